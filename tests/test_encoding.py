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
    # A system message is its own paragraph: one blank line before the first turn (it was three).
    sys_msg = {"role": "system", "content": "Be brief."}
    assert render_text((sys_msg, USER), "hh", None, True) == \
        "Be brief.\n\nHuman: Tell me about the apple.\n\nAssistant:"
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
    assert "train: cut 1 of 2 samples to --max_seq_len 32" in logs[-1] and "f.jsonl:2" in logs[-1]  # told, not silent
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


# ----------------------------------------------------------------------------- UltraFeedback rows, token by token

# A Llama-2-style chat template (BOS and [INST] around each user turn, EOS after each reply) that refuses
# conversations whose roles do not alternate, as the real one does.
STRICT_LLAMA_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
GOOD = {"role": "assistant", "content": "The apple is great."}
BAD = {"role": "assistant", "content": "The apple is dull."}


def strict_llama(tokenizer_of):
    import copy

    tok = copy.deepcopy(tokenizer_of("llama"))
    tok.chat_template = STRICT_LLAMA_TEMPLATE
    return tok


def chat_ids(tok, messages, add_generation_prompt=False) -> list[int]:
    return list(tok.apply_chat_template(list(messages), tokenize=True,
                                        add_generation_prompt=add_generation_prompt)["input_ids"])


def reference_ids(tok, family: str, messages) -> tuple[list[int], int]:
    """(ids of the whole conversation, ids of its prompt) straight from the tokenizer: its chat template
    (up to the EOS that ends the reply: the encoder drops template text after it), or for the
    template-less OPT tokenizer the hh rendering tokenized in one piece, plus EOS."""
    if family == "opt":
        full = tok(render_text(messages, "hh", tok, False))["input_ids"] + [tok.eos_token_id]
        return full, len(tok(render_text(messages[:-1], "hh", tok, True))["input_ids"])
    full = chat_ids(tok, messages)
    return full[: len(full) - full[::-1].index(tok.eos_token_id)], len(chat_ids(tok, messages[:-1], True))


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("messages_column", [True, False])
def test_ultrafeedback_rows_encode_like_the_chat_template(tmp_path, tokenizer_of, family, messages_column):
    """An UltraFeedback row (prompt string, chosen/rejected as whole conversations, optionally `messages`)
    gives exactly the tokenizer's own ids for prompt + reply, the user turn once, and a loss mask on the
    reply and its EOS only: for SFT, and for both sides of the pair reward and DPO train on."""
    import json

    from utils.data import load_file
    from utils.pairs import collate_pairs, encode_pairs

    tok = strict_llama(tokenizer_of) if family == "llama" else tokenizer_of(family)
    enc = Encoder(tok, "auto", 256)
    assert enc.template == ("hh" if family == "opt" else "chat")
    row = {"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD], "score_chosen": 9.0}
    if messages_column:
        row["messages"] = [USER, GOOD]
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps(row) + "\n")

    (pair,) = encode_pairs(load_file(str(path), "pairs"), enc, "train", log=None)
    for ids, labels, reply in ((pair.chosen, pair.chosen_labels, GOOD), (pair.rejected, pair.rejected_labels, BAD)):
        full, n_prompt = reference_ids(tok, family, (USER, reply))
        assert ids == full, (tok.convert_ids_to_tokens(ids), tok.convert_ids_to_tokens(full))
        assert labels == [IGNORE] * n_prompt + full[n_prompt:] and pair.prompt_len == n_prompt
        assert tok.decode(ids).count(USER["content"]) == 1
        assert labels[-1] == tok.eos_token_id
    batch = collate_pairs([pair], enc.pad_id)
    assert batch["input_ids"][0, : len(pair.chosen)].tolist() == pair.chosen
    assert batch["labels"][1, : len(pair.rejected)].tolist() == pair.rejected_labels

    (sample,) = load_file(str(path), "sft")
    ids, labels = enc.encode_sft(sample)
    assert (ids, labels) == (pair.chosen, pair.chosen_labels)


def test_template_errors_name_the_record(tokenizer_of, tmp_path):
    """A chat template that raises (here: two user turns in a row) is one line naming file:line."""
    import json

    from utils.data import load_file

    tok = strict_llama(tokenizer_of)
    enc = Encoder(tok, "chat", 256)
    path = tmp_path / "roles.jsonl"
    twice = {"messages": [USER, USER, GOOD]}
    path.write_text(json.dumps({"messages": [USER, GOOD]}) + "\n" + json.dumps(twice) + "\n")
    samples = load_file(str(path), "sft")
    with pytest.raises(UserError) as e:
        encode_all(samples, lambda s: (enc.encode_sft(s),), enc, "train")
    assert str(e.value) == (f"{path}:2: the tokenizer's chat template refused this conversation: Conversation roles "
                            "must alternate user/assistant/user/assistant/... (--template chat; fix the record or "
                            "pick --template hh, alpaca or raw)")


@pytest.mark.parametrize("turn_end", ["<|im_end|>", "<|eot|>"])
def test_a_chat_templates_turn_end_ends_the_reply_when_the_eos_is_another_token(tiny_dir, tmp_path, turn_end):
    """A base model with a chat template often names another EOS than the template's turn end (Qwen2.5
    base: EOS <|endoftext|>, turns end with <|im_end|>; Gemma-it: <eos> and <end_of_turn>; Llama 3.0:
    <|end_of_text|> and <|eot_id|>). The reply ends with the turn end, as the template renders it: no EOS
    appended after it (mid-conversation too), the template's newline after it untrained; rollouts stop
    there (Encoder.eos_id) and the saved generation_config stops there too. Plain text keeps the EOS."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.encoding import reply_end_id
    from utils.model import save_hf
    from utils.reward import export_pad_token_id

    tok = AutoTokenizer.from_pretrained(tiny_dir("qwen2"))
    if turn_end != "<|im_end|>":
        tok.add_special_tokens({"additional_special_tokens": [turn_end]})
        tok.chat_template = tok.chat_template.replace("<|im_end|>", turn_end)
    tok.eos_token = "<|endoftext|>"
    end = tok.convert_tokens_to_ids(turn_end)
    assert end != tok.eos_token_id and reply_end_id(tok, "chat") == end
    assert reply_end_id(tok, "hh") == tok.eos_token_id  # templates of ours end replies with the EOS

    enc = Encoder(tok, "auto", 256)
    second = {"role": "user", "content": "And the pear?"}
    msgs = (USER, REPLY, second, {"role": "assistant", "content": "The pear is fine."})
    ids, labels = enc.encode_conversation(msgs)
    rendered = tok(render_text(msgs, "chat", tok, False), add_special_tokens=False)["input_ids"]
    assert ids == rendered[: len(ids)] and tok.decode(rendered[len(ids):]) == "\n"  # only the final newline cut
    assert tok.eos_token_id not in ids
    trained = [t for t in labels if t != IGNORE]
    assert trained.count(end) == 2 and trained[-1] == end
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    first_end = ids.index(end)
    assert ids[first_end + 1: first_end + 1 + len(newline)] == newline and labels[first_end + 1] == IGNORE
    text_ids, _ = enc.encode_text("The apple is great.")
    assert text_ids[-1] == tok.eos_token_id

    assert export_pad_token_id(tok, enc.eos_id) == tok.pad_token_id  # <|endoftext|> is pad and EOS here
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2"))
    model.resize_token_embeddings(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    save_hf(model, tok, str(tmp_path / "out"), {"step": "test"}, enc)
    assert json.load(open(tmp_path / "out" / "generation_config.json"))["eos_token_id"] == [end, tok.eos_token_id]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_special_tokens_text_in_a_message_skips_the_sample_and_says_so(tokenizer_of, family):
    """A reply holding its model's end-token text (an HTML `<s>old</s>` for Llama or OPT, `<|im_end|>` for
    Qwen) was silently cut there, and two different replies could encode to the same ids. Such samples
    are left out with one log line; plain text keeps its `<|endoftext|>` document separators."""
    tok = tokenizer_of(family)
    enc = Encoder(tok, "auto", 128)
    end = tok.convert_ids_to_tokens(enc.eos_id)
    bad = Sample(prompt=(USER,), chosen=({"role": "assistant", "content": f"Use {end} here, then go on."},),
                 where="f.jsonl:2")
    good = Sample(prompt=(USER,), chosen=(REPLY,), where="f.jsonl:1")
    logs = []
    out = encode_all([good, bad], lambda s: (enc.encode_sft(s),), enc, "train", logs.append)
    assert len(out.items) == 1 and out.kept == [0], out.kept
    assert logs == [f"train: skipped 1 of 2 samples whose text contains {end!r} (first: f.jsonl:2), the text of a "
                    "special token, which the tokenizer would read as that token; remove or escape it in the data "
                    "to keep them"]
    with pytest.raises(UserError, match="train: every sample contains a special token's text .*f.jsonl:2"):
        encode_all([bad], lambda s: (enc.encode_sft(s),), enc, "train", logs.append)
    assert enc.special_text(Sample(prompt=(USER,), chosen=bad.chosen), prompt_only=True) is None  # PPO: prompts only
    text = Sample(text=f"One document.{tok.eos_token}Another one.")
    assert enc.special_text(text) is None and tok.eos_token_id in enc.encode_sft(text)[0][:-1]


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_an_opening_greeting_and_weight_0_turns_are_context(tokenizer_of, family):
    """A conversation that opens with the assistant's greeting crashed every step under a chat template
    (the empty conversation before it cannot be rendered); OpenAI's `"weight": 0` was ignored. Both turns
    are now rendered as context, not trained; a conversation with nothing left to train is refused."""
    tok = tokenizer_of(family)
    enc = Encoder(tok, "auto", 256)
    hello = {"role": "assistant", "content": "Hello, how can I help?"}
    skip = {"role": "assistant", "content": "The cat is good.", "weight": 0}
    more = {"role": "user", "content": "And the dog?"}
    last = {"role": "assistant", "content": "The dog is fine."}
    ids, labels = enc.encode_conversation((hello, USER, skip, more, last))
    assert tok.decode(ids).count("Hello, how can I help?") == 1 and "The cat is good." in tok.decode(ids)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE], skip_special_tokens=True).strip() == \
        "The dog is fine."
    prompt = enc.encode_prompt((hello, USER))
    assert ids[: len(prompt)] == prompt
    # Every reply ends with the reply end token, a context one too: under hh the greeting and the weight-0
    # turn were rendered without it ("Assistant: The cat is good.\n\nHuman: ..."), unlike trained turns.
    # (A chat template writes its turn end after every turn, user turns too.)
    if enc.template != "chat":
        ends = [labels[i] for i, t in enumerate(ids) if t == enc.eos_id]
        assert ends == [IGNORE, IGNORE, enc.eos_id], tok.decode(ids)
    with pytest.raises(UserError, match="nothing to train"):
        enc.encode_conversation((hello, USER, skip))


def test_message_weights_are_read_as_openai_defines_them(tmp_path):
    from conftest import write_jsonl
    from utils.data import load_file

    def conv(weight, role="assistant"):
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
        msgs[1 if role == "assistant" else 0]["weight"] = weight
        return {"messages": msgs + [{"role": "user", "content": "More"}, {"role": "assistant", "content": "Ho"}]}

    s = load_file(write_jsonl(tmp_path / "w.jsonl", [conv(0), conv(1)]), "sft")
    assert s[0].prompt[1] == {"role": "assistant", "content": "Yo", "weight": 0} and "weight" not in s[1].prompt[1]
    for bad, problem in [(conv(0.5), "expected 0 or 1, got 0.5"), (conv(True), "expected 0 or 1, got True"),
                         (conv(0, "user"), "only assistant turns take a weight")]:
        with pytest.raises(UserError, match=rf"w.jsonl:1: field 'messages\[\d\].weight': {problem}"):
            load_file(write_jsonl(tmp_path / "w.jsonl", [bad]), "sft")


def test_generation_keeps_a_lora_models_own_generation_config(tiny_dir):
    """only_our_settings blanks the model's generation_config while generating and restores it; peft's
    wrapper copies its blank one onto the base model inside generate(), and the base model's config is
    the one saved, so a LoRA actor was saved with its EOS list, pad id and sampling defaults wiped."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils.generation import only_our_settings
    from utils.model import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    model.generation_config.eos_token_id = [2, 7]
    model.generation_config.top_k = 5
    wrapped = apply_lora(model, 4, 8, "all-linear", False)
    with only_our_settings(wrapped):
        assert wrapped.get_base_model().generation_config.top_k is None or \
            wrapped.get_base_model().generation_config.top_k == 50  # transformers' neutral default, not 5
        wrapped.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False, pad_token_id=0,
                         eos_token_id=2)
    base = wrapped.get_base_model().generation_config
    assert base.eos_token_id == [2, 7] and base.top_k == 5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["hh", "chatml"])
def test_a_conversation_encodes_as_its_whole_text_tokenizes(tokenizer_of, family, template):
    """The ids of a multi-turn conversation (and of a PPO prompt) are those of its whole rendered text,
    each reply's end token written as its text: what plain transformers gives for the text (a chat UI, the
    README's reward recipe). Each segment tokenized on its own gave a sentencepiece tokenizer's word-start
    piece after every reply's EOS ("</s>", "\u2581", "\\n", "\\n", "Human:") and ChatML replies a "\u2581The" that
    the whole text spells "T", "he"."""
    import copy

    tok = copy.deepcopy(tokenizer_of(family))
    if template == "chatml":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    enc = Encoder(tok, "hh" if template == "hh" else "chat", 512)
    system = {"role": "system", "content": "Be brief."}
    second = ({"role": "user", "content": "And the owl?"}, {"role": "assistant", "content": "The owl is lovely."})
    msgs = (system, USER, REPLY) + second
    end = tok.convert_ids_to_tokens(enc.eos_id)
    if template == "hh":
        text = (f"Be brief.\n\nHuman: Tell me about the apple.\n\nAssistant: The apple is great.{end}\n\nHuman: And "
                f"the owl?\n\nAssistant: The owl is lovely.{end}")
        assert render_text(msgs, "hh", tok, False).replace("great.", "great." + end) + end == text
    else:
        text = tok.apply_chat_template(list(msgs), tokenize=False)
        text = text[:text.rindex(end) + len(end)]  # the template's newline after the last turn end: not trained
    bos = [enc.bos_id] if enc.bos_id is not None else []
    ids, labels = enc.encode_conversation(msgs)
    assert ids == bos + tok(text, add_special_tokens=False)["input_ids"]
    prompt = enc.encode_prompt(msgs[:4])
    assert prompt == ids[:len(prompt)] and labels[len(prompt)] != IGNORE  # the second reply trained from its start


CONVERSATIONS = [
    (USER, REPLY),
    ({"role": "system", "content": "Be brief, 'quoted' and \\ odd."}, USER, REPLY,
     {"role": "user", "content": "And the pear?\nTwo lines."}, {"role": "assistant", "content": "The pear is {{ fine }}."}),
    ({"role": "assistant", "content": "Hello."}, USER, {**REPLY, "weight": 0}, USER, REPLY),
    ({"role": "user", "content": "Name a fruit.\n\nred", "instruction": "Name a fruit.", "input": "red"}, REPLY),
]


@pytest.mark.parametrize("template", ["hh", "alpaca", "raw"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_saved_chat_template_renders_the_trained_format(tiny_dir, tokenizer_of, tmp_path, family, template):
    """A model trained with hh, alpaca or raw was saved with its base tokenizer's chat template, or none
    (GPT-2, Llama, OPT): plain transformers' apply_chat_template then failed, or prompted the model in a
    format it never saw. The saved tokenizer's template now gives the ids the encoder trained on, for whole
    conversations and for generation prompts (system turns, several turns, an alpaca input, quotes)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.model import save_hf

    tok = copy.deepcopy(tokenizer_of(family))
    enc = Encoder(tok, template, 256)
    own = tok.chat_template
    save_hf(AutoModelForCausalLM.from_pretrained(tiny_dir(family)), tok, str(tmp_path), {"template": template}, enc)
    assert tok.chat_template == own  # the run's tokenizer is left as it was
    saved = AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        expected, _ = enc.encode_segments(render_segments(messages, template, tok, False))
        assert chat_ids(saved, messages) == expected, (messages, saved.apply_chat_template(list(messages), tokenize=False))
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        prompt = messages[: last_user + 1]
        assert chat_ids(saved, prompt, add_generation_prompt=True) == enc.encode_prompt(prompt)
        if not any(m["role"] == "assistant" for m in prompt):  # the text too (rendered replies carry no end text)
            text = saved.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            lead = text[: len(text) - len(enc.render_prompt(prompt))]
            assert text.endswith(enc.render_prompt(prompt)) and lead in ("", saved.bos_token, f"{saved.bos_token} ")


def test_a_sample_longer_than_the_tokenizers_model_max_length_gets_only_our_log_line(tokenizer_of):
    """A text past the tokenizer's model_max_length (GPT-2's 1024) made transformers warn that running it
    "will result in indexing errors", although --overlong then skips or cuts it and says so itself."""
    import copy
    import logging

    tok = copy.deepcopy(tokenizer_of("gpt2"))  # transformers warns once per tokenizer object
    enc = Encoder(tok, "auto", 64)
    long = sample(USER, {"role": "assistant", "content": "The apple is great. " * (tok.model_max_length // 2)})
    logs, warned = [], []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")  # its own handler, not propagated: caplog does not see it
    hf_logger.addHandler(handler)
    try:
        out = encode_all([long, sample(USER, REPLY)], lambda s: (enc.encode_sft(s),), enc, "train", logs.append)
    finally:
        hf_logger.removeHandler(handler)
    assert len(out.items) == 1 and len(logs) == 1 and "longer than --max_seq_len 64" in logs[0]
    assert not [w for w in warned if "indexing errors" in w], warned


# A Phi-3-style template: `<|role|>\n...<|end|>\n` per turn, the EOS written after the conversation's last turn
# only (not before a generation prompt).
PHI3_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def test_a_template_that_ends_the_last_turn_only_encodes_multi_turn_conversations(tokenizer_of):
    """Phi-3 writes its EOS after the conversation's last turn, so the conversation up to a reply is not a prefix
    of the longer one there; every multi-turn row, and every PPO prompt with an earlier reply, was refused
    ("template does not render earlier turns as a prefix"). Each reply is now trained up to its turn end
    (`<|end|>`), and the ids are the template's own up to the last one."""
    import copy

    tok = copy.deepcopy(tokenizer_of("qwen2"))
    tok.add_tokens(["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], special_tokens=True)
    tok.eos_token = "<|endoftext|>"
    tok.chat_template = PHI3_TEMPLATE
    enc = Encoder(tok, "chat", 256)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert enc.eos_id == end and enc.bos_id is None
    later = ({"role": "user", "content": "And the pear?"}, {"role": "assistant", "content": "The pear is fine."})
    for messages in ((USER, REPLY) + later, ({"role": "system", "content": "Be brief."}, USER, REPLY) + later):
        ids, labels = enc.encode_sft(sample(*messages))
        full = chat_ids(tok, messages)
        assert full[len(ids):] == tok("\n<|endoftext|>", add_special_tokens=False)["input_ids"] and ids == full[:len(ids)]
        replies = [tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])]
        assert replies == [REPLY["content"] + "<|end|>" + later[1]["content"] + "<|end|>"]
        assert labels.count(end) == 2 and labels[-1] == end
        assert enc.encode_prompt(messages[:-1]) == chat_ids(tok, messages[:-1], add_generation_prompt=True)
        r_ids, r_labels = enc.encode_reply(messages[:-1], messages[-1:])
        assert r_ids == ids and tok.decode([l for l in r_labels if l != IGNORE]) == later[1]["content"] + "<|end|>"


def test_a_template_that_rewrites_an_earlier_reply_is_refused_naming_where(tokenizer_of):
    """A Qwen3-style template writes a `<think>` block in the last reply only and drops it once a later user
    turn follows: no split into prompt and reply gives that reply's ids, so the row is refused; the refusal
    names the text where the renderings part (it said only "does not render earlier turns as a prefix")."""
    import copy

    tok = copy.deepcopy(tokenizer_of("qwen2"))
    tok.chat_template = (
        "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
        "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\n' }}{%- if m['role'] == 'assistant' and loop.index0 > ns.last %}"
        "{{ '<think>\n\n</think>\n\n' }}{%- endif %}{{ m['content'] + '<|im_end|>\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")
    enc = Encoder(tok, "chat", 256)
    ids, labels = enc.encode_sft(sample(USER, REPLY))  # one turn: the empty think block is part of the reply
    assert tok.decode([l for l in labels if l != IGNORE]).startswith("<think>\n\n</think>\n\nThe apple")
    with pytest.raises(UserError) as e:
        enc.encode_sft(sample(USER, REPLY, {"role": "user", "content": "And?"}, REPLY))
    assert "goes on '<think>\\n\\n</think>\\n\\nThe apple i', the longer 'The apple is great.<|im_end|>\\n'" \
        in str(e.value)
