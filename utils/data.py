"""Reading, validating and normalising the data formats every step accepts.

Sources: local .jsonl/.json/.parquet files, `datasets.save_to_disk` directories, local directories laid
out like a hub dataset repository (`data/train-00000-of-00001.parquet`, ...), and hub dataset names;
`SOURCE:SPLIT` picks a split of a directory or hub dataset (default `train`).

Formats are detected per source from the fields of its first record and from what the step needs
(`need`: "sft", "pairs" or "prompts"), so rows with extra columns are read by the fields the step uses:
a preference step reads `chosen`/`rejected` even when a `messages` column is there, SFT prefers
`messages`, a PPO step reads `prompt`. Every later record of the source must match the format.
Each record becomes a `Sample`:

  {"messages": [{"role", "content"}, ...]}      prompt = turns before the last assistant turn
  {"conversations": [{"from", "value"}, ...]}    ShareGPT: the same, with human/gpt/system turns
  {"prompt", "response"}                         one user turn, one reply
  {"prompt", "completion"}                       the same (TRL's prompt-completion format; strings, or a
                                                 `prompt` conversation and assistant-only `completion` turns)
  {"prompt", "chosen"[, "rejected"][, "margin"]} chosen is the SFT target; strings, assistant-only
                                                 message lists (TRL), or whole conversations that
                                                 repeat the prompt turns (UltraFeedback)
  {"chosen"[, "rejected"]} HH transcripts        "\\n\\nHuman: ...\\n\\nAssistant: ..." strings, or conversations
  {"instruction"[, "input"], "output"}           Alpaca (also Dolly's instruction, context, response)
  {"text"}                                       plain language modelling, loss on all tokens
  {"prompt"}                                     prompt only (PPO)

Problems raise `DataError` naming the source, the line (or row) and the field.
"""
from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import math
import os
import random
from dataclasses import dataclass, field

from .errors import DataError, UserError, location

UNTYPED_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".csv", ".tsv")
# Files in a hub-style directory that hold rows (datasets would read them for a split) and the metadata
# files beside them that do not.
DIRECTORY_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".tsv", ".jsonl.gz", ".json.gz",
                           ".csv.gz", ".tsv.gz")
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")
FORMATS = ("messages", "sharegpt", "prompt_response", "prompt_completion", "preference", "hh", "alpaca", "text", "prompt")
ROLES = ("system", "user", "assistant")
NEEDS = ("sft", "pairs", "prompts")
# Files `datasets.save_to_disk` writes: a DatasetDict, or one Dataset.
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
PROMPT_FIELDS = ("prompt", "messages", "conversations")  # the fields a prompt is read from; the rest of a row is its columns
# Public datasets' own names for our fields, read as ours where a row has no field of our name (and no
# conversation): GSM8K {question, answer}, MATH {problem, solution}, Orca DPO pairs {system, question,
# chosen, rejected}. A PPO prompt row keeps its `answer`/`solution` as a column (exact_match reads either).
PROMPT_ALIASES = ("question", "problem")
REPLY_ALIASES = {"question": "answer", "problem": "solution"}


@dataclass(frozen=True)
class Sample:
    prompt: tuple = ()            # messages before the response
    chosen: tuple | None = None   # response messages (SFT target / preferred answer)
    rejected: tuple | None = None
    text: str | None = None       # plain-text record
    margin: float | None = None
    where: str = field(default="", compare=False)  # "path:line" or "source row i"
    # The record's other fields (e.g. a verifiable `answer`), kept for prompt loads only: step 3 passes
    # them to rule-based reward functions as keyword arguments.
    columns: dict | None = field(default=None, compare=False, repr=False)
    # A prompt row given as turns (a `prompt` or `messages` list): reward functions get TRL's
    # conversational form for it.
    conversational: bool = field(default=False, compare=False, repr=False)


# ----------------------------------------------------------------------------- reading sources
# Each reader yields (source label, line, row, record): `line` for text files and record numbers of
# .json/.parquet files (1-based), `row` for records read through `datasets` (0-based, as dataset[i]).

def _decode_error(path: str, line: int | None, raw: bytes, e: UnicodeDecodeError) -> DataError:
    if line in (None, 1) and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return DataError(path, line, None, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                                           "save it as UTF-8")
    return DataError(path, line, None, f"undecodable bytes (not UTF-8) at byte {e.start}")


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it ends in .gz."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip: not a gzip file, or one cut short
        if not path.lower().endswith(".gz"):
            raise
        raise DataError(path, None, None, f"cannot read the gzip file: {e}") from None


def _read_jsonl(path: str):
    raw_lines = _read_bytes(path).split(b"\n")
    # A UTF-8 byte-order mark (what many Windows editors write) is not part of the first record.
    if raw_lines[0].startswith(codecs.BOM_UTF8):
        raw_lines[0] = raw_lines[0][len(codecs.BOM_UTF8):]
    for i, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _decode_error(path, i, raw, e) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, i, None, f"malformed JSON ({_json_problem(e)})") from None
        yield path, i, None, row


def _json_problem(e: json.JSONDecodeError) -> str:
    msg = e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg  # "Unterminated string starting at"
    return f"{msg} at column {e.colno}"


def _read_json(path: str):
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")  # -sig: a leading UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise _decode_error(path, None, raw, e) from None
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        if e.msg == "Extra data" and first.startswith("{"):  # JSON Lines in a .json file, as datasets' to_json writes
            yield from _read_jsonl(path)
            return
        raise DataError(path, e.lineno, None, f"malformed JSON ({_json_problem(e)})") from None
    if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, None, None, "a .json file must hold a list of records (or use .jsonl)")
    for i, row in enumerate(data, start=1):
        yield path, i, None, row


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(path, None, None, f"cannot read parquet: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield path, i, None, row


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _rows(label: str, dataset, index: list[int] | None = None):
    """(label, None, row, record) per row; `index`: the rows' numbers in the whole split (a slice of it)."""
    for i, row in enumerate(dataset):
        yield label, None, i if index is None else index[i], row


def _split_name(split: str) -> str:
    """'train_prefs[:1000]' -> 'train_prefs'."""
    return split.split("[", 1)[0]


def _split_rows(dataset, path: str, split: str):
    """The rows of `dataset` (split `_split_name(split)`) that SPLIT's slice picks, in the `datasets` syntax
    ('train[:100]', 'train[-50:]', 'train[:10%]', 'train[:5]+train[-5:]'), labelled `path:split` and
    numbered as in the whole split; no slice: every row."""
    name = _split_name(split)
    if "[" not in split:
        return _rows(f"{path}:{name}", dataset)
    import datasets

    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(dataset)})
    except (ValueError, KeyError, AssertionError) as e:  # datasets' own words for a malformed slice
        raise UserError(f"data path '{path}:{split}': not a split slice that datasets reads "
                        f"({_one_line(e)}); e.g. '{path}:{name}[:1000]' or '{path}:{name}[:10%]'") from None
    index = [i for p in parts for i in range(p.from_, p.to)]
    return _rows(f"{path}:{name}", dataset.select(index), index)


def _read_saved_dataset(path: str, split: str | None):
    """A `datasets.save_to_disk` directory: one Dataset, or a DatasetDict (split `train` unless named)."""
    import datasets

    try:
        obj = datasets.load_from_disk(path)
    except Exception as e:  # a damaged save: datasets/pyarrow raise many types; the user needs the path
        raise UserError(f"data path '{path}': cannot read the saved dataset ({_one_line(e)})") from None
    if isinstance(obj, datasets.DatasetDict):
        split = split or "train"
        if _split_name(split) not in obj:
            raise UserError(f"data path '{path}' has no split '{_split_name(split)}' (splits: {', '.join(obj)}); "
                            f"pick one as '{path}:SPLIT'")
        return _split_rows(obj[_split_name(split)], path, split)
    if split is not None:
        raise UserError(f"data path '{path}:{split}': '{path}' holds one saved dataset without splits; "
                        f"give it without ':{split}'")
    return _rows(path, obj)


def _read_dataset_repo(path: str, split: str | None, local: bool):
    """A local directory laid out like a hub dataset repository, or a hub dataset name (split `train`
    unless named)."""
    import datasets

    split = split or "train"
    name = _split_name(split)
    what = f"data path '{path}'" if local else f"data path '{path}' is not a local file and"
    only = _split_files(path, name) if local else {}
    untyped = [f for f in only.get("data_files", {}).get(name, []) if f.endswith(UNTYPED_SUFFIXES)]
    if untyped:  # datasets reads them (a .txt file as one `text` row per line), unlike a file given by name
        raise UserError(f"data path '{path}': '{os.path.relpath(untyped[0], path)}' is not read (.csv, .tsv and .txt "
                        "files have no typed columns); keep only .parquet, .json, .jsonl or .arrow files there, or "
                        "convert it, e.g. datasets.load_dataset('csv', data_files=FILE)['train'].to_json('data.jsonl')")
    try:
        ds = datasets.load_dataset(path, split=name, **only)
    except FileNotFoundError as e:  # also datasets' EmptyDatasetError
        if local:
            raise UserError(f"{what} is a directory without dataset files: expected a datasets.save_to_disk "
                            "directory or a hub-style layout such as data/train-00000-of-00001.parquet") from None
        raise UserError(f"{what} could not be loaded as a hub dataset: {_one_line(e)}") from None
    except Exception as e:  # the hub client and the file builders raise many types; the message is what counts
        if isinstance(e, ValueError) and "split" in str(e).lower():  # 'Unknown split "test". Should be one of ...'
            raise UserError(f"data path '{path}': {str(e).splitlines()[0]} (pick one as '{path}:SPLIT')") from None
        if local:  # datasets hides the reason (files whose columns differ, ...) in the exception's cause
            columns = {}  # file -> the fields its records use
            for f in only.get("data_files", {}).get(name, []):  # a damaged file: our reader names its line
                if f.lower().endswith((".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")):
                    keys = columns.setdefault(f, set())
                    try:
                        for _, _, _, record in read_records(f):
                            keys.update(record if isinstance(record, dict) else ())
                    except UserError as bad:
                        raise UserError(f"{what}: {bad}") from None
            first, *rest = list(columns.items()) or [(None, None)]
            for f, keys in rest:  # datasets reads a split's files as one table: its CastError names no file
                if keys != first[1]:
                    raise UserError(f"{what}: '{os.path.relpath(f, path)}' has fields ({', '.join(sorted(keys))}) "
                                    f"and '{os.path.relpath(first[0], path)}' ({', '.join(sorted(first[1]))}): the "
                                    f"files of split '{name}' are read as one table; give them the same fields, or "
                                    "give each as a --data_path of its own") from None
            cause = f" ({_one_line(e.__cause__)})" if e.__cause__ is not None else ""
            raise UserError(f"{what} could not be loaded with datasets.load_dataset: {_one_line(e)}{cause}; files "
                            "of different formats can be given as separate --data_path sources") from None
        raise UserError(f"{what} could not be loaded as a hub dataset: {_one_line(e)}") from None
    return _split_rows(ds, path, split)


def _split_files(path: str, split: str) -> dict:
    """Only the requested split's files of a hub-style directory: load_dataset(dir) reads every split,
    so a split with other columns (UltraFeedback's train_gen beside train_prefs) or a damaged file in
    another split failed the one asked for. {} where datasets finds no split layout (its error then)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(path)
    except Exception:  # no files datasets recognises: load_dataset reports it in its own words
        return {}
    names = sorted(str(k) for k in patterns)  # datasets' NamedSplit keys
    if split not in names:
        raise UserError(f"data path '{path}' has no split '{split}' (splits: {', '.join(names)}); "
                        f"pick one as '{path}:SPLIT'")
    files = DataFilesDict.from_patterns(patterns, base_path=path)
    _refuse_files_of_no_split(path, {os.path.realpath(f) for fs in files.values() for f in fs})
    return {"data_files": {split: list(files[split])}}


def _refuse_files_of_no_split(path: str, in_splits: set[str]) -> None:
    """datasets reads a directory's files by split name (train.jsonl, data/test-00000.parquet, ...) and
    skips, without a word, a data file whose name names no split once another's does: refuse instead."""
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for n in sorted(names):
            f = os.path.join(root, n)
            if (not n.startswith((".", "_")) and n.lower().endswith(DIRECTORY_DATA_SUFFIXES)
                    and n not in METADATA_FILES and os.path.realpath(f) not in in_splits):
                raise UserError(f"data path '{path}': '{os.path.relpath(f, path)}' belongs to no split (datasets "
                                "reads a directory's files by split name, e.g. train.jsonl, test-00000.parquet, and "
                                "would skip it); rename it, move it out, or give it as a --data_path of its own")


def _quiet_datasets() -> None:
    """No progress bars or info lines from `datasets` on every rank; its errors still reach us."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach us as exceptions, said once


def looks_local(path: str, suffixes: tuple = ()) -> bool:
    """Whether `path`, which does not exist, can only be meant as a local path and never as a hub id
    ("name" or "owner/name"): one of `suffixes`, a leading ".", "/" or "~", or more than one "/"."""
    p = path.rstrip("/")
    return p.lower().endswith(suffixes) or p.startswith((".", "/", "~")) or p.count("/") > 1


def local_parent(path: str) -> str | None:
    """The first component of an 'A/B' path when it is a local directory ('data/sft.jsonll' -> 'data')."""
    head, sep, _ = path.rstrip("/").partition("/")
    return head if sep and os.path.isdir(head) else None


def _looks_local(path: str) -> bool:
    return looks_local(path, LOCAL_SUFFIXES) or local_parent(path) is not None


def split_source(path: str) -> tuple[str, str | None]:
    """'SOURCE:SPLIT' -> (SOURCE, SPLIT) for a directory or hub name; anything else -> (path, None). SPLIT may
    end with a slice in the `datasets` syntax: 'train[:1000]', 'train[10%:20%]'."""
    if os.path.exists(path):
        return path, None
    cut, depth = -1, 0  # the last ':' outside brackets: a slice ('train[:100]') has colons of its own
    for i, ch in enumerate(path):
        depth += (ch == "[") - (ch == "]")
        if ch == ":" and depth == 0:
            cut = i
    head, sep, tail = (path[:cut], ":", path[cut + 1:]) if cut >= 0 else (path, "", "")
    if sep and head and tail and "/" not in tail and (os.path.isdir(head) or not _looks_local(head)):
        return head, tail
    return path, None


def read_records(path: str):
    """Yield (source label, line, row, record) from a local file, a dataset directory or a hub dataset."""
    source, split = split_source(path)
    if os.path.isdir(source):
        _quiet_datasets()
        if any(os.path.isfile(os.path.join(source, m)) for m in SAVED_DATASET_MARKERS):
            yield from _read_saved_dataset(source, split)
        else:
            yield from _read_dataset_repo(source, split, local=True)
        return
    if not os.path.exists(source):
        if looks_local(source, LOCAL_SUFFIXES):
            raise UserError(f"data file '{path}' does not exist")
        if local_parent(source):
            raise UserError(f"data file '{path}' does not exist (not tried as a hub dataset: "
                            f"'{local_parent(source)}/' is a directory here)")
        _quiet_datasets()
        yield from _read_dataset_repo(source, split, local=False)
        return
    suffix = source.lower()  # DATA.JSON, train.Parquet: the suffix names the format in any case
    if suffix.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz", ".xlsx")):
        raise UserError(f"data file '{path}': {suffix.rsplit('.', 1)[-1] if not suffix.endswith('.gz') else 'csv/tsv'} "
                        "files are not read (their columns have no types); convert to .jsonl, e.g. "
                        "datasets.load_dataset('csv', data_files=FILE)['train'].to_json('data.jsonl')")
    if suffix.endswith(".parquet"):
        reader = _read_parquet
    elif suffix.endswith((".json", ".json.gz")):
        reader = _read_json
    else:
        reader = _read_jsonl  # .jsonl, .jsonl.gz (as Anthropic's HH files ship), and any other text file
    yield from reader(source)


# ----------------------------------------------------------------------------- formats

def detect_format(row: dict, need: str = "sft") -> str | None:
    """The format of a record for a step that needs `need` ("sft", "pairs" or "prompts").

    The step's own fields win over extra columns: a preference step reads `chosen`/`rejected` (an
    UltraFeedback row also has `messages`, `score_chosen`, `prompt_id`, ...), a PPO step reads
    `prompt`; SFT prefers `messages`, then `prompt`+`response`, then `chosen`.
    """
    keys = set(row)
    if need == "pairs" and "chosen" in keys:
        return "preference" if "prompt" in keys else "hh"
    if need == "prompts" and "prompt" in keys:
        return "prompt"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "response" in keys:
        return "prompt_response"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys and "chosen" in keys:
        return "preference"
    if "chosen" in keys:
        return "hh"
    if "instruction" in keys and ("output" in keys or "response" in keys):
        return "alpaca"  # Dolly's rows name them instruction, context, response
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    return None


class _Row:
    """Field access with errors that name the source, the line (or row) and the field."""

    def __init__(self, path, line, row, record):
        self.path, self.line, self.row_index, self.row = path, line, row, record
        self.where = location(path, line, row)
        self.notes: list[str] = []  # counted, logged changes to the record (see load_file)
        self.named: dict[str, str] = {}  # our field -> the row's own name for it (PROMPT_ALIASES)

    def err(self, fld, problem):
        if fld is not None:
            head, dot, tail = fld.partition("[") if "[" in fld else fld.partition(".")
            fld = self.named.get(head, head) + dot + tail
        return DataError(self.path, self.line, fld, problem, row=self.row_index)

    def read_aliases(self, need: str) -> None:
        """Read a public dataset's `question`/`problem` (and, for SFT, its `answer`/`solution`) as our
        `prompt` (`response`) where the row has no field of ours; errors keep naming the row's own fields."""
        keys = set(self.row)
        if keys & {"prompt", "messages", "conversations", "text", "instruction"}:
            return
        alias = next((a for a in PROMPT_ALIASES if a in keys), None)
        if alias is None:
            return
        reply = REPLY_ALIASES[alias]
        renamed = {"prompt": alias}
        if need == "sft" and reply in keys and not keys & {"response", "completion", "chosen"}:
            renamed["response"] = reply
        if need == "prompts" or "chosen" in keys or "response" in renamed:
            self.row = {**{k: v for k, v in self.row.items() if k not in renamed.values()},
                        **{ours: self.row[theirs] for ours, theirs in renamed.items()}}
            self.named = renamed
            self.notes.append(f"read {' and '.join(repr(t) for t in renamed.values())} as "
                              f"{' and '.join(repr(o) for o in renamed)}")

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
        return self.text(fld, v)

    def text(self, fld, v: str) -> str:
        """A text the tokenizer can take: JSON's \\ud83d escapes decode to a lone surrogate (an emoji cut in
        half, common in ShareGPT dumps), which no tokenizer encodes (a TypeError deep in the run)."""
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.err(fld, f"holds a lone surrogate {v[e.start]!r} at character {e.start} (half of an emoji "
                                "pair, cut off); remove or repair it") from None
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
            if isinstance(content, list):  # OpenAI-style parts: [{"type": "text", "text": ...}, ...]
                content = self._text_parts(f"{fld}[{j}].content", content)
            if not isinstance(content, str):
                raise self.err(f"{fld}[{j}].content", "missing or not a string")
            if not content.strip():
                raise self.err(f"{fld}[{j}].content", "field is empty")
            msg = {"role": role, "content": self.text(f"{fld}[{j}].content", content)}
            weight = m.get("weight")
            if weight is not None:  # OpenAI's fine-tuning format: weight 0 leaves an assistant turn untrained
                if role != "assistant":
                    raise self.err(f"{fld}[{j}].weight", "only assistant turns take a weight")
                if isinstance(weight, bool) or weight not in (0, 1):
                    raise self.err(f"{fld}[{j}].weight", f"expected 0 or 1, got {weight!r}")
                if weight == 0:
                    msg["weight"] = 0
            out.append(msg)
        return tuple(out)

    def _text_parts(self, fld, parts: list) -> str:
        texts = []
        for k, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise self.err(f"{fld}[{k}]", f"only text parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)

    def margin(self):
        v = self.row.get("margin")
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err("margin", f"expected a number, got {type(v).__name__}")
        if not math.isfinite(v):  # Python's json reads NaN and Infinity; the loss would be nan mid-run
            raise self.err("margin", f"expected a finite number, got {v}")
        return float(v)


def parse_hh(r: _Row, fld: str, text: str | None = None, ends_with_reply: bool = True) -> tuple:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages. The transcript must end with an Assistant turn
    (or, for a prompt, `ends_with_reply=False`, with a Human turn)."""
    text = r.string(fld) if text is None else text
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
    if ends_with_reply and (not msgs or msgs[-1]["role"] != "assistant"):
        raise r.err(fld, "HH transcript must end with an Assistant turn")
    if not ends_with_reply and (not msgs or msgs[-1]["role"] != "user"):
        raise r.err(fld, "an HH prompt must end with a Human turn followed by 'Assistant:'")
    return tuple(msgs)


HH_PROMPT_END = "\n\nAssistant:"


def _hh_prompt(text: str) -> str | None:
    """The transcript part of a prompt string written as an HH transcript: one that ends in 'Assistant:'
    (DeepSpeed-Chat's Dahoas/rm-static layout: prompt "\\n\\nHuman: ...\\n\\nAssistant:", chosen " ..."), or
    one in HH's own layout, starting "\\n\\nHuman:", that ends with the Human turn; else None. Read as one
    user turn it rendered 'Human: \\n\\nHuman: ...' with a second 'Assistant:', and a transcript's
    earlier turns as text of the last one."""
    t = text.rstrip()
    if not t.lstrip("\n").startswith("Human:"):
        return None
    if t.endswith(HH_PROMPT_END.strip()) and "\n\nAssistant:" in ("\n\n" + t.lstrip("\n")):
        return ("\n\n" + t.lstrip("\n"))[: -len("Assistant:")].rstrip()
    return t if t.startswith("\n\nHuman:") else None


def _split_last_reply(r: _Row, fld: str, msgs: tuple):
    """(prompt, reply) where reply is the final run of assistant turns (None if the last turn is not one)."""
    k = len(msgs)
    while k > 0 and msgs[k - 1]["role"] == "assistant":
        k -= 1
    if k == len(msgs):
        return msgs, None
    if k == 0:
        raise r.err(fld, "conversation has no user turn before the assistant reply")
    return msgs[:k], msgs[k:]


def _prompt_messages(r: _Row, system: bool = True) -> tuple:
    """The `prompt` field's turns, after the row's top-level `system` unless `system=False`."""
    v = r.row.get("prompt")
    if isinstance(v, list):
        msgs = r.messages("prompt")
    else:
        text = r.string("prompt")
        transcript = _hh_prompt(text)
        if transcript is not None:
            r.notes.append("read the 'prompt' HH transcript ('Human: ... Assistant:') as its turns")
            msgs = parse_hh(r, "prompt", transcript, ends_with_reply=False)
        else:
            msgs = ({"role": "user", "content": text},)
    return _with_system(r, msgs) if system else msgs


def _with_system(r: _Row, msgs: tuple) -> tuple:
    """A row's top-level `system` string (Orca DPO pairs, many instruction sets) as the conversation's first
    turn: it was dropped without a word. An empty one is no system turn; turns that open with their own
    system turn keep theirs."""
    system = r.row.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return msgs
    if not isinstance(system, str):
        raise r.err("system", f"expected a string, got {type(system).__name__}")
    if msgs and msgs[0]["role"] == "system":
        return msgs
    return ({"role": "system", "content": r.text("system", system)},) + tuple(msgs)


# ShareGPT speaker names -> roles (`from` as ShareGPT dumps and their derivatives write it)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


def _sharegpt_messages(r: _Row, fld: str = "conversations") -> tuple:
    """ShareGPT turns ({"from": "human"|"gpt"|"system", "value": ...}) as messages, validated by name."""
    v = r.row.get(fld)
    if not isinstance(v, list):
        raise r.err(fld, f"expected a list of turns, got {type(v).__name__}")
    msgs = []
    for j, t in enumerate(v):
        if not isinstance(t, dict):
            raise r.err(f"{fld}[{j}]", f"expected a turn object, got {type(t).__name__}")
        if "from" not in t and "role" in t:  # some dumps mix in role/content turns
            t = {"from": t.get("role"), "value": t.get("content")}
        speaker, value = t.get("from"), t.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise r.err(f"{fld}[{j}].from", f"expected one of {', '.join(SHAREGPT_ROLES)}, got {speaker!r}")
        if not isinstance(value, str):
            raise r.err(f"{fld}[{j}].value", "missing or not a string")
        if not value.strip():
            raise r.err(f"{fld}[{j}].value", "field is empty")
        msgs.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    system = r.row.get("system")  # some ShareGPT dumps keep the system prompt beside the turns
    if isinstance(system, str) and system.strip() and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return r.messages(fld, value=msgs)


# The field a conversation format keeps its turns in.
CONVERSATION_FIELD = {"messages": "messages", "sharegpt": "conversations"}


def _turns(r: _Row, fld: str) -> tuple:
    """The validated messages of a conversation field: ShareGPT's `conversations`, else role/content turns."""
    return _sharegpt_messages(r, fld) if fld == "conversations" else r.messages(fld)


def _conversation_prompt(r: _Row, fld: str) -> tuple:
    """The prompt of a conversation given for PPO (`prompt` list, `messages` or ShareGPT `conversations`).
    One rule for all: a trailing assistant reply is dropped (and counted in the log), so the model
    answers the last user turn."""
    prompt, reply = _split_last_reply(r, fld, _turns(r, fld))
    if reply is not None:
        r.notes.append(f"dropped the trailing assistant turn of the '{fld}' conversation")
    return prompt


def _reply_side(r: _Row, fld: str, has_prompt: bool):
    """(prompt turns inside the value or None, reply) of a `chosen`/`rejected` value.

    A string is the reply (with a `prompt` field) or an HH transcript (without one); a list of
    assistant turns is the reply (TRL's conversational format); any other list is a whole
    conversation (UltraFeedback) whose final assistant turn(s) are the reply and the rest the prompt.
    """
    v = r.row.get(fld)
    if isinstance(v, list):
        msgs = r.messages(fld)
        if all(m["role"] == "assistant" for m in msgs):
            if not has_prompt:
                raise r.err(fld, "conversation has no user turn before the assistant reply")
            return None, msgs
        prompt, reply = _split_last_reply(r, fld, msgs)
        if reply is None:
            raise r.err(fld, "conversation does not end with an assistant reply")
        return prompt, reply
    if has_prompt:
        return None, _reply_text(r, fld)
    msgs = parse_hh(r, fld)
    return msgs[:-1], msgs[-1:]


def _reply_text(r: _Row, fld: str) -> tuple:
    """A reply beside a `prompt`: a list of messages, or a string. After an HH-transcript prompt (the
    Dahoas layout: prompt "...\n\nAssistant:", reply " Yes.") the space that separated them is not part
    of a string reply: stripped, as each turn of a whole transcript is (`parse_hh`)."""
    if isinstance(r.row.get(fld), list):
        return r.messages(fld)
    text = r.string(fld)
    prompt = r.row.get("prompt")
    if isinstance(prompt, str) and _hh_prompt(prompt) is not None:
        text = text.strip()
    return ({"role": "assistant", "content": text},)


def _same_turns(a: tuple, b: tuple) -> bool:
    """Equal roles and contents (surrounding whitespace aside)."""
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def parse_pair(r: _Row, with_rejected: bool = True) -> Sample:
    """Preference records with or without a `prompt` field (see `_reply_side`). The prompt turns appear
    once (pitfall 22): when `chosen`/`rejected` are whole conversations, the turns before their last
    reply are the prompt; they must be the same in both, and equal the `prompt` field when it is given.
    `with_rejected=False` (SFT on the chosen replies, PPO prompts from HH rows) leaves `rejected` unread:
    a field the step never uses does not stop it (real HH rows have empty rejected replies)."""
    has_prompt = "prompt" in r.row
    given = _prompt_messages(r, system=False) if has_prompt else None
    fields = ("chosen", "rejected") if with_rejected and r.row.get("rejected") is not None else ("chosen",)
    sides = {fld: _reply_side(r, fld, has_prompt) for fld in fields}
    inner = [(fld, turns) for fld, (turns, _) in sides.items() if turns is not None]
    # A conversation's own turns are what gets rendered (the prompt field may differ in whitespace only).
    prompt = inner[0][1] if inner else given
    for fld, turns in inner:
        if given is not None and not _same_turns(turns, given):
            raise r.err("prompt", f"differs from the turns before the last reply in '{fld}' (a conversation in "
                                  "chosen/rejected must start with the prompt's turns)")
        if not _same_turns(turns, prompt):
            raise r.err("rejected", "chosen and rejected conversations differ before the last reply")
    rejected = sides["rejected"][1] if "rejected" in sides else None
    return Sample(prompt=_with_system(r, prompt), chosen=sides["chosen"][1], rejected=rejected, margin=r.margin(),
                  where=r.where)


def parse_record(fmt: str, r: _Row, need: str = "pairs") -> Sample:
    where = r.where
    if fmt in CONVERSATION_FIELD:
        fld = CONVERSATION_FIELD[fmt]
        msgs = _turns(r, fld)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is not None and last < len(msgs) - 1:  # a conversation ending with an unanswered user turn
            r.notes.append(f"dropped the unanswered turn(s) after the last assistant reply of '{fld}'")
            msgs = msgs[:last + 1]
        prompt, reply = _split_last_reply(r, fld, msgs)
        return Sample(prompt=prompt, chosen=reply, where=where)
    if fmt == "prompt_response":
        reply = _reply_text(r, "response")
        return Sample(prompt=_prompt_messages(r), chosen=reply, where=where)
    if fmt == "prompt_completion":
        if "label" in r.row:  # TRL's unpaired preference (KTO) rows: a completion labelled bad is no SFT target
            raise r.err("label", "unpaired preference rows (prompt, completion, label) are not supported: SFT would "
                                 "also train on the completions labelled false, and reward/DPO need chosen and "
                                 "rejected; give chosen/rejected pairs, or for SFT the rows labelled true without "
                                 "the label column")
        reply = _reply_text(r, "completion")
        if any(m["role"] != "assistant" for m in reply):
            raise r.err("completion", "expected assistant turns only (the conversation before them goes in 'prompt')")
        return Sample(prompt=_prompt_messages(r), chosen=reply, where=where)
    if fmt in ("preference", "hh"):
        return parse_pair(r, with_rejected=need == "pairs")
    if fmt == "alpaca":
        instruction = r.string("instruction")
        inp_field = "input" if "input" in r.row or "context" not in r.row else "context"
        inp = r.string(inp_field, required=False, allow_empty=True) or ""
        content = instruction + (f"\n\n{inp}" if inp.strip() else "")
        user = {"role": "user", "content": content, "instruction": instruction, "input": inp.strip()}
        out_field = "output" if "output" in r.row or "response" not in r.row else "response"
        return Sample(prompt=(user,), chosen=({"role": "assistant", "content": r.string(out_field)},), where=where)
    if fmt == "text":
        return Sample(text=r.string("text"), where=where)
    if fmt == "prompt":
        if isinstance(r.row.get("prompt"), list):
            return Sample(prompt=_conversation_prompt(r, "prompt"), where=where)
        return Sample(prompt=_prompt_messages(r), where=where)
    raise AssertionError(fmt)


def parse_for(need: str, fmt: str, r: _Row) -> Sample:
    """The record as the step reads it: PPO takes the prompt of a `messages` conversation."""
    if need == "prompts" and fmt in CONVERSATION_FIELD:
        return Sample(prompt=_conversation_prompt(r, CONVERSATION_FIELD[fmt]), where=r.where)
    return parse_record(fmt, r, need)


def _check_need(need: str, s: Sample, r: _Row, fmt: str):
    if need == "sft" and s.text is None and not s.chosen:
        raise r.err(CONVERSATION_FIELD.get(fmt, "prompt"),
                    "record has no assistant reply to train on")
    if need == "pairs":
        if s.text is not None or s.chosen is None or fmt not in ("preference", "hh"):
            raise r.err("chosen", f"format '{fmt}' has no chosen/rejected pair")
        if s.rejected is None:
            raise r.err("rejected", "missing field (preference training needs chosen and rejected)")
    if need == "prompts" and s.text is not None:
        raise r.err("prompt", "format 'text' has no prompt")


def load_file(path: str, need: str, log=print) -> list[Sample]:
    """Every record of one source as Samples for a step that needs `need`. Changes made to records
    (a dropped trailing assistant turn of a PPO prompt) are counted and logged with the first place."""
    if need not in NEEDS:
        raise ValueError(f"need must be one of {NEEDS}, got {need!r}")
    samples, fmt, label = [], None, path
    notes: dict[str, list] = {}  # note -> [count, first where]
    for label, line, row, record in read_records(path):
        r = _Row(label, line, row, record)
        if not isinstance(record, dict):
            raise r.err(None, f"expected a JSON object, got {type(record).__name__}")
        r.read_aliases(need)
        if fmt is None:
            fmt = detect_format(r.row, need)
            if fmt == "text" and {"parent_id", "message_tree_id"} & set(record):
                raise r.err(None, "an OpenAssistant message row (text, role, parent_id): each row is one message of "
                                  "a tree; build conversations ({\"messages\": [...]}) from the trees first")
            if fmt is None:
                raise r.err(None, f"record matches no known format (fields: {', '.join(sorted(record)) or 'none'}); "
                                  "expected messages, conversations (ShareGPT), prompt+response, prompt+completion, prompt+chosen[+rejected], chosen (HH), "
                                  "instruction+output, question[+answer] or problem[+solution], text or prompt")
        s = parse_for(need, fmt, r)
        _check_need(need, s, r, fmt)
        if need == "prompts":
            s = dataclasses.replace(s, columns={k: v for k, v in record.items() if k not in PROMPT_FIELDS},
                                    conversational=fmt in CONVERSATION_FIELD or isinstance(r.row.get("prompt"), list))
        samples.append(s)
        for note in r.notes:
            notes.setdefault(note, [0, r.where])[0] += 1
    if not samples:
        raise DataError(label, None, None, "file is empty (no records)")
    for note, (count, first) in notes.items():
        log(f"{path}: {note} in {count} of {len(samples)} rows (first: {first})")
    return samples


def load_samples(paths: list[str], need: str, log=print) -> list[Sample]:
    """Load and mix several sources. For pairs, rows with chosen == rejected are counted and skipped."""
    out = []
    for p in paths:
        file_samples = load_file(p, need, log)
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
