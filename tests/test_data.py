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
