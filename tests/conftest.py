"""Shared fixtures: tiny models per family (built once per session) and a `deepspeed` launcher."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> path of a random-init tiny model + tokenizer of that family (cached per session)."""
    from utils.tiny import make_tiny_model

    made = {}

    def get(family: str = "llama") -> str:
        if family not in made:
            made[family] = make_tiny_model(family, str(tmp_path_factory.mktemp(f"tiny-{family}")))
        return made[family]

    return get


@pytest.fixture(scope="session")
def tokenizer_of(tiny_dir):
    from transformers import AutoTokenizer

    cache = {}

    def get(family: str = "llama"):
        if family not in cache:
            cache[family] = AutoTokenizer.from_pretrained(tiny_dir(family))
        return cache[family]

    return get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_shm(port: int) -> list[str]:
    """Remove DeepSpeed's shared-memory buffers of a run that was killed (normal exits clean up);
    returns the paths it found."""
    import glob

    found = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    for path in found:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return found


def run_deepspeed(script: str, args: list[str], num_gpus: int = 2, timeout: int = 600,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Launch `deepspeed --num_gpus N script args` from the repo root; returns the finished process."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(port),
           os.path.join(REPO, script), *map(str, args)]
    # PYTHONFAULTHANDLER: a rank that dies on a signal (SIGABRT, SIGSEGV) prints its Python stacks.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONFAULTHANDLER="1")
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        left = clean_shm(port)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}")
    if check:  # a run that ended normally removed its own /dev/shm buffers (utils.ds.finish)
        assert not left, left
    return p


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python script args` as one process (for error-path tests)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(p: subprocess.CompletedProcess, expected: str, what: str = "") -> None:
    """The run failed as bad input should: exit status 2, a message matching `expected` (a regex) on
    stderr, no Python traceback."""
    assert p.returncode == 2, (what, p.returncode, p.stderr[-2000:])
    assert re.search(expected, p.stderr), (what, expected, p.stderr[-2000:])
    assert "Traceback" not in p.stdout + p.stderr, (what, p.stderr[-2000:])


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def ultrafeedback(row: dict, messages: bool = True) -> dict:
    """A {"prompt", "chosen", "rejected"} row of data/preference.jsonl (or a {"prompt", "response"} row of
    data/sft.jsonl, as chosen only) in the ultrafeedback_binarized layout: chosen/rejected as whole
    conversations that repeat the user turn, scores, an id, and (optionally) a `messages` column holding
    the chosen conversation."""
    user = {"role": "user", "content": row["prompt"]}
    out = {"prompt": row["prompt"], "prompt_id": str(len(row["prompt"])),
           "chosen": [user, {"role": "assistant", "content": row.get("chosen", row.get("response"))}],
           "score_chosen": 8.0}
    if "rejected" in row:
        out.update(rejected=[user, {"role": "assistant", "content": row["rejected"]}], score_rejected=3.0)
    if messages:
        out["messages"] = out["chosen"]
    return out


def save_to_disk(rows: list[dict], path) -> str:
    """A `datasets.Dataset.save_to_disk` directory of `rows`."""
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def hub_layout(rows: list[dict], path) -> str:
    """A directory laid out like a hub dataset repository: data/train-00000-of-00001.parquet."""
    import datasets

    datasets.disable_progress_bars()
    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(os.path.join(path, "data", "train-00000-of-00001.parquet"))
    return str(path)


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_by_step(metrics: list[dict], split: str = "train", key: str = "loss") -> dict:
    """The last logged value per step (a killed run's lines after its checkpoint are redone on resume)."""
    return {m["step"]: m[key] for m in metrics if m["split"] == split and key in m}


def run_killed_after_checkpoint(script: str, args: list[str], out: str, timeout: float = 300) -> str:
    """Start a 2-rank run, SIGKILL the whole process group once a checkpoint is complete."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.join(REPO, script), *args]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    root = os.path.join(out, "checkpoints")
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            done = [d for d in os.listdir(root) if d.startswith("step-")] if os.path.isdir(root) else []
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return max(done, key=lambda d: int(d.split("-")[1]))
            if proc.poll() is not None:
                raise AssertionError(f"run finished before a checkpoint was written (rc {proc.returncode})")
            time.sleep(0.05)
        raise AssertionError("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        clean_shm(port)
