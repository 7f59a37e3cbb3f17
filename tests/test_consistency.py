"""The same global batch on 1 rank, on 2 ranks (ZeRO 0 and 3, and packed) and on 2 nodes x 1 rank gives the same
losses."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import DATA, REPO, clean_shm, free_port, read_metrics, run_deepspeed, run_python

pytestmark = pytest.mark.e2e


def train_values(out: str, key: str) -> list[float]:
    return [m[key] for m in read_metrics(out) if m["split"] == "train"]


@pytest.mark.parametrize("script,data,lr,tolerances,runs", [
    # SFT also with --packing on 2 ranks: packed micro-batches train the same curve as padded ones.
    ("step1_sft/main.py", "sft.jsonl", "3e-3", {"loss": 2e-5}, [("0", []), ("3", []), ("0", ["--packing"])]),
    # DPO: the policy and the frozen reference are both sharded under ZeRO-3 on 2 ranks.
    pytest.param("dpo/main.py", "preference.jsonl", "1e-3", {"loss": 2e-5, "rewards/margins": 1e-4},
                 [("0", []), ("3", [])], marks=pytest.mark.slow),
])
def test_one_rank_equals_two_ranks(tiny_dir, tmp_path, script, data, lr, tolerances, runs):
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, data),
              "--learning_rate", lr, "--max_steps", "8", "--log_interval", "1"]
    one = str(tmp_path / "one")
    p = run_python(script, common + ["--output_dir", one, "--per_device_train_batch_size", "8", "--zero_stage", "0"])
    assert p.returncode == 0, p.stderr[-3000:]
    ref = train_values(one, "loss")
    assert len(ref) == 8 and ref[-1] < ref[0] - 0.05, ref
    for stage, extra in runs:
        out = str(tmp_path / f"two-z{stage}{''.join(extra)}")
        run_deepspeed(script, common + ["--output_dir", out, "--per_device_train_batch_size", "4",
                                        "--zero_stage", stage, *extra])
        for key, tol in tolerances.items():
            got, want = train_values(out, key), train_values(one, key)
            assert got == pytest.approx(want, abs=tol), (stage, extra, key, got, want)
    if script == "step1_sft/main.py":
        nodes = str(tmp_path / "two-nodes")
        run_two_nodes("sft", common + ["--output_dir", nodes, "--per_device_train_batch_size", "4", "--max_seq_len",
                                       "512", "--zero_stage", "0"])
        assert train_values(nodes, "loss") == pytest.approx(train_values(str(tmp_path / "two-z0"), "loss"), abs=1e-6)


def run_two_nodes(step: str, args: list[str]) -> None:
    """Two "nodes" of one rank on this machine, started the way multi-node runs start without ssh: one
    launch/run.sh per node (NUM_NODES, NODE_RANK, MASTER_ADDR -> `deepspeed --no_ssh --node_rank i`)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "ZERO_STAGE", "OFFLOAD")}
    env.update(NUM_NODES="2", NGPUS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MODEL_SIZE="tiny")
    procs = [subprocess.Popen(["bash", os.path.join(REPO, "launch/run.sh"), step, *args], cwd=REPO,
                              env=dict(env, NODE_RANK=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        clean_shm(port)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, (i, out[-4000:])
    assert "world=2" in outs[0]  # one process group over both nodes
