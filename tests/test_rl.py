"""Unit tests for utils/rl.py: slow loop references, hand-derived examples, tight tolerances."""

import math

import pytest
import torch

from utils.rl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    entropy_from_logits,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    place_terminal_reward,
    policy_loss,
    value_loss,
)

ATOL = 1e-6
F64 = torch.float64


def mask_from_lengths(lengths, T):
    """0/1 action mask [B, T] from known response lengths (contiguous from position 0)."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


# Padded rows, a full-length row and a length-1 row in one batch.
LENGTHS = [3, 6, 1, 5, 2]
T = 6


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def test_masked_sum_and_mean_match_loop():
    torch.manual_seed(0)
    x = torch.randn(len(LENGTHS), T, dtype=F64)
    mask = mask_from_lengths(LENGTHS, T)
    entries = [x[b, t].item() for b in range(x.shape[0]) for t in range(T) if mask[b, t] == 1]
    assert masked_sum(x, mask).item() == pytest.approx(sum(entries), abs=ATOL)
    assert masked_mean(x, mask).item() == pytest.approx(sum(entries) / len(entries), abs=ATOL)

    row_sums = [sum(x[b, t].item() for t in range(LENGTHS[b])) for b in range(len(LENGTHS))]
    row_means = [s / n for s, n in zip(row_sums, LENGTHS)]
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor(row_sums, dtype=F64), atol=ATOL, rtol=0)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor(row_means, dtype=F64), atol=ATOL, rtol=0)


def test_masked_mean_ignores_values_under_the_mask():
    x = torch.tensor([[1.0, 2.0, 1e9]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    assert masked_mean(x, mask).item() == pytest.approx(1.5, abs=ATOL)


def test_masked_var_matches_loop():
    torch.manual_seed(1)
    x = torch.randn(len(LENGTHS), T, dtype=F64) * 3 + 2
    mask = mask_from_lengths(LENGTHS, T)
    entries = [x[b, t].item() for b in range(x.shape[0]) for t in range(T) if mask[b, t] == 1]
    n = len(entries)
    mean = sum(entries) / n
    ss = sum((e - mean) ** 2 for e in entries)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(ss / (n - 1), abs=ATOL)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(ss / n, abs=ATOL)


def test_masked_var_rejects_too_few_entries():
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1.0, 0.0]], dtype=F64), unbiased=True)
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros(1, 2, dtype=F64), unbiased=False)


def test_masked_whiten_normalises_masked_entries_only():
    torch.manual_seed(2)
    x = torch.randn(len(LENGTHS), T, dtype=F64) * 5 + 7
    mask = mask_from_lengths(LENGTHS, T)
    x[mask == 0] = 1e6  # padding garbage must not enter the statistics
    w = masked_whiten(x, mask)
    entries = w[mask == 1]
    assert entries.mean().item() == pytest.approx(0.0, abs=ATOL)
    assert entries.std(unbiased=True).item() == pytest.approx(1.0, abs=ATOL)
    assert torch.all(w[mask == 0] == 0)
    # Explicit reference: (x - mean) / std over masked entries.
    ref = (x - x[mask == 1].mean()) / x[mask == 1].std(unbiased=True)
    torch.testing.assert_close(w[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)


def test_masked_whiten_without_mean_shift_keeps_mean():
    torch.manual_seed(3)
    x = torch.randn(len(LENGTHS), T, dtype=F64) * 5 + 7
    mask = mask_from_lengths(LENGTHS, T)
    w = masked_whiten(x, mask, shift_mean=False)
    entries = w[mask == 1]
    assert entries.mean().item() == pytest.approx(x[mask == 1].mean().item(), abs=ATOL)
    assert entries.std(unbiased=True).item() == pytest.approx(1.0, abs=ATOL)
    assert torch.all(w[mask == 0] == 0)


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    # log_ratio = logp - ref_logp = [0, ln 2, -ln 2]:
    #   k1 = log_ratio                       = [0, 0.693147, -0.693147]
    #   k2 = 0.5 * log_ratio^2               = [0, 0.5 * 0.480453, same] = [0, 0.240227, 0.240227]
    #   k3 = exp(-lr) - 1 + lr: lr = ln 2 -> 0.5 - 1 + 0.693147 = 0.193147
    #                           lr = -ln 2 -> 2 - 1 - 0.693147 = 0.306853
    ln2 = math.log(2.0)
    ref_logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    logp = ref_logp + torch.tensor([[0.0, ln2, -ln2]], dtype=F64)
    expected = {
        "k1": [0.0, ln2, -ln2],
        "k2": [0.0, 0.5 * ln2**2, 0.5 * ln2**2],
        "k3": [0.0, 0.5 - 1.0 + ln2, 2.0 - 1.0 - ln2],
    }
    assert expected["k3"][1] == pytest.approx(0.193147, abs=1e-6)
    assert expected["k3"][2] == pytest.approx(0.306853, abs=1e-6)
    for estimator, values in expected.items():
        out = kl_penalty(logp, ref_logp, estimator)
        assert out.shape == (1, 3)
        torch.testing.assert_close(out, torch.tensor([values], dtype=F64), atol=ATOL, rtol=0)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


def test_k3_is_nonnegative():
    torch.manual_seed(4)
    logp = torch.randn(64, 32, dtype=F64) * 3
    ref_logp = torch.randn(64, 32, dtype=F64) * 3
    assert torch.all(kl_penalty(logp, ref_logp, "k3") >= 0)
    assert torch.all(kl_penalty(logp, ref_logp, "k2") >= 0)
    assert torch.any(kl_penalty(logp, ref_logp, "k1") < 0)  # k1 is only unbiased on average


def test_k1_and_k3_are_unbiased_estimates_of_true_kl():
    # Tokens sampled from the policy p; KL(p || q) = sum_x p(x) log(p(x)/q(x)).
    gen = torch.Generator().manual_seed(5)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=F64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=F64)
    true_kl = (p * (p / q).log()).sum().item()
    n = 200_000
    samples = torch.multinomial(p, n, replacement=True, generator=gen).view(400, 500)
    logp, ref_logp = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        est = kl_penalty(logp, ref_logp, estimator)
        stderr = est.std().item() / math.sqrt(n)
        # 5 standard errors (~0.003 here): passes for the right estimator, fails if the sign
        # or the direction of the ratio were swapped (that would estimate KL(q||p) = 0.24 vs 0.26).
        assert abs(est.mean().item() - true_kl) < 5 * stderr, estimator
        assert 5 * stderr < 0.01


# ---------------------------------------------------------------------------------------------
# Reward placement and compute_rewards
# ---------------------------------------------------------------------------------------------


def place_terminal_reward_loop(kl_rewards, score, action_mask):
    out = kl_rewards.clone()
    for b in range(out.shape[0]):
        last = None
        for t in range(out.shape[1]):
            if action_mask[b, t] == 1:
                last = t
        out[b, last] += score[b]
    return out


@pytest.mark.parametrize(
    "lengths,T_",
    [
        (LENGTHS, T),  # padded, full-length and length-1 rows mixed
        ([4, 4, 4], 4),  # all full length: no padding at all
        ([1, 1], 3),  # only length-1 rows
        ([1], 1),  # T == 1
    ],
)
def test_place_terminal_reward_matches_loop(lengths, T_):
    torch.manual_seed(6)
    mask = mask_from_lengths(lengths, T_)
    kl_rewards = torch.randn(len(lengths), T_, dtype=F64) * mask
    score = torch.randn(len(lengths), dtype=F64)
    out = place_terminal_reward(kl_rewards, score, mask)
    torch.testing.assert_close(out, place_terminal_reward_loop(kl_rewards, score, mask), atol=ATOL, rtol=0)
    # Exactly one position per row changed, and it is index length - 1.
    for b, n in enumerate(lengths):
        changed = torch.nonzero(out[b] != kl_rewards[b]).flatten().tolist()
        assert changed == [n - 1]
    assert torch.equal(kl_rewards, kl_rewards * mask)  # input not modified in place


def test_place_terminal_reward_lands_on_eos_when_pad_equals_eos():
    # GPT-2 style: pad == eos == 0. Response "5 7 <eos>" then padding. A mask built as
    # ids != pad would drop the EOS and put the score on token 7; the mask from the known
    # length (3, EOS included) must put it on the EOS at index 2, not 1 and not 3.
    pad = eos = 0
    ids = torch.tensor([[5, 7, eos, pad, pad], [4, 4, 4, 4, 4]])  # second row cut at the limit
    mask = mask_from_lengths([3, 5], 5)
    zeros, score = torch.zeros(2, 5, dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)
    out = place_terminal_reward(zeros, score, mask)
    expected = torch.tensor([[0, 0, 1.0, 0, 0], [0, 0, 0, 0, 2.0]], dtype=F64)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    wrong = place_terminal_reward(zeros, score, (ids != pad).to(F64))
    assert not torch.equal(wrong, expected)  # the pitfall this test guards against


def test_place_terminal_reward_rejects_row_without_action():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        place_terminal_reward(torch.zeros(2, 3), torch.ones(2), mask)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_compute_rewards_matches_loop(estimator):
    torch.manual_seed(7)
    B = len(LENGTHS)
    mask = mask_from_lengths(LENGTHS, T)
    logp = -torch.rand(B, T, dtype=F64) * 3
    ref_logp = -torch.rand(B, T, dtype=F64) * 3
    score = torch.tensor([3.0, -0.5, 10.0, -7.0, 1.0], dtype=F64)
    kl_coef, clip = 0.1, 5.0
    rewards, kl, stats = compute_rewards(logp, ref_logp, score, mask, kl_coef, estimator, clip_reward_value=clip)

    ref_rewards = torch.zeros(B, T, dtype=F64)
    ref_kl = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for t in range(LENGTHS[b]):
            lr = logp[b, t].item() - ref_logp[b, t].item()
            k = {"k1": lr, "k2": 0.5 * lr * lr, "k3": math.exp(-lr) - 1 + lr}[estimator]
            ref_kl[b, t] = k
            ref_rewards[b, t] = -kl_coef * k
        ref_rewards[b, LENGTHS[b] - 1] += min(max(score[b].item(), -clip), clip)
    torch.testing.assert_close(kl, ref_kl, atol=ATOL, rtol=0)
    torch.testing.assert_close(rewards, ref_rewards, atol=ATOL, rtol=0)
    # The reported KL is the KL in the penalty, over response tokens only.
    assert stats["kl_seq_mean"] == pytest.approx(ref_kl.sum(1).mean().item(), abs=ATOL)
    assert stats["kl_token_mean"] == pytest.approx(ref_kl.sum().item() / sum(LENGTHS), abs=ATOL)
    assert stats["score_mean"] == pytest.approx((3.0 - 0.5 + 5.0 - 5.0 + 1.0) / 5, abs=ATOL)
    assert stats["reward_seq_mean"] == pytest.approx(ref_rewards.sum(1).mean().item(), abs=ATOL)


def test_compute_rewards_without_clip_keeps_score():
    mask = mask_from_lengths([2], 3)
    zeros = torch.zeros(1, 3, dtype=F64)
    rewards, kl, _ = compute_rewards(zeros, zeros, torch.tensor([42.0], dtype=F64), mask, 0.1, "k3")
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 42.0, 0.0]], dtype=F64), atol=ATOL, rtol=0)
    assert torch.all(kl == 0)


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE per episode; the episode ends after `length` actions (V_terminal = 0)."""
    B, T_ = rewards.shape
    adv = torch.zeros(B, T_, dtype=F64)
    ret = torch.zeros(B, T_, dtype=F64)
    for b in range(B):
        n = lengths[b]
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + values[b, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.0, 0.5), (0.5, 1.0)])
@pytest.mark.parametrize("lengths,T_", [(LENGTHS, T), ([4, 4], 4), ([1, 1, 1], 1)])
def test_gae_matches_loop(gamma, lam, lengths, T_):
    torch.manual_seed(8)
    B = len(lengths)
    mask = mask_from_lengths(lengths, T_)
    rewards = torch.randn(B, T_, dtype=F64)
    values = torch.randn(B, T_, dtype=F64)
    # Garbage beyond the last action must not be bootstrapped from or leak into anything.
    rewards[mask == 0] = 1e3
    values[mask == 0] = -1e3
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=ATOL, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=ATOL, rtol=0)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_hand_example():
    # r = [0, 0, 1], V = [0.5, 0.2, 0.4], gamma = 1, lam = 0.5, episode of 3 actions:
    #   delta_2 = 1 + 0 - 0.4 = 0.6          A_2 = 0.6
    #   delta_1 = 0 + 0.4 - 0.2 = 0.2        A_1 = 0.2 + 0.5 * 0.6 = 0.5
    #   delta_0 = 0 + 0.2 - 0.5 = -0.3       A_0 = -0.3 + 0.5 * 0.5 = -0.05
    #   R = A + V = [0.45, 0.7, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.2, 0.4]], dtype=F64)
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3, dtype=F64), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.5, 0.6]], dtype=F64), atol=ATOL, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.7, 1.0]], dtype=F64), atol=ATOL, rtol=0)


def test_gae_with_gamma_lam_one_gives_reward_to_go():
    torch.manual_seed(9)
    mask = mask_from_lengths(LENGTHS, T)
    rewards = torch.randn(len(LENGTHS), T, dtype=F64) * mask
    values = torch.randn(len(LENGTHS), T, dtype=F64)
    _, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    torch.testing.assert_close(ret, reward_to_go, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Policy and value losses
# ---------------------------------------------------------------------------------------------


def test_policy_loss_unclipped_hand_example():
    # ratio = [1.0, 1.1, 0.9] all inside [0.8, 1.2], A = [1, -1, 2]:
    #   loss = mean(-A * ratio) = -(1.0 - 1.1 + 1.8) / 3 = -1.7 / 3 = -0.566667, clipfrac = 0
    #   approx_kl = mean((r - 1) - ln r) = (0 + (0.1 - ln 1.1) + (-0.1 - ln 0.9)) / 3
    ratio = torch.tensor([[1.0, 1.1, 0.9]], dtype=F64)
    old_logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=F64)
    logp = (old_logp + ratio.log()).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=F64)
    loss, stats = policy_loss(logp, old_logp, adv, torch.ones(1, 3, dtype=F64), cliprange=0.2)
    assert loss.item() == pytest.approx(-1.7 / 3, abs=ATOL)
    assert stats["clipfrac"] == 0.0
    expected_kl = ((0.1 - math.log(1.1)) + (-0.1 - math.log(0.9))) / 3
    assert stats["approx_kl"] == pytest.approx(expected_kl, abs=ATOL)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=ATOL)
    # d loss / d logp_t = -A_t * ratio_t / 3 when unclipped.
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * ratio / 3, atol=ATOL, rtol=0)


def test_policy_loss_clipped_hand_example():
    # cliprange 0.2, ratio = [1.5, 0.5, 1.5], A = [1, 1, -1]; per token max(-A r, -A clip(r)):
    #   t0: -1.5 vs -1.2 -> -1.2 (clipped: no gain from pushing an advantaged token further)
    #   t1: -0.5 vs -0.8 -> -0.5 (unclipped: the pessimistic bound keeps the worse term)
    #   t2:  1.5 vs  1.2 ->  1.5 (unclipped)
    #   loss = (-1.2 - 0.5 + 1.5) / 3 = -0.066667; clipfrac = 1/3; ratio_mean = 3.5 / 3
    #   approx_kl = ((0.5 - ln 1.5) * 2 + (-0.5 - ln 0.5)) / 3 = 0.127406
    # A fourth, masked-out token with huge values must change nothing.
    ratio = torch.tensor([[1.5, 0.5, 1.5, 100.0]], dtype=F64)
    old_logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=F64)
    logp = (old_logp + ratio.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 1e6]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    loss, stats = policy_loss(logp, old_logp, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-0.2 / 3, abs=ATOL)
    assert stats["clipfrac"] == pytest.approx(1 / 3, abs=ATOL)
    assert stats["ratio_mean"] == pytest.approx(3.5 / 3, abs=ATOL)
    expected_kl = (2 * (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3
    assert expected_kl == pytest.approx(0.127406, abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(expected_kl, abs=ATOL)
    # Clipped and masked tokens get no gradient; the others get -A * ratio / 3.
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 3, 1.5 / 3, 0.0]], dtype=F64), atol=ATOL, rtol=0)


def test_policy_loss_matches_loop():
    torch.manual_seed(10)
    B = len(LENGTHS)
    mask = mask_from_lengths(LENGTHS, T)
    old_logp = -torch.rand(B, T, dtype=F64) * 3
    logp = old_logp + torch.randn(B, T, dtype=F64) * 0.3
    adv = torch.randn(B, T, dtype=F64)
    c = 0.2
    loss, stats = policy_loss(logp, old_logp, adv, mask, c)
    terms, clipped, n = 0.0, 0, 0
    for b in range(B):
        for t in range(LENGTHS[b]):
            r = math.exp(logp[b, t].item() - old_logp[b, t].item())
            a = adv[b, t].item()
            u, cl = -a * r, -a * min(max(r, 1 - c), 1 + c)
            terms += max(u, cl)
            clipped += cl > u
            n += 1
    assert loss.item() == pytest.approx(terms / n, abs=ATOL)
    assert stats["clipfrac"] == pytest.approx(clipped / n, abs=ATOL)
    assert 0 < stats["clipfrac"] < 1


def test_value_loss_hand_example():
    # old = 0, c = 0.2, v = [0.5, -0.1, 0.3], R = [1, 1, -1]; clip(v) = [0.2, -0.1, 0.2]:
    #   t0: (0.5-1)^2 = 0.25  vs (0.2-1)^2 = 0.64  -> 0.64 (clipped term larger)
    #   t1: (-1.1)^2  = 1.21  vs (-1.1)^2  = 1.21  -> 1.21 (equal: not counted as clipped)
    #   t2: (1.3)^2   = 1.69  vs (1.2)^2   = 1.44  -> 1.69
    #   loss = 0.5 * (0.64 + 1.21 + 1.69) / 3 = 0.59; value_clipfrac = 1/3
    values = torch.tensor([[0.5, -0.1, 0.3, 9.0]], dtype=F64, requires_grad=True)
    old_values = torch.zeros(1, 4, dtype=F64)
    returns = torch.tensor([[1.0, 1.0, -1.0, -9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.59, abs=ATOL)
    assert stats["value_clipfrac"] == pytest.approx(1 / 3, abs=ATOL)
    assert stats["value_mean"] == pytest.approx(0.7 / 3, abs=ATOL)
    # Gradient: t0 takes the clipped branch (constant in v) -> 0; t1, t2: (v - R) / 3; masked -> 0.
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.1 / 3, 1.3 / 3, 0.0]], dtype=F64), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------------------------


def test_entropy_matches_reference():
    torch.manual_seed(11)
    logits = torch.randn(3, 4, 7, dtype=F64) * 4
    p = torch.softmax(logits, -1)
    ref = -(p * p.log()).sum(-1)
    out = entropy_from_logits(logits)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert entropy_from_logits(torch.zeros(1, 1, 10)).item() == pytest.approx(math.log(10), abs=ATOL)


def test_entropy_is_stable_for_extreme_logits():
    logits = torch.tensor([[[1e4, 0.0, -1e4], [0.0, 0.0, float("-inf")]]], dtype=torch.float32)
    out = entropy_from_logits(logits)
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(0.0, abs=ATOL)
    assert out[0, 1].item() == pytest.approx(math.log(2), abs=ATOL)


def test_entropy_gradient_is_finite_with_banned_tokens():
    """The entropy bonus differentiates entropy_from_logits: a -inf logit gets gradient 0 and the others the
    gradient of the entropy of the distribution without that token (no NaN from 0 * -inf in backward)."""
    z = torch.tensor([[0.5, float("-inf"), 1.0]], dtype=F64, requires_grad=True)
    entropy_from_logits(z).sum().backward()
    zf = torch.tensor([[0.5, 1.0]], dtype=F64, requires_grad=True)
    entropy_from_logits(zf).sum().backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad[0, [0, 2]], zf.grad[0], atol=ATOL, rtol=0)
    assert z.grad[0, 1].item() == 0.0


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_trajectory():
    # init 0.1, target 6, horizon 10000, n_steps 256 -> n/h = 0.0256
    #   kl = 12  : e = clip(12/6 - 1 = 1.0)   = 0.2  -> beta = 0.1 * (1 + 0.2*0.0256) = 0.100512
    #   kl = 6.6 : e = 6.6/6 - 1              = 0.1  -> beta = 0.100512 * 1.00256     = 0.10076931072
    #   kl = 0   : e = clip(-1.0)             = -0.2 -> beta = 0.10076931072 * 0.99488 = 0.10025337185
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    expected = [0.100512, 0.10076931072, 0.1002533718487]
    for kl, value in zip([12.0, 6.6, 0.0], expected):
        ctl.update(kl, n_steps=256)
        assert ctl.value == pytest.approx(value, abs=1e-10)


def test_adaptive_kl_controller_direction_and_clip():
    up = AdaptiveKLController(0.2, target=1.0, horizon=100)
    up.update(1.05, n_steps=10)  # e = 0.05, inside the clip
    assert up.value == pytest.approx(0.2 * (1 + 0.05 * 0.1), abs=1e-12)
    down = AdaptiveKLController(0.2, target=1.0, horizon=100)
    down.update(0.9, n_steps=10)  # e = -0.1
    assert down.value == pytest.approx(0.2 * (1 - 0.1 * 0.1), abs=1e-12)
    # Far above / below the target the error saturates at +-0.2.
    for kl, e in [(1000.0, 0.2), (0.0, -0.2)]:
        ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
        ctl.update(kl, n_steps=10)
        assert ctl.value == pytest.approx(0.2 * (1 + e * 0.1), abs=1e-12)


def test_kl_controller_state_dict_roundtrip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl in [10.0, 3.0, 8.0]:
        ctl.update(kl, n_steps=512)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value != 0.1
    ctl.update(7.0, 512)
    resumed.update(7.0, 512)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 512)
    assert fixed.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(KeyError):
        other.load_state_dict({})


# ---------------------------------------------------------------------------------------------
# Answer lengths, token log-probabilities, whitening across shards, running reward statistics
# ---------------------------------------------------------------------------------------------

from utils import rl  # noqa: E402  (the helpers below share names with this file's local ones)


def test_response_lengths_first_eos_inclusive_when_pad_equals_eos():
    eos = 2  # generate() pads finished rows with pad_id, which here is the EOS id too
    responses = torch.tensor([
        [5, 6, 2, 2, 2],   # EOS at 2 -> length 3, the trailing EOS ids are padding
        [5, 6, 7, 8, 9],   # no EOS: cut at the limit -> length 5
        [2, 2, 2, 2, 2],   # EOS first -> length 1 (the EOS is the one action)
        [5, 2, 7, 2, 9],   # only the first EOS ends the answer
    ])
    lengths, has_eos = rl.response_lengths(responses, eos)
    assert lengths.tolist() == [3, 5, 1, 2]
    assert has_eos.tolist() == [True, False, True, True]
    mask = rl.mask_from_lengths(lengths, responses.shape[1])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    # The reward lands on the EOS (or the last token of the cut answer), never one past it.
    assert rl.last_action_index(mask).tolist() == [2, 4, 0, 1]


def test_response_lengths_matches_loop():
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(0, 4, (50, 7), generator=g)
    lengths, has_eos = rl.response_lengths(responses, 3)
    for row, n, h in zip(responses.tolist(), lengths.tolist(), has_eos.tolist()):
        expected = row.index(3) + 1 if 3 in row else len(row)
        assert (n, h) == (expected, 3 in row)


def test_token_logprobs_matches_log_softmax_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 11, generator=g, dtype=F64) * 5
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    got = rl.token_logprobs(logits, tokens)
    for b in range(3):
        for t in range(4):
            probs = [math.exp(v) for v in logits[b, t].tolist()]
            assert got[b, t].item() == pytest.approx(math.log(probs[tokens[b, t]] / sum(probs)), abs=1e-10)
    # bf16 logits are upcast before the softmax.
    assert rl.token_logprobs(logits.to(torch.bfloat16), tokens).dtype == torch.float32


def test_whiten_from_sums_over_shards_equals_whitening_the_union():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g, dtype=F64) * 3 + 1
    mask = mask_from_lengths([5, 2, 4, 1, 3, 5], 5)
    whole = masked_whiten(x, mask)
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]  # e.g. two ranks; only the sums are exchanged
    n = sum(float(m.sum()) for _, m in shards)
    total = sum(float((s * m).sum()) for s, m in shards)
    total_sq = sum(float((s * s * m).sum()) for s, m in shards)
    got = torch.cat([rl.whiten_from_sums(s, m, n, total, total_sq) for s, m in shards])
    assert torch.allclose(got, whole, atol=1e-12)
    kept = torch.cat([rl.whiten_from_sums(s, m, n, total, total_sq, shift_mean=False) for s, m in shards])
    assert torch.allclose(kept, masked_whiten(x, mask, shift_mean=False), atol=1e-12)
    with pytest.raises(ValueError):
        rl.whiten_from_sums(x, mask, 1, 1.0, 1.0)


def test_running_moments_match_statistics_of_everything_seen():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, generator=g, dtype=F64) * 4 + 2 for n in (5, 1, 12)]
    rm = rl.RunningMoments()
    assert rm.std == 1.0 and rm.normalize(torch.tensor([3.0])).item() == pytest.approx(3.0)  # nothing seen yet
    for b in batches:
        rm.update(b.numel(), float(b.sum()), float(b.square().sum()))
    seen = torch.cat(batches)
    assert rm.count == seen.numel()
    assert rm.mean == pytest.approx(seen.mean().item(), abs=1e-12)
    assert rm.std == pytest.approx(seen.std().item(), abs=1e-12)  # unbiased, as torch.std
    x = torch.tensor([0.0, 5.0], dtype=F64)
    assert torch.allclose(rm.normalize(x), (x - seen.mean()) / seen.std(), atol=1e-7)
    copy = rl.RunningMoments()
    copy.load_state_dict(rm.state_dict())
    assert copy.state_dict() == rm.state_dict()
