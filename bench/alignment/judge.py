"""The independent judge: plain `transformers`, no project code.

A model directory is loaded with AutoModelForCausalLM / AutoTokenizer. The prompt template is read
from the directory's args.json ("hh", or "chat" for the tokenizer's chat template) and rendered in
the documented form: the template's text for each turn, every earlier assistant reply followed by
the EOS token, the whole text tokenized at once, and a BOS first when the tokenizer adds one. Answers
are generated greedily in left-padded batches and scored by the task's own predicates:

  preferred   the answer ended with EOS and shows the preferred behaviour
  well_formed the answer ended with EOS and matches the task's exact answer shape
  eos         the answer ended with EOS within the token budget
  length      answer tokens before the EOS
  distinct    distinct tokens / tokens per answer (1.0: no token repeated), averaged

The reward probe scores answers with AutoModelForSequenceClassification, one text at a time (no
padding, so HF's pooling reads the last token: the EOS that closes the answer).
"""
from __future__ import annotations

import json
import os

import torch

MAX_NEW_TOKENS = 40


def _template(model_dir: str) -> str:
    path = os.path.join(model_dir, "args.json")
    template = "auto"
    if os.path.isfile(path):
        with open(path) as f:
            template = json.load(f).get("template", "auto")
    return template


def _pieces(messages: list[dict], template: str, tok) -> list[tuple[str, bool]]:
    """(text, ends_with_eos) pieces of a prompt ending with the generation prompt."""
    if template == "chat" or (template == "auto" and getattr(tok, "chat_template", None)):
        return [(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False)]
    if template not in ("hh", "auto"):
        raise ValueError(f"judge renders hh and chat templates only, not {template!r}")
    out, text = [], ""
    for m in messages:
        if m["role"] == "system":
            text += ("\n\n" if text or out else "") + m["content"]
        elif m["role"] == "user":
            text += ("\n\n" if text or out else "") + f"Human: {m['content']}"
        else:
            out.append((text + "\n\nAssistant:", False))
            out.append((f" {m['content']}", True))
            text = ""
    out.append((text + "\n\nAssistant:", False))
    return out


def prompt_ids(messages: list[dict], template: str, tok) -> list[int]:
    """The prompt's whole text, each earlier reply's EOS written as its text, tokenized at once (what a
    user of plain transformers does), after a BOS where the tokenizer adds one."""
    ids = []
    bos = tok.bos_token_id
    if bos is not None and tok("a")["input_ids"][:1] == [bos]:
        ids.append(bos)
    text = "".join(t + (tok.eos_token if eos else "") for t, eos in _pieces(messages, template, tok))
    return ids + tok(text, add_special_tokens=False)["input_ids"]


def as_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    p = record["prompt"]
    return p if isinstance(p, list) else [{"role": "user", "content": p}]


@torch.no_grad()
def generate(model_dir: str, records: list[dict], batch_size: int = 32) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    template = _template(model_dir)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out = []
    for start in range(0, len(records), batch_size):
        chunk = [prompt_ids(as_messages(r), template, tok) for r in records[start:start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
        for row in gen:
            ended = eos in row
            body = row[:row.index(eos)] if ended else row
            out.append({"text": tok.decode(body, skip_special_tokens=True).strip(), "ended": ended,
                        "tokens": len(body), "distinct": len(set(body)) / max(len(body), 1)})
    return out


def score(task, answers: list[dict]) -> dict:
    n = len(answers)
    return {"n": n,
            "preferred": sum(a["ended"] and task.preferred(a["text"]) for a in answers) / n,
            "well_formed": sum(a["ended"] and task.well_formed(a["text"]) for a in answers) / n,
            "eos": sum(a["ended"] for a in answers) / n,
            "length": sum(a["tokens"] for a in answers) / n,
            "distinct": sum(a["distinct"] for a in answers) / n}


def judge(task, model_dir: str) -> dict:
    answers = generate(model_dir, task.heldout_prompts)
    row = score(task, answers)
    row["answers"] = [a["text"] + ("" if a["ended"] else " [no EOS]") for a in answers]
    return row


# ----------------------------------------------------------------------------- reward probe

@torch.no_grad()
def reward_probe(task, reward_dir: str) -> dict:
    """How often a malformed answer outscores the well-formed preferred answer of the same prompt."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    template = _template(reward_dir)

    def scored(messages, answer: str) -> float:
        ids = prompt_ids(messages, template, tok)
        if answer:
            ids += tok(f" {answer}", add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)  # an empty answer is the EOS right after the generation prompt
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    wins, total, by_kind, worst = 0, 0, {}, None
    pref_scores, bad_scores = [], []
    for p in task.probes:
        msgs = as_messages({"prompt": p["prompt"]})
        best_pref = min(scored(msgs, a) for a in p["preferred"])
        pref_scores.append(best_pref)
        for kind, answers in p["malformed"].items():
            for a in answers:
                s = scored(msgs, a)
                bad_scores.append(s)
                w, t = by_kind.get(kind, (0, 0))
                by_kind[kind] = (w + (s > best_pref), t + 1)
                wins, total = wins + (s > best_pref), total + 1
                if worst is None or s - best_pref > worst[0]:
                    worst = (s - best_pref, a, s, best_pref)
    return {"malformed_wins": wins / total, "by_kind": {k: w / t for k, (w, t) in by_kind.items()},
            "preferred_mean": sum(pref_scores) / len(pref_scores), "malformed_mean": sum(bad_scores) / len(bad_scores),
            "worst": {"answer": worst[1], "score": worst[2], "preferred_score": worst[3]}}
