"""Universal-checkpoint resumes beyond full fine-tuning in fp32: LoRA (trainable and frozen base weights),
bf16, and CPU-offloaded Adam, each stopped by SIGTERM on 2 ranks and resumed on 1 rank (or checkpointed on
1 rank and resumed on 2 under ZeRO-3): the resumed run continues the uninterrupted losses and ends on its
weights, to a bound that fits the precision, and saves a model plain transformers loads."""
from __future__ import annotations

import os
import shutil

import pytest

from conftest import (DATA, last_by_step, partial, read_metrics, run_deepspeed, run_python, run_stopped)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.mark.parametrize("extra,loss_tol,weight_tol", [
    (["--lora_dim", "4"], 1e-4, 1e-5),
    (["--lora_dim", "4", "--only_optimize_lora"], 1e-4, 1e-5),
    (["--dtype", "bf16"], 2e-3, 2e-2),  # bf16 weights: a few ulps at |w| ~ 1 from the other reduction order
    (["--offload"], 1e-4, 1e-5),
], ids=["lora", "lora_only", "bf16", "offload"])
@pytest.mark.parametrize("direction", ["2to1", "1to2_zero3"])
def test_resume_on_another_world_size(tiny_dir, tmp_path, extra, loss_tol, weight_tol, direction):
    from transformers import AutoModelForCausalLM

    common = ["--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
              "--learning_rate", "3e-3", "--max_steps", "12", "--log_interval", "1", "--save_interval", "4",
              "--save_total_limit", "0", *extra]
    two, one = ["--per_device_train_batch_size", "8"], ["--per_device_train_batch_size", "16"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    if direction == "2to1":
        run_deepspeed("step1_sft/main.py", common + two + ["--output_dir", full])
        stop = run_stopped("step1_sft/main.py", common + two + ["--output_dir", resumed], resumed, after=5)
        assert stop["rc"] in (143, -15), stop["output"][-3000:]
        p = run_python("step1_sft/main.py", common + one + ["--output_dir", resumed, "--resume"])
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout
        step = stop["step"]
    else:
        p = run_python("step1_sft/main.py", common + one + ["--output_dir", full])
        assert p.returncode == 0, p.stderr[-3000:]
        shutil.copytree(os.path.join(full, "checkpoints", "step-4"),
                        os.path.join(partial(resumed), "checkpoints", "step-4"))
        out = run_deepspeed("step1_sft/main.py", common + two + ["--zero_stage", "3", "--output_dir", resumed,
                                                                 "--resume"]).stdout
        step = 4
    assert "universal checkpoint" in out and f"at step {step}" in out, out[-3000:]
    a, b = last_by_step(read_metrics(full)), last_by_step(read_metrics(resumed))
    assert sorted(b) == list(range(1 if direction == "2to1" else step + 1, 13))  # no step redone
    for s in range(step + 1, 13):
        assert b[s] == pytest.approx(a[s], abs=loss_tol), (s, a[s], b[s])
    wa, wb = weights(full), weights(resumed)
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < weight_tol
    AutoModelForCausalLM.from_pretrained(resumed)
