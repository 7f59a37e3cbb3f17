"""PPO math for RLHF as pure functions of tensors and floats.

Shapes: B = batch, T = response length (positions of generated tokens), V = vocabulary.
`action_mask` is a 0/1 tensor [B, T] that is 1 on generated tokens (the closing EOS included)
and 0 on right padding; it must come from known response lengths, never from `ids != pad_id`
(pitfalls.md item 2). Log-probabilities are those of the chosen tokens, [B, T].

Losses return `(loss, stats)` where `stats` holds detached Python floats for logging.
References: Schulman et al. 2017 "Proximal Policy Optimization Algorithms" (PPO);
Schulman et al. 2016 "High-Dimensional Continuous Control Using GAE" (GAE);
Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences" (KL reward, controller);
Schulman 2020 "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1/k2/k3);
Shao et al. 2024 "DeepSeekMath" (GRPO); Liu et al. 2025 "Understanding R1-Zero-Like Training" (Dr. GRPO);
Ahmadian et al. 2024 "Back to Basics: Revisiting REINFORCE Style Optimization" (RLOO);
Hu et al. 2025 "REINFORCE++" (global advantage normalisation).

Group estimators take `group_ids` [N] (long): answers with the same id are the K answers to one
prompt. Ids are positions in the rollout, never prompt contents, so the same prompt drawn twice
forms two groups (pitfall 25).
"""

import math

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # exp() of a bf16/fp16 log-ratio loses most of its precision; float64 inputs stay float64.
    return x.to(fp32_dtype(x))


def fp32_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype at_least_fp32(x) has, without converting x."""
    return torch.promote_types(x.dtype, torch.float32)


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

    As a penalty in the reward (--kl_in reward) only the value matters. As a loss term (--kl_in loss,
    differentiated through logp) the gradients differ, for answers sampled from pi (pitfall 25):
      k1: E[grad log pi] = 0, so the term has no gradient in expectation (refused as a loss);
      k2: E[log_ratio * grad log pi] = grad KL(pi || pi_ref), the unbiased gradient of the KL;
      k3: E[(1 - pi_ref / pi) grad log pi] = grad KL(pi_ref || pi), the gradient of the *reverse* KL:
          a biased estimate of the gradient of the KL its value estimates (GRPO's choice; the two
          agree to first order near pi = pi_ref).
    """
    log_ratio = at_least_fp32(logp) - at_least_fp32(ref_logp)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # expm1 keeps precision when the policy is still close to the reference (log_ratio ~ 0).
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def masked_kl(logp: torch.Tensor, ref_logp: torch.Tensor, action_mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """kl_penalty on the answer tokens, exactly 0 under the mask. [B, T] -> [B, T].

    The log-ratio is set to 0 under the mask *before* the estimator: padding holds arbitrary
    log-probabilities, and k3's exp() of a large one overflows to inf, which a later `* mask` would
    turn into NaN (and so would its gradient). Differentiable in logp.
    """
    valid = action_mask.bool()
    same = torch.where(valid, at_least_fp32(ref_logp), at_least_fp32(logp).detach())
    return torch.where(valid, kl_penalty(logp, same, estimator), torch.zeros_like(same))


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
    logits = at_least_fp32(logits)
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
    mask = action_mask.to(fp32_dtype(logp))
    kl = masked_kl(logp, ref_logp, action_mask, estimator) * mask
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


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # need K >= 2 answers per prompt


def group_stats(scores: torch.Tensor, group_ids: torch.Tensor):
    """Statistics of each answer's group: scores [N], group_ids [N] (long) -> dict of [N] tensors.

      mean   (1/K) sum_j r_j over the K answers of the group
      std    sqrt( sum_j (r_j - mean)^2 / (K - 1) ), Bessel-corrected as torch.std; 0 for K = 1
      size   K
      equal  True where every score of the group is the same (no learning signal)
    Computed in float64 and returned in the scores' dtype (at least fp32).
    """
    dtype = fp32_dtype(scores)
    x = scores.detach().to(torch.float64)
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    G = counts.numel()
    mean = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, inv, x) / counts
    sq = torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, inv, (x - mean[inv]).square())
    std = (sq / (counts - 1).clamp_min(1)).sqrt()
    hi = torch.full((G,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amax")
    lo = torch.full((G,), math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amin")
    return {"mean": mean[inv].to(dtype), "std": std[inv].to(dtype), "size": counts[inv], "equal": (hi == lo)[inv]}


@torch.no_grad()
def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6):
    """GRPO outcome advantage (Shao et al. 2024, sec. 4.1.2), one value per answer, the same on every token:

      A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     scale_by_std=True  (GRPO)
      A_i =  r_i - mean(r_group)                              scale_by_std=False (Dr. GRPO, Liu et al. 2025)

    scores [N], group_ids [N] -> [N]. Dr. GRPO drops the std because dividing by it weights prompts
    that are almost always solved (or never) more than the others, a bias in the gradient. A group
    whose scores are all equal gets exactly 0 (no NaN, no eps-sized noise).
    """
    st = group_stats(scores, group_ids)
    adv = at_least_fp32(scores) - st["mean"]
    if scale_by_std:
        adv = adv / (st["std"] + eps)
    return torch.where(st["equal"], torch.zeros_like(adv), adv)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor):
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6): each answer's baseline is the mean score of
    the other K - 1 answers to its prompt,

      A_i = r_i - (1 / (K - 1)) sum_{j != i} r_j  =  K / (K - 1) * (r_i - mean(r_group)).

    scores [N], group_ids [N] -> [N]. Raises ValueError for a group of fewer than 2 answers.
    """
    st = group_stats(scores, group_ids)
    if bool((st["size"] < 2).any()):
        raise ValueError("rloo needs at least 2 answers per group")
    k = st["size"].to(st["mean"].dtype)
    total = st["mean"] * k
    adv = at_least_fp32(scores) - (total - at_least_fp32(scores)) / (k - 1)
    return torch.where(st["equal"], torch.zeros_like(adv), adv)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the answer's own tokens. rewards, action_mask [B, T] ->
    [B, T], 0 under the mask (padding never contributes)."""
    mask = action_mask.to(fp32_dtype(rewards))
    rewards = at_least_fp32(rewards) * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


@torch.no_grad()
def reinforce_pp_advantages(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float, eps: float = 1e-8):
    """REINFORCE++ (Hu et al. 2025, eqs. 8-10): per-token rewards r_t = -beta KL_t + [t = last] score
    (compute_rewards), their discounted returns G_t, then normalised over every action token of the
    global batch:  A_t = (G_t - mean_batch(G)) / std_batch(G).  rewards, action_mask [B, T] -> [B, T].

    This is the one-shard form; with several ranks the trainer whitens the returns with all-reduced
    sums (whiten_from_sums), which equals it on the union. REINFORCE++-baseline is the same with
    score - mean(score of its group) in place of the score (group mean first, then the batch
    normalisation)."""
    return masked_whiten(discounted_returns(rewards, action_mask, gamma), action_mask, eps=eps)


def std_from_sums(n: float, total: float, total_sq: float) -> float:
    """Unbiased standard deviation of a set given its size, sum and sum of squares (e.g. all-reduced)."""
    if n < 2:
        return 0.0
    mean = total / n
    return math.sqrt(max(total_sq - n * mean * mean, 0.0) / (n - 1))


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
    mask = action_mask.to(fp32_dtype(logp))
    per_token, terms = policy_loss_per_token(logp, old_logp, advantages, cliprange)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(terms["clipped"], mask).item(),
            "approx_kl": masked_mean(terms["approx_kl"], mask).item(),
            "ratio_mean": masked_mean(terms["ratio"], mask).item(),
        }
    return loss, stats


def policy_loss_per_token(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cliprange: float):
    """The PPO clipped surrogate of `policy_loss` per token, before any masking or averaging.

    logp (with grad), old_logp, advantages: [B, T] -> (loss [B, T], terms): loss_t = max(-A r_t, -A clip(r_t));
    terms holds detached [B, T] tensors: clipped (1.0 where the clipped term is active), approx_kl
    ((r - 1) - log r) and ratio. Reduce with aggregate_loss / masked_mean.
    """
    log_ratio = at_least_fp32(logp) - at_least_fp32(old_logp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    with torch.no_grad():
        terms = {"clipped": (clipped > unclipped).to(ratio.dtype), "approx_kl": (ratio - 1.0) - log_ratio,
                 "ratio": ratio.detach()}
    return torch.maximum(unclipped, clipped), terms


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
    mask = action_mask.to(fp32_dtype(values))
    per_token, clipped = value_loss_per_token(values, old_values, returns, cliprange_value)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "value_clipfrac": masked_mean(clipped, mask).item(),
            "value_mean": masked_mean(values, mask).item(),
        }
    return loss, stats


def value_loss_per_token(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                         cliprange_value: float):
    """The clipped value loss of `value_loss` per token: [B, T] -> (0.5 * max((V - R)^2, (V_clip - R)^2) [B, T],
    clipped [B, T] detached, 1.0 where the clipped term is larger)."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).detach().to(unclipped.dtype)


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate_loss(per_token: torch.Tensor, action_mask: torch.Tensor, mode: str, step_tokens: float,
                   step_seqs: float, norm_len: float | None = None) -> torch.Tensor:
    """This micro-batch's part of a per-token loss aggregated over the whole optimizer step.

    per_token, action_mask: [B, T]; step_tokens / step_seqs: action tokens / answers of the whole
    optimizer step over all ranks and accumulation micro-batches (all-reduced), so the parts of every
    micro-batch on every rank add up to the full-batch value however the batch is split (pitfall 16;
    multiply by step_loss_scale before engine.backward to undo DeepSpeed's averaging). With
    l_it the loss of token t of answer i, |o_i| its length, N answers and T_all tokens in the step:
      token_mean                (1 / T_all) sum_i sum_t l_it                 PPO; every token weighs the same
      seq_mean_token_mean       (1 / N) sum_i (1 / |o_i|) sum_t l_it         GRPO (Shao et al. eq. 3): every
                                                                             answer weighs the same, so tokens
                                                                             of short answers weigh more
      seq_mean_token_sum_norm   (1 / (N L)) sum_i sum_t l_it, L = norm_len   Dr. GRPO (Liu et al.): a constant
                                                                             in place of |o_i|, which removes
                                                                             that length bias
    """
    mask = action_mask.to(per_token.dtype)
    if mode == "token_mean":
        return masked_sum(per_token, mask) / step_tokens
    if mode == "seq_mean_token_mean":
        per_seq = masked_sum(per_token, mask, dim=-1) / mask.sum(-1).clamp_min(1)
        return per_seq.sum() / step_seqs
    if mode == "seq_mean_token_sum_norm":
        if not norm_len:
            raise ValueError("seq_mean_token_sum_norm needs norm_len (the answer-length budget)")
        return masked_sum(per_token, mask) / (step_seqs * norm_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis. [B, T, V] -> [B, T].

    H = logsumexp(z) - sum_i softmax(z)_i * z_i, which never takes the log of a probability, so it
    stays finite for large logits; -inf logits (banned tokens) contribute 0 instead of NaN.
    """
    logits = at_least_fp32(logits)
    probs = torch.softmax(logits, dim=-1)
    # Mask the logits, not the product: where() passes a zero gradient to the branch it drops, but that
    # branch's own backward (0 * -inf) is NaN, which poisons the entropy bonus's gradient.
    finite = torch.where(probs > 0, logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(dim=-1)


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
