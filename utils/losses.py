"""Losses as pure functions of tensors. Each returns `(loss, diagnostics)`; diagnostics are detached floats.

Token-normalised losses take the token count of the whole optimizer step (all ranks, all
accumulation micro-batches) so the gradient equals the full-batch token mean however the global
batch is split (pitfall 16). See `step_loss_scale` for the factor that undoes DeepSpeed's own
averaging over ranks and micro-batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rl import at_least_fp32

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


def log_probs(logits: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """log softmax over the last axis, in at least fp32 unless fp32 is False (float64 stays float64)."""
    return torch.log_softmax(at_least_fp32(logits) if fp32 else logits, dim=-1)


def shifted_log_probs(logits: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """log_probs of the logits that predict the next label (position t predicts labels[:, t + 1]): logits
    [B, T, V] -> [B, T - 1, V]. Computed once per forward and shared by the labelled tokens' log-probs and
    the full-vocabulary KL."""
    return log_probs(logits[:, :-1, :], fp32)


def labelled_logps(log_probs: torch.Tensor, labels: torch.Tensor):
    """Per-row sum of log p over labelled tokens from shifted_log_probs: log_probs [B, T - 1, V], labels
    [B, T] -> ([B], [B] counts)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE
    safe = shift_labels.masked_fill(~mask, 0)
    logp = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = True):
    """Per-sequence sum of log p over labelled tokens: logits [B, T, V], labels [B, T] -> ([B], [B] counts)."""
    return labelled_logps(shifted_log_probs(logits, fp32), labels)


# ----------------------------------------------------------------------------- DPO family

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             num_pairs: float | torch.Tensor | None = None):
    """Direct preference losses on sequence log-probabilities (summed over response tokens, EOS included).

    All log-prob inputs are [B] (one entry per preference pair). With the log-ratio margin
        h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
    the per-pair losses are
        sigmoid  -(1-eps) * log sigma(beta*h) - eps * log sigma(-beta*h)
                 DPO, Rafailov et al. 2023 eq. 7; eps = label_smoothing > 0 is conservative DPO
                 (Mitchell 2023: preferences flipped with probability eps)
        hinge    max(0, 1 - beta*h)                           SLiC-HF (Zhao et al. 2023) hinge, margin 1/beta
        ipo      (h_avg - 1/(2*beta))^2                       IPO, Azar et al. 2023 eq. 17 (beta is their tau)
    IPO uses h_avg, the margin of per-token-average log-ratios (each side's log-ratio divided by its
    response length, `chosen_lengths`/`rejected_lengths` [B]): with summed log-probs the squared loss
    and its target 1/(2*beta) would scale with response length. This is TRL's convention, which its
    authors confirmed with the IPO authors (the paper's results use it).

    Returns (loss, diagnostics): loss = sum of per-pair losses / num_pairs (default B, the mean; pass
    the pair count of the whole optimizer step for split-invariant normalisation, as `sft_loss` does
    with tokens). Diagnostics are detached [B] tensors on the sequence level for every loss type:
    "losses", "rewards/chosen" = beta*(log pi - log ref)(y_w), "rewards/rejected", "rewards/margins"
    and "rewards/accuracies" (1.0 where the chosen reward is strictly larger).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing (conservative DPO) applies to loss_type 'sigmoid' only")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths (per-token averages)")
        h_avg = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (h_avg - 1.0 / (2.0 * beta)) ** 2
    loss = losses.sum() / (losses.numel() if num_pairs is None else num_pairs)
    chosen_rewards = (beta * chosen_ratio).detach()
    rejected_rewards = (beta * rejected_ratio).detach()
    return loss, {"losses": losses.detach(), "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                  "rewards/margins": chosen_rewards - rejected_rewards,
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float()}


def chosen_nll_loss(policy_chosen_logps: torch.Tensor, num_tokens: float | torch.Tensor):
    """The RPO term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): NLL of the chosen
    responses per response token, -sum_b log pi(y_w,b|x_b) / N.

    policy_chosen_logps [B] are summed response log-probs; N is their token count (EOS included) —
    of this micro-batch for the token mean, or of the whole optimizer step for a split-invariant sum.
    Added to a DPO loss with weight alpha it keeps the chosen log-probabilities from falling, the
    usual failure of DPO on small data. Returns (loss, {"nll_sum": float}).
    """
    nll_sum = -policy_chosen_logps.sum()
    return nll_sum / num_tokens, {"nll_sum": nll_sum.item()}


def kl_from_log_probs(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary KL(ref || policy) of the next token at every position, from log-probabilities
    normalised over the last axis (log_probs of the logits): [..., V] -> [...].

        KL_t = sum_v ref(v | x_<=t) * (log ref(v | x_<=t) - log pi(v | x_<=t))

    Unlike the log-probability of the sampled or labelled token, it also sees probability moved among the
    other tokens (a preferred word's pieces gaining where the label is a copied noun)."""
    ref_probs = ref_log_probs.exp()
    # Tokens the reference gives probability 0 contribute 0 (0 * -inf would be NaN).
    diff = torch.where(ref_probs > 0, ref_log_probs - log_probs, torch.zeros_like(log_probs))
    return (ref_probs * diff).sum(-1)


def token_kl_sums(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sums over labelled positions of the full-vocabulary KL, from shifted_log_probs of the policy
    and of the reference: log_probs, ref_log_probs [B, T - 1, V] (position t predicts labels[:, t + 1]),
    labels [B, T] -> [B]."""
    mask = labels[:, 1:] != IGNORE
    return (kl_from_log_probs(log_probs, ref_log_probs) * mask).sum(-1)


# ----------------------------------------------------------------------------- reward model

def pairwise_reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                         center_coef: float = 0.0, num_pairs: float | torch.Tensor | None = None):
    """Bradley-Terry pairwise loss on scalar rewards, with an optional per-pair margin and reward centering.

    r_chosen, r_rejected, margin: [B]. Per pair (Ouyang et al. 2022, eq. 1; margin as in Llama 2, eq. 2;
    centering as in Eisenstein et al. 2023):
        l_b = -log sigma(r_c,b - r_r,b - m_b) + center_coef * (r_c,b + r_r,b)^2
    loss = sum_b l_b / N, N = B by default; pass the pair count of the whole optimizer step for a
    gradient that does not depend on how the step is split over ranks and micro-batches.
    Diagnostics are sums over the B pairs (so they can be summed over ranks): loss_sum, correct
    (r_c > r_r strictly; ties count as wrong), chosen_sum, rejected_sum, margin_sum (of r_c - r_r), pairs.
    """
    diff = r_chosen - r_rejected
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    loss = losses.sum() / (losses.numel() if num_pairs is None else num_pairs)
    return loss, {"loss_sum": losses.sum().item(), "correct": (diff > 0).sum().item(),
                  "chosen_sum": r_chosen.sum().item(), "rejected_sum": r_rejected.sum().item(),
                  "margin_sum": diff.sum().item(), "pairs": diff.numel()}
