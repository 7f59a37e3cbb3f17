"""Packing: packed and padded micro-batches give the same losses, rewards and DPO log-probs (per family)."""
from __future__ import annotations

import random

import pytest
import torch

from utils import packing
from utils.encoding import IGNORE, pad_batch
from utils.errors import UserError
from utils.losses import count_target_tokens, sequence_logps, sft_loss


def samples(n: int = 7, vocab: int = 500, seed: int = 0):
    """Token ids of very different lengths with labelled replies (the first few tokens unlabelled)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([1, 2, 3, 5, 9, 17, 33])
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        k = rng.randrange(0, max(1, length // 2) + 1)
        out.append((ids, [IGNORE] * k + ids[k:]))
    return out


def test_first_fit_decreasing_fills_rows_in_order():
    rows = packing.first_fit_decreasing([3, 8, 5, 2, 8, 1], 8)
    assert rows == [[1], [4], [2, 0], [3, 5]]
    assert sorted(i for r in rows for i in r) == list(range(6))
    with pytest.raises(ValueError):
        packing.first_fit_decreasing([9], 8)


def test_pack_layout():
    seqs = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35], [41]]
    labels = [[IGNORE, 12, 13], [21, 22], [IGNORE, IGNORE, 33, 34, 35], [41]]
    b = packing.pack(seqs, labels, pad_id=0)
    # Rows of 5 (the longest sample): [sample 2], [0, 1] (given order within a row), [3 + padding].
    assert b["input_ids"].tolist() == [[31, 32, 33, 34, 35], [11, 12, 13, 21, 22], [41, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert b["segment_ids"].tolist() == [[2, 2, 2, 2, 2], [0, 0, 0, 1, 1], [3, -1, -1, -1, -1]]
    # Every sample's first label is ignored: its previous position belongs to another sample.
    assert b["labels"].tolist() == [[IGNORE, IGNORE, 33, 34, 35], [IGNORE, 12, 13, IGNORE, 22],
                                    [IGNORE] * 5]
    assert b["sample_row"].tolist() == [1, 1, 0, 2]
    assert b["sample_start"].tolist() == [0, 3, 0, 0]
    assert b["sample_len"].tolist() == [3, 2, 5, 1]
    assert packing.sample_count(b) == 4 and packing.real_tokens(b) == 11
    padded = pad_batch(seqs, labels, 0)
    assert int(count_target_tokens(b["labels"])) == int(count_target_tokens(padded["labels"]))


def forward_both(model, items, labelled: bool = True):
    seqs, labels = [i for i, _ in items], [l for _, l in items]
    padded = pad_batch(seqs, labels if labelled else None, 0)
    packed = packing.pack(seqs, labels if labelled else None, 0)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        out_pad = model(**packing.forward_inputs(padded), use_cache=False)
        out_pack = model(**packing.forward_inputs(packed), use_cache=False)
    return padded, packed, out_pad, out_pack


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", packing.PACKABLE)
def test_packed_equals_padded(tiny_dir, family, attn):
    """SFT loss, DPO sequence log-probs and last-token rewards: packed == padded to 1e-5, in fp32."""
    from transformers import AutoModelForCausalLM

    packing.check_supported(tiny_dir(family))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir(family), dtype=torch.float32, attn_implementation=attn).eval()
    items = samples()
    padded, packed, out_pad, out_pack = forward_both(lm, items)
    n = count_target_tokens(padded["labels"])
    loss_pad, _ = sft_loss(out_pad.logits, padded["labels"], n)
    loss_pack, _ = sft_loss(out_pack.logits, packed["labels"], n)
    assert abs(loss_pad.item() - loss_pack.item()) < 1e-5
    logp_pad, cnt_pad = sequence_logps(out_pad.logits, padded["labels"])
    logp_pack, cnt_pack = packing.sequence_logps(out_pack.logits, packed)
    assert cnt_pack.tolist() == cnt_pad.tolist()
    # Sums of up to 33 log-probs near -6 are ~ -200, where one fp32 ulp is 1.5e-5: 1e-5 per token, 1e-6 relative.
    torch.testing.assert_close(logp_pack / cnt_pack.clamp(min=1), logp_pad / cnt_pad.clamp(min=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(logp_pack, logp_pad, atol=1e-5, rtol=1e-6)

    from utils.reward import gather_last, load_reward_model, token_scores

    rm = load_reward_model(tiny_dir(family), pad_id=0).eval()
    seqs = [i for i, _ in items]
    p, q = pad_batch(seqs, None, 0), packing.pack(seqs, None, 0)
    with torch.no_grad():
        r_pad = gather_last(token_scores(rm, p["input_ids"], p["attention_mask"]), p["attention_mask"])
        r_pack = packing.last_token_scores(token_scores(rm, q["input_ids"], None, q["position_ids"]), q)
    torch.testing.assert_close(r_pack, r_pad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_families_that_would_attend_across_samples_are_refused(tiny_dir, family):
    """OPT's mask ignores the position ids and Bloom's ALiBi reads none: packed samples see each other,
    so --packing refuses them."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir(family), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    padded, packed, out_pad, out_pack = forward_both(lm, samples())
    logp_pad, _ = sequence_logps(out_pad.logits, padded["labels"])
    logp_pack, _ = packing.sequence_logps(out_pack.logits, packed)
    assert (logp_pack - logp_pad).abs().max() > 1e-3
    with pytest.raises(UserError, match=f"'{family}' model family is not supported"):
        packing.check_supported(tiny_dir(family))


def test_gradients_match(tiny_dir):
    """The packed SFT loss has the padded loss's gradient (the quantity training uses)."""
    from transformers import AutoModelForCausalLM

    grads = []
    for pack in (False, True):
        lm = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32)
        lm.train()
        items = samples(seed=1)
        seqs, labels = [i for i, _ in items], [l for _, l in items]
        b = packing.pack(seqs, labels, 0) if pack else pad_batch(seqs, labels, 0)
        logits = lm(**packing.forward_inputs(b), use_cache=False).logits
        sft_loss(logits, b["labels"], count_target_tokens(b["labels"]))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_reward_and_dpo_collates(tiny_dir):
    """The step-2 and DPO batch functions on packed pairs: the same rewards, log-probs and step counts."""
    import os

    from transformers import AutoModelForCausalLM

    from dpo.trainer import concatenated_logps, pair_counts
    from step2_reward.trainer import pair_rewards
    from utils.pairs import collate_pairs, encode_pairs, pair_tokens
    from utils.data import load_samples
    from utils.encoding import Encoder
    from utils.model import load_tokenizer
    from utils.reward import load_reward_model

    from conftest import DATA

    tok = load_tokenizer(tiny_dir("llama"))
    enc = Encoder(tok, "auto", 512)
    pairs = load_samples([os.path.join(DATA, "preference.jsonl")], "pairs", log=lambda *_: None)[:6]
    items = encode_pairs(pairs, enc, "test", log=lambda *_: None)
    rm = load_reward_model(tiny_dir("llama"), pad_id=enc.pad_id).eval()
    with torch.no_grad():
        padded, packed = collate_pairs(items, enc.pad_id), collate_pairs(items, enc.pad_id, pack=True)
        assert pair_tokens(packed) == pair_tokens(padded)
        for a, b in zip(pair_rewards(rm, packed, True), pair_rewards(rm, padded, True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32).eval()
    assert pair_counts(packed) == pair_counts(padded)
    with torch.no_grad():
        (lp, cp), (lq, cq) = concatenated_logps(lm, padded), concatenated_logps(lm, packed)
    assert cq.tolist() == cp.tolist()
    torch.testing.assert_close(lq, lp, atol=1e-5, rtol=1e-6)
    # DPO's log-ratios against a reference (here a perturbed copy) agree as well.
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)  # the same perturbation whatever ran before
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        rp, rq = concatenated_logps(ref, padded)[0], concatenated_logps(ref, packed)[0]
    torch.testing.assert_close(lq - rq, lp - rp, atol=1e-5, rtol=0)


def test_packing_refused_for_opt(tiny_dir, tmp_path):
    """One line naming the family, exit 2, before any model is loaded."""
    import os

    from conftest import DATA, assert_user_error, run_python

    p = run_python("step1_sft/main.py", ["--model_name_or_path", tiny_dir("opt"), "--data_path",
                                         os.path.join(DATA, "sft.jsonl"), "--output_dir", str(tmp_path / "o"),
                                         "--packing"])
    assert_user_error(p, r"--packing: the 'opt' model family is not supported")
