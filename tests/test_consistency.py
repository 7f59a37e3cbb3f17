"""The same global batch on 1 rank and on 2 ranks (ZeRO 0 and 3, and packed) gives the same losses."""
from __future__ import annotations

import os

import pytest

from conftest import DATA, read_metrics, run_deepspeed, run_python

pytestmark = pytest.mark.e2e


def train_values(out: str, key: str) -> list[float]:
    return [m[key] for m in read_metrics(out) if m["split"] == "train"]


@pytest.mark.parametrize("script,data,lr,tolerances,runs", [
    # SFT also with --packing on 2 ranks: packed micro-batches train the same curve as padded ones.
    ("step1_sft/main.py", "sft.jsonl", "3e-3", {"loss": 2e-5}, [("0", []), ("3", []), ("0", ["--packing"])]),
    # DPO: the policy and the frozen reference are both sharded under ZeRO-3 on 2 ranks.
    ("dpo/main.py", "preference.jsonl", "1e-3", {"loss": 2e-5, "rewards/margins": 1e-4}, [("0", []), ("3", [])]),
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
