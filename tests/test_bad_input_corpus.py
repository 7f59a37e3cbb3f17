"""The bad-input corpus (tests/bad_inputs/, outcomes documented in its README.md) and the security rules.

Every corpus file gives its documented outcome: either a `UserError`/`DataError` whose message names the
file, the line (record) and the field, or a counted skip whose log line says how many and names the first
file:line. The in-process tests call the same functions the programs call; four `python <step>/main.py`
runs (e2e) check the whole path: exit code 2, the message on stderr, no traceback, nothing written.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil

import pytest

from conftest import REPO, run_python
from utils.data import load_samples, load_splits
from utils.encoding import IGNORE, Encoder, encode_all
from utils.errors import DataError, UserError

CORPUS = os.path.join(REPO, "tests", "bad_inputs")
NEED = {"sft": "sft", "pairs": "pairs", "prompts": "prompts"}  # corpus folder -> load_samples(need=...)
MAX_LEN = 64  # --max_seq_len / --max_prompt_seq_len for the over-long cases; normal samples are ~30 tokens

# Corpus file -> the start of its error message ({path} is the path as given on the command line; after
# "malformed JSON (" comes Python's own description, which differs between Python versions).
# The line of a .jsonl file is its text line; of a .json/.parquet file, the record number (1-based),
# except a JSON syntax error in a .json file, which is reported at its text line.
ERRORS = {
    "sft/malformed_json.jsonl": "{path}:2: malformed JSON (",
    "sft/malformed_json.json": "{path}:4: malformed JSON (",
    "sft/missing_field.jsonl": "{path}:2: field 'response': missing field",
    "sft/empty_field.jsonl": "{path}:3: field 'response': field is empty",
    "sft/wrong_type.jsonl": "{path}:2: field 'prompt': expected a string, got int",
    "sft/undecodable_bytes.jsonl": "{path}:2: undecodable bytes (not UTF-8) at byte 33",
    "sft/undecodable_bytes.parquet": "{path}: cannot read parquet: ",
    "sft/empty_file.jsonl": "{path}: file is empty (no records)",
    "sft/no_format.jsonl": "{path}:1: record matches no known format (fields: answer, question)",
    "sft/wrong_kind.jsonl": "{path}:1: field 'prompt': record has no assistant reply to train on",
    "sft/not_a_list.json": "{path}: a .json file must hold a list of records (or use .jsonl)",
    "sft/missing.jsonl": "data file '{path}' does not exist",
    "pairs/malformed_json.jsonl": "{path}:2: malformed JSON (",
    "pairs/missing_field.jsonl": "{path}:2: field 'rejected': missing field (preference training needs chosen "
                                 "and rejected)",
    "pairs/missing_field.parquet": "{path}:2: field 'rejected': missing field",
    "pairs/empty_field.jsonl": "{path}:2: field 'chosen': field is empty",
    "pairs/wrong_type.jsonl": "{path}:3: field 'rejected': expected a string, got int",
    "pairs/wrong_type.json": "{path}:2: field 'margin': expected a number, got str",
    "pairs/undecodable_bytes.jsonl": "{path}:3: undecodable bytes (not UTF-8) at byte 59",
    "pairs/empty_file.jsonl": "{path}: file is empty (no records)",
    "pairs/all_chosen_equal_rejected.jsonl": "{path}: every row has chosen == rejected",
    "pairs/no_format.jsonl": "{path}:1: record matches no known format (fields: bad, good, question)",
    "pairs/wrong_kind.jsonl": "{path}:1: field 'rejected': missing field",
    "pairs/missing.jsonl": "data file '{path}' does not exist",
    "prompts/malformed_json.jsonl": "{path}:3: malformed JSON (",
    "prompts/missing_field.jsonl": "{path}:2: field 'prompt': missing field",
    "prompts/empty_field.jsonl": "{path}:2: field 'prompt': field is empty",
    "prompts/wrong_type.jsonl": "{path}:2: field 'prompt': expected a string, got dict",
    "prompts/wrong_type.json": "{path}:2: field 'prompt[0].content': missing or not a string",
    "prompts/undecodable_bytes.jsonl": "{path}:1: undecodable bytes (not UTF-8) at byte 30",
    "prompts/empty_file.jsonl": "{path}: file is empty (no records)",
    "prompts/no_format.jsonl": "{path}:1: record matches no known format (fields: question)",
    "prompts/wrong_kind.jsonl": "{path}:1: field 'prompt': format 'text' has no prompt",
    "prompts/missing.jsonl": "data file '{path}' does not exist",
}
# Files that load: rows are skipped and counted (chosen == rejected) or follow --overlong.
LOADS = ("pairs/chosen_equals_rejected.jsonl", "sft/overlong.jsonl", "pairs/overlong.jsonl", "prompts/overlong.jsonl")


def corpus_path(name: str) -> str:
    return os.path.join(CORPUS, name)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_file_raises_error_naming_file_line_field(name):
    path = corpus_path(name)
    logs = []
    with pytest.raises(UserError) as e:
        load_splits([path], None, 0.1, 0, NEED[name.split("/")[0]], log=logs.append)
    assert str(e.value).startswith(ERRORS[name].format(path=path)), str(e.value)
    # A missing file is not a data problem; everything else is a DataError with its parts set.
    assert isinstance(e.value, DataError) == (not name.endswith("missing.jsonl"))
    if name == "pairs/all_chosen_equal_rejected.jsonl":  # the skip is logged before the error
        assert logs == [f"{path}: skipped 2 of 2 rows where chosen == rejected (first: {path}:1)"]


def test_chosen_equals_rejected_is_a_counted_skip():
    path = corpus_path("pairs/chosen_equals_rejected.jsonl")
    logs = []
    samples = load_samples([path], "pairs", log=logs.append)
    assert logs == [f"{path}: skipped 2 of 3 rows where chosen == rejected (first: {path}:2)"]
    assert [s.where for s in samples] == [f"{path}:1"]


def _encode_fn(kind: str, encoder: Encoder):
    """The encoding each program applies: step 1 encode_sft; step 2 and DPO prompt + reply, twice."""
    if kind == "sft":
        return lambda s: (encoder.encode_sft(s),)
    return lambda s: (encoder.encode_reply(s.prompt, s.chosen), encoder.encode_reply(s.prompt, s.rejected))


# (kind, --overlong) -> (items kept, skip log or None, where the error points or None).
# sft/overlong.jsonl: line 2 has a long response, line 3 a long prompt (truncating it leaves no reply token,
# so it is skipped even under truncate). pairs/overlong.jsonl: line 2 has a long rejected reply.
OVERLONG = {
    ("sft", "skip"): (1, "train: skipped 2 of 3 samples longer than --max_seq_len 64 (--overlong skip; first: {path}:2)",
                      None),
    ("sft", "truncate"): (2, "train: skipped 1 of 3 samples longer than --max_seq_len 64 (--overlong truncate; "
                             "first: {path}:3)", None),
    ("sft", "error"): (0, None, "{path}:2: sample has "),
    ("pairs", "skip"): (2, "train: skipped 1 of 3 samples longer than --max_seq_len 64 (--overlong skip; "
                           "first: {path}:2)", None),
    ("pairs", "truncate"): (3, None, None),
    ("pairs", "error"): (0, None, "{path}:2: sample has "),
}


@pytest.mark.parametrize("kind,rule", sorted(OVERLONG))
def test_overlong_sample_follows_the_rule(tokenizer_of, kind, rule):
    path = corpus_path(f"{kind}/overlong.jsonl")
    kept, log_line, error = OVERLONG[(kind, rule)]
    encoder = Encoder(tokenizer_of("llama"), "auto", MAX_LEN, rule)
    samples = load_samples([path], NEED[kind])
    logs = []
    if error:
        with pytest.raises(UserError) as e:
            encode_all(samples, _encode_fn(kind, encoder), encoder, "train", log=logs.append)
        msg = str(e.value)
        assert msg.startswith(error.format(path=path)), msg
        assert msg.endswith(f"tokens, more than --max_seq_len {MAX_LEN} (--overlong error)"), msg
        return
    encoded = encode_all(samples, _encode_fn(kind, encoder), encoder, "train", log=logs.append)
    assert len(encoded.items) == kept
    assert logs == ([log_line.format(path=path)] if log_line else [])
    lengths = [len(ids) for item in encoded.items for ids, _ in item]
    assert max(lengths) == MAX_LEN if rule == "truncate" else max(lengths) < MAX_LEN
    # A truncated sample keeps reply tokens to train on.
    assert all(any(t != IGNORE for t in labels) for item in encoded.items for _, labels in item)


@pytest.mark.parametrize("rule", ["skip", "truncate", "error"])
def test_overlong_prompt_follows_the_rule(tokenizer_of, capsys, rule):
    """PPO prompts go through step 3's encode_prompts (truncation keeps the end, where the generation
    prompt is), not encode_all."""
    from step3_ppo.main import encode_prompts

    path = corpus_path("prompts/overlong.jsonl")
    encoder = Encoder(tokenizer_of("llama"), "auto", MAX_LEN, rule)
    samples = load_samples([path], "prompts")
    if rule == "error":
        with pytest.raises(UserError) as e:
            encode_prompts(samples, encoder, MAX_LEN, "prompts")
        assert re.fullmatch(re.escape(f"{path}:2: prompt has ") + r"\d+" + re.escape(
            f" tokens, more than --max_prompt_seq_len {MAX_LEN} (--overlong error)"), str(e.value)), str(e.value)
        return
    out = encode_prompts(samples, encoder, MAX_LEN, "prompts")
    printed = capsys.readouterr().out
    full = encoder.encode_prompt(samples[1].prompt)
    if rule == "skip":
        assert len(out) == 2
        assert (f"prompts: skipped 1 of 3 prompts longer than --max_prompt_seq_len {MAX_LEN} "
                f"(--overlong skip; first: {path}:2)") in printed
    else:
        assert len(out) == 3 and "skipped" not in printed
        assert len(out[1]) == MAX_LEN and out[1][0] == encoder.bos_id and out[1][1:] == full[-(MAX_LEN - 1):]


def test_corpus_and_readme_cover_each_other():
    """Every corpus file has a documented outcome here and in tests/bad_inputs/README.md, and back."""
    files = {os.path.relpath(p, CORPUS) for p in glob.glob(os.path.join(CORPUS, "*", "*"))}
    cases = set(ERRORS) | set(LOADS)
    missing_paths = {n for n in cases if n.endswith("missing.jsonl")}
    assert files == cases - missing_paths
    with open(os.path.join(CORPUS, "README.md")) as f:
        readme = f.read()
    assert not [n for n in cases if f"`{n}`" not in readme]


# ----------------------------------------------------------------------------- the programs


@pytest.fixture(scope="module")
def bare_models(tiny_dir, tmp_path_factory):
    """Tokenizer and config of the tiny llama without its weights, as a causal LM and as a reward model:
    a program that loads a model before checking the data fails with a different error."""
    src = tiny_dir("llama")
    out = {}
    for name, arch in (("lm", None), ("rm", "LlamaForSequenceClassification")):
        d = str(tmp_path_factory.mktemp(f"bare-{name}"))
        for f in os.listdir(src):
            if not f.endswith(".safetensors"):
                shutil.copy(os.path.join(src, f), d)
        if arch:
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            cfg["architectures"] = [arch]
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
        out[name] = d
    return out


# program -> (its model flags given the bare dirs, the corpus file it is given)
PROGRAMS = {
    "step1_sft": (lambda m: ["--model_name_or_path", m["lm"]], "sft/missing_field.jsonl"),
    "step2_reward": (lambda m: ["--model_name_or_path", m["lm"]], "pairs/empty_field.jsonl"),
    "dpo": (lambda m: ["--model_name_or_path", m["lm"]], "pairs/wrong_type.jsonl"),
    "step3_ppo": (lambda m: ["--actor_model_name_or_path", m["lm"], "--critic_model_name_or_path", m["rm"]],
                  "prompts/wrong_type.jsonl"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_exits_2_with_the_message_before_loading_models(bare_models, tmp_path, program):
    model_flags, name = PROGRAMS[program]
    rel = os.path.join("tests", "bad_inputs", name)  # as a user types it, relative to the working directory
    out = tmp_path / "out"
    p = run_python(f"{program}/main.py", [*model_flags(bare_models), "--data_path", rel, "--output_dir", out])
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"error: {ERRORS[name].format(path=rel)}" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- security

OUR_CODE = ("utils", "step1_sft", "step2_reward", "step3_ppo", "dpo", "bench", "data", "launch")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal"}
PICKLE_ERRORS = {"UnpicklingError"}  # importing the exception torch.load(weights_only=True) raises is fine


def _our_sources():
    for folder in OUR_CODE:
        yield from sorted(glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True))


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_unsafe_loading_or_saving_in_our_code():
    """torch.load only with weights_only=True; no pickle-family modules; no np.load(allow_pickle=True);
    trust_remote_code never hard-coded to True; no torch.save or safe_serialization=False (models are written
    by utils.model.save_hf as safetensors; resumable state goes through DeepSpeed's checkpoints, read back
    with weights_only=True by utils.checkpoint)."""
    problems = []
    for path in _our_sources():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        rel = os.path.relpath(path, REPO)
        for node in ast.walk(tree):
            errors_only = isinstance(node, ast.ImportFrom) and all(a.name in PICKLE_ERRORS for a in node.names)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not errors_only:
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{rel}:{node.lineno}: imports {m}" for m in mods if m.split(".")[0] in PICKLE_MODULES]
            if not isinstance(node, ast.Call):
                continue
            fn = ast.unparse(node.func)
            if fn.endswith("torch.load") and not _is_true(_kw(node, "weights_only")):
                problems.append(f"{rel}:{node.lineno}: {fn}(...) without weights_only=True")
            if fn.endswith("torch.save"):
                problems.append(f"{rel}:{node.lineno}: {fn}(...) writes a pickle")
            if fn.split(".")[-1] == "load" and _is_true(_kw(node, "allow_pickle")):
                problems.append(f"{rel}:{node.lineno}: {fn}(..., allow_pickle=True)")
            if _is_true(_kw(node, "trust_remote_code")):
                problems.append(f"{rel}:{node.lineno}: trust_remote_code=True hard-coded")
            ser = _kw(node, "safe_serialization")
            if isinstance(ser, ast.Constant) and ser.value is False:
                problems.append(f"{rel}:{node.lineno}: safe_serialization=False")
    assert not problems, "\n".join(problems)


class _Parsed(Exception):
    """Raised by the patched `parse` to stop main() right after parsing, carrying the namespace."""


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_trust_remote_code_is_off_by_default(monkeypatch, program):
    """Each main() parsed with only its required flags (the groups and required list it passes itself)."""
    import importlib

    from utils.args import parse

    module = importlib.import_module(f"{program}.main")

    def parse_required_only(groups, description, argv=None, required=("output_dir",), **kwargs):
        argv = [x for name in required for x in (f"--{name}", "x")]
        raise _Parsed(parse(groups, description, argv, required=required, **kwargs))

    monkeypatch.setattr(module, "parse", parse_required_only)
    with pytest.raises(_Parsed) as e:
        module.main([])
    ns = e.value.args[0]
    assert ns.trust_remote_code is False
