"""Format detection, validation errors (file, line, field) and seeded splits."""
from __future__ import annotations

import json

import pytest

from utils.data import detect_format, load_file, load_samples, load_splits, train_eval_split
from utils.errors import DataError, UserError


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.mark.parametrize("row,fmt", [
    ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
    ({"prompt": "a", "response": "b"}, "prompt_response"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
    ({"prompt": "a", "chosen": "b"}, "preference"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "hh"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"text": "a"}, "text"),
    ({"prompt": "a"}, "prompt"),
    ({"question": "a"}, None),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_each_format_normalises(tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"}]
    s = load_file(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), "sft")[0]
    assert [m["content"] for m in s.prompt] == ["S", "U1", "A1", "U2"] and s.chosen[0]["content"] == "A2"

    s = load_file(write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "P", "response": "R"}]), "sft")[0]
    assert s.prompt == ({"role": "user", "content": "P"},) and s.chosen == ({"role": "assistant", "content": "R"},)

    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Later",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: No"}
    s = load_file(write_jsonl(tmp_path / "hh.jsonl", [hh]), "pairs")[0]
    assert [m["role"] for m in s.prompt] == ["user", "assistant", "user"]
    assert s.chosen[0]["content"] == "Later" and s.rejected[0]["content"] == "No"

    s = load_file(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "I", "input": "X", "output": "O"}]), "sft")[0]
    assert s.prompt[0]["instruction"] == "I" and s.prompt[0]["input"] == "X" and s.chosen[0]["content"] == "O"

    s = load_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]), "sft")[0]
    assert s.text == "hello"

    s = load_file(write_jsonl(tmp_path / "pm.jsonl", [{"prompt": "P", "chosen": "C", "rejected": "R",
                                                       "margin": 2}]), "pairs")[0]
    assert s.margin == 2.0 and s.rejected[0]["content"] == "R"


def test_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "P1", "response": "R1"}, {"prompt": "P2", "response": "R2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = load_file(str(tmp_path / "d.json"), "sft")
    b = load_file(str(tmp_path / "d.parquet"), "sft")
    assert [s.chosen for s in a] == [s.chosen for s in b]
    assert len(load_samples([str(tmp_path / "d.json"), str(tmp_path / "d.parquet")], "sft")) == 4


@pytest.mark.parametrize("content,line,field,problem", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], 2, None, "malformed JSON"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], 2, "response", "missing field"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "  "}'], 2, "response", "empty"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": 3, "response": "b"}'], 2, "prompt", "expected a string"),
    (['{"question": "a"}'], 1, None, "matches no known format"),
    (['[1, 2]'], 1, None, "expected a JSON object"),
    (['{"messages": [{"role": "bot", "content": "x"}]}'], 1, "messages[0].role", "expected one of"),
])
def test_bad_rows_name_file_line_field(tmp_path, content, line, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as e:
        load_file(path, "sft")
    assert e.value.line == line and e.value.field == field and problem in str(e.value)
    assert str(e.value).startswith(f"{path}:{line}")


def test_undecodable_empty_and_missing(tmp_path):
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2: undecodable bytes"):
        load_file(str(p), "sft")
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(DataError, match="file is empty"):
        load_file(str(e), "sft")
    with pytest.raises(UserError, match="does not exist"):
        load_file(str(tmp_path / "nope.jsonl"), "sft")


def test_need_checks_and_chosen_equals_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "C"}])
    with pytest.raises(DataError, match="field 'rejected': missing"):
        load_file(path, "pairs")
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "P", "chosen": "C", "rejected": "C"},
                                              {"prompt": "P", "chosen": "C", "rejected": "D"}])
    logs = []
    out = load_samples([path], "pairs", log=logs.append)
    assert len(out) == 1 and "skipped 1 of 2" in logs[0] and "q.jsonl:1" in logs[0]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="no prompt"):
        load_file(path, "prompts")


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    tr1, ev1 = train_eval_split(items, 0.1, seed=7)
    tr2, ev2 = train_eval_split(items, 0.1, seed=7)
    tr3, ev3 = train_eval_split(items, 0.1, seed=8)
    assert (tr1, ev1) == (tr2, ev2) and ev1 != ev3
    assert len(ev1) == 10 and not set(tr1) & set(ev1) and sorted(tr1 + ev1) == items


def test_load_splits_with_eval_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"P{i}", "response": "R"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "E", "response": "R"}])
    tr, ev = load_splits([a], [b], 0.5, 0, "sft")
    assert len(tr) == 5 and len(ev) == 1


def test_step_stream_same_global_batch_for_any_world_size(monkeypatch):
    """1 rank x 8 and 2 ranks x 4 see the same global batches; each epoch is a new permutation that
    covers every item; every rank runs the same number of micro-batches."""
    from utils import ds
    from utils.stream import StepStream

    items = list(range(21))

    def stream(world, rank, bs, ga=1):
        monkeypatch.setattr(ds, "world_size", lambda: world)
        monkeypatch.setattr(ds, "rank", lambda: rank)
        return StepStream(items, bs, ga, list, seed=3)

    one = stream(1, 0, 8)
    r0, r1 = stream(2, 0, 4), stream(2, 1, 4)
    for _ in range(7):  # crosses two epoch boundaries (3 global batches per epoch)
        a = one.next_step()[0]
        b = r0.next_step()[0] + r1.next_step()[0]
        assert a == b
    fresh = stream(1, 0, 8)
    e0 = [x for _ in range(3) for x in fresh.next_step()[0]]
    assert set(e0) == set(items) and len(e0) == 24  # 3 wrapped-around fillers
    s = stream(1, 0, 8)
    first = [s.next_step()[0] for _ in range(3)]
    second = [s.next_step()[0] for _ in range(3)]
    assert first != second and s.epoch == 2


# ----------------------------------------------------------------------------- the fields a step needs

U = {"role": "user", "content": "Tell me about the cat."}
A_GOOD = {"role": "assistant", "content": "The cat is great."}
A_BAD = {"role": "assistant", "content": "The cat is dull."}
UF = {"prompt": U["content"], "chosen": [U, A_GOOD], "rejected": [U, A_BAD], "messages": [U, A_GOOD],
      "score_chosen": 8.0, "score_rejected": 2.0, "prompt_id": "abc"}


@pytest.mark.parametrize("row,need,fmt", [
    (UF, "pairs", "preference"),
    (UF, "sft", "messages"),
    (UF, "prompts", "prompt"),
    ({k: v for k, v in UF.items() if k != "messages"}, "sft", "preference"),
    ({"chosen": [U, A_GOOD], "rejected": [U, A_BAD], "messages": [U, A_GOOD]}, "pairs", "hh"),
    ({"messages": [U, A_GOOD], "prompt": "x"}, "prompts", "prompt"),
    ({"messages": [U, A_GOOD]}, "prompts", "messages"),
    ({"prompt": "a", "response": "b"}, "pairs", "prompt_response"),
])
def test_detect_format_by_what_the_step_needs(row, need, fmt):
    assert detect_format(row, need) == fmt


@pytest.mark.parametrize("messages", [True, False])
def test_ultrafeedback_rows_have_the_prompt_once(tmp_path, messages):
    """prompt string + chosen/rejected as whole conversations (pitfall 22): the user turn is the prompt,
    only the final assistant turn is the reply, in every step, with or without a `messages` column."""
    row = dict(UF) if messages else {k: v for k, v in UF.items() if k != "messages"}
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    pairs = load_file(path, "pairs")[0]
    assert pairs.prompt == (U,) and pairs.chosen == (A_GOOD,) and pairs.rejected == (A_BAD,)
    sft = load_file(path, "sft")[0]
    assert sft.prompt == (U,) and sft.chosen == (A_GOOD,)
    assert load_file(path, "prompts")[0].prompt == (U,)
    # TRL's conversational preference format (prompt list, assistant-only replies) reads the same.
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]}])
    assert load_file(trl, "pairs")[0] == pairs
    assert load_file(trl, "sft")[0].prompt == sft.prompt and load_file(trl, "sft")[0].chosen == sft.chosen


def test_multi_turn_conversations_split_at_the_last_reply(tmp_path):
    sys_turn = {"role": "system", "content": "Be kind."}
    before = [sys_turn, U, {"role": "assistant", "content": "Which cat?"}, {"role": "user", "content": "Yours."}]
    path = write_jsonl(tmp_path / "mt.jsonl", [{"prompt": before, "chosen": before + [A_GOOD],
                                                "rejected": before + [A_BAD]},
                                               {"chosen": before + [A_GOOD], "rejected": before + [A_BAD]}])
    for s in load_file(path, "pairs"):
        assert s.prompt == tuple(before) and s.chosen == (A_GOOD,) and s.rejected == (A_BAD,)


@pytest.mark.parametrize("row,field,problem", [
    ({"prompt": "Tell me about the dog.", "chosen": [U, A_GOOD], "rejected": [U, A_BAD]}, "prompt",
     "differs from the turns before the last reply in 'chosen'"),
    ({"prompt": U["content"], "chosen": "The cat is great.", "rejected": [{"role": "user", "content": "Hm?"}, A_BAD]},
     "prompt", "differs from the turns before the last reply in 'rejected'"),
    ({"chosen": [U, A_GOOD], "rejected": [{"role": "user", "content": "Other."}, A_BAD]}, "rejected",
     "chosen and rejected conversations differ before the last reply"),
    ({"prompt": U["content"], "chosen": [U, A_GOOD, U], "rejected": [U, A_BAD]}, "chosen",
     "conversation does not end with an assistant reply"),
    ({"chosen": [A_GOOD], "rejected": [A_BAD]}, "chosen", "conversation has no user turn before the assistant reply"),
])
def test_pair_conversations_that_do_not_fit_name_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [UF, row])
    with pytest.raises(DataError) as e:
        load_file(path, "pairs")
    assert str(e.value).startswith(f"{path}:2: field '{field}': {problem}"), str(e.value)


def test_ppo_prompts_drop_a_trailing_assistant_turn_in_both_layouts(tmp_path):
    """One rule for a prompt conversation that ends with an assistant turn, whether it is a `prompt` list
    or `messages`: the turn is dropped, and the log counts the rows and names the first."""
    for fld in ("prompt", "messages"):
        path = write_jsonl(tmp_path / f"{fld}.jsonl", [{fld: [U, A_GOOD]}, {fld: [U]}, {fld: [U, A_BAD, U, A_GOOD]}])
        logs = []
        samples = load_samples([path], "prompts", log=logs.append)
        assert [s.prompt for s in samples] == [(U,), (U,), (U, A_BAD, U)]
        assert logs == [f"{path}: dropped the trailing assistant turn of the '{fld}' conversation in 2 of 3 rows "
                        f"(first: {path}:1)"]


# ----------------------------------------------------------------------------- sources

def test_utf8_bom_is_accepted_and_utf16_named(tmp_path):
    rows = [{"prompt": "P", "response": "R"}, {"prompt": "Q", "response": "S"}]
    body = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    want = load_file(write_jsonl(tmp_path / "plain.jsonl", rows), "sft")
    assert [s.prompt for s in load_file(str(tmp_path / "bom.jsonl"), "sft")] == [s.prompt for s in want]
    assert [s.prompt for s in load_file(str(tmp_path / "bom.json"), "sft")] == [s.prompt for s in want]
    (tmp_path / "u16.jsonl").write_bytes(body.encode("utf-16"))
    with pytest.raises(DataError, match=r"u16.jsonl:1: the file is UTF-16"):
        load_file(str(tmp_path / "u16.jsonl"), "sft")
    # A byte-order mark anywhere else is not one: line 2 is malformed JSON.
    (tmp_path / "mid.jsonl").write_bytes(body.encode() + b"\xef\xbb\xbf" + json.dumps(rows[0]).encode())
    with pytest.raises(DataError, match=r"mid.jsonl:3: malformed JSON"):
        load_file(str(tmp_path / "mid.jsonl"), "sft")


@pytest.fixture(scope="module")
def dataset_dirs(tmp_path_factory):
    """The same 4 UltraFeedback-style rows as a save_to_disk Dataset, a save_to_disk DatasetDict
    (train/test) and a hub-style directory (data/train-00000-of-00001.parquet + data/test-...)."""
    import datasets

    tmp_path = tmp_path_factory.mktemp("datasets")
    (tmp_path / "empty").mkdir()
    rows = [dict(UF, prompt_id=str(i)) for i in range(4)]
    rows[1] = dict(rows[1], chosen=[U, {"role": "assistant", "content": "The cat is lovely."}])
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    ds.select([2]).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    return tmp_path, rows


def test_dataset_directories_load_with_splits(dataset_dirs):
    root, rows = dataset_dirs
    want = load_file(write_jsonl(root / "rows.jsonl", rows), "pairs")  # the same rows as a file
    for path, n, where in ((root / "disk", 4, f"{root / 'disk'} row 3"),
                           (root / "dict", 4, f"{root / 'dict'}:train row 3"),
                           (f"{root / 'dict'}:test", 2, f"{root / 'dict'}:test row 1"),
                           (root / "hub", 4, f"{root / 'hub'}:train row 3"),
                           (f"{root / 'hub'}:test", 1, f"{root / 'hub'}:test row 0")):
        got = load_file(str(path), "pairs")
        assert len(got) == n and got[-1].where == where
        if n > 1:
            assert got == want[:n]  # Sample equality ignores `where`
    assert load_file(f"{root / 'hub'}:test", "pairs") == [want[2]]
    assert len(load_samples([str(root / "disk"), str(root / "hub")], "sft")) == 8


def test_a_split_can_be_sliced_as_datasets_slices_it(dataset_dirs):
    """'SOURCE:train[:2]' (datasets' split syntax, the usual way to take a part of UltraFeedback) works on
    saved and hub-style directories; rows keep their numbers in the whole split."""
    root, rows = dataset_dirs
    want = load_file(write_jsonl(root / "rows2.jsonl", rows), "pairs")
    for src in ("dict", "hub"):
        assert load_file(f"{root / src}:train[:2]", "pairs") == want[:2]
        got = load_file(f"{root / src}:train[-2:]", "pairs")
        assert got == want[2:] and [g.where for g in got] == [f"{root / src}:train row 2", f"{root / src}:train row 3"]
        assert load_file(f"{root / src}:train[:25%]+train[-1:]", "pairs") == [want[0], want[3]]
    with pytest.raises(UserError) as e:
        load_file(f"{root / 'dict'}:train[:x]", "pairs")
    assert str(e.value).startswith(f"data path '{root / 'dict'}:train[:x]': not a split slice that datasets reads")
    with pytest.raises(UserError, match=r"has no split 'dev' \(splits: train, test\)"):
        load_file(f"{root / 'dict'}:dev[:2]", "pairs")


@pytest.mark.parametrize("spec,message", [
    ("dict:dev", "data path '{root}/dict' has no split 'dev' (splits: train, test); pick one as '{root}/dict:SPLIT'"),
    ("disk:test", "data path '{root}/disk:test': '{root}/disk' holds one saved dataset without splits"),
    ("hub:dev", "data path '{root}/hub' has no split 'dev' (splits: test, train); pick one as '{root}/hub:SPLIT'"),
    ("empty", "data path '{root}/empty' is a directory without dataset files"),
    ("nope/x.jsonl", "data file '{root}/nope/x.jsonl' does not exist"),
])
def test_dataset_directory_errors(dataset_dirs, spec, message):
    root, _ = dataset_dirs
    with pytest.raises(UserError) as e:
        load_file(f"{root}/{spec}", "pairs")
    assert str(e.value).startswith(message.format(root=root)), str(e.value)


def test_a_directory_of_split_named_files_names_its_splits_and_refuses_a_file_of_no_split(tmp_path):
    """train.jsonl + test.jsonl: datasets names the splits (NamedSplit keys, which the error listing them
    could not join), and skips without a word a file whose name names no split."""
    rows = [{"prompt": "Hi", "response": "Yo"}, {"prompt": "Hey", "response": "Ho"}]
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "test.jsonl", rows[:1])
    assert len(load_file(str(d), "sft")) == 2 and len(load_file(f"{d}:test", "sft")) == 1
    with pytest.raises(UserError) as e:
        load_file(f"{d}:validation", "sft")
    assert str(e.value) == f"data path '{d}' has no split 'validation' (splits: test, train); pick one as '{d}:SPLIT'"
    write_jsonl(d / "extra_rows.jsonl", rows)
    (d / "notes.txt").write_text("not data")
    with pytest.raises(UserError) as e:
        load_file(str(d), "sft")
    assert str(e.value).startswith(f"data path '{d}': 'extra_rows.jsonl' belongs to no split"), str(e.value)
    # A damaged file there: its line, in one message (datasets logged a second line of its own first).
    (d / "extra_rows.jsonl").unlink()
    with open(d / "train.jsonl", "a") as f:
        f.write('{"prompt": "cut')
    with pytest.raises(UserError) as e:
        load_file(str(d), "sft")
    assert str(e.value) == f"data path '{d}': {d}/train.jsonl:3: malformed JSON (Unterminated string starting at " \
                           "column 12)"


def test_a_missing_path_under_a_local_directory_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    """'data/sft_trian' (a typo, no suffix, 'data/' here) is a missing local path, not a hub dataset
    name that would reach for the network; 'a/b/c' cannot be a hub id either."""
    import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried as a hub dataset"))
    with pytest.raises(UserError) as e:
        load_file("data/sft_trian", "sft")
    assert str(e.value) == "data file 'data/sft_trian' does not exist (not tried as a hub dataset: 'data/' is a " \
                           "directory here)"
    with pytest.raises(UserError, match="^data file 'x/y/z' does not exist$"):
        load_file("x/y/z", "sft")
    # The same typo in a model path went to the hub (a minute of retries) before it failed.
    from utils.model import load_tokenizer

    with pytest.raises(UserError) as e:
        load_tokenizer("data/sft_modle")
    assert str(e.value) == "--model_name_or_path 'data/sft_modle' does not exist (not read as a hub model name: " \
                           "'data/' is a directory here)"


def test_dataset_rows_are_named_by_row_index(tmp_path):
    import datasets

    rows = [{"prompt": "P", "chosen": "C", "rejected": "R"}, {"prompt": "P", "chosen": "C", "rejected": None}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError) as e:
        load_file(str(tmp_path / "d"), "pairs")
    assert str(e.value) == (f"{tmp_path / 'd'} row 1: field 'rejected': missing field (preference training needs "
                            "chosen and rejected)")
    assert e.value.row == 1 and e.value.line is None


def test_prompt_completion_rows_train_like_prompt_response(tmp_path):
    """TRL's prompt-completion format, as strings and conversational; its unpaired preference (KTO) rows
    are refused by name, since SFT would otherwise train on the completions labelled bad."""
    s = load_file(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "P", "completion": "C"}]), "sft")[0]
    assert s.prompt == ({"role": "user", "content": "P"},) and s.chosen == ({"role": "assistant", "content": "C"},)
    conv = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}],
            "completion": [{"role": "assistant", "content": "C"}]}
    s = load_file(write_jsonl(tmp_path / "pcc.jsonl", [conv]), "sft")[0]
    assert [m["role"] for m in s.prompt] == ["system", "user"] and s.chosen[0]["content"] == "C"
    s = load_file(write_jsonl(tmp_path / "pcp.jsonl", [conv]), "prompts")[0]  # PPO reads the prompt
    assert [m["content"] for m in s.prompt] == ["S", "P"]
    with pytest.raises(DataError, match="pc.jsonl:1: field 'chosen': format 'prompt_completion' has no chosen/rejected"):
        load_file(str(tmp_path / "pc.jsonl"), "pairs")
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "P", "completion": "C", "label": True}])
    for need in ("sft", "pairs"):
        with pytest.raises(DataError, match="kto.jsonl:1: field 'label': unpaired preference rows"):
            load_file(kto, need)
    bad = dict(conv, completion=[{"role": "user", "content": "U"}])
    with pytest.raises(DataError, match="field 'completion': expected assistant turns only"):
        load_file(write_jsonl(tmp_path / "bad.jsonl", [bad]), "sft")


def test_sharegpt_conversations_and_text_parts(tmp_path):
    """ShareGPT rows (`conversations` of from/value turns) read as `messages`; OpenAI-style content parts
    are joined when they are text and refused by name when not."""
    conv = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U1"},
                              {"from": "gpt", "value": "A1"}, {"from": "human", "value": "U2"},
                              {"from": "gpt", "value": "A2"}], "id": "x1"}
    s = load_file(write_jsonl(tmp_path / "sg.jsonl", [conv]), "sft")[0]
    assert [m["role"] for m in s.prompt] == ["system", "user", "assistant", "user"]
    assert s.chosen == ({"role": "assistant", "content": "A2"},)
    logs = []
    p = load_samples([str(tmp_path / "sg.jsonl")], "prompts", log=logs.append)[0]
    assert p.prompt == s.prompt and p.columns == {"id": "x1"} and "dropped the trailing assistant turn" in logs[0]
    for turn, field, problem in [({"from": "bot", "value": "x"}, "conversations[1].from", "expected one of"),
                                 ({"from": "gpt", "value": " "}, "conversations[1].value", "field is empty"),
                                 ({"from": "gpt"}, "conversations[1].value", "missing or not a string")]:
        bad = {"conversations": [{"from": "human", "value": "U"}, turn]}
        with pytest.raises(DataError) as e:
            load_file(write_jsonl(tmp_path / "bad.jsonl", [bad]), "sft")
        assert e.value.field == field and problem in str(e.value)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": "Hello"}]}
    s = load_file(write_jsonl(tmp_path / "parts.jsonl", [parts]), "sft")[0]
    assert s.prompt[0]["content"] == "Hi there"
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
                          {"role": "assistant", "content": "A"}]}
    with pytest.raises(DataError, match=r"field 'messages\[0\].content\[0\]': only text parts are supported, got 'image_url'"):
        load_file(write_jsonl(tmp_path / "img.jsonl", [image]), "sft")


def test_dolly_rows_read_as_alpaca(tmp_path):
    row = {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}
    s = load_file(write_jsonl(tmp_path / "dolly.jsonl", [row, dict(row, context="")]), "sft")
    assert s[0].prompt[0]["content"] == "Summarise.\n\nA long text." and s[0].prompt[0]["input"] == "A long text."
    assert s[0].chosen == ({"role": "assistant", "content": "Short."},) and s[1].prompt[0]["content"] == "Summarise."
    with pytest.raises(DataError, match="dolly2.jsonl:1: field 'response': field is empty"):
        load_file(write_jsonl(tmp_path / "dolly2.jsonl", [dict(row, response=" ")]), "sft")


def test_unanswered_last_turns_are_dropped_and_counted_and_json_lines_in_a_json_file(tmp_path):
    """ShareGPT dumps often end with a user turn nobody answered: SFT trains the turns up to the last reply
    and the log counts the rows. A .json file in JSON Lines layout (datasets' to_json) reads as .jsonl."""
    rows = [{"conversations": [{"from": "human", "value": "U1"}, {"from": "gpt", "value": "A1"},
                               {"from": "human", "value": "U2"}]},
            {"conversations": [{"from": "human", "value": "V1"}, {"from": "gpt", "value": "B1"}]}]
    logs = []
    out = load_samples([write_jsonl(tmp_path / "sg.jsonl", rows)], "sft", log=logs.append)
    assert [s.chosen[0]["content"] for s in out] == ["A1", "B1"] and out[0].prompt[-1]["content"] == "U1"
    assert any("dropped the unanswered turn(s)" in line and "1 of 2" in line and "sg.jsonl:1" in line for line in logs)
    lines = write_jsonl(tmp_path / "lines.json", [{"prompt": "P1", "response": "R1"}, {"prompt": "P2", "response": "R2"}])
    assert [s.where for s in load_file(lines, "sft")] == [f"{lines}:1", f"{lines}:2"]


def test_user_data_mistakes_found_by_an_audit(tmp_path):
    """Each gave a traceback, a nan loss mid-run or a silent misread; each is now one line naming the
    file, line and field, or read as the user meant."""
    import gzip

    def error(rows_or_text, need="sft", name="d.jsonl"):
        path = tmp_path / name
        if isinstance(rows_or_text, str):
            path.write_text(rows_or_text)
        else:
            write_jsonl(path, rows_or_text)
        with pytest.raises(UserError) as e:
            load_file(str(path), need)
        return str(e.value).replace(str(tmp_path) + "/", "")

    # A lone surrogate (a cut emoji in a ShareGPT dump) was a TypeError inside the tokenizer.
    assert error('{"prompt": "Hi", "response": "Nice \\ud83d"}\n') == (
        "d.jsonl:1: field 'response': holds a lone surrogate '\\ud83d' at character 5 (half of an emoji pair, cut "
        "off); remove or repair it")
    assert error('{"messages": [{"role": "user", "content": "\\udc00x"}, {"role": "assistant", "content": "y"}]}\n'
                 ).startswith("d.jsonl:1: field 'messages[0].content': holds a lone surrogate")
    # NaN / Infinity margins (Python's json reads them) ran to "loss is nan" after the model had trained.
    assert error('{"prompt": "P", "chosen": "C", "rejected": "R", "margin": NaN}\n', "pairs") == (
        "d.jsonl:1: field 'margin': expected a finite number, got nan")
    # OpenAssistant's message rows were trained as plain text, user messages included.
    assert error([{"message_id": "a", "parent_id": None, "text": "Hi", "role": "prompter"}]).startswith(
        "d.jsonl:1: an OpenAssistant message row (text, role, parent_id)")
    assert error("a,b\n1,2\n", name="d.csv").startswith("data file 'd.csv': csv files are not read")
    assert error('{"prompt": "unterminated\n') == "d.jsonl:1: malformed JSON (Unterminated string starting at column 12)"

    # gzip'd JSON Lines (as Anthropic's HH files ship) are read.
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}))
    assert load_file(str(tmp_path / "hh.jsonl.gz"), "pairs")[0].rejected == ({"role": "assistant", "content": "Go"},)
    # A gzip'd .json list (it was read as JSON Lines: "malformed JSON" at line 2 of the pretty-printed list).
    with gzip.open(tmp_path / "list.json.gz", "wt") as f:
        json.dump([{"prompt": "Hi", "response": "Yo"}, {"prompt": "Hey", "response": "Ho"}], f, indent=2)
    assert [r.chosen[0]["content"] for r in load_file(str(tmp_path / "list.json.gz"), "sft")] == ["Yo", "Ho"]
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(b'[{"prompt": "Hi", "response": "Yo"}]')[:-9])
    with pytest.raises(UserError, match="cut.json.gz: cannot read the gzip file"):
        load_file(str(tmp_path / "cut.json.gz"), "sft")
    # DeepSpeed-Chat's Dahoas layout: the prompt is itself an HH transcript ending with "Assistant:".
    row = {"prompt": "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: More?\n\nAssistant:", "chosen": " Yes.",
           "rejected": " No."}
    s = load_file(write_jsonl(tmp_path / "dahoas.jsonl", [row]), "pairs", log=lambda m: None)[0]
    assert s.prompt == ({"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "More?"})
    assert s.chosen == ({"role": "assistant", "content": "Yes."},)  # the separating space is not the reply's
    assert s.rejected == ({"role": "assistant", "content": "No."},)
    # HH's own layout for a prompt, "\n\nHuman: ..." ending with the Human turn (no "Assistant:"), was one user
    # turn whose text held "Human:" (rendered "Human: \n\nHuman: ..."), a transcript's turns collapsed into it.
    for prompt, turns in (("\n\nHuman: Tell me about the cat.", [U]),
                          ("\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: More?",
                           [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "More?"}])):
        s = load_file(write_jsonl(tmp_path / "hh_prompt.jsonl", [{"prompt": prompt}]), "prompts", log=lambda m: None)[0]
        assert list(s.prompt) == turns
    with pytest.raises(DataError, match="hh_prompt.jsonl:1: field 'prompt': an HH prompt must end with a Human turn"):
        load_file(write_jsonl(tmp_path / "hh_prompt.jsonl", [{"prompt": "\n\nHuman: Hi.\n\nAssistant: Yo."}]),
                  "prompts")
    assert load_file(write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Human: hi"}]), "prompts")[0].prompt == (
        {"role": "user", "content": "Human: hi"},)  # plain text that starts with the word: not a transcript
    # A suffix in capitals names the format too (UP.JSON, a list, was read as JSON Lines).
    (tmp_path / "UP.JSON").write_text(json.dumps([{"prompt": "Hi", "response": "Yo"}]))
    assert load_file(str(tmp_path / "UP.JSON"), "sft")[0].chosen == ({"role": "assistant", "content": "Yo"},)
    # A ShareGPT dump's top-level system prompt was dropped.
    row = {"system": "Be warm.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    s = load_file(write_jsonl(tmp_path / "sg.jsonl", [row]), "sft")[0]
    assert s.prompt[0] == {"role": "system", "content": "Be warm."}
    from utils.templates import render_text

    # --template alpaca dropped system turns.
    assert render_text(s.prompt + s.chosen, "alpaca", None, False).startswith("Be warm.\n\nBelow is an instruction")


def test_a_hub_style_split_loads_when_another_split_has_other_columns(tmp_path):
    """UltraFeedback's layout: train_prefs (chosen/rejected) beside train_gen (other columns) and a damaged
    file in a third split. load_dataset(dir) reads every split, so the one asked for failed too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "uf" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"prompt": "P", "chosen": "C", "rejected": "R"}] * 3),
                   data / "train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "P", "completions": [1, 2]}]), data / "train_gen-00000-of-00001.parquet")
    (data / "test_prefs-00000-of-00001.parquet").write_bytes(b"not parquet")
    assert len(load_file(f"{tmp_path / 'uf'}:train_prefs", "pairs")) == 3
    with pytest.raises(UserError, match="has no split 'dev' \\(splits: test_prefs, train_gen, train_prefs\\)"):
        load_file(f"{tmp_path / 'uf'}:dev", "pairs")


@pytest.mark.parametrize("name", ["train.csv", "train.txt", "data/train-00000-of-00001.tsv"])
def test_a_directory_of_untyped_files_is_refused_by_name(tmp_path, name):
    """A local directory is read with datasets.load_dataset(dir), which took a .txt file as one `text` row
    per line (and trained on it) and a .csv file with guessed column types; given by name, such files
    are refused. Now they are refused inside a directory too, naming the file."""
    path = tmp_path / "d" / name
    path.parent.mkdir(parents=True)
    path.write_text("prompt,response\nHi,Yo\n")
    with pytest.raises(UserError, match=f"data path '.*d': '{name}' is not read"):
        load_file(str(tmp_path / "d"), "sft")


def test_a_field_the_step_never_uses_does_not_stop_it(tmp_path):
    """Real HH rows have empty rejected replies. SFT reads the chosen side and PPO the prompt: an empty or
    malformed `rejected` stops neither, while the preference steps that train on it still name it."""
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Tell me about the lamp.\n\nAssistant: The lamp is great.",
                              "rejected": "\n\nHuman: Tell me about the lamp.\n\nAssistant:"}) + "\n")
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Tell me about the chair.", "chosen": "The chair is great.",
                                "rejected": ""}) + "\n")
    (prompt,) = load_file(str(hh), "prompts")
    assert prompt.prompt == ({"role": "user", "content": "Tell me about the lamp."},)
    for path in (hh, pref):
        (sft,) = load_file(str(path), "sft")
        assert sft.chosen[-1]["content"] in ("The lamp is great.", "The chair is great.")
        assert sft.rejected is None
    with pytest.raises(DataError, match=r"hh.jsonl:1: field 'rejected': empty assistant turn"):
        load_file(str(hh), "pairs")
    with pytest.raises(DataError, match=r"pref.jsonl:1: field 'rejected': field is empty"):
        load_file(str(pref), "pairs")


def test_files_of_one_split_with_different_fields_are_named(tmp_path):
    """datasets reads a split's files as one table; files with different fields failed with its CastError
    ("Couldn't cast"), naming no file. The message now names both files and their fields."""
    data = tmp_path / "d" / "data"
    data.mkdir(parents=True)
    (data / "train-00000-of-00002.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (data / "train-00001-of-00002.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(UserError, match=r"'data/train-00001-of-00002.jsonl' has fields \(completion, prompt\) and "
                                        r"'data/train-00000-of-00002.jsonl' \(prompt, response\)"):
        load_file(str(tmp_path / "d"), "sft")


def test_public_datasets_own_field_names_and_a_top_level_system(tmp_path):
    """GSM8K {question, answer}, MATH {problem, solution} and Orca DPO pairs {system, question, chosen,
    rejected} matched no format; a top-level `system` beside a prompt was dropped without a word. Each is
    now read as ours (counted in the log); errors name the row's own fields; a PPO prompt row keeps its
    `answer` as a column for exact_match."""
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}])
    logs = []
    (sft,) = load_file(gsm, "sft", log=logs.append)
    assert sft.prompt == ({"role": "user", "content": "What is 2 + 3?"},)
    assert sft.chosen == ({"role": "assistant", "content": "2 + 3 = 5\n#### 5"},)
    assert logs == [f"{gsm}: read 'question' and 'answer' as 'prompt' and 'response' in 1 of 1 rows (first: {gsm}:1)"]
    (prompt,) = load_file(gsm, "prompts", log=logs.append)
    assert prompt.prompt[-1]["content"] == "What is 2 + 3?" and prompt.columns["answer"] == "2 + 3 = 5\n#### 5"
    math_rows = write_jsonl(tmp_path / "math.jsonl", [{"problem": "Solve x + 1 = 2.", "solution": "x = 1"}])
    assert load_file(math_rows, "sft")[0].chosen[0]["content"] == "x = 1"
    orca = write_jsonl(tmp_path / "orca.jsonl", [
        {"system": "You are terse.", "question": "Tell me about the cat.", "chosen": "The cat is great.",
         "rejected": "Cats."},
        {"system": "", "question": "Tell me about the dog.", "chosen": "The dog is great.", "rejected": "Dogs."}])
    first, second = load_file(orca, "pairs")
    assert first.prompt == ({"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "Tell me about the cat."})
    assert second.prompt == ({"role": "user", "content": "Tell me about the dog."},)  # an empty system: none
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "  ", "answer": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'question': field is empty"):
        load_file(bad, "sft")
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"system": "Be brief.", "prompt": "Hi", "response": "Yo"}])
    assert load_file(pr, "sft")[0].prompt[0] == {"role": "system", "content": "Be brief."}
