"""The bad-input corpus (tests/bad_inputs/, outcomes documented in its README.md) and the security rules.

Every corpus file gives its documented outcome: either a `UserError`/`DataError` whose message names the
file, the line (record) and the field, or it loads as documented (a counted skip or change whose log
line says how many and names the first file:line, a BOM, an UltraFeedback row, a dataset directory).
The in-process tests call the same functions the programs call, and each program's main() for the
mistakes it refuses before it starts a process group (flags, --config, --output_dir, models);
`python <step>/main.py` and a 2-rank `deepspeed` run (e2e) check the whole path: exit code 2, one
line on stderr, no traceback, nothing written.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil

import pytest

from conftest import DATA as DATA_DIR
from conftest import REPO, run_python
from utils.args import SHARED_GROUPS, parse
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
    "sft/no_format.jsonl": "{path}:1: record matches no known format (fields: query, reply)",
    "sft/wrong_kind.jsonl": "{path}:1: field 'prompt': record has no assistant reply to train on",
    "sft/not_a_list.json": "{path}: a .json file must hold a list of records (or use .jsonl)",
    "sft/missing.jsonl": "data file '{path}' does not exist",
    "sft/utf16.jsonl": "{path}:1: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8",
    "sft/hub_layout:test": "data path '{source}' has no split 'test' (splits: train); pick one as '{source}:SPLIT'",
    "sft/saved_dataset:test": "data path '{path}': '{source}' holds one saved dataset without splits; give it "
                              "without ':test'",
    "sft/split_fields_differ": "data path '{path}': 'data/train-00001-of-00002.jsonl' has fields (completion, prompt) "
                               "and 'data/train-00000-of-00002.jsonl' (prompt, response): the files of split 'train' are "
                               "read as one table",
    "sft/not_a_dataset": "data path '{path}' is a directory without dataset files: expected a datasets.save_to_disk "
                         "directory or a hub-style layout such as data/train-00000-of-00001.parquet",
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
    "pairs/wrong_kind.jsonl": "{path}:1: field 'chosen': format 'prompt_response' has no chosen/rejected pair",
    "pairs/missing.jsonl": "data file '{path}' does not exist",
    "pairs/prompt_mismatch.jsonl": "{path}:2: field 'prompt': differs from the turns before the last reply in "
                                   "'chosen' (a conversation in chosen/rejected must start with the prompt's turns)",
    "prompts/malformed_json.jsonl": "{path}:3: malformed JSON (",
    "prompts/missing_field.jsonl": "{path}:2: field 'prompt': missing field",
    "prompts/empty_field.jsonl": "{path}:2: field 'prompt': field is empty",
    "prompts/wrong_type.jsonl": "{path}:2: field 'prompt': expected a string, got dict",
    "prompts/wrong_type.json": "{path}:2: field 'prompt[0].content': missing or not a string",
    "prompts/undecodable_bytes.jsonl": "{path}:1: undecodable bytes (not UTF-8) at byte 30",
    "prompts/empty_file.jsonl": "{path}: file is empty (no records)",
    "prompts/no_format.jsonl": "{path}:1: record matches no known format (fields: query)",
    "prompts/wrong_kind.jsonl": "{path}:1: field 'prompt': format 'text' has no prompt",
    "prompts/missing.jsonl": "data file '{path}' does not exist",
}
# Errors about the path rather than a record (UserError, not DataError).
PATH_ERRORS = {"sft/missing.jsonl", "pairs/missing.jsonl", "prompts/missing.jsonl", "sft/hub_layout:test",
               "sft/saved_dataset:test", "sft/not_a_dataset", "sft/split_fields_differ"}
# Raised when a record is rendered: by a chat template that requires alternating user/assistant turns
# (Llama-2 style, STRICT_LLAMA_TEMPLATE below); the other templates accept the record.
RENDER_ERRORS = {
    "sft/role_order.jsonl": "{path}:2: the tokenizer's chat template refused this conversation: Conversation roles "
                            "must alternate user/assistant/user/assistant/... (--template chat; fix the record or "
                            "pick --template hh, alpaca or raw)",
    "pairs/role_order.jsonl": "{path}:1: the tokenizer's chat template refused this conversation: Conversation roles "
                              "must alternate user/assistant/user/assistant/... (--template chat; fix the record or "
                              "pick --template hh, alpaca or raw)",
}
# --config files: refused with one line naming the key, or (data_path_scalar) read as intended.
CONFIG_ERRORS = {
    "config/zero_stage_5.yaml": "--config file '{path}': key 'zero_stage': 5 is not one of 0, 1, 2, 3",
    "config/dtype_fp64.yaml": "--config file '{path}': key 'dtype': 'fp64' is not one of fp32, fp16, bf16",
    "config/negative_learning_rate.json": "--config file '{path}': key 'learning_rate': must be >= 0, got -1.0",
}
# Files that load: rows are skipped or changed and counted, or follow --overlong, or are read as documented.
LOADS = ("pairs/chosen_equals_rejected.jsonl", "sft/overlong.jsonl", "pairs/overlong.jsonl", "prompts/overlong.jsonl",
         "sft/bom.jsonl", "pairs/bom.json", "sft/ultrafeedback.jsonl", "pairs/ultrafeedback.jsonl",
         "sft/saved_dataset", "sft/hub_layout", "prompts/trailing_assistant_messages.jsonl",
         "prompts/trailing_assistant_prompt.jsonl", "config/data_path_scalar.yaml")
STRICT_LLAMA_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def corpus_path(name: str) -> str:
    return os.path.join(CORPUS, name)


def expected(table: dict, name: str) -> str:
    path = corpus_path(name)
    return table[name].format(path=path, source=path.split(":")[0])


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_file_raises_error_naming_file_line_field(name):
    path = corpus_path(name)
    logs = []
    with pytest.raises(UserError) as e:
        load_splits([path], None, 0.1, 0, NEED[name.split("/")[0]], log=logs.append)
    assert str(e.value).startswith(expected(ERRORS, name)), str(e.value)
    # A path that cannot be read is not a data problem; everything else is a DataError with its parts set.
    assert isinstance(e.value, DataError) == (name not in PATH_ERRORS)
    if name == "pairs/all_chosen_equal_rejected.jsonl":  # the skip is logged before the error
        assert logs == [f"{path}: skipped 2 of 2 rows where chosen == rejected (first: {path}:1)"]


@pytest.mark.parametrize("name", sorted(RENDER_ERRORS))
def test_template_that_refuses_a_record_names_it(tokenizer_of, name):
    import copy

    from utils.pairs import encode_pairs

    tok = copy.deepcopy(tokenizer_of("llama"))
    tok.chat_template = STRICT_LLAMA_TEMPLATE
    encoder = Encoder(tok, "auto", 256)
    samples = load_samples([corpus_path(name)], NEED[name.split("/")[0]])
    with pytest.raises(UserError) as e:
        if name.startswith("pairs/"):
            encode_pairs(samples, encoder, "train")
        else:
            encode_all(samples, lambda s: (encoder.encode_sft(s),), encoder, "train")
    assert str(e.value) == expected(RENDER_ERRORS, name)
    # Without the strict template the same records encode (hh renders any role order).
    hh = Encoder(tok, "hh", 256)
    assert encode_all(samples, lambda s: (hh.encode_reply(s.prompt, s.chosen),), hh, "train").items


@pytest.mark.parametrize("name", sorted(CONFIG_ERRORS))
def test_bad_config_file_is_one_line_naming_the_key(name):
    with pytest.raises(UserError) as e:
        parse(SHARED_GROUPS, "t", ["--config", corpus_path(name), "--model_name_or_path", "m", "--data_path", "d",
                                   "--output_dir", "o"])
    assert str(e.value) == expected(CONFIG_ERRORS, name)


def test_config_scalar_data_path_is_one_path():
    ns = parse(SHARED_GROUPS, "t", ["--config", corpus_path("config/data_path_scalar.yaml"),
                                    "--model_name_or_path", "m", "--output_dir", "o"])
    assert ns.data_path == ["tests/bad_inputs/sft/missing_field.jsonl"] and ns.learning_rate == 1e-3


def test_bom_files_load_like_plain_ones(tmp_path):
    import codecs

    for name in ("sft/bom.jsonl", "pairs/bom.json"):
        with open(corpus_path(name), "rb") as f:
            raw = f.read()
        assert raw.startswith(codecs.BOM_UTF8)
        plain = tmp_path / os.path.basename(name)
        plain.write_bytes(raw[len(codecs.BOM_UTF8):])
        need = NEED[name.split("/")[0]]
        assert load_samples([corpus_path(name)], need) == load_samples([str(plain)], need)


@pytest.mark.parametrize("name", ["sft/ultrafeedback.jsonl", "pairs/ultrafeedback.jsonl"])
def test_ultrafeedback_rows_load_with_the_prompt_once(name):
    with open(corpus_path(name)) as f:
        rows = [json.loads(line) for line in f]
    for need in ("sft", "pairs", "prompts"):
        samples = load_samples([corpus_path(name)], need)
        for row, s in zip(rows, samples):
            assert s.prompt == ({"role": "user", "content": row["prompt"]},), (need, s)
            if need != "prompts":
                assert s.chosen == tuple(row["chosen"][1:])
            if need == "pairs":
                assert s.rejected == tuple(row["rejected"][1:])


def test_dataset_directories_load():
    samples = load_samples([corpus_path("sft/saved_dataset"), corpus_path("sft/hub_layout:train")], "sft")
    assert [s.chosen[0]["content"] for s in samples] == ["The apple is great.", "The river is great.",
                                                          "The owl is great."] * 2
    assert samples[2].where == f"{corpus_path('sft/saved_dataset')} row 2"
    assert samples[3].where == f"{corpus_path('sft/hub_layout')}:train row 0"


@pytest.mark.parametrize("name,field,dropped", [("prompts/trailing_assistant_messages.jsonl", "messages", (2, 1)),
                                                ("prompts/trailing_assistant_prompt.jsonl", "prompt", (1, 2))])
def test_trailing_assistant_turn_of_a_prompt_is_dropped_and_counted(name, field, dropped):
    path = corpus_path(name)
    logs = []
    samples = load_samples([path], "prompts", log=logs.append)
    assert all(s.prompt[-1]["role"] == "user" and len(s.prompt) == 1 for s in samples)
    count, first = dropped
    assert logs == [f"{path}: dropped the trailing assistant turn of the '{field}' conversation in {count} of "
                    f"{len(samples)} rows (first: {path}:{first})"]


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


# (kind, --overlong) -> (items kept, the log line(s) or None, where the error points or None).
# sft/overlong.jsonl: line 2 has a long response, line 3 a long prompt (truncating it leaves no reply token,
# so it is skipped even under truncate). pairs/overlong.jsonl: line 2 has a long rejected reply.
OVERLONG = {
    ("sft", "skip"): (1, "train: skipped 2 of 3 samples longer than --max_seq_len 64 (--overlong skip; first: {path}:2)",
                      None),
    ("sft", "truncate"): (2, ["train: cut 1 of 3 samples to --max_seq_len 64 (--overlong truncate: the tokens after "
                              "it are not trained, a reply cut there has no EOS; first: {path}:2)",
                              "train: skipped 1 of 3 samples with no reply token left when cut to --max_seq_len 64 "
                              "(--overlong truncate; first: {path}:3)"], None),
    ("sft", "error"): (0, None, "{path}:2: sample has "),
    ("pairs", "skip"): (2, "train: skipped 1 of 3 samples longer than --max_seq_len 64 (--overlong skip; "
                           "first: {path}:2)", None),
    ("pairs", "truncate"): (3, "train: cut 1 of 3 samples to --max_seq_len 64 (--overlong truncate: the tokens after "
                               "it are not trained, a reply cut there has no EOS; first: {path}:2)", None),
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
    lines = [log_line] if isinstance(log_line, str) else log_line or []
    assert logs == [line.format(path=path) for line in lines]  # every cut or skipped sample is counted
    lengths = [len(ids) for item in encoded.items for ids, _ in item]
    assert max(lengths) == MAX_LEN if rule == "truncate" else max(lengths) < MAX_LEN
    # A truncated sample keeps reply tokens to train on.
    assert all(any(t != IGNORE for t in labels) for item in encoded.items for _, labels in item)


def test_a_pair_that_truncation_makes_identical_is_skipped_and_counted(tokenizer_of, tmp_path):
    """--overlong truncate cuts both sides of a pair at --max_seq_len; where the replies differ only after
    it, chosen and rejected become the same sequence, a pair with nothing to learn: skipped, counted."""
    shared = " ".join(["The cat is great and the dog is wonderful."] * 8)
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Tell me about the cat.", "chosen": "The cat is great.", "rejected": "The cat is dull."},
            {"prompt": "Tell me about the dog.", "chosen": shared + " Yes.", "rejected": shared + " No."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = Encoder(tokenizer_of("llama"), "auto", MAX_LEN, "truncate")
    logs = []
    encoded = encode_all(load_samples([str(path)], "pairs"), _encode_fn("pairs", encoder), encoder, "train",
                         log=logs.append)
    assert len(encoded.items) == 1 and encoded.kept == [0]
    assert logs == [f"train: skipped 1 of 2 pairs whose chosen and rejected replies are the same once truncated "
                    f"to --max_seq_len {MAX_LEN} (they differ after it; first: {path}:2)"]


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
        assert (f"prompts: cut 1 of 3 prompts to their last {MAX_LEN} tokens (--max_prompt_seq_len; --overlong "
                f"truncate: the start of the conversation, a system turn included, is lost; first: {path}:2)") in printed
        assert len(out[1]) == MAX_LEN and out[1][0] == encoder.bos_id and out[1][1:] == full[-(MAX_LEN - 1):]


def test_corpus_and_readme_cover_each_other():
    """Every corpus file (or directory) has a documented outcome here and in tests/bad_inputs/README.md,
    and back."""
    files = {os.path.relpath(p, CORPUS) for p in glob.glob(os.path.join(CORPUS, "*", "*"))}
    cases = set(ERRORS) | set(RENDER_ERRORS) | set(CONFIG_ERRORS) | set(LOADS)
    missing_paths = {n for n in cases if n.endswith("missing.jsonl")}
    assert files == {n.split(":")[0] for n in cases - missing_paths}
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
    for name, arch in (("lm", None), ("rm", "LlamaForSequenceClassification"), ("strict", None)):
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
        if name == "strict":  # a Llama-2-style chat template that refuses non-alternating roles
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(d)
            tok.chat_template = STRICT_LLAMA_TEMPLATE
            tok.save_pretrained(d)
        out[name] = d
    return out


# program -> (its model flags given the bare dirs, the flags naming its bad input, the error it gives)
PROGRAMS = {
    # A YAML scalar `data_path:` is one path (it used to be read one character at a time).
    "step1_sft": (lambda m: ["--model_name_or_path", m["lm"]],
                  ["--config", "tests/bad_inputs/config/data_path_scalar.yaml"],
                  "tests/bad_inputs/sft/missing_field.jsonl:2: field 'response': missing field"),
    "step2_reward": (lambda m: ["--model_name_or_path", m["lm"]],
                     ["--data_path", "tests/bad_inputs/pairs/empty_field.jsonl"],
                     "tests/bad_inputs/pairs/empty_field.jsonl:2: field 'chosen': field is empty"),
    "dpo": (lambda m: ["--model_name_or_path", m["strict"]],
            ["--data_path", "tests/bad_inputs/pairs/role_order.jsonl", "--eval_data_path", "data/preference.jsonl"],
            "tests/bad_inputs/pairs/role_order.jsonl:1: the tokenizer's chat template refused this conversation: "
            "Conversation roles must alternate"),
    "step3_ppo": (lambda m: ["--actor_model_name_or_path", m["lm"], "--critic_model_name_or_path", m["rm"]],
                  ["--data_path", "tests/bad_inputs/prompts/wrong_type.jsonl"],
                  "tests/bad_inputs/prompts/wrong_type.jsonl:2: field 'prompt': expected a string, got dict"),
}


def snapshot(*roots) -> dict:
    """(size, mtime) of every file under `roots`: compared before and after a refused run."""
    out = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                st = os.stat(os.path.join(dirpath, n))
                out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_exits_2_with_the_message_before_loading_models(bare_models, tmp_path, program):
    model_flags, data_flags, message = PROGRAMS[program]
    out = tmp_path / "out"
    before = snapshot(CORPUS, *bare_models.values())
    # Paths as a user types them, relative to the working directory.
    p = run_python(f"{program}/main.py", [*model_flags(bare_models), *data_flags, "--output_dir", out])
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"error: {message}" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert not out.exists() and snapshot(CORPUS, *bare_models.values()) == before


# ----------------------------------------------------------------------------- the programs, in process
# Mistakes each program refuses before it starts a process group: its main() is called here directly.

def refused(module: str, argv: list, capsys) -> str:
    """Run `module.main(argv)`; it must exit 2 with exactly one line `error: ...` on stderr and no
    traceback. Returns the message."""
    import importlib

    import torch.distributed as dist

    env = dict(os.environ)
    try:
        with pytest.raises(SystemExit) as e:
            importlib.import_module(module).main([str(a) for a in argv])
    finally:  # a program refused after it joined its (one-rank) process group leaves nothing for later tests
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (e.value.code, captured.err)
    assert "Traceback" not in captured.out + captured.err
    return lines[0][len("error: "):]


@pytest.fixture(scope="module")
def damaged_models(tiny_dir, tmp_path_factory):
    """A causal LM and a reward model whose model.safetensors is cut in half."""
    from utils.reward import load_reward_model

    out = {}
    for name in ("lm", "rm"):
        d = tmp_path_factory.mktemp(f"truncated-{name}")
        if name == "lm":
            shutil.copytree(tiny_dir("llama"), d, dirs_exist_ok=True)
        else:
            from transformers import AutoTokenizer

            load_reward_model(tiny_dir("llama"), pad_id=0).save_pretrained(d)
            AutoTokenizer.from_pretrained(tiny_dir("llama")).save_pretrained(d)
        weights = d / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        out[name] = str(d)
    d = tmp_path_factory.mktemp("reward-model")  # a whole reward model, where a causal LM is expected
    from transformers import AutoTokenizer

    load_reward_model(tiny_dir("llama"), pad_id=0).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_dir("llama")).save_pretrained(d)
    out["good_rm"] = str(d)
    # A model copied without its tokenizer, and one whose tokenizer config names no vocabulary: transformers
    # 5 makes an empty tokenizer of the model's type for both, which encodes every text to nothing.
    for name, family, files in (("no_tok", "llama", {}), ("empty_tok", "gpt_neox", {"tokenizer_config.json": "{}"})):
        d = tmp_path_factory.mktemp(name)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tiny_dir(family), f), d / f)
        for f, text in files.items():
            (d / f).write_text(text)
        out[name] = str(d)
    d = tmp_path_factory.mktemp("ppo-out")  # step 3's output: the models are one level down
    for sub in ("actor", "critic"):
        shutil.copytree(tiny_dir("llama"), d / sub)
    out["ppo_out"] = str(d)
    d = tmp_path_factory.mktemp("adapter")  # what peft's save_pretrained writes: no config.json, no base weights
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "base"}')
    (d / "adapter_model.safetensors").write_bytes(b"")
    out["adapter"] = str(d)
    d = tmp_path_factory.mktemp("small-vocab")  # tokens added to the tokenizer, embeddings not resized
    shutil.copytree(tiny_dir("llama"), d, dirs_exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    rows = json.loads((d / "config.json").read_text())["vocab_size"]
    extra = [f"<extra_{i}>" for i in range(rows - len(tok) + 2)]
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.save_pretrained(d)
    out["small_vocab"], out["small_vocab_rows"], out["small_vocab_len"] = str(d), rows, len(tok)
    out["small_vocab_beyond"] = extra[-2:]  # the two ids without an embedding row
    d = tmp_path_factory.mktemp("unfinished")
    (d / "sft.partial").mkdir()  # a run stopped before it finished
    out["unfinished"] = str(d / "sft")
    return out


def program_cases(models: dict, tmp: str) -> dict:
    """case -> (module, argv, the message). `models`: a working tiny causal LM ("lm"), the truncated
    ones ("bad_lm", "bad_rm") and a file that is not a directory ("file")."""
    sft, pairs, prompts = (os.path.join(DATA_DIR, n) for n in ("sft.jsonl", "preference.jsonl", "prompts.jsonl"))
    one = ["--model_name_or_path", models["lm"], "--output_dir", f"{tmp}/out"]
    ppo = ["--actor_model_name_or_path", models["lm"], "--critic_model_name_or_path", models["lm"],
           "--data_path", prompts, "--output_dir", f"{tmp}/out"]
    cfg = os.path.join(CORPUS, "config")
    return {
        "sft --learning_rate -1": ("step1_sft.main", one + ["--data_path", sft, "--learning_rate", "-1"],
                                   "--learning_rate must be >= 0, got -1.0"),
        "reward --learning_rate -1": ("step2_reward.main", one + ["--data_path", pairs, "--learning_rate", "-1"],
                                      "--learning_rate must be >= 0, got -1.0"),
        "dpo --learning_rate -1": ("dpo.main", one + ["--data_path", pairs, "--learning_rate", "-1"],
                                   "--learning_rate must be >= 0, got -1.0"),
        "ppo --actor_learning_rate -1": ("step3_ppo.main", ppo + ["--actor_learning_rate", "-1"],
                                         "--actor_learning_rate must be >= 0, got -1.0"),
        "ppo --critic_learning_rate -1": ("step3_ppo.main", ppo + ["--critic_learning_rate", "-1"],
                                          "--critic_learning_rate must be >= 0, got -1.0"),
        "rw_eval --batch_size 0": ("step2_reward.rw_eval", ["--model", models["lm"], "--pairs", pairs,
                                                            "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        "sft config zero_stage 5": ("step1_sft.main",
                                    one + ["--data_path", sft, "--config", f"{cfg}/zero_stage_5.yaml"],
                                    f"--config file '{cfg}/zero_stage_5.yaml': key 'zero_stage': 5 is not one of "
                                    "0, 1, 2, 3"),
        "dpo config dtype fp64": ("dpo.main", one + ["--data_path", pairs, "--config", f"{cfg}/dtype_fp64.yaml"],
                                  f"--config file '{cfg}/dtype_fp64.yaml': key 'dtype': 'fp64' is not one of fp32, "
                                  "fp16, bf16"),
        "sft --zero_stage 5": ("step1_sft.main", one + ["--data_path", sft, "--zero_stage", "5"],
                               "argument --zero_stage: invalid choice: 5 (choose from 0, 1, 2, 3) (see --help)"),
        "sft --output_dir file": ("step1_sft.main", ["--model_name_or_path", models["lm"], "--data_path", sft,
                                                     "--output_dir", models["file"]],
                                  f"--output_dir '{models['file']}' is a file, not a directory"),
        "ppo --output_dir file": ("step3_ppo.main", ppo + ["--output_dir", models["file"]],
                                  f"--output_dir '{models['file']}' is a file, not a directory"),
        "rw_eval causal LM": ("step2_reward.rw_eval",
                              ["--model", models["lm"], "--prompt", "Hi.", "--responses", "Yo."],
                              f"--model '{models['lm']}' is not a reward model (LlamaForCausalLM, not a "
                              "*ForSequenceClassification with a trained score head): its scores would come from a "
                              "random head; give a step-2 output"),
        "rw_eval truncated weights": ("step2_reward.rw_eval", ["--model", models["bad_rm"], "--prompt", "Hi.",
                                                               "--responses", "Yo."],
                                      f"--model '{models['bad_rm']}': weights file "
                                      f"'{models['bad_rm']}/model.safetensors' "
                                      "is damaged or truncated (Error while deserializing header: incomplete metadata, "
                                      "file not fully covered)"),
        "chat truncated weights": ("launch.chat", ["--model", models["bad_lm"]],
                                   f"--model '{models['bad_lm']}': weights file '{models['bad_lm']}/model.safetensors' "
                                   "is damaged or truncated (Error while deserializing header: incomplete metadata, "
                                   "file not fully covered)"),
        "report missing run": ("launch.report", ["--runs", f"sft={tmp}/no-run", "--out", f"{tmp}/r.png"],
                               f"--runs: run directory '{tmp}/no-run' does not exist"),
        "sft, a model without tokenizer files": (
            "step1_sft.main", ["--model_name_or_path", models["no_tok"], "--output_dir", f"{tmp}/out", "--data_path", sft],
            f"--model_name_or_path '{models['no_tok']}' has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "tokenizer.model, ...): save the tokenizer next to the weights (tokenizer.save_pretrained(dir))"),
        "dpo, an empty tokenizer": (
            "dpo.main", ["--model_name_or_path", models["empty_tok"], "--output_dir", f"{tmp}/out", "--data_path", pairs],
            f"the tokenizer of --model_name_or_path '{models['empty_tok']}' encodes text to no tokens (vocabulary of 2): "
            "its vocabulary files are missing or empty"),
        "sft --max_seq_len beyond the model's positions": (
            "step1_sft.main", one + ["--data_path", sft, "--max_seq_len", "4096"],
            f"--max_seq_len is 4096 tokens, more than the 512 positions of --model_name_or_path '{models['lm']}' "
            "(config.json max_position_embeddings)"),
        "ppo prompt + answer beyond the model's positions": (
            "step3_ppo.main", ["--actor_model_name_or_path", models["lm"], "--data_path", prompts, "--output_dir",
                               f"{tmp}/out", "--advantage_estimator", "grpo", "--reward_funcs",
                               "utils.reward_funcs:answer_format", "--n_samples_per_prompt", "4", "--max_answer_seq_len", "300",
                               "--max_prompt_seq_len", "256"],  # given both: checked, not shrunk
            f"--max_prompt_seq_len + --max_answer_seq_len is 556 tokens, more than the 512 positions of "
            f"--actor_model_name_or_path '{models['lm']}' (config.json max_position_embeddings)"),
        "sft from a LoRA adapter directory": (
            "step1_sft.main", ["--model_name_or_path", models["adapter"], "--output_dir", f"{tmp}/out", "--data_path", sft],
            f"--model_name_or_path '{models['adapter']}' is a LoRA/PEFT adapter (adapter_config.json), not a whole "
            "model: merge it into its base model first (PeftModel.from_pretrained(base, dir).merge_and_unload()"
            ".save_pretrained(out), with the tokenizer) and pass that directory"),
        "dpo, a tokenizer larger than the embedding": (
            "dpo.main", ["--model_name_or_path", models["small_vocab"], "--output_dir", f"{tmp}/out", "--data_path", pairs],
            f"the tokenizer of --model_name_or_path '{models['small_vocab']}' has {models['small_vocab_len']} tokens but "
            f"the model's config.json vocab_size is {models['small_vocab_rows']} (ids from {models['small_vocab_rows']} "
            f"up, e.g. {models['small_vocab_beyond']}, have no embedding): call "
            "model.resize_token_embeddings(len(tokenizer)) and save the model again"),
        "dpo from step 3's output directory": (
            "dpo.main", ["--model_name_or_path", models["ppo_out"], "--output_dir", f"{tmp}/out", "--data_path", pairs],
            f"--model_name_or_path '{models['ppo_out']}' is not a Hugging Face model directory (no config.json); it "
            f"holds actor/, critic/: pass one of them (step 3 saves actor/ and critic/), e.g. {models['ppo_out']}/actor"),
        "reward from an unfinished SFT run": (
            "step2_reward.main", ["--model_name_or_path", models["unfinished"], "--output_dir", f"{tmp}/out",
                                  "--data_path", pairs],
            f"--model_name_or_path '{models['unfinished']}' does not exist ('{models['unfinished']}.partial' holds an "
            "unfinished run: finish it with --resume first)"),
        "dpo, a reward model as the policy": (
            "dpo.main", ["--model_name_or_path", models["good_rm"], "--output_dir", f"{tmp}/out", "--data_path", pairs],
            f"--model_name_or_path (the reference) '{models['good_rm']}' is a reward model "
            "(LlamaForSequenceClassification), not a causal LM: give a step-1 (SFT) output or another causal LM"),
        "report NAME=DIR": ("launch.report", ["--runs", "sft", "--out", f"{tmp}/r.png"],
                            "--runs: expected NAME=DIR, got 'sft'"),
        "sft from a model directory that does not exist": (
            "step1_sft.main", ["--model_name_or_path", f"{tmp}/no-model", "--output_dir", f"{tmp}/out", "--data_path",
                               sft],
            f"--model_name_or_path '{tmp}/no-model' does not exist"),
        "rw_eval, a pairs file with a missing field": (
            "step2_reward.rw_eval", ["--model", models["good_rm"], "--pairs",
                                     os.path.join(CORPUS, "pairs", "missing_field.jsonl")],
            f"{os.path.join(CORPUS, 'pairs', 'missing_field.jsonl')}:2: field 'rejected': missing field (preference "
            "training needs chosen and rejected)"),
    }


CASES = sorted(program_cases({"lm": "", "bad_lm": "", "bad_rm": "", "file": "", "no_tok": "", "empty_tok": "",
                              "good_rm": "", "ppo_out": "", "unfinished": "", "adapter": "", "small_vocab": "",
                              "small_vocab_rows": 0, "small_vocab_len": 0, "small_vocab_beyond": []}, ""))


@pytest.mark.parametrize("case", CASES)
def test_program_refuses_a_mistake_in_one_line(tiny_dir, damaged_models, tmp_path, capsys, case):
    (tmp_path / "a-file").write_text("keep me")
    models = {"lm": tiny_dir("llama"), "bad_lm": damaged_models["lm"], "bad_rm": damaged_models["rm"],
              "file": str(tmp_path / "a-file"), "no_tok": damaged_models["no_tok"],
              "empty_tok": damaged_models["empty_tok"], "good_rm": damaged_models["good_rm"],
              **{k: damaged_models[k] for k in ("ppo_out", "unfinished", "adapter", "small_vocab", "small_vocab_rows",
                                                "small_vocab_len", "small_vocab_beyond")}}
    module, argv, message = program_cases(models, str(tmp_path))[case]
    paths = [v for v in (*models.values(), *damaged_models.values()) if isinstance(v, str)]
    before = snapshot(tmp_path, CORPUS, *paths)
    assert refused(module, argv, capsys) == message
    assert snapshot(tmp_path, CORPUS, *paths) == before
    assert not (tmp_path / "out").exists()


def test_truncated_weights_name_the_file_in_every_loader(damaged_models):
    """Every program loads models through utils.model.load_model (reward models too)."""
    from transformers import AutoModelForCausalLM

    from utils.model import load_model
    from utils.reward import load_reward_model

    for name, load in (("lm", lambda d: load_model(AutoModelForCausalLM, d)),
                       ("rm", lambda d: load_reward_model(d, pad_id=0))):
        with pytest.raises(UserError, match=re.escape(f"weights file '{damaged_models[name]}/model.safetensors' "
                                                      "is damaged or truncated")):
            load(damaged_models[name])


@pytest.mark.e2e
def test_output_dir_that_is_a_file_is_refused_on_every_rank(tiny_dir, tmp_path):
    """2 ranks: both refuse it at start-up (before the model loads), so no rank is left waiting in a
    collective for one that died (which used to end in a gloo error on rank 1); the machine's local rank 0
    alone prints it (every rank printed the same line)."""
    from conftest import run_deepspeed

    target = tmp_path / "model-out"
    target.write_text("keep me")
    p = run_deepspeed("step1_sft/main.py", ["--model_name_or_path", tiny_dir("llama"), "--data_path",
                                            os.path.join(DATA_DIR, "sft.jsonl"), "--output_dir", target], check=False)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert lines == [f"error: --output_dir '{target}' is a file, not a directory"], p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr and "gloo" not in (p.stdout + p.stderr).lower()
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["model-out"]


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
