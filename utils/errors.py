"""User-facing errors: bad input, bad paths, bad flags.

A `UserError` is printed as one clear line (no traceback) and the program exits with status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """An error caused by the user's input; its message names the file, line and field where known.

    `every_rank`: every rank raises this same error at the same point (they agreed on it through a
    collective), so rank 0 alone prints it; the others leave after it has."""

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
    then reports that signal instead of the user's error (see utils.ds.finish).

    A rank whose peer ended first (its own error, an OOM kill, `kill -9`) fails in its next collective
    with a gloo or NCCL error that says only where this rank was waiting; it prints that in one line
    (`lost_peer_line`) and leaves with status 1, so the peer's own message is the one the user reads."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            group = _process_group()
            if group is None or group[1] == 1 or not lost_peer(e):
                raise
            print(lost_peer_line(group[0], e), file=sys.stderr, flush=True)
            from . import ds

            ds.leave(1)
        except UserError as e:
            group = _process_group()
            if group is None:  # before the group exists every rank of a machine checks the same flags and
                quiet = os.environ.get("LOCAL_RANK", "0") != "0"  # files: its local rank 0 speaks for them
            else:
                quiet = e.every_rank and group[0] != 0
            if not quiet:
                print(f"error: {e}", file=sys.stderr, flush=True)
            if group is not None and group[1] > 1:
                from . import ds

                if e.every_rank:  # the quiet ranks wait for rank 0's line: the launcher kills the others
                    try:          # (within a second) once one rank has exited with an error
                        ds.barrier()
                    except RuntimeError:
                        pass
                ds.leave(2)
            sys.exit(2)

    return wrapper


_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited or there was a network error")


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank went away (gloo's and NCCL's wording)."""
    text = str(e)
    return any(m in text for m in _LOST_PEER)


def lost_peer_line(rank: int, e: BaseException) -> str:
    """One line for a rank that lost its peers: where this rank was (the innermost frame of the project)."""
    import traceback

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if frame.filename.startswith(root + os.sep) and not frame.filename.endswith(
                (os.path.join("utils", "ds.py"), os.path.join("utils", "errors.py"))):
            where = f" in {frame.name} ({os.path.relpath(frame.filename, root)}:{frame.lineno})"
            break
    return (f"error: rank {rank} stopped{where}: another rank of this job ended first (failed or was killed); "
            "its own message, above or in its log, says why")


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed is initialised, else None (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()
