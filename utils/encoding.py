"""Token ids, label masks and batches.

Masks come from known segment lengths, never from `input_ids != pad_id`: where pad == eos that test
would mask every EOS and the model would never learn to stop (pitfalls 1-3).
Labels are aligned with input_ids (HF convention); the loss shifts them by one, so the first response
token is predicted from the last prompt token and is in the loss.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .data import Sample
from .errors import UserError, at_record
from .templates import jinja_template, render_segments, resolve_template

IGNORE = -100
OVERLONG_RULES = ("skip", "truncate", "error")


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


PROBE_REPLY = "Probe reply 7."
PROBE_CONVERSATION = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                      {"role": "assistant", "content": PROBE_REPLY}, {"role": "user", "content": "And then?"},
                      {"role": "assistant", "content": "Then 8."})


def reply_end_id(tokenizer, template: str) -> int:
    """The token that ends an assistant reply: the first special token the chat template writes after a
    reply (Gemma's <end_of_turn>, ChatML's <|im_end|>, Llama 3's <|eot_id|>, Phi-3's <|end|>), else the
    tokenizer's EOS. Base models with a chat template often name another EOS (Qwen2.5 base:
    <|endoftext|>); appending that EOS after the turn end trained text the template never renders (an
    EOS in the middle of a conversation, the newline after the turn end), and an instruct model used
    as PPO's actor, which stops at its turn end, never reached the EOS its rollouts waited for."""
    eos = tokenizer.eos_token_id
    if template != "chat":
        return eos
    try:
        segments = render_segments(({"role": "user", "content": "Hi."}, {"role": "assistant", "content": PROBE_REPLY}),
                                   template, tokenizer)
    except UserError:
        return eos
    reply = next((seg.text for seg in segments if seg.train), "")
    k = reply.rfind(PROBE_REPLY)
    if k < 0:
        return eos
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in tokenizer(reply[k + len(PROBE_REPLY):], add_special_tokens=False)["input_ids"]:
        if i == eos or i in special:
            return i
    return eos


class Encoder:
    """Turns samples into token ids with the run's one template. Shared by every step.

    `eos_id` is the token that ends a reply (`reply_end_id`): trained after every assistant turn, where
    generation stops, where the reward is read. Plain text (the `text` format) ends with the tokenizer's
    own EOS, `text_eos_id`."""

    def __init__(self, tokenizer, template: str, max_seq_len: int, overlong: str = "skip"):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token; responses must end with one")
        if overlong not in OVERLONG_RULES:
            raise UserError(f"--overlong must be one of {OVERLONG_RULES}")
        self.tokenizer = tokenizer
        self._recent: dict[str, tuple] = {}  # text -> ids, the last few tokenized (_ids)
        self.template = resolve_template(template, tokenizer)
        self.max_seq_len = max_seq_len
        self.overlong = overlong
        self.text_eos_id = tokenizer.eos_token_id
        self.eos_id = reply_end_id(tokenizer, self.template)
        # The reply end's text where the tokenizer reads it back as that one token (else None): written
        # into the running text of encode_segments after a reply whose EOS is appended as an id.
        text = tokenizer.convert_ids_to_tokens(self.eos_id)
        self.eos_text = text if isinstance(text, str) and self._ids(text) == [self.eos_id] else None
        self.bos_id = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
        # Padding id for batches only; the tokenizer itself is never changed (pitfall 5).
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        specials = set(tokenizer.all_special_tokens) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        specials = sorted((t for t in specials if t), key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None

    def chat_template(self) -> str | None:
        """The chat template a model trained with this encoder is saved with: the tokenizer's own under `chat`;
        under hh, alpaca and raw one that renders the same text (`jinja_template`), so plain transformers'
        `apply_chat_template` (a chat UI, vLLM, TRL) prompts the model as it was trained, not with the base
        tokenizer's format or with none. None where no such template gives the trained ids (the reply end
        has no text the tokenizer reads back as it)."""
        if self.template == "chat":
            return self.tokenizer.chat_template
        if self.eos_text is None:
            return None
        want = self.encode_segments(render_segments(PROBE_CONVERSATION, self.template, self.tokenizer))[0]
        bos = self.tokenizer.bos_token if self.bos_id is not None else ""
        # Where the BOS is written as text, a tokenizer that marks only a text's first word as word-start
        # (sentencepiece's prepend_scheme "first": Mistral, this project's llama-sp) reads "<s>Human" without
        # the "▁Human" the encoder trained on after its BOS id; "<s> Human" gives it. Each lead is verified.
        for lead in (bos, bos + " ") if bos else ("",):
            source = jinja_template(self.template, self.eos_text, lead)
            text = self.tokenizer.apply_chat_template(list(PROBE_CONVERSATION), chat_template=source, tokenize=False)
            if self._ids(text) == want:
                return source
        return None

    def special_text(self, s: Sample, prompt_only: bool = False) -> str | None:
        """The first special token's text (`</s>`, `<|im_end|>`, `<|endoftext|>`) in the sample's messages,
        or None. The tokenizer reads such text as the token itself: a reply was cut at an EOS written in
        it (an HTML `<s>...</s>` for Llama), and two different replies could encode identically."""
        if self._special_text is None or s.text is not None:  # plain text: `<|endoftext|>` between documents is
            return None                                         # what GPT-2-style corpora mean by it
        parts = (s.prompt,) if prompt_only else (s.prompt, s.chosen, s.rejected)
        return self.special_text_in(m["content"] for part in parts if part for m in part)

    def special_text_in(self, texts) -> str | None:
        """The first special token's text found in `texts`, or None."""
        for t in texts if self._special_text is not None else ():
            found = self._special_text.search(t)
            if found:
                return found.group(0)
        return None

    def without_special_text(self, text: str) -> str:
        """`text` with every special token's text (`special_text`) removed."""
        return self._special_text.sub("", text) if self._special_text is not None else text

    def _ids(self, text: str) -> list[int]:
        """The ids of `text` tokenized whole. The last few texts are remembered: a preference pair tokenized
        its prompt six times (the prompt alone, then as the start of each reply's conversation, each twice),
        which was most of the time a large dataset took to encode, on every rank."""
        if text not in self._recent:
            if len(self._recent) >= 8:
                self._recent.pop(next(iter(self._recent)))
            # verbose=False: a text longer than the tokenizer's model_max_length follows --overlong, said in our
            # own log line; transformers' "will result in indexing errors" warning about it would be wrong here.
            self._recent[text] = tuple(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        return list(self._recent[text])

    def encode_segments(self, segments) -> tuple[list[int], list[int]]:
        """Token ids and labels of rendered segments, the ids those of the whole text as the tokenizer reads
        it: each segment's tokens are what tokenizing the text up to its end adds to the text before it.
        Tokenized on its own, a segment after a reply's EOS (or ChatML's "assistant\n") started with the
        word-start piece a sentencepiece tokenizer puts at the start of a text (Llama, Mistral: "</s>",
        "▁", "\n", "\n", "Human:"), which the same text tokenized whole (plain transformers, a chat UI) does
        not have. Where a boundary merges (the whole text's tokens do not start with the earlier text's),
        the segment is tokenized on its own, so labels stay exact."""
        ids: list[int] = []
        labels: list[int] = []
        bos_tok = self.tokenizer.bos_token
        if self.bos_id is not None and not (segments and bos_tok and segments[0].text.startswith(bos_tok)):
            ids.append(self.bos_id)
            labels.append(IGNORE)
        text, whole = "", []  # the text so far (a reply's end token as its text) and its ids, tokenized whole
        for seg in segments:
            now = self._ids(text + seg.text)
            t = now[len(whole):] if now[:len(whole)] == whole else self._ids(seg.text)
            text, whole = text + seg.text, now
            if not seg.reply:
                ids += t
                labels += [IGNORE] * len(t)
                continue
            # The reply ends at its end token (the EOS, or the template's turn end); a template's text after
            # it (e.g. a newline) is not trained, nor is an untrained reply ("weight": 0).
            if self.eos_id in t:
                k = t.index(self.eos_id) + 1
                head, tail = t[:k], t[k:]
            else:
                head, tail = t + [self.eos_id], []
                text, whole = (text + self.eos_text, whole + [self.eos_id]) if self.eos_text is not None else ("", [])
            ids += head + tail
            labels += (head if seg.train else [IGNORE] * len(head)) + [IGNORE] * len(tail)
        return ids, labels

    def encode_prompt(self, prompt) -> list[int]:
        """Prompt ids ending with the generation prompt, identical to the prompt part of a training example."""
        ids, _ = self.encode_segments(render_segments(prompt, self.template, self.tokenizer, True))
        return ids

    def render_prompt(self, prompt) -> str:
        return "".join(s.text for s in render_segments(prompt, self.template, self.tokenizer, True))

    def encode_conversation(self, messages) -> tuple[list[int], list[int]]:
        """Every assistant turn trained; text after the last trained token is dropped."""
        ids, labels = self.encode_segments(render_segments(messages, self.template, self.tokenizer, False))
        if all(l == IGNORE for l in labels):
            raise UserError("nothing to train: every assistant turn has \"weight\": 0 or comes before the first "
                            "user turn")
        last = max(i for i, l in enumerate(labels) if l != IGNORE) + 1
        return ids[:last], labels[:last]

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        ids = ([self.bos_id] if self.bos_id is not None else []) + self._ids(text) + [self.text_eos_id]
        return ids, list(ids)

    def encode_sft(self, s: Sample) -> tuple[list[int], list[int]]:
        if s.text is not None:
            return self.encode_text(s.text)
        return self.encode_conversation(tuple(s.prompt) + tuple(s.chosen))

    def encode_reply(self, prompt, reply) -> tuple[list[int], list[int]]:
        """Prompt + one reply with only the reply (and its EOS) labelled: the unit of reward and DPO."""
        p = self.encode_prompt(prompt)
        ids, labels = self.encode_conversation(tuple(prompt) + tuple(reply))
        if ids[: len(p)] != p:
            raise UserError(f"template '{self.template}' tokenizes the prompt differently inside the conversation")
        return ids, [IGNORE] * len(p) + labels[len(p):]

    # --------------------------------------------------------------------- length rule

    def fit(self, ids: list[int], labels: list[int]):
        """Apply --overlong; returns None for a sample to skip."""
        if len(ids) <= self.max_seq_len:
            return ids, labels
        if self.overlong == "truncate":
            ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            return (ids, labels) if any(l != IGNORE for l in labels[1:]) else None
        return None


@dataclass
class EncodedSet:
    items: list           # per-sample encodings (tuples of lists)
    skipped: int
    first_skipped: str | None
    kept: list = field(default_factory=list)  # index in `samples` of each item (to carry per-row fields)


def without_special_text(samples: list[Sample], encoder: Encoder, what: str, log, prompt_only: bool = False):
    """(index, sample) for every sample whose messages hold no special token's text (`Encoder.special_text`);
    the others are counted in one log line once the samples are exhausted, and none left is an error."""
    special = []
    for i, s in enumerate(samples):
        found = encoder.special_text(s, prompt_only)
        if found is None:
            yield i, s
        else:
            special.append((s.where, found))
    if special:
        log(f"{what}: skipped {len(special)} of {len(samples)} samples whose text contains {special[0][1]!r} "
            f"(first: {special[0][0]}), the text of a special token, which the tokenizer would read as that "
            "token; remove or escape it in the data to keep them")
        if len(special) == len(samples):
            raise UserError(f"{what}: every sample contains a special token's text ({special[0][1]!r}, first: "
                            f"{special[0][0]}); remove or escape it in the data")


def encode_all(samples: list[Sample], fn, encoder: Encoder, what: str, log=print) -> EncodedSet:
    """Encode samples with `fn(sample) -> tuple of (ids, labels) pairs`; over-long ones follow --overlong,
    ones whose text holds a special token's text are skipped (both counted in the log)."""
    items, skipped, first, kept = [], 0, None, []
    same, first_same = 0, None  # pairs that --overlong truncate left with equal sides: nothing to learn
    cut, first_cut = 0, None    # samples --overlong truncate kept with their ends cut off (untrained)
    for i, s in without_special_text(samples, encoder, what, log):
        try:
            pairs = fn(s)
        except UserError as e:  # a template that refuses the record: name the record
            raise at_record(s.where, e) from None
        fitted = [encoder.fit(ids, labels) for ids, labels in pairs]
        if any(f is None for f in fitted):
            if encoder.overlong == "error":
                longest = max(len(ids) for ids, _ in pairs)
                raise UserError(f"{s.where}: sample has {longest} tokens, more than --max_seq_len "
                                f"{encoder.max_seq_len} (--overlong error)")
            skipped += 1
            first = first or s.where
            continue
        if len(fitted) > 1 and all(f[0] == fitted[0][0] for f in fitted[1:]) and \
                any(ids != pairs[0][0] for ids, _ in pairs[1:]):
            same += 1
            first_same = first_same or s.where
            continue
        if any(len(f[0]) < len(ids) for f, (ids, _) in zip(fitted, pairs)):
            cut += 1
            first_cut = first_cut or s.where
        items.append(tuple(fitted))
        kept.append(i)
    if cut:
        log(f"{what}: cut {cut} of {len(samples)} samples to --max_seq_len {encoder.max_seq_len} (--overlong "
            f"truncate: the tokens after it are not trained, a reply cut there has no EOS; first: {first_cut})")
    if skipped:
        why = "with no reply token left when cut to" if encoder.overlong == "truncate" else "longer than"
        log(f"{what}: skipped {skipped} of {len(samples)} samples {why} --max_seq_len "
            f"{encoder.max_seq_len} (--overlong {encoder.overlong}; first: {first})")
    if same:
        log(f"{what}: skipped {same} of {len(samples)} pairs whose chosen and rejected replies are the same once "
            f"truncated to --max_seq_len {encoder.max_seq_len} (they differ after it; first: {first_same})")
        skipped += same
        first = first or first_same
    if not items:
        raise UserError(f"{what}: no sample fits in --max_seq_len {encoder.max_seq_len}")
    return EncodedSet(items, skipped, first, kept)


def pad_batch(seqs: list[list[int]], labels: list[list[int]] | None, pad_id: int, left: bool = False):
    """Pad to the longest sequence in the batch. The attention mask comes from the lengths."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
        if lab is not None:
            lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as `generate()` does for left-padded prompts (pitfall 4)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)
