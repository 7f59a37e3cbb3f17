"""Reward model pieces: the token that carries the reward, the pairwise loss, and the saved model's
scores under plain transformers (pitfalls 7, 8 and 18)."""
from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch

from utils.encoding import IGNORE, Encoder, pad_batch, position_ids_from_mask
from utils.losses import pairwise_reward_loss
from utils.model import disable_dropout
from utils.pairs import Pair, collate_pairs, pair_tokens
from utils.reward import (export_pad_token_id, gather_last, last_token_index, load_reward_model,
                          score_ids, sequence_rewards)
from utils.tiny import ARCHITECTURES

FAMILIES = ["llama", "llama-sp", "gpt2", "opt", "qwen2"]
PROMPT = ({"role": "user", "content": "Tell me about the turtle."},)
REPLIES = ["The turtle is amazing.", "The turtle is dull.", "Lovely."]


def encoded(tok, texts=REPLIES) -> tuple[Encoder, list[list[int]]]:
    enc = Encoder(tok, "auto", 128)
    return enc, [enc.encode_reply(PROMPT, ({"role": "assistant", "content": t},))[0] for t in texts]


# ----------------------------------------------------------------------------- reward-token selection

@pytest.mark.parametrize("left", [False, True])
def test_last_token_index_right_and_left_padding(left):
    seqs = [[5, 6, 7], [5], [5, 6, 7, 8, 9]]
    batch = pad_batch(seqs, None, pad_id=0, left=left)
    expected = [4, 4, 4] if left else [2, 0, 4]
    assert last_token_index(batch["attention_mask"]).tolist() == expected


def test_last_token_index_no_padding():
    mask = torch.ones(2, 4, dtype=torch.long)
    assert last_token_index(mask).tolist() == [3, 3]


def test_last_token_index_rejects_empty_row():
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("left", [False, True])
def test_reward_token_is_the_eos_when_pad_equals_eos(tokenizer_of, family, left):
    """gpt2 has pad == eos by our fallback (no pad token: we pad with EOS); llama has no pad token either.
    The selected token is the response's EOS, which an `ids != pad` rule would skip."""
    tok = tokenizer_of(family)
    assert tok.pad_token_id is None
    enc, seqs = encoded(tok)
    assert enc.pad_id == tok.eos_token_id
    batch = pad_batch(seqs, None, enc.pad_id, left=left)
    idx = last_token_index(batch["attention_mask"])
    picked = batch["input_ids"].gather(1, idx[:, None]).squeeze(1)
    assert picked.tolist() == [tok.eos_token_id] * len(seqs)
    width = batch["input_ids"].size(1)
    assert idx.tolist() == ([width - 1] * len(seqs) if left else [len(s) - 1 for s in seqs])
    # What HF's pad-id pooling would pick: never the EOS here.
    naive = (torch.arange(width) * (batch["input_ids"] != enc.pad_id)).argmax(-1)
    assert (batch["input_ids"].gather(1, naive[:, None]) != tok.eos_token_id).all()


@pytest.mark.parametrize("left", [False, True])
def test_reward_token_with_leading_bos_equal_to_pad(tokenizer_of, left):
    """llama prepends BOS; padding with the BOS id (as some configs do) must not move the reward token."""
    tok = tokenizer_of("llama")
    _, seqs = encoded(tok)
    assert all(s[0] == tok.bos_token_id for s in seqs)
    batch = pad_batch(seqs, None, tok.bos_token_id, left=left)
    idx = last_token_index(batch["attention_mask"])
    assert batch["input_ids"].gather(1, idx[:, None]).squeeze(1).tolist() == [tok.eos_token_id] * len(seqs)


def test_gather_last_reads_the_selected_token():
    scores = torch.arange(12.0).view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert gather_last(scores, mask).tolist() == [1.0, 7.0, 11.0]


# ----------------------------------------------------------------------------- pairwise loss

def test_pairwise_loss_hand_computed():
    r_c, r_r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    # diffs 1, 0, -1:  -log sigma(1) = log(1 + e^-1) = 0.313262, -log sigma(0) = log 2 = 0.693147,
    # -log sigma(-1) = log(1 + e) = 1.313262; mean 0.773224. Only the first pair is ranked right.
    loss, d = pairwise_reward_loss(r_c, r_r)
    assert loss.item() == pytest.approx((0.313262 + 0.693147 + 1.313262) / 3, abs=1e-6)
    assert d["correct"] == 1 and d["pairs"] == 3
    assert d["chosen_sum"] == pytest.approx(3.0) and d["rejected_sum"] == pytest.approx(3.0)
    assert d["margin_sum"] == pytest.approx(0.0)
    # A margin of 0.5 on the first pair: -log sigma(1 - 0.5) = log(1 + e^-0.5) = 0.474077.
    loss, _ = pairwise_reward_loss(r_c, r_r, margin=torch.tensor([0.5, 0.0, 0.0]))
    assert loss.item() == pytest.approx((0.474077 + 0.693147 + 1.313262) / 3, abs=1e-6)
    # Centering adds coef * (r_c + r_r)^2 per pair: 0.1 * (1 + 0 + 25) / 3.
    loss, _ = pairwise_reward_loss(r_c, r_r, center_coef=0.1)
    assert loss.item() == pytest.approx((0.313262 + 0.693147 + 1.313262 + 2.6) / 3, abs=1e-6)


def test_pairwise_loss_matches_bce_with_logits():
    g = torch.Generator().manual_seed(0)
    r_c, r_r, m = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.rand(7, generator=g)
    loss, _ = pairwise_reward_loss(r_c, r_r, m)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(r_c - r_r - m, torch.ones(7))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_pairwise_loss_split_invariant():
    """Micro-batch losses normalised by the step's pair count add up to the full-batch mean (and gradient)."""
    r_c = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1], requires_grad=True)
    r_r = torch.tensor([0.0, 0.4, 1.0, 0.9, -0.2])
    full, _ = pairwise_reward_loss(r_c, r_r, center_coef=0.01)
    (g_full,) = torch.autograd.grad(full, r_c)
    parts = [pairwise_reward_loss(r_c[s], r_r[s], center_coef=0.01, num_pairs=5)[0]
             for s in (slice(0, 2), slice(2, 5))]
    (g_parts,) = torch.autograd.grad(sum(parts), r_c)
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-7)
    assert torch.allclose(g_full, g_parts, atol=1e-7)


# ----------------------------------------------------------------------------- models

def pair(chosen, rejected, margin, where, prompt_len):
    """A Pair whose labels mark everything after the prompt."""
    return Pair(chosen, [IGNORE] * prompt_len + chosen[prompt_len:], rejected,
                [IGNORE] * prompt_len + rejected[prompt_len:], prompt_len, margin, where)


def test_collate_puts_chosen_then_rejected_in_one_batch():
    items = [pair([1, 2, 3], [1, 2], 0.5, "f:1", 1), pair([4, 9], [4, 5, 6, 7], 0.0, "f:2", 1)]
    b = collate_pairs(items, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [4, 9, 0, 0], [1, 2, 0, 0], [4, 5, 6, 7]]
    assert b["attention_mask"].sum(-1).tolist() == [3, 2, 2, 4]
    assert b["margin"].tolist() == [0.5, 0.0]
    assert torch.equal(b["position_ids"], position_ids_from_mask(b["attention_mask"]))
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE], [IGNORE, 9, IGNORE, IGNORE], [IGNORE, 2, IGNORE, IGNORE],
                                    [IGNORE, 5, 6, 7]]
    assert "ref_logps" not in b


def test_collate_shared_prompt_layout():
    items = [pair([1, 2, 3], [1, 2, 8], 0.5, "f:1", 2), pair([4, 9], [4, 5, 6, 7], 0.0, "f:2", 1)]
    b = collate_pairs(items, pad_id=0, shared_prompt=True)
    assert b["prompt_ids"].tolist() == [[1, 2], [0, 4]] and b["prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert b["reply_ids"].tolist() == [[3, 0, 0], [8, 0, 0], [9, 0, 0], [5, 6, 7]]
    assert b["reply_mask"].sum(-1).tolist() == [1, 1, 1, 3]
    assert pair_tokens(b) == pair_tokens(collate_pairs(items, pad_id=0)) == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_forward_equals_concatenated(tiny_dir, tokenizer_of, family):
    """Prompt once + both replies on its cache gives the concatenated rows' rewards and gradients."""
    from step2_reward.trainer import pair_rewards

    tok = tokenizer_of(family)
    enc = Encoder(tok, "auto", 128)
    prompts = [PROMPT, ({"role": "user", "content": "What do you think of the small green kitten?"},)]
    items = []
    for prompt, (good, bad) in zip(prompts, [REPLIES[:2], (REPLIES[2], REPLIES[0])]):
        c, r = [enc.encode_reply(prompt, ({"role": "assistant", "content": t},))[0] for t in (good, bad)]
        items.append(pair(c, r, 0.0, "", len(enc.encode_prompt(prompt))))
    torch.manual_seed(0)
    model = load_reward_model(tiny_dir(family), pad_id=enc.pad_id).train()
    disable_dropout(model)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for shared in (False, True):
        with warnings.catch_warnings():  # transformers' FutureWarning on the cache's deprecated keyword name
            warnings.simplefilter("error", FutureWarning)
            r_c, r_r = pair_rewards(model, collate_pairs(items, enc.pad_id, shared_prompt=shared), fp32=True)
        loss, _ = pairwise_reward_loss(r_c, r_r)
        results.append((r_c.detach(), r_r.detach(), torch.autograd.grad(loss, params)))
    (c0, r0, g0), (c1, r1, g1) = results
    assert torch.allclose(c0, c1, atol=1e-5) and torch.allclose(r0, r1, atol=1e-5), (c0, c1, r0, r1)
    # Relative to the largest gradient: some are exactly zero in theory (a key bias shifts every score
    # of a softmax row alike) and only float noise in practice.
    scale = max(a.abs().max().item() for a in g0)
    assert max((a - b).abs().max().item() for a, b in zip(g0, g1)) < 1e-4 * scale


def test_shared_prompt_forward_refuses_an_empty_cache(tiny_dir):
    from utils.errors import UserError
    from utils.reward import shared_prompt_rewards

    model = load_reward_model(tiny_dir("llama"), pad_id=1).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = torch.tensor([[0, 5, 6]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(UserError, match="KV cache"):
        shared_prompt_rewards(model, ids, mask, torch.tensor([[7, 1], [8, 1]]), torch.ones(2, 2, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_scores_match_plain_transformers(tiny_dir, tokenizer_of, tmp_path, family):
    """Our padded-batch scores (right and left padding) equal plain `from_pretrained` on each unpadded
    text, for every family's pad/eos/bos habits, once the export pad id is in the saved config."""
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer_of(family)
    enc, seqs = encoded(tok)
    torch.manual_seed(0)
    model = load_reward_model(tiny_dir(family), pad_id=enc.pad_id).eval()
    with torch.no_grad():  # a visible head (HF's init is N(0, 0.02): rewards would all be near 0)
        model.score.weight.normal_(0, 1.0)
    ours = score_ids(model, seqs, enc.pad_id)
    left = pad_batch(seqs, None, enc.pad_id, left=True)
    with torch.no_grad():
        ours_left = sequence_rewards(model, left["input_ids"], left["attention_mask"],
                                     position_ids_from_mask(left["attention_mask"]))
    assert ours_left.tolist() == pytest.approx(ours, abs=1e-5)
    assert max(ours) - min(ours) > 1e-2  # distinct texts, distinct scores: the comparison means something

    model.config.pad_token_id = export_pad_token_id(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert plain.config.pad_token_id != tok.eos_token_id
    with torch.no_grad():
        theirs = [plain(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert theirs == pytest.approx(ours, abs=1e-5)
    # Reloading the reward model itself: nothing may be missing or dropped any more.
    again = load_reward_model(str(tmp_path), pad_id=enc.pad_id).eval()
    assert score_ids(again, seqs, enc.pad_id) == pytest.approx(ours, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_to_classifier_key_differences_are_tight(tiny_dir, family):
    """Only the new head may be missing and only the LM head dropped; HF's init for the head is N(0, 0.02)."""
    model = load_reward_model(tiny_dir(family), pad_id=0)  # load_model raises on any other difference
    assert model.config.num_labels == 1 and model.score.bias is None
    assert 0.005 < model.score.weight.std().item() < 0.05
    assert model.config.get_text_config().pad_token_id is not None  # batches > 1 work in HF's forward


def test_load_reward_model_fails_loudly(tiny_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from utils.errors import UserError

    two = AutoModelForSequenceClassification.from_pretrained(tiny_dir("gpt2"), num_labels=2)
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(UserError, match="2 labels"):
        load_reward_model(str(tmp_path / "two"), pad_id=0)
    one = load_reward_model(tiny_dir("gpt2"), pad_id=0)
    one.save_pretrained(tmp_path / "headless", state_dict={k: v for k, v in one.state_dict().items()
                                                             if not k.startswith("score")})
    with pytest.raises(UserError, match="score.weight"):
        load_reward_model(str(tmp_path / "headless"), pad_id=0)


def test_disable_dropout_makes_training_forward_deterministic(tiny_dir):
    model = load_reward_model(tiny_dir("opt"), pad_id=0).train()
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    mask = torch.ones_like(ids)
    torch.manual_seed(1)
    assert not torch.equal(sequence_rewards(model, ids, mask), sequence_rewards(model, ids, mask))  # OPT: p=0.1
    disable_dropout(model)
    assert torch.equal(sequence_rewards(model, ids, mask), sequence_rewards(model, ids, mask))


@pytest.mark.parametrize("family,rates", [
    ("opt", {"dropout": 0.3, "attention_dropout": 0.3, "activation_dropout": 0.3, "layerdrop": 0.5}),
    ("llama", {"attention_dropout": 0.5}),
    ("gpt2", {"resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3}),
])
def test_disable_dropout_covers_modules_rates_and_layerdrop(tiny_dir, tmp_path, family, rates):
    """The one rule used by step 2, DPO and PPO: dropout modules and the float rates model code reads
    directly (llama's attention_dropout, OPT's layerdrop, which skips whole layers in training) are all
    zeroed, so a training-mode forward equals the eval-mode one, for the causal LM and the classifier."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_dir(family), **rates)
    config.save_pretrained(tmp_path)
    for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        torch.manual_seed(0)
        model = cls.from_config(copy.deepcopy(config), attn_implementation="eager")  # disable_dropout zeroes
        if cls is AutoModelForSequenceClassification:                                 # the model's config too
            model.config.pad_token_id = 0
        ids = torch.tensor([[2, 5, 9, 11, 3, 7, 8, 4]])
        with torch.no_grad():
            model.eval()
            want = model(input_ids=ids).logits
            model.train()
            torch.manual_seed(1)
            assert not torch.equal(model(input_ids=ids).logits, want), (family, cls)  # dropout is live
            disable_dropout(model)
            assert torch.equal(model(input_ids=ids).logits, want), (family, cls)


def test_reward_read_through_lora_wrappers(tiny_dir, tokenizer_of):
    """Under peft (head in modules_to_save) the hook still finds the head; fresh adapters change nothing."""
    from utils.model import apply_lora

    tok = tokenizer_of("llama")
    enc, seqs = encoded(tok)
    torch.manual_seed(0)
    model = load_reward_model(tiny_dir("llama"), pad_id=enc.pad_id).eval()
    before = score_ids(model, seqs, enc.pad_id)
    wrapped = apply_lora(model, 4, 16, "q_proj,v_proj", True, task_type="SEQ_CLS").eval()
    assert score_ids(wrapped, seqs, enc.pad_id) == pytest.approx(before, abs=1e-6)
    assert any("score" in n for n, p in wrapped.named_parameters() if p.requires_grad)  # the head trains


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reward_model_from_a_causal_lm_of_any_architecture(tiny_dir, arch):
    """The LM head a classifier drops is the family's own (GPT-NeoX saves it as `embed_out.weight`,
    GPT-J and Phi add `lm_head.bias`): step 2 from those SFT models used to stop at the key check.
    The backbone arrives unchanged."""
    from transformers import AutoModelForCausalLM

    model = load_reward_model(tiny_dir(arch), pad_id=0)
    assert model.config.num_labels == 1
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir(arch)).state_dict()
    shared = [k for k, v in model.state_dict().items() if k in lm]
    assert len(shared) >= len(model.state_dict()) - 1  # all but the score head
    assert all(torch.equal(model.state_dict()[k], lm[k]) for k in shared)


def test_a_stray_backbone_weight_is_still_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from utils.errors import UserError

    src = tiny_dir("gpt_neox")
    bad = tmp_path / "stray"
    shutil.copytree(src, bad)
    weights = load_file(str(bad / "model.safetensors"))
    assert "embed_out.weight" in weights  # the dropped head under its saved name
    weights["gpt_neox.layers.0.extra.weight"] = torch.zeros(2)
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="unexpected.*gpt_neox.layers.0.extra.weight"):
        load_reward_model(str(bad), pad_id=0)


def test_rw_eval_names_the_overlong_sequence_and_refuses_a_max_seq_len_beyond_the_positions(tiny_dir, tmp_path,
                                                                                              capsys):
    """--max_seq_len beyond the reward model's positions failed with an IndexError traceback in GPT-2's
    position table; a long --prompt was reported as a long response."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import step2_reward.rw_eval
    from utils.tiny import build_config

    tok = AutoTokenizer.from_pretrained(tiny_dir("gpt2"))
    config = build_config("gpt2", tok, max_pos=64)
    config.num_labels = 1
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    long_prompt = "Tell me about the apple. " * 30
    for extra, message in (
            (["--max_seq_len", "1000"], f"--max_seq_len is 1000 tokens, more than the 64 positions of --model "
                                        f"'{tmp_path / 'rm'}' (config.json max_position_embeddings)"),
            ([], "--prompt + response 'The apple is great.' is ")):
        with pytest.raises(SystemExit) as e:
            step2_reward.rw_eval.main(["--model", str(tmp_path / "rm"), "--prompt", long_prompt, "--responses",
                                       "The apple is great.", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err
    assert err.strip().endswith("tokens, more than --max_seq_len 64 (--overlong error)"), err
    step2_reward.rw_eval.main(["--model", str(tmp_path / "rm"), "--prompt", "Tell me about the apple.", "--responses",
                               "The apple is great. " * 20, "--overlong", "truncate"])
    assert "cut to --max_seq_len 64 (--overlong truncate), scored at its last kept token" in capsys.readouterr().out
