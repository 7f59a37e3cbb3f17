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
