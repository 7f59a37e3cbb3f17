"""utils.errors.exit_on_user_error on ranks of a real 2-process gloo group: an error every rank agreed on
is printed once (by rank 0) and every rank exits 2; an error of one rank is printed by that rank (exit 2),
and the rank left waiting for it says so in one line (exit 1)."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, free_port

SCRIPT = """
import os, sys
import torch.distributed as dist
from utils.errors import UserError, exit_on_user_error

@exit_on_user_error
def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if sys.argv[1] == "every":
        raise UserError("same on every rank", every_rank=True)
    if rank == 1:
        raise UserError("only rank one")
    dist.barrier()  # rank 0 waits for its peer, which has left: the peer's exit ends the job

main()
"""


def run_two_ranks(mode: str) -> list[subprocess.CompletedProcess]:
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, mode], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=REPO, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_an_error_every_rank_raised_is_printed_once_and_every_rank_exits_2():
    r0, r1 = run_two_ranks("every")
    assert (r0.returncode, r1.returncode) == (2, 2), (r0.stderr[-1500:], r1.stderr[-1500:])
    assert r0.stderr.strip().splitlines()[-1] == "error: same on every rank" and "error:" not in r1.stderr
    assert "Traceback" not in r0.stderr + r1.stderr and "Aborted" not in r0.stderr + r1.stderr


def test_an_error_of_one_rank_is_printed_by_that_rank():
    r0, r1 = run_two_ranks("one")
    assert r1.returncode == 2 and r1.stderr.strip().splitlines()[-1] == "error: only rank one", r1.stderr[-1500:]
    # Rank 0 fails in its barrier, its peer gone (a launcher may have stopped it by then): one line, no
    # gloo traceback, so the peer's message is the one that reads as the cause.
    assert r0.returncode == 1 and "Traceback" not in r0.stderr, r0.stderr[-1500:]
    assert r0.stderr.strip().splitlines()[-1].startswith("error: rank 0 stopped: another rank of this job ended "
                                                         "first"), r0.stderr[-1500:]
