"""A rank that fails or is killed under 2 ranks: the job ends in one line per cause, with no traceback from
the ranks that were only waiting for it, and no rank's /dev/shm buffer left behind."""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess

import pytest

from conftest import DATA, REPO, clean_shm, free_port, partial, run_stopped

pytestmark = pytest.mark.e2e
LOST_PEER = "another rank of this job ended first"


def test_a_killed_rank_ends_the_job_in_one_line_and_leaves_no_buffer(tiny_dir, tmp_path):
    """`kill -9` of rank 1 (an OOM kill): rank 0 used to end in a gloo traceback, and rank 1's shared-memory
    buffer stayed in /dev/shm. run_stopped asserts that the job ends within 60 s and leaves no buffer."""
    out = str(tmp_path / "out")
    stop = run_stopped("step1_sft/main.py", ["--model_name_or_path", tiny_dir("llama"), "--data_path",
                                             os.path.join(DATA, "sft.jsonl"), "--output_dir", out, "--max_steps",
                                             "5000", "--log_interval", "1"],
                       out, after=5, sig=signal.SIGKILL, target="rank1")
    assert stop["rc"] != 0
    assert "Traceback" not in stop["output"], stop["output"][-3000:]
    lines = [line for line in stop["output"].splitlines() if LOST_PEER in line]
    assert len(lines) == 1 and re.search(r"error: rank 0 stopped in \w+ \(\S+\.py:\d+\)", lines[0]), lines


def _run_under_file_size_limit(args: list, limit: int) -> subprocess.CompletedProcess:
    """A 2-rank SFT run whose processes cannot write a file larger than `limit` bytes (as on a full disk)."""
    from deepspeed.comm.torch import build_shm_op

    from utils.ds import extensions_dir

    extensions_dir()
    build_shm_op()  # the launched ranks load the op: it must not be built under the limit
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.join(REPO, "step1_sft/main.py"),
           *map(str, args)]
    env = dict(os.environ, PYTHONPATH=REPO)
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    finally:
        assert not clean_shm(port)


@pytest.mark.parametrize("save_interval,expected", [
    (0, r"error: could not write the model to '.*\.partial': .*File too large"),
    (2, r"error: could not write checkpoint '.*step-2': the file came out short"),
])
def test_a_failed_write_under_two_ranks_is_one_line(tiny_dir, tmp_path, save_interval, expected):
    """A file-size limit below the model's size: the final save (rank 0 writes, rank 1 waits) and a periodic
    checkpoint (every rank writes its shard) end with exit 2 and the write's own message; rank 1 used to
    end the final save in a gloo traceback, and a failed checkpoint was a torch traceback. Nothing
    half-written is left. In a checkpoint both ranks' shards are refused: each rank used to print its own
    line and exit, and the launcher sometimes killed the slower rank before it had (CI saw one line
    instead of two); the ranks now agree and rank 0 prints the first refusal."""
    out = tmp_path / "out"
    p = _run_under_file_size_limit(["--model_name_or_path", tiny_dir("llama"), "--data_path",
                                    os.path.join(DATA, "sft.jsonl"), "--output_dir", out, "--max_steps", "3",
                                    "--save_interval", save_interval], limit=300_000)
    output = p.stdout + p.stderr
    assert p.returncode == 2, output[-3000:]
    assert "Traceback" not in output and LOST_PEER not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1 and re.search(expected, errors[0]), errors
    left = sorted(os.listdir(tmp_path))
    assert left == ["out.partial"], left  # no OUT.partial.tmp
    ckpts = os.path.join(partial(str(out)), "checkpoints")
    assert not os.path.isdir(ckpts) or os.listdir(ckpts) == [], os.listdir(ckpts)


def test_a_hangup_stops_the_job_with_a_checkpoint_unless_started_under_nohup(tiny_dir, tmp_path):
    """SIGHUP to the whole job (a closed terminal, a dropped ssh session) killed every process at once with
    no checkpoint and left the /dev/shm buffers; it is now a stop request like SIGTERM. A job started
    under `nohup` ignores it and trains to the end."""
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--log_interval", "1"]
    out = str(tmp_path / "hup")
    stop = run_stopped("step1_sft/main.py", common + ["--output_dir", out, "--max_steps", "5000"], out, after=5,
                       sig=signal.SIGHUP, target="group")
    assert stop["step"] is not None and os.path.isfile(
        os.path.join(partial(out), "checkpoints", f"step-{stop['step']}", "meta.json")), stop["output"][-3000:]
    assert "received SIGHUP" in stop["output"] and "resume with: " in stop["output"], stop["output"][-3000:]
    out = str(tmp_path / "nohup")
    done = run_stopped("step1_sft/main.py", common + ["--output_dir", out, "--max_steps", "40"], out, after=5,
                       sig=signal.SIGHUP, target="group", ignore_hangup=True)
    assert done["rc"] == 0 and os.path.isfile(os.path.join(out, "done.json")), done["output"][-3000:]



RENDEZVOUS_SCRIPT = r"""
import os, sys
os.environ.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from utils import ds
print("entering init_distributed", flush=True)
ds.init_distributed(0)  # rank 0 never comes: the rendezvous waits
print("past the rendezvous", flush=True)
"""


def test_a_stop_signal_ends_a_rank_waiting_in_the_rendezvous_at_once():
    """A rank whose peer exits before the rendezvous (rank 0 refusing a busy --output_dir) waits in
    init_distributed's C++ connect loop, which retries on EINTR; our Python handler ran only when the
    call returned, so the launcher's SIGTERM did nothing until its SIGKILL 30 s later. The stop signals
    now keep their default action there."""
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", RENDEZVOUS_SCRIPT, str(free_port())], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        while "entering init_distributed" not in p.stdout.readline():
            assert p.poll() is None, p.stdout.read()
        time.sleep(2)  # inside the rendezvous
        start = time.time()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == -signal.SIGTERM and time.time() - start < 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
