"""Stopping and resuming: SIGTERM to the launcher (or a signal to one rank) checkpoints and stops the
whole job, a hard kill resumes from the last periodic checkpoint, --resume reproduces the uninterrupted
run (with dropout 0.1), also on another world size and ZeRO stage; output directories are never lost."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from conftest import (DATA, assert_user_error, checkpoints_of, last_by_step, partial, read_metrics, run_deepspeed,
                      run_killed_after_checkpoint, run_python, run_stopped)

pytestmark = pytest.mark.e2e
STOPPED = 143  # utils/signals.py: STOP_EXIT_CODE


def snapshot(root: str) -> dict:
    """Every file under `root` with its size and modification time."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def assert_same_losses(a: dict, b: dict, steps, tol: float) -> None:
    for s in steps:
        assert b[s] == pytest.approx(a[s], abs=tol), (s, a[s], b[s])


def assert_stopped_cleanly(stop: dict, out: str) -> None:
    """Every rank exited 143 after a complete checkpoint at the step they agreed on, with the resume command.
    (A `deepspeed` command that got SIGTERM itself died of it at once; its launcher reports the ranks' code.)"""
    assert stop["rc"] in (STOPPED, -signal.SIGTERM), stop["output"][-3000:]
    assert f"exits with return code = {STOPPED}" in stop["output"], stop["output"][-3000:]
    assert stop["step"] in checkpoints_of(out), (stop["step"], checkpoints_of(out))
    ckpt = os.path.join(partial(out), "checkpoints", f"step-{stop['step']}")
    meta = json.load(open(os.path.join(ckpt, "meta.json")))
    assert meta["step"] == stop["step"] and meta["world_size"] == 2
    assert "resume with: " in stop["output"] and "--resume" in stop["output"].split("resume with: ")[1]


def test_sft_stop_kill_resume_and_overwrite_with_dropout(tiny_dir, tmp_path):
    """OPT (dropout 0.1, which SFT keeps): a finished run is refused without --overwrite_output_dir and left
    untouched; an overwrite run is stopped by SIGTERM to `deepspeed` (the old model stays loadable, its
    metrics intact), resumed, hard-killed after a periodic checkpoint, resumed again: every loss equals
    the uninterrupted run's, and the old metrics end up in metrics.previous.jsonl."""
    from transformers import AutoModelForCausalLM

    common = ["--model_name_or_path", tiny_dir("opt"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--learning_rate", "3e-3", "--max_steps", "40", "--per_device_train_batch_size", "4",
              "--log_interval", "1", "--eval_interval", "20", "--save_interval", "10", "--zero_stage", "2"]
    out = str(tmp_path / "sft")
    run_deepspeed("step1_sft/main.py", common + ["--output_dir", out])
    full = read_metrics(out)
    old_text = open(os.path.join(out, "metrics.jsonl")).read()
    before = snapshot(out)

    p = run_python("step1_sft/main.py", common + ["--output_dir", out])
    assert_user_error(p, f"--output_dir '{out}' holds a finished run.*--overwrite_output_dir")
    assert snapshot(out) == before and not os.path.exists(partial(out))

    stop = run_stopped("step1_sft/main.py", common + ["--output_dir", out, "--overwrite_output_dir"], out, after=13)
    assert_stopped_cleanly(stop, out)
    assert snapshot(out) == before  # the finished run is untouched while the new one trains
    AutoModelForCausalLM.from_pretrained(out)

    args = common + ["--output_dir", out, "--overwrite_output_dir", "--resume"]
    assert run_killed_after_checkpoint("step1_sft/main.py", args, out, newer_than=stop["step"]) in ("step-20",
                                                                                                    "step-30")
    assert snapshot(out) == before
    p = run_deepspeed("step1_sft/main.py", args)
    assert "resumed from" in p.stdout
    assert not os.path.exists(partial(out))
    a, b = last_by_step(full), last_by_step(read_metrics(out))
    assert sorted(b) == list(range(1, 41))
    assert_same_losses(a, b, range(1, 41), 1e-5)
    ev_a, ev_b = last_by_step(full, "eval"), last_by_step(read_metrics(out), "eval")
    assert ev_b[40] == pytest.approx(ev_a[40], abs=1e-5)
    assert open(os.path.join(out, "metrics.previous.jsonl")).read() == old_text
    assert json.load(open(os.path.join(out, "done.json")))["inputs"]["flags"]["max_steps"] == 40
    ckpts = os.listdir(os.path.join(out, "checkpoints"))
    assert all(c.startswith("step-") for c in ckpts) and len(ckpts) <= 2


@pytest.mark.parametrize("stage", [pytest.param(["--zero_stage", "0"], marks=pytest.mark.slow),
                                   pytest.param(["--zero_stage", "1"], marks=pytest.mark.slow),
                                   # slow too: every default-stage resume goes through this loader, and
                                   # CPU Adam's state through it in test_resume_with_optimizer_offload_switched
                                   pytest.param(["--zero_stage", "2", "--offload"], marks=pytest.mark.slow)])
def test_every_zero_stage_resumes_through_the_weights_only_loader(tiny_dir, tmp_path, stage):
    """The checkpoint files of ZeRO-0/1/2 (+ CPU-offloaded Adam) hold nothing the weights_only loader refuses
    (ZeRO-3 is covered by the reward-model, PPO and world-size tests), and the resumed steps match."""
    out, again = str(tmp_path / "o"), str(tmp_path / "again")
    args = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
            "--learning_rate", "3e-3", "--max_steps", "6", "--per_device_train_batch_size", "4", "--log_interval",
            "1", "--save_interval", "3", *stage]
    run_deepspeed("step1_sft/main.py", args + ["--output_dir", out])
    shutil.copytree(os.path.join(out, "checkpoints", "step-3"), os.path.join(partial(again), "checkpoints", "step-3"))
    p = run_deepspeed("step1_sft/main.py", args + ["--output_dir", again, "--resume"])
    assert "at step 3" in p.stdout
    full, resumed = last_by_step(read_metrics(out)), last_by_step(read_metrics(again))
    assert_same_losses(full, resumed, (4, 5, 6), 1e-5)


def test_resume_on_another_world_size_and_zero_stage(tiny_dir, tmp_path):
    """The same global batch (16) split 2 ranks x 8, 1 rank x 16 and 2 ranks x 8 under ZeRO-3: a 2-rank
    ZeRO-2 checkpoint resumes on 1 rank, that run's 1-rank checkpoint resumes on 2 ranks under ZeRO-3
    (DeepSpeed's universal checkpoint), and both continue the uninterrupted curve."""
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--learning_rate", "3e-3", "--max_steps", "12", "--log_interval", "1", "--save_interval", "4",
              "--save_total_limit", "0"]
    full, one, three = str(tmp_path / "full"), str(tmp_path / "one"), str(tmp_path / "three")
    run_deepspeed("step1_sft/main.py", common + ["--output_dir", full, "--per_device_train_batch_size", "8",
                                                 "--zero_stage", "2"])
    ref = last_by_step(read_metrics(full))
    shutil.copytree(os.path.join(full, "checkpoints", "step-4"), os.path.join(partial(one), "checkpoints", "step-4"))
    p = run_python("step1_sft/main.py", common + ["--output_dir", one, "--per_device_train_batch_size", "16",
                                                  "--zero_stage", "2", "--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "universal checkpoint" in p.stdout and "at step 4" in p.stdout
    assert_same_losses(ref, last_by_step(read_metrics(one)), range(5, 13), 1e-4)

    shutil.copytree(os.path.join(one, "checkpoints", "step-8"), os.path.join(partial(three), "checkpoints", "step-8"))
    p = run_deepspeed("step1_sft/main.py", common + ["--output_dir", three, "--per_device_train_batch_size", "8",
                                                     "--zero_stage", "3", "--resume"])
    assert "universal checkpoint" in p.stdout and "at step 8" in p.stdout
    assert_same_losses(ref, last_by_step(read_metrics(three)), range(9, 13), 1e-4)

    # Another global batch, or other inputs, is refused before args.json is rewritten, and before the
    # 2-rank checkpoint is converted for 1 rank.
    shutil.copytree(os.path.join(full, "checkpoints", "step-4"), os.path.join(partial(str(tmp_path / "x")),
                                                                             "checkpoints", "step-4"))
    sentinel = os.path.join(partial(str(tmp_path / "x")), "args.json")
    open(sentinel, "w").write("{}")
    bad = common + ["--output_dir", str(tmp_path / "x"), "--resume", "--zero_stage", "2"]
    p = run_python("step1_sft/main.py", bad + ["--per_device_train_batch_size", "8"])
    assert_user_error(p, "global batch of 16 samples, now it is 8")
    ckpt_x = os.path.join(partial(str(tmp_path / "x")), "checkpoints", "step-4")
    assert "converted" not in p.stdout and not [d for d in os.listdir(ckpt_x) if "universal" in d]  # refused first
    p = run_python("step1_sft/main.py", bad + ["--per_device_train_batch_size", "16", "--learning_rate", "1e-3"])
    assert_user_error(p, r"inputs changed since checkpoint .*--learning_rate 0.003 -> 0.001")
    assert open(sentinel).read() == "{}"


def test_nan_loss_stops_with_step_and_keeps_checkpoints(tiny_dir, tmp_path):
    """An exploding learning rate drives the loss to NaN/inf within a few steps."""
    import re

    out = str(tmp_path / "nan")
    p = run_python("step1_sft/main.py", [
        "--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"), "--output_dir", out,
        "--learning_rate", "1e8", "--max_grad_norm", "0", "--max_steps", "30", "--save_interval", "1",
        "--zero_stage", "0"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    m = re.search(r"loss is (nan|inf|-inf) at step (\d+)", p.stderr)
    assert m, p.stderr[-2000:]
    step = int(m.group(2))
    assert checkpoints_of(out) and max(checkpoints_of(out)) == step - 1
    assert not os.path.exists(out)  # nothing finished: no output directory


@pytest.mark.parametrize("script,extra,target,sig", [
    # Reward model under ZeRO-3: SIGTERM to the `deepspeed` command.
    ("step2_reward/main.py", ["--learning_rate", "1e-3", "--zero_stage", "3"], "launcher", signal.SIGTERM),
    # DPO: SIGUSR1 to rank 1 only; rank 0 learns of it through the per-step agreement. With the reference's
    # log-probs precomputed (sharded over the ranks and gathered; the resumed run computes them again).
    ("dpo/main.py", ["--learning_rate", "1e-4", "--zero_stage", "2", "--precompute_ref_logprobs", "--anchor_coef", "0"],
     "rank1", signal.SIGUSR1),
])
def test_pairs_programs_stop_and_resume(tiny_dir, tmp_path, script, extra, target, sig):
    """Reward model and DPO on OPT (dropout 0.1 in its config; both programs turn it off by default, so this
    checks they still do after a resume): a stop request checkpoints at the same step on both ranks and
    exits 143, --resume gives the uninterrupted losses."""
    common = ["--model_name_or_path", tiny_dir("opt"), "--data_path", os.path.join(DATA, "preference.jsonl"),
              "--max_steps", "30", "--per_device_train_batch_size", "4", "--log_interval", "1",
              "--save_interval", "0", *extra]
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    run_deepspeed(script, common + ["--output_dir", full])
    stop = run_stopped(script, common + ["--output_dir", broken], broken, after=8, sig=sig, target=target)
    assert_stopped_cleanly(stop, broken)
    p = run_deepspeed(script, common + ["--output_dir", broken, "--resume"])
    assert f"at step {stop['step']}" in p.stdout
    a, b = last_by_step(read_metrics(full)), last_by_step(read_metrics(broken))
    later = [s for s in a if s > stop["step"]]
    assert len(later) >= 10, (stop["step"], sorted(a))
    assert_same_losses(a, b, later, 1e-5)


@pytest.mark.parametrize("first,then", [([], ["--offload"]), pytest.param(["--offload"], [], marks=pytest.mark.slow)])
def test_resume_with_optimizer_offload_switched(tiny_dir, tmp_path, first, then):
    """A run checkpointed without --offload (torch's AdamW) and resumed with it (DeepSpeedCPUAdam), as on a
    machine with less GPU memory, failed at its first step with KeyError 'bias_correction'; the other way
    round too the optimizer classes differ. Both now continue with the uninterrupted run's losses."""
    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--max_steps", "8", "--save_interval", "4", "--save_total_limit", "0", "--zero_stage", "2",
              "--log_interval", "1"]
    whole = tmp_path / "whole"
    p = run_python("step1_sft/main.py", common + ["--output_dir", whole] + first)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = tmp_path / "resumed"
    os.makedirs(partial(str(resumed)) + "/checkpoints")
    shutil.copytree(whole / "checkpoints" / "step-4", partial(str(resumed)) + "/checkpoints/step-4")
    p = run_python("step1_sft/main.py", common + ["--output_dir", resumed, "--resume"] + then)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    assert_same_losses(last_by_step(read_metrics(str(whole))), last_by_step(read_metrics(str(resumed))),
                       range(5, 9), 1e-4)


FRESH_OPTIMIZER_SCRIPT = r"""
import os, sys, torch
from transformers import AutoModelForCausalLM
from utils import ds
from utils.checkpoint import load_checkpoint, save_checkpoint

model_dir, root = sys.argv[1], sys.argv[2]
ds.init_distributed(0)
def engine(stage):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = ds.ds_config(stage=stage, offload=False, dtype="fp32", micro_batch=2, grad_accum=1, world=1)
    return ds.init_train_engine(model, cfg=cfg, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), offload=False,
                                scheduler="constant", warmup=0, total_steps=10)
def step_then_loss(e):
    batch = torch.arange(2 * 12).reshape(2, 12) % 100 + 3
    e.backward(e(input_ids=batch, labels=batch).loss)
    e.step()
    with torch.no_grad():
        return e(input_ids=batch, labels=batch).loss.item()
# The actor during PPO's critic warm-up: saved before its optimizer's first step, under ZeRO-2.
path = save_checkpoint(root, 1, {"actor": engine(2)}, {"data": 0}, keep=2, meta={})
resumed = engine(3)
load_checkpoint(path, {"actor": resumed})  # ZeRO-2 -> ZeRO-3: through the universal checkpoint
print("LOSSES", step_then_loss(resumed), step_then_loss(engine(3)))
"""


def test_an_optimizer_saved_before_its_first_step_resumes_on_another_zero_stage(tiny_dir, tmp_path):
    """PPO's actor does not step during the critic warm-up (the first tenth of the steps by default); a
    run stopped then and resumed on another world size or ZeRO stage crashed with a StopIteration: the
    universal conversion of an optimizer that never stepped has no step.pt and no Adam moments. It now
    resumes, and its first update is a fresh optimizer's."""
    import subprocess
    import sys

    from conftest import REPO, free_port

    env = dict(os.environ, PYTHONPATH=REPO, MASTER_PORT=str(free_port()))
    p = subprocess.run([sys.executable, "-c", FRESH_OPTIMIZER_SCRIPT, tiny_dir("llama"), str(tmp_path / "ckpt")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed, fresh = map(float, p.stdout.split("LOSSES")[1].split())
    assert resumed == pytest.approx(fresh, abs=1e-6), (resumed, fresh)
