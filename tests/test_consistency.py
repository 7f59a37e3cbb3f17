"""The same global batch on 1 rank and on 2 ranks (ZeRO 0 and 3) gives the same losses."""
from __future__ import annotations

import os

import pytest

from conftest import DATA, read_metrics, run_deepspeed, run_python

pytestmark = pytest.mark.e2e


def losses(out: str) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if m["split"] == "train"]


def test_sft_one_rank_equals_two_ranks(tiny_dir, tmp_path):
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--learning_rate", "3e-3", "--max_steps", "8", "--log_interval", "1"]
    one = str(tmp_path / "one")
    p = run_python("step1_sft/main.py", common + ["--output_dir", one, "--per_device_train_batch_size", "8",
                                                  "--zero_stage", "0"])
    assert p.returncode == 0, p.stderr[-3000:]
    ref = losses(one)
    assert len(ref) == 8
    for stage in ("0", "3"):
        out = str(tmp_path / f"two-z{stage}")
        run_deepspeed("step1_sft/main.py", common + ["--output_dir", out, "--per_device_train_batch_size", "4",
                                                     "--zero_stage", stage])
        assert losses(out) == pytest.approx(ref, abs=2e-5), (stage, losses(out), ref)


def test_dpo_one_rank_equals_two_ranks(tiny_dir, tmp_path):
    """DPO: policy and frozen reference, sharded under ZeRO-3 on 2 ranks, give the 1-rank losses and margins."""
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "preference.jsonl"),
              "--learning_rate", "1e-3", "--max_steps", "8", "--log_interval", "1"]
    one = str(tmp_path / "one")
    p = run_python("dpo/main.py", common + ["--output_dir", one, "--per_device_train_batch_size", "8",
                                            "--zero_stage", "0"])
    assert p.returncode == 0, p.stderr[-3000:]
    ref = read_metrics(one)
    assert len(losses(one)) == 8 and losses(one)[-1] < losses(one)[0] - 0.05, losses(one)
    for stage in ("0", "3"):
        out = str(tmp_path / f"two-z{stage}")
        run_deepspeed("dpo/main.py", common + ["--output_dir", out, "--per_device_train_batch_size", "4",
                                               "--zero_stage", stage])
        assert losses(out) == pytest.approx(losses(one), abs=2e-5), (stage, losses(out), losses(one))
        margins = [m["rewards/margins"] for m in read_metrics(out) if m["split"] == "train"]
        assert margins == pytest.approx([m["rewards/margins"] for m in ref if m["split"] == "train"], abs=1e-4), stage
