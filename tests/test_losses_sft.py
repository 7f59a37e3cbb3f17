"""SFT loss against torch's cross entropy, and invariance to data-parallel / accumulation splits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils.losses import IGNORE, count_target_tokens, sequence_logps, sft_loss, step_loss_scale


def test_three_token_example():
    # One sequence of 3 positions, vocab 2. Targets: position 1 -> token 1, position 2 -> ignored.
    # logits at position 0 are [0, 0] so p(token 1) = 1/2 and the loss is -log(1/2) = log 2.
    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[IGNORE, 1, IGNORE]])
    loss, d = sft_loss(logits, labels, count_target_tokens(labels))
    assert d["tokens"] == 1
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_matches_cross_entropy_mean():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE
    labels[2, 5:] = IGNORE
    loss, _ = sft_loss(logits, labels, count_target_tokens(labels))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def _grads(model, batches, n_tokens, scale):
    model.zero_grad()
    for x, y in batches:
        loss, _ = sft_loss(model(x), y, n_tokens)
        (loss * scale).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("world,ga", [(1, 4), (2, 2), (4, 1)])
def test_gradient_invariant_to_dp_and_ga_splits(world, ga):
    """Split 8 sequences of very different response lengths over `world` ranks x `ga` micro-batches.
    Simulate DeepSpeed (loss / ga per micro-batch, gradients averaged over ranks) and compare to the
    full-batch token mean. A per-micro-batch token mean would fail this."""
    torch.manual_seed(0)
    V, T = 13, 9
    model = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))
    x = torch.randint(0, V, (8, T))
    y = x.clone()
    for i in range(8):
        y[i, : T - 1 - i] = IGNORE  # response lengths 1..8
    full = _grads(model, [(x, y)], count_target_tokens(y), 1.0)
    n = count_target_tokens(y)  # the step's global token count (all-reduced in training)
    per = 8 // (world * ga)
    rank_grads = []
    for r in range(world):
        micro = [(x[(r * ga + m) * per:(r * ga + m + 1) * per], y[(r * ga + m) * per:(r * ga + m + 1) * per])
                 for m in range(ga)]
        g = _grads(model, micro, n, step_loss_scale(world, ga) / ga)  # DeepSpeed divides by ga
        rank_grads.append(g)
    avg = [sum(gs) / world for gs in zip(*rank_grads)]  # DeepSpeed averages over ranks
    for a, b in zip(avg, full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sequence_logps_reference_loop():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 6], [IGNORE, 2, 2, IGNORE, IGNORE]])
    logp, counts = sequence_logps(logits, labels)
    lsm = torch.log_softmax(logits, -1)
    for b in range(2):
        ref = sum(lsm[b, t - 1, labels[b, t]].item() for t in range(1, 5) if labels[b, t] != IGNORE)
        assert logp[b].item() == pytest.approx(ref, abs=1e-5)
    assert counts.tolist() == [3, 2]


def test_fp32_upcast_for_half_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 50).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6))
    loss32, _ = sft_loss(logits, labels, count_target_tokens(labels), fp32=True)
    assert loss32.dtype == torch.float32
    ref = F.cross_entropy(logits.float()[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    assert loss32.item() == pytest.approx(ref.item(), abs=1e-6)
