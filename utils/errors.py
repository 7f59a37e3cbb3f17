"""User-facing errors: bad input, bad paths, bad flags.

A `UserError` is printed as one clear line (no traceback) and the program exits with status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error caused by the user's input; its message names the file, line and field where known."""


def location(path: str, line: int | None = None, row: int | None = None) -> str:
    """Where a record is: `path:line` for a text line (or a record number of a .json/.parquet file),
    `source row i` for a record read through `datasets` (0-based, as `dataset[i]`), else the path."""
    if line is not None:
        return f"{path}:{line}"
    if row is not None:
        return f"{path} row {row}"
    return str(path)


class DataError(UserError):
    def __init__(self, path: str, line: int | None, field: str | None, problem: str, row: int | None = None):
        where = location(path, line, row)
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.row, self.field, self.problem = path, line, row, field, problem


def at_record(where: str, error: UserError) -> UserError:
    """`error` (raised while rendering or encoding one record) with the record's location in front."""
    msg = str(error)
    return error if not where or msg.startswith(where) else UserError(f"{where}: {msg}")


def exit_on_user_error(fn):
    """Decorator for entry points: a UserError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
