"""User-facing errors: bad input, bad paths, bad flags.

A `UserError` is printed as one clear line (no traceback) and the program exits with status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """An error caused by the user's input; its message names the file, line and field where known.

    `every_rank`: every rank raises this same error at the same point (they agreed on it through a
    collective), so rank 0 alone prints it."""

    def __init__(self, message: str = "", every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


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
    """Decorator for entry points: a UserError becomes `error: <message>` on stderr and exit code 2.

    Once a multi-rank process group exists the rank leaves with `os._exit(2)` after flushing its streams
    and removing its shared-memory buffers: interpreter teardown of a gloo group whose peer is exiting
    too can abort the rank ("terminate called without an active exception", SIGABRT), and the launcher
    then reports that signal instead of the user's error (see utils.ds.finish)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            group = _process_group()
            if not (e.every_rank and group is not None and group[0] != 0):
                print(f"error: {e}", file=sys.stderr, flush=True)
            if group is not None and group[1] > 1:
                from . import ds

                ds.leave(2)
            sys.exit(2)

    return wrapper


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed is initialised, else None (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()
