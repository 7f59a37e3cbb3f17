"""Critic-free advantage estimators, loss aggregation and the KL-as-loss gradients, against slow loops and
exact expectations. The step-3 buffer is tested end to end on fake rollouts with garbage under the masks."""
from __future__ import annotations

import math
import types

import pytest
import torch

from step3_ppo.config import GROUPS, REQUIRED, resolve_algorithm
from step3_ppo.rollout import PromptItem, repeat_prompts
from step3_ppo.trainer import build_buffer
from utils.args import parse
from utils.errors import UserError
from utils.losses import step_loss_scale
from utils.rl import (LOSS_AGGREGATIONS, RunningMoments, aggregate_loss, compute_rewards, discounted_returns,
                      grpo_advantages,
                      group_stats, kl_penalty, masked_kl, policy_loss, policy_loss_per_token, reinforce_pp_advantages,
                      rloo_advantages, std_from_sums)

F64 = torch.float64
EPS = 1e-6


def groups_of(sizes):
    """Group ids for groups of the given sizes, shuffled so members of one group are not adjacent."""
    ids = torch.cat([torch.full((k,), g) for g, k in enumerate(sizes)])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(len(ids)))]


def loop_stats(scores, groups):
    """Per answer: (mean, Bessel std, scores of the others in its group), by plain Python."""
    s, g = scores.tolist(), groups.tolist()
    out = []
    for i in range(len(s)):
        members = [s[j] for j in range(len(s)) if g[j] == g[i]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1)) if len(members) > 1 else 0.0
        others = [s[j] for j in range(len(s)) if g[j] == g[i] and j != i]
        out.append((mean, std, others))
    return out


# ----------------------------------------------------------------------------- group estimators

@pytest.mark.parametrize("sizes", [[4, 4, 4], [2, 2, 2, 2, 2], [3, 5, 2], [8]])
def test_group_estimators_match_loops(sizes):
    groups = groups_of(sizes)
    scores = torch.randn(len(groups), generator=torch.Generator().manual_seed(7), dtype=F64) * 2
    ref = loop_stats(scores, groups)
    grpo = grpo_advantages(scores, groups)
    dr = grpo_advantages(scores, groups, scale_by_std=False)
    rloo = rloo_advantages(scores, groups)
    for i, (mean, std, others) in enumerate(ref):
        r = scores[i].item()
        assert grpo[i].item() == pytest.approx((r - mean) / (std + EPS), abs=1e-12)
        assert dr[i].item() == pytest.approx(r - mean, abs=1e-12)
        assert rloo[i].item() == pytest.approx(r - sum(others) / len(others), abs=1e-12)
    st = group_stats(scores, groups)
    assert torch.allclose(st["std"], torch.tensor([s for _, s, _ in ref], dtype=F64), atol=1e-12)
    assert st["size"].tolist() == [sizes[g] for g in groups.tolist()]


def test_dr_grpo_differs_from_grpo_exactly_by_the_group_std():
    groups = groups_of([4, 4, 3])
    scores = torch.randn(11, generator=torch.Generator().manual_seed(3), dtype=F64)
    std = group_stats(scores, groups)["std"]
    assert torch.allclose(grpo_advantages(scores, groups) * (std + EPS), grpo_advantages(scores, groups, False),
                          atol=1e-14)
    # and RLOO is Dr. GRPO's advantage times K / (K - 1)
    k = group_stats(scores, groups)["size"].to(F64)
    assert torch.allclose(rloo_advantages(scores, groups), grpo_advantages(scores, groups, False) * k / (k - 1),
                          atol=1e-12)


def test_k2_groups_by_hand():
    # Groups (1, 0) and (0.5, 2): mean 0.5 and 1.25; Bessel std |a - b| / sqrt(2) = 0.7071 and 1.0607.
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=F64)
    groups = torch.tensor([0, 0, 1, 1])
    s = 1 / math.sqrt(2)
    assert grpo_advantages(scores, groups).tolist() == pytest.approx(
        [0.5 / (s + EPS), -0.5 / (s + EPS), -0.75 / (1.5 * s + EPS), 0.75 / (1.5 * s + EPS)], abs=1e-12)
    assert grpo_advantages(scores, groups, False).tolist() == pytest.approx([0.5, -0.5, -0.75, 0.75])
    assert rloo_advantages(scores, groups).tolist() == pytest.approx([1.0, -1.0, -1.5, 1.5])  # r_i - r_other


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -3.7])
def test_all_equal_rewards_give_exactly_zero_and_no_nan(value):
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not depend on the mean being exact.
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([value] * 3 + [1.0, 0.0, 1.0], dtype=torch.float32)
    for adv in (grpo_advantages(scores, groups), grpo_advantages(scores, groups, False),
                rloo_advantages(scores, groups)):
        assert not torch.isnan(adv).any()
        assert adv[:3].tolist() == [0.0, 0.0, 0.0]
        assert adv[3:].abs().min() > 0
    assert group_stats(scores, groups)["equal"].tolist() == [True] * 3 + [False] * 3
    two = grpo_advantages(torch.tensor([2.0, 2.0]), torch.tensor([5, 5]))  # K = 2, std 0
    assert two.tolist() == [0.0, 0.0]


def test_rloo_refuses_a_group_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_repeated_prompts_form_separate_groups():
    """The same prompt drawn twice in one batch: two groups of K, never one of 2K; ids follow positions."""
    a = PromptItem([1, 2], "same", {"answer": "1"}, "p.jsonl:1")
    b = PromptItem([3], "other", {"answer": "2"}, "p.jsonl:2")
    items, groups = repeat_prompts([a, b, a], 3, first_group=10)
    assert [it.where for it in items] == ["p.jsonl:1"] * 3 + ["p.jsonl:2"] * 3 + ["p.jsonl:1"] * 3
    assert groups.tolist() == [10, 10, 10, 11, 11, 11, 12, 12, 12]
    scores = torch.tensor([1.0, 0.0, 0.0, 5.0, 5.0, 6.0, 1.0, 1.0, 0.0], dtype=F64)
    dr = grpo_advantages(scores, groups, scale_by_std=False)
    assert dr.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 1 / 3, 1 / 3, -2 / 3])


# ----------------------------------------------------------------------------- REINFORCE++

def test_discounted_returns_and_reinforce_pp_match_loops():
    g = torch.Generator().manual_seed(5)
    lengths = [3, 6, 1, 5]
    T, gamma = 6, 0.9
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to(F64)
    rewards = torch.randn(4, T, generator=g, dtype=F64)
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))  # garbage under the mask
    G = discounted_returns(rewards, mask, gamma)
    flat = []
    for b, n in enumerate(lengths):
        for t in range(T):
            want = sum(gamma ** (s - t) * rewards[b, s].item() for s in range(t, n)) if t < n else 0.0
            assert G[b, t].item() == pytest.approx(want, abs=1e-10)
            if t < n:
                flat.append(want)
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    A = reinforce_pp_advantages(rewards, mask, gamma)
    for b, n in enumerate(lengths):
        for t in range(T):
            want = (G[b, t].item() - mean) / math.sqrt(std ** 2 + 1e-8) if t < n else 0.0
            assert A[b, t].item() == pytest.approx(want, abs=1e-9)


def test_std_from_sums():
    x = torch.tensor([1.0, 4.0, 2.0, 8.0], dtype=F64)
    assert std_from_sums(4, float(x.sum()), float(x.square().sum())) == pytest.approx(x.std().item(), abs=1e-12)
    assert std_from_sums(1, 3.0, 9.0) == 0.0


# ----------------------------------------------------------------------------- the step-3 buffer

def _algo_args(estimator, *flags, k=4):
    base = ["--actor_model_name_or_path", "a", "--data_path", "p.jsonl", "--output_dir", "o",
            "--advantage_estimator", estimator, "--n_samples_per_prompt", str(k),
            "--missing_eos_penalty", "0.5", "--clip_reward_value", "3", "--kl_coef", "0.2", "--gamma", "0.9"]
    if estimator == "gae":
        base += ["--critic_model_name_or_path", "c"]
    else:
        base += ["--reward_funcs", "utils.reward_funcs:exact_match"]
    args = parse(GROUPS, "test", base + list(flags), required=REQUIRED)
    return args, resolve_algorithm(args)


def _fake_rollout(B, T, k, seed):
    """A rollout batch as generate() + experience() leave it, with garbage (1e4) under every mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    garbage = lambda x: torch.where(mask.bool(), x, torch.full_like(x, 1e4))  # noqa: E731
    score = torch.randint(0, 3, (B,), generator=g).float() - 0.5  # ties within groups are likely
    score[:k] = 1.0  # the first group: all equal
    has_eos = lengths < T
    has_eos[:k] = True  # so the first group's final rewards (after the missing-EOS penalty) stay equal
    P = 3
    return {"action_mask": mask, "logp": garbage(-torch.rand(B, T, generator=g)),
            "ref_logp": garbage(-torch.rand(B, T, generator=g)), "entropy": garbage(torch.rand(B, T, generator=g)),
            "score": score, "has_eos": has_eos, "groups": torch.arange(B) // k + 100 * seed,
            "seq": torch.zeros(B, P + T, dtype=torch.long), "answers": torch.zeros(B, T, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1), "prompt_width": P}


def _reference(args, algo, rollouts):
    """Advantages per answer (lists of token values) by plain loops over every answer of every rollout."""
    c = args.kl_coef if algo.kl_in == "reward" else 0.0
    answers = []  # (score, per-token kl, group key, n)
    for b in rollouts:
        for i in range(b["score"].numel()):
            n = int(b["action_mask"][i].sum())
            s = b["score"][i].item() - (0.5 if not b["has_eos"][i] else 0.0)
            s = max(-3.0, min(3.0, s))
            kl = [b["logp"][i, t].item() - b["ref_logp"][i, t].item() for t in range(n)]
            answers.append((s, kl, int(b["groups"][i]), n))
    by_group = {}
    for s, _, gk, _ in answers:
        by_group.setdefault(gk, []).append(s)
    out = []
    if algo.estimator in ("grpo", "dr_grpo", "rloo"):
        # The score less its group baseline, divided by the scores' std (group or batch), minus kl_coef x the
        # summed KL less its group baseline (never divided).
        scores = [s for s, _, _, _ in answers]
        mean_all = sum(scores) / len(scores)
        batch_std = math.sqrt(sum((x - mean_all) ** 2 for x in scores) / (len(scores) - 1))
        members = {}
        for s, kl, gk, _ in answers:
            members.setdefault(gk, []).append((s, sum(kl)))

        def less_baseline(x, mem):
            return x - (sum(mem) - x) / (len(mem) - 1) if algo.estimator == "rloo" else x - sum(mem) / len(mem)

        for s, kl, gk, n in answers:
            mem_s, mem_k = [m[0] for m in members[gk]], [m[1] for m in members[gk]]
            m = sum(mem_s) / len(mem_s)
            std = math.sqrt(sum((x - m) ** 2 for x in mem_s) / (len(mem_s) - 1))
            a = 0.0 if max(mem_s) == min(mem_s) else less_baseline(s, mem_s)
            if algo.scale == "group":
                a = a / (std + EPS)
            elif algo.scale == "batch":
                a = a / (batch_std + EPS)
            out.append([a - c * less_baseline(sum(kl), mem_k)] * n)
        return out
    # reinforce_pp(_baseline): token rewards, discounted returns, whitening over every token
    returns = []
    for s, kl, gk, n in answers:
        if algo.estimator == "reinforce_pp_baseline":
            s = s - sum(by_group[gk]) / len(by_group[gk])
        r = [-c * x for x in kl]
        r[-1] += s
        returns.append([sum(args.gamma ** (u - t) * r[u] for u in range(t, n)) for t in range(n)])
    flat = [x for row in returns for x in row]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    if algo.scale == "none":
        return returns
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in returns]


@pytest.mark.parametrize("estimator, flags", [
    ("grpo", []), ("dr_grpo", []), ("rloo", []), ("grpo", ["--scale_rewards", "batch"]),
    ("rloo", ["--scale_rewards", "group"]), ("reinforce_pp", []), ("reinforce_pp_baseline", []),
    ("reinforce_pp_baseline", ["--scale_rewards", "none"]), ("grpo", ["--kl_in", "loss", "--kl_estimator", "k3"]),
])
def test_buffer_advantages_match_loops_with_garbage_under_the_mask(estimator, flags):
    args, algo = _algo_args(estimator, *flags)
    rollouts = [_fake_rollout(8, 5, 4, seed) for seed in (1, 2)]  # two generation batches
    rows, stats, n = build_buffer(args, algo, rollouts, args.kl_coef, RunningMoments())
    want = _reference(args, algo, rollouts)
    assert n == 16 and len(rows) == 16
    for row, ref in zip(rows, want):
        assert row["advantages"].tolist() == pytest.approx(ref, abs=2e-5)
        assert math.isfinite(float(row["advantages"].abs().max()))
    assert 0 < stats["groups_all_equal"] <= 1 and "group_reward_std" in stats
    assert stats["response_length_max"] == 5 and stats["clipped_rate"] == pytest.approx(
        1 - sum(float(b["has_eos"].sum()) for b in rollouts) / 16)
    assert ("ref_logp" in rows[0]) == (algo.kl_in == "loss")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_group_of_equal_scores_gets_only_the_kl_penalty_at_its_own_scale(estimator):
    """--kl_in reward with the group std: four equal scores and per-token KLs of 0.10 to 0.16 nats. The KL
    part is kl_coef x its own differences (a few hundredths), not divided by the group's std, which made
    it +-1.16 whatever kl_coef; a group with different scores keeps its unit-scale score advantages."""
    flags = ["--scale_rewards", "group"] if estimator == "rloo" else []
    args, algo = _algo_args(estimator, *flags, k=4)
    B, T = 8, 5
    mask = torch.ones(B, T, dtype=torch.long)
    kl = torch.tensor([0.10, 0.12, 0.14, 0.16] * 2)
    b = {"action_mask": mask, "logp": torch.zeros(B, T), "ref_logp": -kl[:, None].expand(B, T).clone(),
         "entropy": torch.zeros(B, T), "score": torch.tensor([1.0] * 4 + [0.0, 1.0, 0.0, 1.0]),
         "has_eos": torch.ones(B, dtype=torch.bool), "groups": torch.arange(B) // 4,
         "seq": torch.zeros(B, 3 + T, dtype=torch.long), "answers": torch.zeros(B, T, dtype=torch.long),
         "attention_mask": torch.ones(B, 3 + T, dtype=torch.long), "prompt_width": 3}
    rows, stats, _ = build_buffer(args, algo, [b], 0.1, RunningMoments())
    adv = torch.stack([r["advantages"][0] for r in rows])
    summed = kl * T
    for g in (slice(0, 4), slice(4, 8)):
        base = summed[g] - (summed[g].sum() - summed[g]) / 3 if estimator == "rloo" else summed[g] - summed[g].mean()
        kl_part = -0.1 * base
        score = b["score"][g]
        if g.start == 0:
            assert adv[g].tolist() == pytest.approx(kl_part.tolist(), abs=1e-6)
            assert adv[g].abs().max() < 0.05
        else:
            s_base = score - (score.sum() - score) / 3 if estimator == "rloo" else score - score.mean()
            want = s_base / (score.std() + EPS) + kl_part
            assert adv[g].tolist() == pytest.approx(want.tolist(), abs=1e-5)
    assert stats["groups_all_equal"] == 0.5


def test_buffer_with_one_group_of_equal_rewards_is_all_zero():
    args, algo = _algo_args("grpo", k=8)
    b = _fake_rollout(8, 5, 8, 3)
    rows, stats, _ = build_buffer(args, algo, [b], 0.0, RunningMoments())
    assert all(float(r["advantages"].abs().max()) == 0.0 for r in rows)
    assert stats["groups_all_equal"] == 1.0



def test_a_reward_function_that_applied_to_no_answer_logs_no_mean():
    """None means "does not apply": a function that returned None for every answer of the step was logged
    as reward/<name> 0.0, read as "every answer wrong". It has no mean, so it is left out; a function that
    applied to some answers logs the mean of those only (two rollouts, over all of them)."""
    args, algo = _algo_args("grpo", k=4)
    rollouts = [_fake_rollout(8, 5, 4, seed) for seed in (1, 2)]
    rollouts[0]["func_rewards"] = {"never": [None] * 8, "some": [None] * 6 + [1.0, 0.5]}
    rollouts[1]["func_rewards"] = {"never": [None] * 8, "some": [None] * 7 + [0.0]}
    _, stats, _ = build_buffer(args, algo, rollouts, 0.0, RunningMoments())
    assert "reward/never" not in stats and stats["reward/some"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- loss aggregation

def _model_and_batch(seed=0):
    """A tiny policy (embedding + linear) and 8 answers of very different lengths (1..8 tokens)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    V, T, B = 11, 8, 8
    model = torch.nn.Sequential(torch.nn.Embedding(V, 6), torch.nn.Linear(6, V)).double()
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.arange(1, B + 1)[:, None]).to(F64)
    old = -torch.rand(B, T, generator=g, dtype=F64) - 1.0
    adv = torch.randn(B, generator=g, dtype=F64)[:, None].expand(B, T)
    return model, tokens, mask, old, adv


def _per_token(model, tokens, old, adv):
    logp = torch.log_softmax(model(tokens), -1).gather(-1, tokens[..., None])[..., 0]
    return policy_loss_per_token(logp, old, adv, 0.2)[0]


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _split_grads(mode, world, ga, naive=False):
    """Simulate DeepSpeed: each rank's micro-batch losses / ga are summed, gradients averaged over ranks."""
    model, tokens, mask, old, adv = _model_and_batch()
    n_tok, n_seq, L = float(mask.sum()), float(mask.shape[0]), 8.0
    per = 8 // (world * ga)
    rank_grads = []
    for r in range(world):
        model.zero_grad()
        for m in range(ga):
            sl = slice((r * ga + m) * per, (r * ga + m + 1) * per)
            pt = _per_token(model, tokens[sl], old[sl], adv[sl])
            if naive:  # each micro-batch normalised by its own counts: what the contract forbids
                loss = aggregate_loss(pt, mask[sl], mode, float(mask[sl].sum()), float(per), L)
                (loss / ga).backward()
            else:
                loss = aggregate_loss(pt, mask[sl], mode, n_tok, n_seq, L)
                (loss * step_loss_scale(world, ga) / ga).backward()
        rank_grads.append(_grads(model).clone())
    return sum(rank_grads) / world


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_loss_aggregation_is_invariant_to_rank_and_accumulation_splits(mode):
    model, tokens, mask, old, adv = _model_and_batch()
    model.zero_grad()
    full_loss = aggregate_loss(_per_token(model, tokens, old, adv), mask, mode, float(mask.sum()), 8.0, 8.0)
    full_loss.backward()
    full = _grads(model).clone()
    one = _split_grads(mode, 1, 4)   # 1 rank x GA 4
    two = _split_grads(mode, 2, 2)   # 2 ranks x GA 2
    assert torch.allclose(one, full, atol=1e-12, rtol=1e-10) and torch.allclose(two, full, atol=1e-12, rtol=1e-10)
    # The test has teeth: normalising each micro-batch by its own token count (a per-micro-batch token
    # mean) gives a different gradient when answer lengths differ. The per-answer modes only count
    # answers, and every micro-batch holds the same number, so for them the local count happens to agree.
    if mode == "token_mean":
        assert not torch.allclose(_split_grads(mode, 2, 2, naive=True), full, atol=1e-6)


def test_loss_aggregation_by_hand():
    # Two answers: losses [1, 3] (length 2) and [5] (length 1); 3 tokens, 2 answers, L = 4.
    per_token = torch.tensor([[1.0, 3.0], [5.0, 99.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert aggregate_loss(per_token, mask, "token_mean", 3, 2).item() == pytest.approx(9 / 3)
    assert aggregate_loss(per_token, mask, "seq_mean_token_mean", 3, 2).item() == pytest.approx((2 + 5) / 2)
    assert aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", 3, 2, 4).item() == pytest.approx(9 / 8)
    with pytest.raises(ValueError):
        aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", 3, 2)
    # token_mean over one micro-batch's own tokens is policy_loss's mean
    logp, old = torch.randn(2, 2), torch.randn(2, 2)
    adv = torch.randn(2, 2)
    pt, _ = policy_loss_per_token(logp, old, adv, 0.2)
    assert aggregate_loss(pt, mask, "token_mean", 3, 2).item() == pytest.approx(
        policy_loss(logp, old, adv, mask, 0.2)[0].item(), abs=1e-7)


# ----------------------------------------------------------------------------- KL as a loss

def test_kl_estimator_gradients_as_losses_exactly():
    """Exact expectations over a 4-outcome policy: E_pi[grad k1] = 0, E_pi[grad k2] = grad KL(pi||ref)
    (unbiased), E_pi[grad k3] = grad KL(ref||pi), the reverse KL's gradient (biased for KL(pi||ref))."""
    theta = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=F64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.0], dtype=F64), -1)

    def expected_grad(est):
        logp = torch.log_softmax(theta, -1)
        p = logp.exp().detach()  # samples come from pi: the expectation weights do not carry gradient
        (g,) = torch.autograd.grad((p * kl_penalty(logp, ref, est)).sum(), theta)
        return g

    logp = torch.log_softmax(theta, -1)
    (fwd,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)        # grad KL(pi || ref)
    (rev,) = torch.autograd.grad((ref.exp() * (ref - torch.log_softmax(theta, -1))).sum(), theta)  # KL(ref || pi)
    assert torch.allclose(expected_grad("k1"), torch.zeros(4, dtype=F64), atol=1e-14)
    assert torch.allclose(expected_grad("k2"), fwd, atol=1e-12)
    assert torch.allclose(expected_grad("k3"), rev, atol=1e-12)
    assert not torch.allclose(rev, fwd, atol=1e-3)


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, message", [
    (["--advantage_estimator", "grpo", "--reward_funcs", "m:f"], "--n_samples_per_prompt >= 2"),
    (["--advantage_estimator", "rloo", "--n_samples_per_prompt", "1", "--reward_funcs", "m:f"],
     "--n_samples_per_prompt"),
    (["--advantage_estimator", "grpo", "--n_samples_per_prompt", "4", "--reward_funcs", "m:f",
      "--critic_model_name_or_path", "c"], "--critic_model_name_or_path is not used"),
    (["--advantage_estimator", "grpo", "--n_samples_per_prompt", "4"], "no reward"),
    ([], "--critic_model_name_or_path"),
    (["--critic_model_name_or_path", "c", "--scale_rewards", "group"], "--whiten_advantages"),
    (["--advantage_estimator", "reinforce_pp", "--reward_funcs", "m:f", "--scale_rewards", "group"], "batch or none"),
    (["--critic_model_name_or_path", "c", "--kl_in", "loss"], "k1"),
    (["--critic_model_name_or_path", "c", "--kl_coef", "0", "--target_kl", "1"], "--target_kl"),
    (["--advantage_estimator", "grpo", "--n_samples_per_prompt", "3", "--reward_funcs", "m:f",
      "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "4"], "3 answers"),
    (["--critic_model_name_or_path", "c", "--cut_answer_score", "lowest", "--clip_reward_value", "0"],
     "--clip_reward_value 0"),
    (["--critic_model_name_or_path", "c", "--cut_answer_score", "lowest", "--missing_eos_penalty", "1"],
     "--missing_eos_penalty applies with --cut_answer_score scored"),
])
def test_algorithm_flags_refuse_what_cannot_work(flags, message):
    from step3_ppo.models import check_args

    args = parse(GROUPS, "test", ["--actor_model_name_or_path", "a", "--data_path", "p", "--output_dir", "o", *flags],
                 required=REQUIRED)
    with pytest.raises(UserError, match=message):
        check_args(args)


def test_algorithm_defaults_and_models_loaded():
    args, algo = _algo_args("gae")
    assert (algo.critic, algo.reference, algo.reward_model, algo.loss_agg, algo.k) == (True, True, "c", "token_mean", 4)
    base = ["--actor_model_name_or_path", "a", "--data_path", "p", "--output_dir", "o"]
    ppo = resolve_algorithm(parse(GROUPS, "t", base + ["--critic_model_name_or_path", "c"], required=REQUIRED))
    assert (ppo.estimator, ppo.k, ppo.reward_model, ppo.kl_in) == ("gae", 1, "c", "reward")  # today's PPO
    rule_ppo = resolve_algorithm(parse(GROUPS, "t", base + ["--critic_model_name_or_path", "c", "--reward_funcs",
                                                           "m:f"], required=REQUIRED))
    assert rule_ppo.reward_model is None and rule_ppo.critic  # with reward functions a model is used only if named
    grpo = resolve_algorithm(parse(GROUPS, "t", base + ["--advantage_estimator", "grpo", "--n_samples_per_prompt",
                                                        "8", "--reward_model_name_or_path", "r", "--kl_coef", "0"],
                                   required=REQUIRED))
    assert (grpo.critic, grpo.reference, grpo.reward_model, grpo.scale, grpo.loss_agg) == (
        False, False, "r", "group", "seq_mean_token_mean")
    dr = _algo_args("dr_grpo")[1]
    assert (dr.scale, dr.loss_agg) == ("none", "seq_mean_token_sum_norm")
    assert _algo_args("reinforce_pp", k=1)[1].scale == "batch"
    args = types.SimpleNamespace(**vars(_algo_args("grpo")[0]))
    assert args.advantage_estimator == "grpo"  # resolving never changes the parsed flags


def test_rollout_temperature_defaults_per_estimator_and_the_flag_wins():
    """--temperature unset: PPO with a critic samples at 0.7 (README, Alignment defaults), the critic-free
    estimators at 1.0; a given --temperature is used as it is, for every estimator."""
    base = ["--actor_model_name_or_path", "a", "--data_path", "p", "--output_dir", "o"]
    ppo = base + ["--critic_model_name_or_path", "c"]
    grpo = base + ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "4", "--reward_model_name_or_path", "r"]
    run = lambda flags: resolve_algorithm(parse(GROUPS, "t", flags, required=REQUIRED))  # noqa: E731
    assert run(ppo).temperature == 0.7 and run(grpo).temperature == 1.0
    for est in ("dr_grpo", "rloo", "reinforce_pp_baseline"):
        assert _algo_args(est)[1].temperature == 1.0
    assert run(ppo + ["--temperature", "1.0"]).temperature == 1.0
    assert run(grpo + ["--temperature", "0.6"]).temperature == 0.6
    assert parse(GROUPS, "t", ppo, required=REQUIRED).temperature is None  # the flag itself stays unset


def test_a_cut_answer_gets_the_lowest_score_by_default_when_a_reward_model_scores_it():
    """--cut_answer_score auto: with a reward model, clipping on and no --missing_eos_penalty, an answer cut
    at --max_answer_seq_len scores -clip_reward_value whatever the reward model read at its last token;
    with reward functions only, with a penalty of the user's own, or with clipping off, the score stands."""
    from step3_ppo.trainer import final_score

    base = ["--actor_model_name_or_path", "a", "--data_path", "p", "--output_dir", "o"]

    def resolved(*flags):
        args = parse(GROUPS, "t", base + list(flags), required=REQUIRED)
        return args, resolve_algorithm(args)

    b = {"score": torch.tensor([4.0, 9.0, -1.0, 2.0]), "has_eos": torch.tensor([True, True, False, False])}
    args, algo = resolved("--critic_model_name_or_path", "c")  # PPO's defaults: clip 5
    assert algo.cut_score == "lowest" and final_score(args, algo, b, RunningMoments()).tolist() == [4.0, 5.0, -5.0, -5.0]
    args, algo = resolved("--critic_model_name_or_path", "c", "--missing_eos_penalty", "0.5")
    assert algo.cut_score == "scored" and final_score(args, algo, b, RunningMoments()).tolist() == [4.0, 5.0, -1.5, 1.5]
    args, algo = resolved("--critic_model_name_or_path", "c", "--clip_reward_value", "0")
    assert algo.cut_score == "scored" and final_score(args, algo, b, RunningMoments()).tolist() == [4.0, 9.0, -1.0, 2.0]
    args, algo = resolved("--critic_model_name_or_path", "c", "--cut_answer_score", "scored")
    assert algo.cut_score == "scored" and final_score(args, algo, b, RunningMoments()).tolist() == [4.0, 5.0, -1.0, 2.0]
    grpo = ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "4", "--reward_funcs", "m:f"]
    assert resolved(*grpo)[1].cut_score == "scored"  # a reward function decides what a cut answer is worth
    assert resolved(*grpo, "--reward_model_name_or_path", "r")[1].cut_score == "lowest"
    args, algo = resolved(*grpo, "--cut_answer_score", "lowest", "--clip_reward_value", "2")
    assert algo.cut_score == "lowest" and final_score(args, algo, b, RunningMoments()).tolist() == [2.0, 2.0, -2.0, -2.0]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_under_the_mask_is_zero_even_where_padding_would_overflow(estimator):
    """Padding log-probabilities are arbitrary: k3 of logp - ref = -200 is exp(200) = inf in fp32, and
    inf * 0 is NaN. The KL must be computed as 0 there, in value and in gradient."""
    mask = torch.tensor([[1, 1, 0, 0]])
    logp = torch.tensor([[-0.5, -1.0, -200.0, -300.0]], requires_grad=True)
    ref = torch.tensor([[-0.7, -0.9, 0.0, 0.0]])
    kl = masked_kl(logp, ref, mask, estimator)
    assert kl[0, 2:].tolist() == [0.0, 0.0]
    assert torch.allclose(kl[0, :2], kl_penalty(logp[:, :2], ref[:, :2], estimator)[0])
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2:].tolist() == [0.0, 0.0]
    rewards, kl2, _ = compute_rewards(logp.detach(), ref, torch.tensor([1.0]), mask, 0.1, estimator)
    assert torch.isfinite(rewards).all() and torch.isfinite(kl2).all()


def test_critic_warmup_steps_resolve_to_a_tenth_of_the_steps_and_only_with_a_critic():
    """-1 (the default): a tenth of the steps, rounded half up, so a smoke run of a few steps trains the actor."""
    from step3_ppo.config import critic_warmup_steps

    args, algo = _algo_args("gae")
    assert args.critic_warmup_steps == -1
    assert [critic_warmup_steps(args, algo, n) for n in (1, 4, 5, 14, 15, 36, 1000)] == [0, 0, 1, 1, 2, 4, 100]
    args, algo = _algo_args("gae", "--critic_warmup_steps", "7")
    assert [critic_warmup_steps(args, algo, n) for n in (5, 36)] == [5, 7]  # never more than the run
    args, algo = _algo_args("gae", "--critic_warmup_steps", "0")
    assert critic_warmup_steps(args, algo, 36) == 0
    args, algo = _algo_args("grpo", k=4)
    assert critic_warmup_steps(args, algo, 36) == 0  # no critic: nothing to warm up, the actor trains from step 1
