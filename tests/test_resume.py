"""Kill -9 after a checkpoint, --resume, and the remaining losses match an uninterrupted run."""
from __future__ import annotations

import os
import shutil

import pytest

from conftest import DATA, last_by_step, read_metrics, run_deepspeed, run_killed_after_checkpoint

pytestmark = pytest.mark.e2e


def test_sft_resume_matches_uninterrupted(tiny_dir, tmp_path):
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--learning_rate", "3e-3", "--max_steps", "120", "--per_device_train_batch_size", "4",
              "--log_interval", "1", "--save_interval", "10", "--save_total_limit", "2", "--zero_stage", "2"]
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    run_deepspeed("step1_sft/main.py", common + ["--output_dir", full])
    run_killed_after_checkpoint("step1_sft/main.py", common + ["--output_dir", broken], broken)
    assert not os.path.exists(os.path.join(broken, "model.safetensors"))
    p = run_deepspeed("step1_sft/main.py", common + ["--output_dir", broken, "--resume"])
    resumed_at = int(p.stdout.split("resumed from")[1].split("at step")[1].split()[0])
    assert resumed_at >= 10
    a, b = last_by_step(read_metrics(full)), last_by_step(read_metrics(broken))
    later = [s for s in a if s > resumed_at]
    assert len(later) >= 10
    for s in later:
        assert b[s] == pytest.approx(a[s], abs=1e-5), (s, a[s], b[s])
    ev_a, ev_b = last_by_step(read_metrics(full), "eval"), last_by_step(read_metrics(broken), "eval")
    assert ev_b[120] == pytest.approx(ev_a[120], abs=1e-5)
    # Only complete checkpoints remain, at most --save_total_limit of them.
    ckpts = os.listdir(os.path.join(broken, "checkpoints"))
    assert all(c.startswith("step-") for c in ckpts) and len(ckpts) <= 2


@pytest.mark.parametrize("stage", [["--zero_stage", "0"], ["--zero_stage", "1"], ["--zero_stage", "2", "--offload"]])
def test_every_zero_stage_resumes_through_the_weights_only_loader(tiny_dir, tmp_path, stage):
    """The checkpoint files of ZeRO-0/1/2 (+ CPU-offloaded Adam) hold nothing the weights_only loader refuses
    (ZeRO-3 is covered by the reward-model and PPO resume tests), and the resumed steps match."""
    out = str(tmp_path / "o")
    args = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
            "--learning_rate", "3e-3", "--max_steps", "6", "--per_device_train_batch_size", "4", "--log_interval",
            "1", "--save_interval", "3", "--output_dir", out, *stage]
    run_deepspeed("step1_sft/main.py", args)
    full = last_by_step(read_metrics(out))
    shutil.rmtree(os.path.join(out, "checkpoints", "step-6"))
    p = run_deepspeed("step1_sft/main.py", args + ["--resume"])
    assert "at step 3" in p.stdout
    again = last_by_step(read_metrics(out))
    assert [again[s] for s in (4, 5, 6)] == pytest.approx([full[s] for s in (4, 5, 6)], abs=1e-5)


def test_resume_refuses_changed_batch(tiny_dir, tmp_path):
    out = str(tmp_path / "o")
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--max_steps", "4", "--save_interval", "2", "--output_dir", out]
    run_deepspeed("step1_sft/main.py", common + ["--per_device_train_batch_size", "4"])
    p = run_deepspeed("step1_sft/main.py", common + ["--per_device_train_batch_size", "8", "--resume"], check=False)
    assert p.returncode != 0
    assert "--per_device_train_batch_size 4 -> 8" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr


def test_nan_loss_stops_with_step_and_keeps_checkpoints(tiny_dir, tmp_path):
    """An exploding learning rate drives the loss to NaN/inf within a few steps."""
    from conftest import run_python

    out = str(tmp_path / "nan")
    p = run_python("step1_sft/main.py", [
        "--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"), "--output_dir", out,
        "--learning_rate", "1e8", "--max_grad_norm", "0", "--max_steps", "30", "--save_interval", "1",
        "--zero_stage", "0"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    import re

    m = re.search(r"loss is (nan|inf|-inf) at step (\d+)", p.stderr)
    assert m, p.stderr[-2000:]
    step = int(m.group(2))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts and all(c.startswith("step-") for c in ckpts)
    assert max(int(c.split("-")[1]) for c in ckpts) == step - 1
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("script,extra", [
    ("step2_reward/main.py", ["--learning_rate", "1e-3", "--zero_stage", "3"]),
    ("dpo/main.py", ["--learning_rate", "1e-4", "--zero_stage", "2"]),
])
def test_pairs_programs_resume_after_kill(tiny_dir, tmp_path, script, extra):
    """Reward model and DPO: SIGKILL after a checkpoint, --resume, same later losses."""
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "preference.jsonl"),
              "--max_steps", "60", "--per_device_train_batch_size", "4", "--log_interval", "1",
              "--save_interval", "10", *extra]
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    run_deepspeed(script, common + ["--output_dir", full])
    run_killed_after_checkpoint(script, common + ["--output_dir", broken], broken)
    p = run_deepspeed(script, common + ["--output_dir", broken, "--resume"])
    resumed_at = int(p.stdout.split("resumed from")[1].split("at step")[1].split()[0])
    a, b = last_by_step(read_metrics(full)), last_by_step(read_metrics(broken))
    later = [s for s in a if s > resumed_at]
    assert len(later) >= 10, (resumed_at, sorted(a))
    for s in later:
        assert b[s] == pytest.approx(a[s], abs=1e-5), (s, a[s], b[s])
