"""Losses as pure functions of tensors. Each returns `(loss, diagnostics)`; diagnostics are detached floats.

Token-normalised losses take the token count of the whole optimizer step (all ranks, all
accumulation micro-batches) so the gradient equals the full-batch token mean however the global
batch is split (pitfall 16). See `step_loss_scale` for the factor that undoes DeepSpeed's own
averaging over ranks and micro-batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of trained tokens: labels [B, T] shifted by one (position 0 is never a target)."""
    return (labels[:, 1:] != IGNORE).sum()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | torch.Tensor,
             fp32: bool = True):
    """Summed next-token NLL over labelled tokens divided by `num_tokens`.

    logits [B, T, V], labels [B, T] aligned with the inputs (IGNORE where not trained).
    loss = -(1/N) * sum_{b,t: labels[b,t+1] != IGNORE} log p(labels[b,t+1] | x_{<=t})
    With N the labelled tokens of this micro-batch it is the usual token mean; with N the labelled
    tokens of the whole optimizer step, micro-batch losses add up to the step's token mean.
    """
    shift_logits = logits[:, :-1, :]
    if fp32:
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    nll_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                              ignore_index=IGNORE, reduction="sum")
    loss = nll_sum / num_tokens
    return loss, {"nll_sum": nll_sum.item(), "tokens": int((shift_labels != IGNORE).sum())}


def step_loss_scale(world_size: int, grad_accum: int) -> float:
    """DeepSpeed divides each micro-batch loss by `grad_accum` and averages gradients over ranks.
    A loss already normalised by the step's global token count is multiplied by this factor before
    `engine.backward` so the resulting gradient is exactly d(step token-mean)/d(theta)."""
    return float(world_size * grad_accum)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = True):
    """Per-sequence sum of log p over labelled tokens: logits [B, T, V], labels [B, T] -> ([B], [B] counts)."""
    shift_logits = logits[:, :-1, :]
    if fp32:
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE
    safe = shift_labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(shift_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)
