"""The learning-rate rule every step uses when its rate flag is 0 (the default).

A rate that trains a 7B model barely moves a 1M-parameter one, and a rate that trains a tiny model
wrecks a large one, so no fixed default serves both. Each step has a known-good full fine-tuning
rate at 7B parameters (below), scaled to the model's size N by sqrt(7e9 / N) and capped at 1e-3
(`size_scaled_lr`). At 1.3B, 125M and 5M parameters that is 2.3x, 7.5x and 37x the 7B
rate. An explicit rate (a flag > 0) is used as given.
"""
from __future__ import annotations

import math

from .errors import UserError

# Peak rates of full fine-tuning at 7B parameters. SFT and reward model: 1e-5 (Llama 2 trained its
# reward models at 1e-5 and SFT at 2e-5); DPO: 1e-6, TRL's DPOConfig default (Zephyr used 5e-7); PPO
# actor and critic: 1e-6 (DeepSpeed-Chat's 9.65e-6 / 5e-6 at 1.3B are 4.2e-6 / 2.2e-6 at 7B by this rule).
# The alignment suite (bench/alignment) measured them at 0.5M and 5M parameters on five tasks.
LR_AT_7B = {"sft": 1e-5, "reward": 1e-5, "dpo": 1e-6, "actor": 1e-6, "critic": 1e-6}


def count_parameters(model) -> int:
    """Parameters of a model, also when ZeRO-3 has already partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def size_scaled_lr(n_params: int, anchor_lr: float, anchor_params: float = 7e9, max_lr: float = 1e-3) -> float:
    """A learning rate for `n_params` scaled from a known-good one at `anchor_params` by
    sqrt(anchor_params / n_params): larger models need smaller steps, and a tiny demo model needs
    far larger ones than a 7B model. Capped at `max_lr`."""
    return min(max_lr, anchor_lr * math.sqrt(anchor_params / max(n_params, 1)))


def scaled_lr(step: str, model, flag_value: float = 0.0) -> float:
    """`flag_value` if > 0, else the step's 7B rate scaled to `model`'s parameter count."""
    if flag_value < 0:
        raise UserError(f"the {step} learning rate must be >= 0 (0 = scaled to the model size), got {flag_value}")
    if flag_value > 0:
        return flag_value
    return size_scaled_lr(count_parameters(model), LR_AT_7B[step])


def lr_help(step: str) -> str:
    return (f"peak learning rate; 0 = scaled to the model size: {LR_AT_7B[step]:g} at 7B parameters times "
            "sqrt(7e9 / parameters), capped at 1e-3 (utils/lr.py)")
