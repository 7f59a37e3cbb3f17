"""User-facing errors: bad input, bad paths, bad flags.

A `UserError` is printed as one clear line (no traceback) and the program exits with status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error caused by the user's input; its message names the file, line and field where known."""


class DataError(UserError):
    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        where = f"{path}:{line}" if line is not None else str(path)
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field, self.problem = path, line, field, problem


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
