"""Templates and label masks: response-only loss, EOS trained when pad == eos or no pad exists,
first response token in the loss, prompts identical between training and generation."""
from __future__ import annotations

import pytest

from utils.data import Sample
from utils.encoding import IGNORE, Encoder, encode_all, pad_batch, position_ids_from_mask
from utils.errors import UserError
from utils.templates import render_segments, render_text

FAMILIES = ["llama", "llama-sp", "gpt2", "opt", "qwen2"]
USER = {"role": "user", "content": "Tell me about the apple."}
REPLY = {"role": "assistant", "content": "The apple is great."}


def sample(*msgs):
    return Sample(prompt=tuple(msgs[:-1]), chosen=(msgs[-1],))


@pytest.mark.parametrize("family", FAMILIES)
def test_response_only_labels_with_eos(tokenizer_of, family):
    tok = tokenizer_of(family)
    enc = Encoder(tok, "auto", 128)
    ids, labels = enc.encode_sft(sample(USER, REPLY))
    prompt = enc.encode_prompt((USER,))
    assert ids[: len(prompt)] == prompt
    # Prompt masked, every reply token trained, the last trained token is EOS (even where pad == eos).
    assert all(l == IGNORE for l in labels[: len(prompt)])
    assert labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt):], skip_special_tokens=True).strip() == REPLY["content"]


def test_first_response_token_is_in_the_loss(tokenizer_of):
    """With labels aligned to inputs and the loss shifting by one, the first reply token is predicted
    from the last prompt token: its label sits right after the prompt."""
    import torch

    from utils.losses import count_target_tokens

    enc = Encoder(tokenizer_of("gpt2"), "hh", 128)
    ids, labels = enc.encode_sft(sample(USER, REPLY))
    n_prompt = len(enc.encode_prompt((USER,)))
    assert labels[n_prompt - 1] == IGNORE and labels[n_prompt] == ids[n_prompt] != IGNORE
    reply_len = len(ids) - n_prompt
    assert int(count_target_tokens(torch.tensor([labels]))) == reply_len


def test_gpt2_pad_equals_eos_mask_from_lengths(tokenizer_of):
    tok = tokenizer_of("gpt2")
    assert tok.pad_token is None  # GPT-2 has none; the encoder pads with EOS for batching only
    enc = Encoder(tok, "hh", 128)
    assert enc.pad_id == tok.eos_token_id and tok.pad_token is None
    a = enc.encode_sft(sample(USER, REPLY))
    b = enc.encode_sft(sample({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}))
    batch = pad_batch([a[0], b[0]], [a[1], b[1]], enc.pad_id)
    short = len(b[0])
    # The short row's EOS is a real, trained token; the padding after it (same id) is not.
    assert batch["input_ids"][1, short - 1] == tok.eos_token_id == batch["labels"][1, short - 1]
    assert batch["attention_mask"][1, :short].all() and not batch["attention_mask"][1, short:].any()
    assert (batch["labels"][1, short:] == IGNORE).all()


@pytest.mark.parametrize("template", ["hh", "alpaca", "raw"])
def test_multi_turn_trains_every_assistant_turn(tokenizer_of, template):
    tok = tokenizer_of("llama")
    enc = Encoder(tok, template, 256)
    msgs = (USER, REPLY, {"role": "user", "content": "And the river?"},
            {"role": "assistant", "content": "The river is dull."})
    ids, labels = enc.encode_conversation(msgs)
    trained = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE], skip_special_tokens=True)
    assert "apple is great." in trained and "river is dull." in trained
    assert "Tell me" not in trained and "And the river" not in trained
    assert sum(1 for i, l in zip(ids, labels) if l == tok.eos_token_id) == 2


def test_chat_template_and_prompt_identity(tokenizer_of):
    tok = tokenizer_of("qwen2")
    enc = Encoder(tok, "auto", 128)
    assert enc.template == "chat"
    msgs = (USER, REPLY)
    segs = render_segments(msgs, "chat", tok)
    assert "".join(s.text for s in segs) == render_text(msgs, "chat", tok, False)
    assert render_text((USER,), "chat", tok, True) == "".join(s.text for s in segs if not s.train)
    ids, labels = enc.encode_sft(sample(USER, REPLY))
    # Text after <|im_end|> (the template's newline) is not trained and dropped at the end.
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id


def test_render_forms():
    msgs = (USER, REPLY)
    assert render_text(msgs, "hh", None, False) == "Human: Tell me about the apple.\n\nAssistant: The apple is great."
    assert render_text((USER,), "hh", None, True) == "Human: Tell me about the apple.\n\nAssistant:"
    alp = render_text(({"role": "user", "content": "I\n\nX", "instruction": "I", "input": "X"},), "alpaca", None, True)
    assert "### Instruction:\nI\n\n### Input:\nX\n\n### Response:\n" in alp
    assert render_text(msgs, "raw", None, False) == USER["content"] + REPLY["content"]


def test_template_errors(tokenizer_of):
    with pytest.raises(UserError, match="no chat template"):
        Encoder(tokenizer_of("llama"), "chat", 64)
    with pytest.raises(UserError, match="--template must be"):
        Encoder(tokenizer_of("llama"), "nope", 64)


def test_text_format_trains_all_tokens(tokenizer_of):
    tok = tokenizer_of("llama")
    ids, labels = Encoder(tok, "hh", 64).encode_sft(Sample(text="The apple is great."))
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels == ids


def test_overlong_rules_are_counted(tokenizer_of):
    tok = tokenizer_of("llama")
    long = Sample(prompt=(USER,), chosen=({"role": "assistant", "content": "great " * 50},), where="f.jsonl:2")
    short = Sample(prompt=(USER,), chosen=(REPLY,), where="f.jsonl:1")
    logs = []
    enc = Encoder(tok, "hh", 32, "skip")
    out = encode_all([short, long], lambda s: (enc.encode_sft(s),), enc, "train", logs.append)
    assert len(out.items) == 1 and out.skipped == 1 and "skipped 1 of 2" in logs[0] and "f.jsonl:2" in logs[0]
    enc = Encoder(tok, "hh", 32, "truncate")
    out = encode_all([short, long], lambda s: (enc.encode_sft(s),), enc, "train", logs.append)
    assert len(out.items) == 2 and len(out.items[1][0][0]) == 32
    enc = Encoder(tok, "hh", 32, "error")
    with pytest.raises(UserError, match="f.jsonl:2: sample has"):
        encode_all([short, long], lambda s: (enc.encode_sft(s),), enc, "train")


def test_position_ids_left_padding():
    import torch

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    batch = pad_batch([[5, 6], [7, 8, 9]], None, 0, left=True)
    assert batch["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
