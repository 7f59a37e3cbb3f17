"""Shared fixtures: tiny models per family (built once per session) and a `deepspeed` launcher."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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


def clean_shm(port: int) -> None:
    """Remove DeepSpeed's shared-memory buffers of a run that was killed (normal exits clean up)."""
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def run_deepspeed(script: str, args: list[str], num_gpus: int = 2, timeout: int = 600,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Launch `deepspeed --num_gpus N script args` from the repo root; returns the finished process."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(port),
           os.path.join(REPO, script), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        clean_shm(port)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}")
    return p


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python script args` as one process (for error-path tests)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
