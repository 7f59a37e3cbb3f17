"""PPO math for RLHF as pure functions of tensors and floats.

Shapes: B = batch, T = response length (positions of generated tokens), V = vocabulary.
`action_mask` is a 0/1 tensor [B, T] that is 1 on generated tokens (the closing EOS included)
and 0 on right padding; it must come from known response lengths, never from `ids != pad_id`
(pitfalls.md item 2). Log-probabilities are those of the chosen tokens, [B, T].

Losses return `(loss, stats)` where `stats` holds detached Python floats for logging.
References: Schulman et al. 2017 "Proximal Policy Optimization Algorithms" (PPO);
Schulman et al. 2016 "High-Dimensional Continuous Control Using GAE" (GAE);
Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences" (KL reward, controller);
Schulman 2020 "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1/k2/k3).
"""

import math

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # exp() of a bf16/fp16 log-ratio loses most of its precision; float64 inputs stay float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of `x` over entries where `mask` is 1. x, mask: same shape; dim=None sums everything."""
    masked = x * mask
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is 1: sum(x * mask) / sum(mask).

    x, mask: same shape (e.g. [B, T]); dim=None reduces to a scalar, otherwise over `dim`.
    An empty mask (along `dim`) gives 0 instead of NaN.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked entries (scalar). x, mask: same shape.

    unbiased=True applies Bessel's correction n / (n - 1) with n = mask.sum().
    Raises ValueError when there are too few entries (0, or 1 when unbiased).
    """
    n = mask.sum()
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked entries, got {int(n)}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean if shift_mean) over the masked entries only.

    x, mask: [B, T] -> [B, T]. Statistics come from masked entries (unbiased variance); masked-out
    entries are 0 in the output so padding never leaks into the advantages. With shift_mean=False
    the original mean is kept (only the scale changes).
    """
    return _whiten(x, mask, masked_mean(x, mask), masked_var(x, mask, unbiased=True), shift_mean, eps)


def whiten_from_sums(x: torch.Tensor, mask: torch.Tensor, n: float, total: float, total_sq: float,
                     shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`masked_whiten` with statistics of a larger set, given as its sums (e.g. all-reduced over ranks).

    x, mask: [B, T] -> [B, T]; n = number of masked entries in the whole set, total = their sum,
    total_sq = sum of their squares. mean = total / n, var = (total_sq - n * mean^2) / (n - 1)
    (unbiased, as in masked_whiten). On one shard holding the whole set it equals masked_whiten.
    """
    if n < 2:
        raise ValueError(f"whitening needs at least 2 entries, got {n}")
    mean = total / n
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)  # max(): float rounding can dip below 0
    return _whiten(x, mask, torch.tensor(mean, dtype=x.dtype), torch.tensor(var, dtype=x.dtype), shift_mean, eps)


def _whiten(x, mask, mean, var, shift_mean: bool, eps: float) -> torch.Tensor:
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


class RunningMoments:
    """Mean and variance of every value seen so far, updated from batch sums (Chan et al. 1979).

    Used to normalise reward-model scores: `update(n, total, total_sq)` with the sums of a batch
    (all-reduced over ranks, so every rank holds the same state), then `normalize(x)`.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0  # m2 = sum of squared deviations

    def update(self, n: float, total: float, total_sq: float) -> None:
        if n <= 0:
            return
        batch_mean = total / n
        batch_m2 = max(total_sq - n * batch_mean * batch_mean, 0.0)
        delta = batch_mean - self.mean
        count = self.count + n
        self.mean += delta * n / count
        self.m2 += batch_m2 + delta * delta * self.count * n / count
        self.count = count

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """(x - mean) / std over everything seen; x of any shape."""
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


# ---------------------------------------------------------------------------------------------
# KL penalty and rewards
# ---------------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi. [B, T] -> [B, T].

    With log_ratio = logp - ref_logp (Schulman's "Approximating KL divergence"):
      k1 = log_ratio                          unbiased, high variance, can be negative
      k2 = 0.5 * log_ratio**2                 biased, low variance, >= 0
      k3 = exp(-log_ratio) - 1 + log_ratio    unbiased, low variance, >= 0
    Not masked: callers multiply by the action mask.
    """
    log_ratio = _at_least_fp32(logp) - _at_least_fp32(ref_logp)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # expm1 keeps precision when the policy is still close to the reference (log_ratio ~ 0).
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def response_lengths(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Length of each generated answer, its first EOS included, and whether it has an EOS at all.

    responses: [B, W] tokens generated after the prompt; what follows the first EOS is padding (which
    may be the EOS id itself when pad == eos, so it is never used to find the end). Rows without an
    EOS were cut at the length limit and have length W. Returns (lengths [B] long, has_eos [B] bool).
    """
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=-1)
    first_eos = is_eos.long().argmax(dim=-1)  # argmax returns the first maximum
    lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, responses.shape[-1]))
    return lengths, has_eos


def mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """0/1 action mask [B, width] (long) that is 1 on the first lengths[b] positions of row b."""
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, in at least fp32. logits [B, T, V], tokens [B, T] -> [B, T].

    logits[:, t] must be the distribution that produced tokens[:, t] (callers shift by one).
    """
    logits = _at_least_fp32(logits)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where action_mask is 1, per row. [B, T] -> [B] (long).

    Raises ValueError if a row has no action.
    """
    has_action = action_mask.bool().any(dim=-1)
    if not bool(has_action.all()):
        bad = torch.nonzero(~has_action).flatten().tolist()
        raise ValueError(f"rows {bad} of action_mask contain no action")
    positions = torch.arange(action_mask.shape[-1], device=action_mask.device)
    # Each 1 is replaced by its own position, so the row maximum is the last action.
    return (action_mask.bool().long() * positions).argmax(dim=-1)


def place_terminal_reward(kl_rewards: torch.Tensor, score: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Add the sequence score to the per-token KL rewards at the last generated action.

    kl_rewards: [B, T] (already -kl_coef * KL, masked); score: [B]; action_mask: [B, T] 0/1.
    Returns rewards [B, T]. The score lands on the last position where action_mask is 1 (the EOS,
    or the last token when the answer hit the length limit) and never one past it
    (pitfalls.md item 9; DeepSpeedExamples PR #672). Raises ValueError on a row with no action.
    """
    last = last_action_index(action_mask)
    rows = torch.arange(kl_rewards.shape[0], device=kl_rewards.device)
    rewards = kl_rewards.clone()
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


@torch.no_grad()
def compute_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    score: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    clip_reward_value=None,
):
    """Per-token PPO rewards r_t = -kl_coef * KL_t + [t == last action] * score (Ziegler et al. eq. 2).

    logp, ref_logp, action_mask: [B, T]; score: [B]. clip_reward_value: clip score to +-value if set.
    Returns (rewards [B, T], kl [B, T], stats). `kl` is the masked per-token estimate used in the
    penalty, so the KL that is reported is the KL that is trained with (pitfalls.md item 12).
    """
    mask = action_mask.to(_at_least_fp32(logp).dtype)
    kl = kl_penalty(logp, ref_logp, estimator) * mask
    if clip_reward_value is not None:
        score = score.clamp(-clip_reward_value, clip_reward_value)
    rewards = place_terminal_reward(-kl_coef * kl, score, action_mask)
    kl_per_seq = kl.sum(dim=-1)
    stats = {
        "kl_seq_mean": kl_per_seq.mean().item(),
        "kl_token_mean": masked_mean(kl, mask).item(),
        "score_mean": score.float().mean().item(),
        "reward_seq_mean": rewards.sum(dim=-1).mean().item(),
        "kl_coef": float(kl_coef),
    }
    return rewards, kl, stats


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16).

    rewards, values, action_mask: [B, T]; action_mask contiguous from the start of the response.
      delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  R_t = A_t + V_t
    The episode ends at the last action: V and A beyond it count as 0 (no bootstrapping from
    padding). Returns (advantages, returns), both [B, T] and 0 at masked positions.
    """
    mask = action_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    cliprange: float,
):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation.

    logp (current policy, with grad), old_logp (rollout policy), advantages, action_mask: [B, T].
      ratio = exp(logp - old_logp)
      loss  = mean_masked( max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)) )
    Token-level mean over action_mask. Stats: clipfrac (share of tokens where the clipped term is
    active), approx_kl (k3 estimate of KL(old || new): mean((ratio - 1) - log ratio)), ratio_mean.
    """
    mask = action_mask.to(_at_least_fp32(logp).dtype)
    log_ratio = _at_least_fp32(logp) - _at_least_fp32(old_logp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask).item(),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    cliprange_value: float,
):
    """Clipped value loss (PPO2 baselines; Schulman et al. 2017 uses the unclipped squared error).

    values (current critic, with grad), old_values (rollout critic), returns, action_mask: [B, T].
      v_clip = old_values + clip(values - old_values, -c, c)
      loss   = 0.5 * mean_masked( max((values - R)^2, (v_clip - R)^2) )
    Stats: value_clipfrac (share of tokens where the clipped term is larger), value_mean.
    """
    mask = action_mask.to(_at_least_fp32(values).dtype)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "value_clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask).item(),
            "value_mean": masked_mean(values, mask).item(),
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis. [B, T, V] -> [B, T].

    H = logsumexp(z) - sum_i softmax(z)_i * z_i, which never takes the log of a probability, so it
    stays finite for large logits; -inf logits (banned tokens) contribute 0 instead of NaN.
    """
    logits = _at_least_fp32(logits)
    probs = torch.softmax(logits, dim=-1)
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - weighted.sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient; same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, eq. 2).

      e_t      = clip(KL_t / target - 1, -0.2, 0.2)
      beta_t+1 = beta_t * (1 + e_t * n_steps / horizon)
    The coefficient grows while the measured KL is above target and shrinks while below.
    `current_kl` should be the per-sequence KL measured on the rollout (the `kl` returned by
    compute_rewards summed over tokens); `n_steps` the number of samples in that rollout.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        # Only the evolving coefficient is state; target and horizon are flags of the run.
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
