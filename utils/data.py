"""Reading, validating and normalising the data formats every step accepts.

Formats are detected per file from the fields of its first record; every later record of the file
must match it. Each record becomes a `Sample`:

  {"messages": [{"role", "content"}, ...]}      prompt = turns before the last assistant turn
  {"prompt", "response"}                         one user turn, one reply
  {"prompt", "chosen"[, "rejected"][, "margin"]} chosen is the SFT target; strings or message lists
  {"chosen"[, "rejected"]} HH transcripts        "\\n\\nHuman: ...\\n\\nAssistant: ..." strings
  {"instruction"[, "input"], "output"}           Alpaca
  {"text"}                                       plain language modelling, loss on all tokens
  {"prompt"}                                     prompt only (PPO)

Problems raise `DataError` naming the file, the line (record) and the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field

from .errors import DataError, UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
FORMATS = ("messages", "prompt_response", "preference", "hh", "alpaca", "text", "prompt")
ROLES = ("system", "user", "assistant")
PROMPT_FIELDS = ("prompt", "messages")  # the fields a prompt is read from; the rest of a row is its columns


@dataclass(frozen=True)
class Sample:
    prompt: tuple = ()            # messages before the response
    chosen: tuple | None = None   # response messages (SFT target / preferred answer)
    rejected: tuple | None = None
    text: str | None = None       # plain-text record
    margin: float | None = None
    where: str = field(default="", compare=False)  # "path:line"
    # The record's other fields (e.g. a verifiable `answer`), kept for prompt loads only: step 3 passes
    # them to rule-based reward functions as keyword arguments.
    columns: dict | None = field(default=None, compare=False, repr=False)


# ----------------------------------------------------------------------------- reading files

def _read_jsonl(path: str):
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    for i, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, i, None, f"undecodable bytes (not UTF-8) at byte {e.start}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, i, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
        yield i, row


def _read_json(path: str):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"undecodable bytes (not UTF-8) at byte {e.start}") from None
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, None, None, "a .json file must hold a list of records (or use .jsonl)")
    for i, row in enumerate(data, start=1):
        yield i, row


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(path, None, None, f"cannot read parquet: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row


def _read_hub(name: str):
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # the hub client raises many types; the message is what the user needs
        raise UserError(
            f"data path '{name}' is not a local file and could not be loaded as a hub dataset: "
            f"{type(e).__name__}: {e}") from None
    for i, row in enumerate(ds, start=1):
        yield i, row


def read_records(path: str):
    """Yield (line_or_record_number, dict) from a local file or a hub dataset name."""
    if os.path.isdir(path):
        raise UserError(f"data path '{path}' is a directory; give the .jsonl/.json/.parquet file")
    if not os.path.exists(path):
        looks_local = path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))
        if looks_local:
            raise UserError(f"data file '{path}' does not exist")
        yield from _read_hub(path)
        return
    if path.endswith(".parquet"):
        reader = _read_parquet
    elif path.endswith(".json"):
        reader = _read_json
    else:
        reader = _read_jsonl
    yield from reader(path)


# ----------------------------------------------------------------------------- formats

def detect_format(row: dict) -> str | None:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "prompt" in keys and "response" in keys:
        return "prompt_response"
    if "prompt" in keys and "chosen" in keys:
        return "preference"
    if "chosen" in keys:
        return "hh"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    return None


class _Row:
    """Field access with errors that name the file, line and field."""

    def __init__(self, path, line, row):
        self.path, self.line, self.row = path, line, row

    def err(self, fld, problem):
        return DataError(self.path, self.line, fld, problem)

    def string(self, fld, required=True, allow_empty=False):
        if fld not in self.row or self.row[fld] is None:
            if required:
                raise self.err(fld, "missing field")
            return None
        v = self.row[fld]
        if not isinstance(v, str):
            raise self.err(fld, f"expected a string, got {type(v).__name__}")
        if not allow_empty and not v.strip():
            raise self.err(fld, "field is empty")
        return v

    def messages(self, fld, value=None):
        v = self.row.get(fld) if value is None else value
        if v is None:
            raise self.err(fld, "missing field")
        if not isinstance(v, list):
            raise self.err(fld, f"expected a list of messages, got {type(v).__name__}")
        if not v:
            raise self.err(fld, "field is empty")
        out = []
        for j, m in enumerate(v):
            if not isinstance(m, dict):
                raise self.err(f"{fld}[{j}]", f"expected a message object, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise self.err(f"{fld}[{j}].role", f"expected one of {ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise self.err(f"{fld}[{j}].content", "missing or not a string")
            if not content.strip():
                raise self.err(f"{fld}[{j}].content", "field is empty")
            out.append({"role": role, "content": content})
        return tuple(out)

    def text_or_messages(self, fld, role="assistant"):
        v = self.row.get(fld)
        if isinstance(v, list):
            return self.messages(fld)
        return ({"role": role, "content": self.string(fld)},)

    def margin(self):
        v = self.row.get("margin")
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err("margin", f"expected a number, got {type(v).__name__}")
        return float(v)


def parse_hh(r: _Row, fld: str) -> tuple:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages. The transcript must end with an Assistant turn."""
    text = r.string(fld)
    msgs, pos = [], 0
    markers = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    if not text.startswith("\n\n"):
        text = "\n\n" + text
    while pos < len(text):
        starts = [(text.find(k, pos), k) for k in markers]
        starts = [(i, k) for i, k in starts if i == pos]
        if not starts:
            raise r.err(fld, "not an HH transcript (expected '\\n\\nHuman:' / '\\n\\nAssistant:' turns)")
        _, key = starts[0]
        body_start = pos + len(key)
        nxt = [i for i in (text.find(k, body_start) for k in markers) if i != -1]
        end = min(nxt) if nxt else len(text)
        content = text[body_start:end].strip()
        if not content:
            raise r.err(fld, f"empty {markers[key]} turn in HH transcript")
        msgs.append({"role": markers[key], "content": content})
        pos = end
    if not msgs or msgs[-1]["role"] != "assistant":
        raise r.err(fld, "HH transcript must end with an Assistant turn")
    return tuple(msgs)


def _split_last_reply(r: _Row, fld: str, msgs: tuple):
    """(prompt, reply) where reply is the final run of assistant turns."""
    k = len(msgs)
    while k > 0 and msgs[k - 1]["role"] == "assistant":
        k -= 1
    if k == len(msgs):
        return msgs, None
    if k == 0:
        raise r.err(fld, "conversation has no user turn before the assistant reply")
    return msgs[:k], msgs[k:]


def _prompt_messages(r: _Row) -> tuple:
    v = r.row.get("prompt")
    if isinstance(v, list):
        return r.messages("prompt")
    return ({"role": "user", "content": r.string("prompt")},)


def parse_record(fmt: str, r: _Row) -> Sample:
    where = f"{r.path}:{r.line}"
    if fmt == "messages":
        msgs = r.messages("messages")
        prompt, reply = _split_last_reply(r, "messages", msgs)
        return Sample(prompt=prompt, chosen=reply, where=where)
    if fmt == "prompt_response":
        return Sample(prompt=_prompt_messages(r), chosen=r.text_or_messages("response"), where=where)
    if fmt == "preference":
        prompt = _prompt_messages(r)
        chosen = r.text_or_messages("chosen")
        rejected = r.text_or_messages("rejected") if r.row.get("rejected") is not None else None
        return Sample(prompt=prompt, chosen=chosen, rejected=rejected, margin=r.margin(), where=where)
    if fmt == "hh":
        if isinstance(r.row.get("chosen"), list):
            c_prompt, chosen = _split_last_reply(r, "chosen", r.messages("chosen"))
            rejected = None
            if r.row.get("rejected") is not None:
                rj_prompt, rejected = _split_last_reply(r, "rejected", r.messages("rejected"))
                if rj_prompt != c_prompt:
                    raise r.err("rejected", "chosen and rejected conversations differ before the last reply")
            if chosen is None:
                raise r.err("chosen", "conversation does not end with an assistant reply")
            return Sample(prompt=c_prompt, chosen=chosen, rejected=rejected, margin=r.margin(), where=where)
        c = parse_hh(r, "chosen")
        rejected = None
        if r.row.get("rejected") is not None:
            rj = parse_hh(r, "rejected")
            if rj[:-1] != c[:-1]:
                raise r.err("rejected", "chosen and rejected transcripts differ before the last Assistant turn")
            rejected = rj[-1:]
        return Sample(prompt=c[:-1], chosen=c[-1:], rejected=rejected, margin=r.margin(), where=where)
    if fmt == "alpaca":
        instruction = r.string("instruction")
        inp = r.string("input", required=False, allow_empty=True) or ""
        content = instruction + (f"\n\n{inp}" if inp.strip() else "")
        user = {"role": "user", "content": content, "instruction": instruction, "input": inp.strip()}
        return Sample(prompt=(user,), chosen=({"role": "assistant", "content": r.string("output")},), where=where)
    if fmt == "text":
        return Sample(text=r.string("text"), where=where)
    if fmt == "prompt":
        v = r.row.get("prompt")
        if isinstance(v, list):
            prompt, reply = _split_last_reply(r, "prompt", r.messages("prompt"))
            if reply is not None:
                raise r.err("prompt", "a prompt conversation must end with a user turn")
            return Sample(prompt=prompt, where=where)
        return Sample(prompt=_prompt_messages(r), where=where)
    raise AssertionError(fmt)


# What each kind of consumer needs from a record.
NEEDS = {
    "sft": "a response (prompt/response, preference, messages, alpaca, HH or text formats)",
    "pairs": "chosen and rejected responses",
    "prompts": "a prompt",
}


def _check_need(need: str, s: Sample, r: _Row, fmt: str):
    if need == "sft" and s.text is None and not s.chosen:
        raise r.err("messages" if fmt == "messages" else "prompt",
                    "record has no assistant reply to train on")
    if need == "pairs":
        if s.text is not None or s.chosen is None:
            raise r.err("chosen", f"format '{fmt}' has no chosen/rejected pair")
        if s.rejected is None:
            raise r.err("rejected", "missing field (preference training needs chosen and rejected)")
    if need == "prompts" and s.text is not None:
        raise r.err("prompt", "format 'text' has no prompt")


def load_file(path: str, need: str) -> list[Sample]:
    samples, fmt = [], None
    for line, row in read_records(path):
        r = _Row(path, line, row)
        if not isinstance(row, dict):
            raise r.err(None, f"expected a JSON object, got {type(row).__name__}")
        if fmt is None:
            fmt = detect_format(row)
            if fmt is None:
                raise r.err(None, f"record matches no known format (fields: {', '.join(sorted(row)) or 'none'}); "
                                  "expected messages, prompt+response, prompt+chosen[+rejected], chosen (HH), "
                                  "instruction+output, text or prompt")
        s = parse_record(fmt, r)
        _check_need(need, s, r, fmt)
        if need == "prompts":
            s = dataclasses.replace(s, columns={k: v for k, v in row.items() if k not in PROMPT_FIELDS})
        samples.append(s)
    if not samples:
        raise DataError(path, None, None, "file is empty (no records)")
    return samples


def load_samples(paths: list[str], need: str, log=print) -> list[Sample]:
    """Load and mix several files. For pairs, rows with chosen == rejected are counted and skipped."""
    out = []
    for p in paths:
        file_samples = load_file(p, need)
        if need == "pairs":
            kept = [s for s in file_samples if s.chosen != s.rejected]
            if len(kept) != len(file_samples):
                log(f"{p}: skipped {len(file_samples) - len(kept)} of {len(file_samples)} rows "
                    f"where chosen == rejected (first: {next(s.where for s in file_samples if s.chosen == s.rejected)})")
            if not kept:
                raise DataError(p, None, None, "every row has chosen == rejected")
            file_samples = kept
        out.extend(file_samples)
    return out


def train_eval_split(samples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded, disjoint split: the same seed and data give the same split in every step and on every rank."""
    if not 0 < eval_fraction < 1:
        raise UserError(f"--eval_fraction must be in (0, 1), got {eval_fraction}")
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(samples) * eval_fraction)))
    if n_eval >= len(samples):
        raise UserError(f"only {len(samples)} samples: too few to hold out an eval split")
    eval_idx = set(idx[:n_eval])
    train = [s for i, s in enumerate(samples) if i not in eval_idx]
    evals = [s for i, s in enumerate(samples) if i in eval_idx]
    return train, evals


def load_splits(data_path: list[str], eval_data_path: list[str] | None, eval_fraction: float,
                seed: int, need: str, log=print) -> tuple[list[Sample], list[Sample]]:
    train = load_samples(data_path, need, log)
    if eval_data_path:
        return train, load_samples(eval_data_path, need, log)
    return train_eval_split(train, eval_fraction, seed)
