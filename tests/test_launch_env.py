"""How a program behaves in the environment a cluster's launcher leaves: scheduler task variables
without RANK, half a rendezvous environment, a LOCAL_RANK beyond the visible GPUs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, assert_user_error
from utils.ds import launch_env_problem

RDZV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODELIST": "node[1-2]"}


@pytest.mark.parametrize("env", [
    {},  # plain `python main.py`
    {"MASTER_PORT": "29600"},  # one process on a chosen port (README)
    {"MASTER_ADDR": "10.0.0.1"},  # exported cluster-wide
    RDZV,  # deepspeed, torchrun
    {**RDZV, **SLURM},  # `deepspeed` or torchrun inside an srun task set RANK
    {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # srun --ntasks 1
    {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8"},  # `srun -n 1` inside an 8-task allocation
])
def test_environments_that_start_the_group_the_user_meant(env):
    assert launch_env_problem(env) is None


@pytest.mark.parametrize("env,expected", [
    (SLURM, "SLURM_NTASKS=2: .*no RANK.*NUM_NODES, NODE_RANK and MASTER_ADDR.*srun --ntasks 1"),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8"}, "SLURM_STEP_NUM_TASKS=4"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE=2"),
    ({"RANK": "0"}, "sets RANK but not WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: .*unset RANK"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "not LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
])
def test_environments_refused_in_one_line(env, expected):
    import re

    problem = launch_env_problem(env)
    assert problem and "\n" not in problem and re.search(expected, problem), problem


@pytest.mark.parametrize("env", [SLURM, {"OMPI_COMM_WORLD_SIZE": "2"}, {"RANK": "0"}])
def test_with_mpi4py_deepspeed_reads_the_ranks_from_mpi(env):
    """DeepSpeed's own `--launcher openmpi` and `slurm` start ranks without RANK and rely on MPI discovery
    (mpi4py): with it installed those launches are left to DeepSpeed, not refused."""
    assert launch_env_problem(env, mpi=True) is None
    assert "LOCAL_RANK=1" in launch_env_problem({**env, "LOCAL_RANK": "1"}, 1, mpi=True)


def test_local_rank_beyond_the_visible_gpus():
    env = {**RDZV, "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "3"}
    assert "LOCAL_RANK=1 but this process sees 1 GPU(s) (CUDA_VISIBLE_DEVICES=3)" in launch_env_problem(env, 1)
    assert launch_env_problem(env, 2) is None
    assert launch_env_problem(env, 0) is None  # CPU ranks have no device index


@pytest.mark.parametrize("script", ["step1_sft/main.py"])
def test_srun_tasks_without_rank_are_refused_before_writing(script, tiny_dir, tmp_path):
    """`srun -n 2 python main.py` (simulated: srun's variables, no RANK): task 0 trained alone as a 1-rank
    job while task 1 was refused as "being written by another run" (on two nodes both trained into one
    directory). Every task now exits 2 in one line and nothing is written or locked."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = REPO
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, script), "--model_name_or_path", tiny_dir(),
                               "--data_path", os.path.join(REPO, "data/preference.jsonl" if "dpo" in script
                                                           else "data/sft.jsonl"),
                               "--output_dir", str(out), "--max_steps", "1"], cwd=REPO,
                              env={**env, **SLURM, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        done = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        assert_user_error(done, r"^error: SLURM_NTASKS=2: the launcher started 2 copies")
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")


def test_ops_folder_falls_back_to_the_temporary_directory_then_refuses(tmp_path, monkeypatch):
    """A read-only environment (sys.prefix) on nodes with a read-only HOME: torch's op build ended every
    run in an OSError traceback. The ops go to a folder of this user under the temporary directory; with
    nothing writable, and for an unwritable TORCH_EXTENSIONS_DIR, one line names the variable to set."""
    import tempfile

    from utils import ds
    from utils.errors import UserError

    blocked = tmp_path / "a-file"  # as root every directory is writable: a file in the path blocks makedirs
    blocked.write_text("")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(blocked / "env"))
    monkeypatch.setenv("HOME", str(blocked / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    path = ds.extensions_dir()
    assert path.startswith(str(tmp_path / "tmp" / f"ds-rlhf-{os.getuid()}")) and os.path.isdir(path)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == path

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked / "tmp"))
    with pytest.raises(UserError, match="no writable folder for DeepSpeed's C\\+\\+ ops .*set TORCH_EXTENSIONS_DIR"):
        ds.extensions_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocked))
    with pytest.raises(UserError, match="TORCH_EXTENSIONS_DIR '.*a-file' is not a writable directory"):
        ds.extensions_dir()


WAITING_RANK = r"""
import os, sys
from utils import ds
from utils.errors import exit_on_user_error
print("entering init_distributed", flush=True)
exit_on_user_error(ds.init_distributed)(0)  # rank 0 never comes: the rendezvous waits
"""


def test_a_rank_waiting_in_the_rendezvous_stops_when_its_launcher_exits(tmp_path):
    """launch/run.sh NUM_NODES=2 with node 1 never started: SIGTERM to run.sh ended the `deepspeed` command
    only, and node 0's rank waited out the rendezvous timeout (601 s) before a DistStoreError traceback.
    It now sees its launcher exit within seconds and ends with 143, in one line."""
    import socket
    import time

    from conftest import free_port

    launcher = subprocess.Popen(["sleep", "120"])
    env = dict(os.environ, PYTHONPATH=REPO, RANK="1", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), RLHF_WATCH_PIDS=f"{socket.gethostname()}:{launcher.pid}")
    rank = subprocess.Popen([sys.executable, "-c", WAITING_RANK], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "entering init_distributed"
        time.sleep(3)
        assert rank.poll() is None  # waiting for its peer
        launcher.kill()
        launcher.wait()
        start = time.time()
        _, stderr = rank.communicate(timeout=30)
        assert time.time() - start < 10, time.time() - start
    finally:
        launcher.kill()
        rank.kill()
        rank.wait()
    assert rank.returncode == 143, stderr
    assert "Traceback" not in stderr and "stopped before training started: saw its launcher" in stderr, stderr


def test_a_rendezvous_that_times_out_is_one_line(monkeypatch, capsys):
    """Node 0 waiting for a node that never came ended, after the rendezvous timeout, in a DistStoreError
    traceback; it is now one line naming the variables every node must share (exit 2)."""
    import deepspeed
    import torch.distributed as dist

    from utils import ds
    from utils.errors import exit_on_user_error

    def times_out(**kw):
        raise dist.DistStoreError("Timed out after 601 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(deepspeed, "init_distributed", times_out)
    monkeypatch.setattr(ds.signals, "install", lambda on_exit=None: None)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(ds.init_distributed)(0)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rank 0 of 2 gave up waiting for the other ranks at MASTER_ADDR=10.0.0.1 "
                          "MASTER_PORT=29500 (Timed out after 601 seconds") and "\n" not in err, err


def test_a_busy_master_port_is_one_line(tmp_path):
    """Two jobs on one machine with deepspeed's default port: the second one's rank 0 could not listen and
    ended in a DistNetworkError traceback. It is now one line naming the port and how to choose another."""
    import socket

    from conftest import free_port

    port = free_port()
    busy = socket.socket()
    busy.bind(("0.0.0.0", port))
    busy.listen()
    try:
        env = dict(os.environ, PYTHONPATH=REPO, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        p = subprocess.run([sys.executable, "-c", WAITING_RANK], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    finally:
        busy.close()
    assert_user_error(p, rf"^error: MASTER_PORT {port} is in use on this machine .*--master_port")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_build_lock_left_by_an_interrupted_build_is_removed(tmp_path, monkeypatch):
    """Ctrl-C during the first build of DeepSpeed's shm op left torch's empty `lock` file in the op's folder,
    and every later run waited for it silently, without end (measured: killed by `timeout 60`, nothing
    printed). The build now runs under our own flock, which makes such a file provably stale."""
    import importlib

    from utils import ds

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` gives deepspeed.comm's torch

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.write_text("")
    seen = []
    monkeypatch.setattr(ds_torch, "build_shm_op", lambda: seen.append(stale.exists()))
    ds.build_ops()
    assert seen == [False] and (tmp_path / "deepspeed_shm_comm").is_dir()
