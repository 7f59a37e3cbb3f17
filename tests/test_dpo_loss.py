"""DPO losses against hand-derived values, and the DPO trainer's log-prob plumbing on tiny models."""
from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import DATA
from dpo.trainer import (PairStats, accepts_logits_to_keep, anchored_labels, attach_reference, concatenated_logps,
                         forward_pair, local_reference_logps, pair_loss, precompute_reference, reference_logps)
from utils import ds
from utils.data import load_file
from utils.encoding import IGNORE, Encoder
from utils.model import disable_dropout
from utils.pairs import collate_pairs, encode_pairs
from utils.losses import chosen_nll_loss, dpo_loss, kl_from_log_probs, log_probs, shifted_log_probs, token_kl_sums

# Three pairs used by every hand-derived example:
#   policy chosen / rejected  [-1, -2, -3] / [-2, -2, -1]
#   ref    chosen / rejected  [-1.5, -2, -2] / [-1.5, -2.5, -2]
#   log-ratios: chosen  r_w = [0.5, 0, -1],  rejected  r_l = [-0.5, 0.5, 1]
#   margin h = r_w - r_l = [1, -0.5, -2];  with beta = 0.5:  beta*h = [0.5, -0.25, -1]
PC = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
PR = torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64)
RC = torch.tensor([-1.5, -2.0, -2.0], dtype=torch.float64)
RR = torch.tensor([-1.5, -2.5, -2.0], dtype=torch.float64)
BETA = 0.5
Z = [0.5, -0.25, -1.0]  # beta * h, derived above


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_hand_derived():
    # -log sigma(z) = log(1 + e^{-z}) = softplus(-z):
    #   softplus(-0.5) = 0.474077, softplus(0.25) = 0.825939, softplus(1) = 1.313262; mean 0.871093
    expected = sum(softplus(-z) for z in Z) / 3
    assert expected == pytest.approx(0.871093, abs=1e-6)
    loss, d = dpo_loss(PC, PR, RC, RR, BETA, "sigmoid")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # Rewards are beta * log-ratios: chosen [0.25, 0, -0.5], rejected [-0.25, 0.25, 0.5].
    assert d["rewards/chosen"].tolist() == [0.25, 0.0, -0.5]
    assert d["rewards/rejected"].tolist() == [-0.25, 0.25, 0.5]
    assert d["rewards/margins"].tolist() == [0.5, -0.25, -1.0]
    assert d["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert d["losses"].tolist() == pytest.approx([softplus(-z) for z in Z], abs=1e-12)


def test_conservative_label_smoothing_hand_derived():
    # eps = 0.25: loss = 0.75 * softplus(-z) + 0.25 * softplus(z)
    #   pair 1: 0.75*0.474077 + 0.25*0.974077 = 0.599077 ; pair 2: 0.75*0.825939 + 0.25*0.575939 = 0.763439
    #   pair 3: 0.75*1.313262 + 0.25*0.313262 = 1.063262 ; mean 0.808593
    expected = sum(0.75 * softplus(-z) + 0.25 * softplus(z) for z in Z) / 3
    assert expected == pytest.approx(0.808593, abs=1e-6)
    loss, _ = dpo_loss(PC, PR, RC, RR, BETA, "sigmoid", label_smoothing=0.25)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_hinge_hand_derived():
    # max(0, 1 - beta*h) = max(0, [0.5, 1.25, 2]) -> mean (0.5 + 1.25 + 2) / 3 = 1.25
    loss, d = dpo_loss(PC, PR, RC, RR, BETA, "hinge")
    assert loss.item() == pytest.approx(1.25, abs=1e-12)
    # A pair past the margin (beta*h >= 1) contributes nothing: h = 4 -> max(0, 1 - 2) = 0.
    loss, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-4.0]), torch.tensor([0.0]), torch.tensor([0.0]), BETA,
                       "hinge")
    assert loss.item() == 0.0


def test_ipo_hand_derived_per_token_average():
    # Response lengths chosen [2, 1, 4], rejected [1, 2, 2]:
    #   per-token log-ratios chosen [0.5/2, 0/1, -1/4] = [0.25, 0, -0.25]; rejected [-0.5, 0.25, 0.5]
    #   h_avg = [0.75, -0.25, -0.75]; target 1/(2*beta) = 1
    #   (h_avg - 1)^2 = [0.0625, 1.5625, 3.0625] -> mean 4.6875 / 3 = 1.5625
    lc, lr = torch.tensor([2.0, 1.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])
    loss, d = dpo_loss(PC, PR, RC, RR, BETA, "ipo", chosen_lengths=lc, rejected_lengths=lr)
    assert loss.item() == pytest.approx(1.5625, abs=1e-12)
    # Rewards stay sequence-level for every loss type, so metrics compare across --loss_type.
    assert d["rewards/chosen"].tolist() == [0.25, 0.0, -0.5]
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(PC, PR, RC, RR, BETA, "ipo")


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, BETA, "kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, BETA, "hinge", label_smoothing=0.1)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_policy_equals_reference(beta):
    # h = 0 for every pair: sigmoid gives -log sigma(0) = log 2 whatever the log-probs; hinge gives 1;
    # IPO gives (0 - 1/(2 beta))^2 = 1/(4 beta^2). Rewards are all 0, so no pair counts as accurate.
    torch.manual_seed(0)
    pc, pr = -10 * torch.rand(5, dtype=torch.float64), -10 * torch.rand(5, dtype=torch.float64)
    n = torch.tensor([3.0, 4, 5, 6, 7])
    loss, d = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta, "sigmoid")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert d["rewards/accuracies"].sum() == 0 and d["rewards/margins"].abs().max() == 0
    assert dpo_loss(pc, pr, pc, pr, beta, "hinge")[0].item() == pytest.approx(1.0, abs=1e-12)
    ipo = dpo_loss(pc, pr, pc, pr, beta, "ipo", chosen_lengths=n, rejected_lengths=n)[0].item()
    assert ipo == pytest.approx(1 / (4 * beta ** 2), abs=1e-9)


def test_sigmoid_gradient_at_reference():
    # d/dx [-log sigma(beta*x)] at x = 0 is -beta * sigma(0) = -beta/2, so with B pairs (mean):
    # dL/d(policy_chosen) = -beta/(2B), dL/d(policy_rejected) = +beta/(2B).
    pc = torch.tensor([-3.0, -4.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-5.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), 0.2, "sigmoid")
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([-0.05, -0.05], abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([0.05, 0.05], abs=1e-12)


def test_num_pairs_makes_splits_add_up():
    # Summed per-pair losses over a global pair count: the halves add up to the full-batch mean.
    full, _ = dpo_loss(PC, PR, RC, RR, BETA, "sigmoid")
    halves = (slice(0, 1), slice(1, 3))
    parts = sum(dpo_loss(PC[s], PR[s], RC[s], RR[s], BETA, "sigmoid", num_pairs=3)[0] for s in halves)
    assert parts.item() == pytest.approx(full.item(), abs=1e-12)


def test_chosen_nll_hand_derived():
    # Two chosen responses with summed log-probs -2 and -4 over 3 tokens in all: NLL per token = 6 / 3 = 2.
    loss, d = chosen_nll_loss(torch.tensor([-2.0, -4.0]), 3)
    assert loss.item() == pytest.approx(2.0) and d["nll_sum"] == pytest.approx(6.0)


def test_pair_loss_adds_rpo_term():
    # Rows are [chosen..., rejected...]; counts are response tokens. alpha * (3 + 5) / (2 + 4) is added.
    logps = torch.tensor([-3.0, -5.0, -1.0, -2.0])
    ref = torch.tensor([-3.0, -5.0, -1.0, -2.0])
    counts = torch.tensor([2, 4, 3, 3])
    args = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.5)
    loss, d = pair_loss(logps, counts, ref, args)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * 8 / 6, abs=1e-6)
    assert d["logps/chosen"].tolist() == [-3.0, -5.0] and d["chosen_tokens"].tolist() == [2, 4]


def test_token_kl_hand_derived():
    # Two-token vocabulary. Row 0: the reference gives (1/2, 1/2), the policy (3/4, 1/4) at the one labelled
    # position: KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3). Row 1's labelled position has equal distributions
    # (KL 0); the unlabelled positions of both rows differ a lot and count nothing. Labels are aligned with
    # the inputs: the logits at t predict the label at t + 1.
    ln = math.log
    pol = torch.tensor([[[ln(3), 0.0], [0.0, 9.0]], [[5.0, 0.0], [0.0, 2.0]]])
    ref = torch.tensor([[[0.0, 0.0], [9.0, 0.0]], [[0.0, 5.0], [1.0, 3.0]]])
    labels = torch.tensor([[IGNORE, 1], [IGNORE, IGNORE]])
    labels_1 = torch.tensor([[IGNORE, IGNORE], [IGNORE, 0]])
    pol2 = pol.clone()
    pol2[1, 0] = torch.tensor([0.0, 5.0])
    lp, lp2, ref_lp = (shifted_log_probs(x) for x in (pol, pol2, ref))
    assert token_kl_sums(lp, ref_lp, labels).tolist() == pytest.approx([0.5 * ln(4 / 3), 0.0], abs=1e-6)
    assert token_kl_sums(lp2, ref_lp, labels_1).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    kl = token_kl_sums(lp, ref_lp, labels_1)  # row 1: ref (e^0, e^5)/Z against the policy (e^5, e^0)/Z
    p = torch.softmax(torch.tensor([0.0, 5.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([5.0, 0.0], dtype=torch.float64), 0)
    assert kl.tolist() == pytest.approx([0.0, float((p * (p / q).log()).sum())], abs=1e-6)


def test_pair_loss_adds_the_anchor_per_chosen_token():
    # The anchor's summed KL (0.3 + 0.9) over the chosen tokens (2 + 4), weighted by anchor_coef 2.
    logps = torch.tensor([-3.0, -5.0, -1.0, -2.0])
    counts = torch.tensor([2, 4, 3, 3])
    args = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0, anchor_coef=2.0)
    loss, _ = pair_loss(logps, counts, logps, args, kl_sums=torch.tensor([0.3, 0.9]))
    assert loss.item() == pytest.approx(math.log(2) + 2.0 * 1.2 / 6, abs=1e-6)
    # split-invariant: two micro-batches normalised by the step's pairs and tokens add up to the whole
    halves = [pair_loss(logps[[i, i + 2]], counts[[i, i + 2]], logps[[i, i + 2]], args, 2, 6,
                        kl_sums=torch.tensor([[0.3, 0.9][i]]))[0] for i in (0, 1)]
    assert sum(h.item() for h in halves) == pytest.approx(loss.item(), abs=1e-6)


def test_the_anchor_holds_every_chosen_token_but_the_choice():
    # Rows [chosen; rejected], right-padded alike; labels are the last K = 5 positions. Pair 0 parts at
    # position 3 (4 against 9): that chosen label is left out, the tokens before and after it stay. Pair 1's
    # answers are the same (a pair of equals): every label stays.
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [7, 2, 3, 4, 5, 6], [1, 2, 3, 9, 5, 0], [7, 2, 3, 4, 5, 6]])
    labels = torch.tensor([[IGNORE, 3, 4, 5, IGNORE], [IGNORE, 3, 4, 5, 6],
                           [IGNORE, 3, 9, 5, IGNORE], [IGNORE, 3, 4, 5, 6]])
    assert anchored_labels({"input_ids": ids}, labels).tolist() == [[IGNORE, 3, IGNORE, 5, IGNORE],
                                                                     [IGNORE, 3, 4, 5, 6]]
    # A chosen answer that ends where the rejected one goes on: its EOS is the choice.
    ids = torch.tensor([[1, 2, 9, 0, 0], [1, 2, 4, 4, 9]])
    labels = torch.tensor([[IGNORE, 2, 9, IGNORE, IGNORE], [IGNORE, 2, 4, 4, 9]])
    assert anchored_labels({"input_ids": ids}, labels).tolist() == [[IGNORE, 2, IGNORE, IGNORE, IGNORE]]


def test_pair_stats_cover_the_whole_window():
    # Two batches of one pair each: the window means cover both, and invalid (filler) rows count 0.
    args = SimpleNamespace(beta=1.0, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0)
    stats = PairStats()
    for margin in (1.0, 3.0):
        _, d = pair_loss(torch.tensor([0.0, -margin]), torch.tensor([1, 1]), torch.tensor([0.0, 0.0]), args)
        stats.add(d)
    _, d = pair_loss(torch.tensor([0.0, 100.0]), torch.tensor([1, 1]), torch.tensor([0.0, 0.0]), args)
    stats.add(d, weight=torch.tensor([0.0]))
    out = stats.reduce(rpo_alpha=0.0)
    assert out["rewards/margins"] == pytest.approx(2.0)
    assert out["rewards/accuracies"] == 1.0
    assert out["loss"] == pytest.approx((softplus(-1.0) + softplus(-3.0)) / 2)


# --------------------------------------------------------------------------- tiny-model plumbing

def _pairs(tokenizer, n: int):
    samples = load_file(os.path.join(DATA, "preference.jsonl"), "pairs")[:n]
    enc = Encoder(tokenizer, "auto", 512)
    return enc, encode_pairs(samples, enc, "pairs")


def _policy_and_ref(path: str):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    disable_dropout(ref)
    policy = copy.deepcopy(ref)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # so the policy differs from the reference
    return policy, ref


def test_precomputed_and_live_reference_give_the_same_loss(tiny_dir, tokenizer_of):
    enc, items = _pairs(tokenizer_of("llama"), 7)
    policy, ref = _policy_and_ref(tiny_dir("llama"))
    args = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.5)
    live = collate_pairs(items, enc.pad_id)
    live_loss, _ = pair_loss(*concatenated_logps(policy, live), reference_logps(ref, live), args)
    # Precomputed in batches of 3 pairs (different padding than the live batch of 7).
    cached = precompute_reference(ref, items, 3, enc.pad_id)
    assert [it._replace(ref=None) for it in cached] == items
    batch = collate_pairs(cached, enc.pad_id)
    assert batch["ref_logps"].shape == (14,)
    pre_loss, _ = pair_loss(*concatenated_logps(policy, batch), reference_logps(None, batch), args)
    assert live_loss.item() != pytest.approx(math.log(2), abs=1e-3)  # the test would be vacuous otherwise
    assert pre_loss.item() == pytest.approx(live_loss.item(), abs=1e-5)


def test_precomputed_reference_sharded_over_ranks(tiny_dir, tokenizer_of, monkeypatch):
    # Two simulated ranks each compute their round-robin share (7 pairs: rank 0 gets 4, rank 1 gets 3
    # plus a filler row); attaching both shares gives every pair its own log-probs, as one rank does.
    enc, items = _pairs(tokenizer_of("llama"), 7)
    _, ref = _policy_and_ref(tiny_dir("llama"))
    single = precompute_reference(ref, items, 2, enc.pad_id)
    monkeypatch.setattr(ds, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(ds, "rank", lambda r=r: r)
        shares.append(local_reference_logps(ref, items, 2, enc.pad_id))
    assert [len(s) for s in shares] == [4, 3]
    sharded = attach_reference(items, shares)
    for a, b in zip(single, sharded):
        assert a._replace(ref=None) == b._replace(ref=None) and a.ref == pytest.approx(b.ref, abs=1e-5)
    assert len({it.ref for it in sharded}) == 7  # distinct pairs, distinct log-probs


def test_forward_pair_shares_one_log_softmax_and_matches_the_separate_formulas(tiny_dir, tokenizer_of):
    """With the anchor on, forward_pair computes each model's log-softmax once and reads both the sequence
    log-probs and the chosen rows' KL from it: the same numbers (and policy gradient) as the separate
    formulas, sequence log-probs of each model's own forward and the KL per anchored chosen token."""
    enc, items = _pairs(tokenizer_of("llama"), 5)
    policy, ref = _policy_and_ref(tiny_dir("llama"))
    batch = collate_pairs(items, enc.pad_id)
    args = SimpleNamespace(compute_fp32_loss=True, anchor_coef=5.0)
    logps, counts, ref_logps, kl = forward_pair(policy, ref, batch, args)
    (logps.sum() + kl.sum()).backward()
    fused = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    b = len(items)
    want_logps, want_counts = concatenated_logps(policy, batch)
    with torch.no_grad():
        want_ref = concatenated_logps(ref, batch)[0]
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:b]
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:b]
    held = anchored_labels(batch, batch["labels"])[:, 1:] != IGNORE  # the full-width labels: every position
    want_kl = (kl_from_log_probs(log_probs(logits[:, :-1]), log_probs(ref_logits[:, :-1])) * held).sum(-1)
    (want_logps.sum() + want_kl.sum()).backward()

    assert kl.shape == (b,) and float(kl.detach().min()) > 0  # the policy differs from the reference at every row
    assert torch.allclose(logps, want_logps, atol=1e-5) and counts.tolist() == want_counts.tolist()
    assert torch.allclose(ref_logps, want_ref, atol=1e-5) and torch.allclose(kl, want_kl, atol=1e-5)
    for got, p in zip(fused, policy.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-5)


def test_response_only_masking_when_pad_is_eos(tiny_dir, tokenizer_of):
    # gpt2 family: no pad token, so pad_id == eos_id. Each response's closing EOS must be in the loss;
    # the padding after it (the same id) must not.
    tok = tokenizer_of("gpt2")
    enc, items = _pairs(tok, 4)
    assert enc.pad_id == enc.eos_id
    batch = collate_pairs(items, enc.pad_id)
    rows = [(it.chosen, it.chosen_labels) for it in items] + [(it.rejected, it.rejected_labels) for it in items]
    assert len({len(ids) for ids, _ in rows}) > 1  # some rows are padded
    for i, (ids, _) in enumerate(rows):
        reply = [t for t, l in zip(*rows[i]) if l != IGNORE]
        text = tok.decode(reply[:-1])
        assert reply[-1] == enc.eos_id and text.strip().startswith("The ") and text.endswith(".")
        lab = batch["labels"][i]
        assert lab[len(ids) - 1] == enc.eos_id  # the EOS is labelled...
        assert (lab[len(ids):] == IGNORE).all() and (batch["input_ids"][i, len(ids):] == enc.eos_id).all()
        assert batch["attention_mask"][i].sum() == len(ids)  # ...and the padding with the same id is not
    # Summed log-probs equal a slow per-row loop over the unpadded reply tokens, EOS included (and
    # computing only the response positions' logits, as gpt2 allows, changes nothing).
    policy, _ = _policy_and_ref(tiny_dir("gpt2"))
    assert accepts_logits_to_keep(policy)
    with torch.no_grad():
        logps, counts = concatenated_logps(policy, batch)
        for i, (ids, labels) in enumerate(rows):
            lp = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            targets = [t for t in range(1, len(ids)) if labels[t] != IGNORE]
            assert counts[i] == len(targets) == len([l for l in labels if l != IGNORE])
            expected = sum(lp[t - 1, ids[t]].item() for t in targets)
            assert logps[i].item() == pytest.approx(expected, abs=1e-4)


def test_disable_dropout_makes_policy_equal_reference(tiny_dir, tokenizer_of):
    # gpt2 has dropout 0.1: in train mode the policy's log-probs differ from the eval-mode reference
    # unless dropout is disabled; with it disabled, policy == reference gives exactly log 2.
    from transformers import AutoModelForCausalLM

    enc, items = _pairs(tokenizer_of("gpt2"), 4)
    batch = collate_pairs(items, enc.pad_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("gpt2"))
    assert model.config.resid_pdrop > 0
    ref = copy.deepcopy(model).eval()
    args = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0)
    model.train()
    torch.manual_seed(0)
    noisy, _ = pair_loss(*concatenated_logps(model, batch), reference_logps(ref, batch), args)
    assert noisy.item() != pytest.approx(math.log(2), abs=1e-6)
    disable_dropout(model)
    exact, _ = pair_loss(*concatenated_logps(model, batch), reference_logps(ref, batch), args)
    assert exact.item() == pytest.approx(math.log(2), abs=1e-6)


def test_full_vocabulary_kl_skips_tokens_the_reference_bans():
    """kl_from_log_probs (the DPO and PPO anchors): a token with reference probability 0 contributes 0, not
    0 * -inf = NaN, and the gradient stays finite."""
    logits = torch.tensor([[0.2, 0.1, 0.3]], dtype=torch.float64, requires_grad=True)
    ref = log_probs(torch.tensor([[0.5, float("-inf"), 1.0]], dtype=torch.float64))
    kl = kl_from_log_probs(log_probs(logits), ref)
    p, q = torch.softmax(logits.detach(), -1)[0], ref.exp()[0]
    want = sum(float(q[i] * (q[i].log() - p[i].log())) for i in (0, 2))
    assert kl.item() == pytest.approx(want, rel=1e-12)
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
