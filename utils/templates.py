"""Prompt templates and the one rendering function every step uses.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`.
`render_segments` turns it into text segments, each marked trainable (an assistant reply) or not.
The segments of `messages[:k]` rendered with `add_generation_prompt=True` are exactly the leading
segments of the full conversation, so a PPO or chat prompt is byte-identical (and, as the encoder
tokenizes the text up to each segment's end, token-identical) to the prompt part of an SFT example.

Templates:
  chat    the tokenizer's own chat template (an error if it has none)
  hh      "Human: ...\\n\\nAssistant: ..." (Anthropic HH form)
  alpaca  the Alpaca instruction template
  raw     contents concatenated as given
  auto    resolved once per run: chat if the tokenizer has a chat template, else hh
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError

TEMPLATES = ("auto", "chat", "alpaca", "hh", "raw")

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # True for a trained assistant reply: its tokens (and the EOS after it) are trained
    reply: bool = False  # an assistant reply, trained or not (train implies it); the encoder ends it with the
    #                      reply end token where the template does not write one (hh, alpaca, raw)


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise UserError(f"--template must be one of {', '.join(TEMPLATES)}, got '{template}'")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "hh"
    if template == "chat" and not has_chat:
        raise UserError("--template chat: the tokenizer has no chat template; use auto, hh, alpaca or raw")
    return template


def _hh(messages, add_generation_prompt: bool) -> str:
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":  # its own paragraph before the first turn, one blank line after it
            out.append(("" if not out else "\n\n") + content)
        elif role == "user":
            # The first turn starts without the blank line the HH transcripts begin with.
            out.append(("" if not out else "\n\n") + f"Human: {content}")
        else:
            out.append(f"\n\nAssistant: {content}")
    if add_generation_prompt:
        out.append("\n\nAssistant:")
    return "".join(out)


def _alpaca(messages, add_generation_prompt: bool) -> str:
    out = []
    for m in messages:
        if m["role"] == "system":  # before the instruction blocks (it was dropped, silently)
            out.append(("\n\n" if out else "") + m["content"])
            continue
        if m["role"] == "user":
            instruction, inp = m.get("instruction", m["content"]), m.get("input", "")
            block = ALPACA_HEADER_INPUT if inp else ALPACA_HEADER
            block += f"### Instruction:\n{instruction}\n\n"
            if inp:
                block += f"### Input:\n{inp}\n\n"
            out.append(("\n\n" if out else "") + block)
        else:
            out.append(f"### Response:\n{m['content']}")
    if add_generation_prompt:
        out.append("### Response:\n")
    return "".join(out)


def _raw(messages, add_generation_prompt: bool) -> str:
    return "".join(m["content"] for m in messages)


def render_text(messages, template: str, tokenizer, add_generation_prompt: bool) -> str:
    """The whole conversation as one string (template already resolved, not 'auto')."""
    if template == "chat":
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError) as e:  # raise_exception() in the template (role order, system turns),
            # a broken template, or transformers' own checks
            raise UserError(f"the tokenizer's chat template refused this conversation: {e} (--template chat; "
                            "fix the record or pick --template hh, alpaca or raw)") from None
    fn = {"hh": _hh, "alpaca": _alpaca, "raw": _raw}[template]
    return fn(messages, add_generation_prompt)


# Jinja sources of the templates above, for the chat template a saved tokenizer carries (Encoder.chat_template):
# each renders render_text's string, `end` after every reply as the encoder writes it, `bos` first.
_JINJA_TURNS = {
    "hh": ("{%- if message['role'] == 'user' %}{{ ('' if loop.first else '\\n\\n') + 'Human: ' + message['content'] }}"
           "{%- elif message['role'] == 'system' %}{{ ('' if loop.first else '\\n\\n') + message['content'] }}"
           "{%- else %}{{ '\\n\\nAssistant: ' + message['content'] + END }}{%- endif %}",
           "\\n\\nAssistant:"),
    "alpaca": ("{%- if message['role'] == 'user' %}"
               "{%- set inp = message['input'] if message['input'] is defined else '' %}"
               "{{- ('' if loop.first else '\\n\\n') + (HEADER_INPUT if inp else HEADER) + '### Instruction:\\n'"
               " + (message['instruction'] if message['instruction'] is defined else message['content']) + '\\n\\n' }}"
               "{%- if inp %}{{ '### Input:\\n' + inp + '\\n\\n' }}{% endif %}"
               "{%- elif message['role'] == 'system' %}{{ ('' if loop.first else '\\n\\n') + message['content'] }}"
               "{%- else %}{{ '### Response:\\n' + message['content'] + END }}{%- endif %}",
               "### Response:\\n"),
    "raw": ("{{- message['content'] }}{%- if message['role'] == 'assistant' %}{{ END }}{%- endif %}", ""),
}


def jinja_template(template: str, end: str, bos: str = "") -> str:
    """A Jinja chat template rendering `template` (hh, alpaca or raw) as `render_text` does, with the text
    `end` after every assistant reply (the reply end token the encoder writes there) and `bos` first, so
    plain transformers' `apply_chat_template` gives the text, and tokenized the ids, a model trained with
    `template` saw; with `add_generation_prompt` it ends where that model's answers begin."""
    turns, prompt = _JINJA_TURNS[template]
    def lit(text: str) -> str:  # a Jinja string literal
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    head = "{%- set END = " + lit(end) + " %}"
    if template == "alpaca":
        head += "{%- set HEADER = " + lit(ALPACA_HEADER) + " %}{%- set HEADER_INPUT = " + lit(ALPACA_HEADER_INPUT) + " %}"
    return (head + ("{{- " + lit(bos) + " }}" if bos else "") + "{%- for message in messages %}" + turns
            + "{%- endfor %}" + ("{%- if add_generation_prompt %}{{ '" + prompt + "' }}{%- endif %}" if prompt else ""))


def _prefix_ok(text: str, prefix: str, what: str) -> None:
    if not text.startswith(prefix):
        # Name where the two renderings part: a template that drops an earlier reply's reasoning (Qwen3) or opens
        # a `<think>` in the generation prompt that the rendered reply lacks (DeepSeek-R1) is told apart at a glance.
        k = len(os.path.commonprefix([text, prefix]))
        raise UserError(
            f"template does not render {what} as a prefix of the longer conversation (after "
            f"{prefix[max(0, k - 30):k]!r} the shorter rendering goes on {prefix[k:k + 30]!r}, the longer "
            f"{text[k:k + 30]!r}); loss masks would be wrong with it (a template that renders a reply differently "
            "once a later turn follows, or a generation prompt the reply does not start with, cannot be "
            "split into prompt and reply: edit the chat template or pick --template hh, alpaca or raw)")


def _reopen(segments: list, done: str, later: str, content: str, tokenizer) -> str:
    """`done` (ending with a reply segment, whose message content is `content`) cut where `later`, a longer
    conversation's rendering, departs from it, where that is after the reply's content: a template that writes
    text after the conversation's last turn only (Phi-3's EOS after the final `<|end|>\\n`) renders the earlier
    turns as a prefix up to that text, and the encoder trains a reply only up to its end token anyway. The
    last segment is shortened in place; `done` is returned unchanged where the departure is not that."""
    if later.startswith(done) or not segments or not segments[-1].reply:
        return done
    k = len(os.path.commonprefix([done, later]))
    for special in tokenizer.all_special_tokens + [t.content for t in tokenizer.added_tokens_decoder.values()]:
        j = done.rfind(special, 0, k + len(special) - 1)  # not inside a special token's text: `<|endoftext|>`
        if 0 <= j < k < j + len(special):                   # and `<|user|>` share `<|`
            k = j
    start = len(done) - len(segments[-1].text)
    if k <= start or content.strip() not in done[start:k]:
        return done
    segments[-1] = Segment(done[start:k], segments[-1].train, reply=True)
    return done[:k]


def trained(messages, i: int) -> bool:
    """Whether message i is a reply the loss covers: an assistant turn after the first user turn (a greeting
    that opens the conversation answers nothing, and a chat template cannot render the empty prompt before
    it) and not marked `"weight": 0` (OpenAI's fine-tuning format)."""
    m = messages[i]
    return (m["role"] == "assistant" and m.get("weight", 1) != 0
            and any(p["role"] == "user" for p in messages[:i]))


def render_segments(messages, template: str, tokenizer, add_generation_prompt: bool = False) -> list[Segment]:
    """Split a rendered conversation into non-trainable and trainable (assistant) segments.

    Each trained reply (`trained`) is the difference between the conversation rendered up to and
    including it and the conversation before it rendered with a generation prompt. Concatenating the
    segments gives `render_text(messages, ...)` exactly, up to the last trained reply at least.
    """
    segments: list[Segment] = []
    done = ""  # text rendered so far
    last = ""  # the content of the reply that ends `done`
    for i, m in enumerate(messages):
        # Under hh, alpaca and raw every reply ends with the end token the encoder appends, an untrained one
        # ("weight": 0, a greeting before the first user turn) too, as a chat template writes its turn end.
        untrained_reply = template != "chat" and m["role"] == "assistant"
        if not (trained(messages, i) or untrained_reply):
            continue
        before = render_text(messages[:i], template, tokenizer, add_generation_prompt=True)
        upto = render_text(messages[: i + 1], template, tokenizer, add_generation_prompt=False)
        done = _reopen(segments, done, before, last, tokenizer)
        _prefix_ok(before, done, "earlier turns")
        _prefix_ok(upto, before, "the generation prompt")
        if len(before) > len(done):
            segments.append(Segment(before[len(done):], False))
        segments.append(Segment(upto[len(before):], trained(messages, i), reply=True))
        done, last = upto, m["content"]
    if not messages or not trained(messages, len(messages) - 1):
        rest = render_text(messages, template, tokenizer, add_generation_prompt=add_generation_prompt)
        done = _reopen(segments, done, rest, last, tokenizer)
        _prefix_ok(rest, done, "earlier turns")
        if len(rest) > len(done):
            segments.append(Segment(rest[len(done):], False))
    return segments
