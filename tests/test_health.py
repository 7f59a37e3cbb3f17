"""Answer-health signals (utils/health.py) and synthetic reward-model negatives (utils/negatives.py)."""
from __future__ import annotations

import random

import pytest
import torch

from utils.health import AnswerHealthMonitor, DisplacementMonitor, distinct_ratio_sums, flat_reward_warning
from utils.negatives import DEFAULT_KINDS, KINDS, corrupt_reply, synthetic_pairs

EOS = 2


def test_distinct_ratio_counts_each_answer_up_to_its_eos():
    answers = torch.tensor([[5, 6, 7, EOS, 0], [5, 5, 5, 5, EOS], [EOS, 0, 0, 0, 0], [8, 9, 8, 9, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    total, n = distinct_ratio_sums(answers, mask, EOS)
    # 3/3 distinct; 1/4 (one token four times); empty answer counts 1; no EOS (cut): 2 distinct of 5.
    assert n == 4 and total == pytest.approx(1.0 + 0.25 + 1.0 + 0.4)


def test_displacement_warns_once_with_cause_and_flag():
    events = []

    class Log:
        def log(self, e):
            events.append(e)

    mon = DisplacementMonitor(nats=2.0, beta=0.1, rpo_alpha=0.0, logger=Log())
    mon.log({"step": 0, "split": "eval", "rewards/chosen": 0.0})
    mon.log({"step": 5, "split": "train", "rewards/chosen": -0.15})   # -1.5 nats: under the threshold
    mon.log({"step": 10, "split": "train", "rewards/chosen": -0.25})  # -2.5 nats: warn
    mon.log({"step": 15, "split": "train", "rewards/chosen": -0.4})   # once only
    assert [e["split"] for e in events] == ["eval", "train", "train", "warning", "train"]
    assert [e.get("logps/chosen_shift") for e in events if e["split"] != "warning"] == pytest.approx(
        [0.0, -1.5, -2.5, -4.0])
    w = events[3]
    assert w["warning"] == "likelihood_displacement" and w["step"] == 10
    assert "--rpo_alpha 1" in w["message"] and "2.50 nats" in w["message"]
    assert "raise --rpo_alpha (now 0.5)" in DisplacementMonitor(1.0, 0.1, 0.5).check(
        1, {"rewards/chosen": -0.2})["message"]
    assert DisplacementMonitor(0.0, 0.1, 0.0).check(1, {"rewards/chosen": -100.0}) is None  # 0 disables


def test_answer_health_warns_when_eos_or_variety_drops_from_the_first_step():
    mon = AnswerHealthMonitor(eos_drop=0.2, distinct_drop=0.15)
    assert mon.check(1, {"eos_rate": 1.0, "distinct_ratio": 0.95}) == []
    assert mon.check(2, {"eos_rate": 0.85, "distinct_ratio": 0.85}) == []
    first = mon.check(3, {"eos_rate": 0.7, "distinct_ratio": 0.7})
    assert [w["warning"] for w in first] == ["answers_without_eos", "repeating_answers"]
    assert "70%" in first[0]["message"] and "0.70" in first[1]["message"]
    assert mon.check(4, {"eos_rate": 0.1, "distinct_ratio": 0.1}) == []  # each warns once


def test_answer_health_warns_once_when_answers_grow_past_twice_their_first_length():
    mon = AnswerHealthMonitor()
    ok = {"eos_rate": 1.0, "distinct_ratio": 0.95}
    assert mon.check(1, {**ok, "finished_length": 9.4}) == []
    assert mon.check(2, {**ok, "finished_length": 18.8}) == []  # exactly twice: not yet
    (w,) = mon.check(3, {**ok, "finished_length": 24.1})
    assert w["warning"] == "answers_growing" and "24.1" in w["message"] and "9.4" in w["message"]
    assert "repeat_span" in w["message"] and "rw_eval.py" in w["message"]
    assert mon.check(4, {**ok, "finished_length": 58.0}) == []  # once
    assert AnswerHealthMonitor().check(1, ok) == [] and AnswerHealthMonitor(length_growth=2.0).check(1, ok) == []


def test_a_first_rollout_of_mostly_cut_answers_warns_when_cut_answers_score_the_lowest():
    assert AnswerHealthMonitor().check(1, {"eos_rate": 0.2, "distinct_ratio": 0.9}) == []
    assert AnswerHealthMonitor(cut_lowest=True).check(1, {"eos_rate": 0.6, "distinct_ratio": 0.9}) == []
    mon = AnswerHealthMonitor(cut_lowest=True)
    (w,) = mon.check(1, {"eos_rate": 0.2, "distinct_ratio": 0.9})
    assert w["warning"] == "answers_cut_at_start" and "20%" in w["message"] and "--max_answer_seq_len" in w["message"]
    assert mon.check(2, {"eos_rate": 0.1, "distinct_ratio": 0.9}) == []  # the drop rule: 0.2 -> 0.1 is within 0.2


def test_corruptions_of_a_reply():
    reply = [10, 11, 12, 13, EOS]
    rng = random.Random(0)
    assert corrupt_reply(reply, "empty", EOS, rng) == [EOS]
    for _ in range(20):
        d = corrupt_reply(reply, "drop", EOS, rng)
        assert len(d) == 4 and d[-1] == EOS and all(t in reply for t in d)
        r = corrupt_reply(reply, "repeat", EOS, rng)
        assert r[-1] == EOS and len(r) in (7, 8) and sorted(set(r)) == sorted(set(reply))
        body = r[:-1]  # the repeated token appears 3-4 times in a row
        assert max(sum(1 for _ in g) for _, g in __import__("itertools").groupby(body)) >= 3
        t = corrupt_reply(reply, "truncate", EOS, rng)
        assert t[-1] == EOS and 2 <= len(t) <= 4 and t[:-1] == reply[:len(t) - 1]
    long_reply, spans = list(range(10, 20)) + [EOS], set()
    for _ in range(200):  # a contiguous run of 2..5 of the 10 tokens removed, anywhere, the rest in order
        s = corrupt_reply(long_reply, "drop_span", EOS, rng)
        n = len(long_reply) - len(s)
        i = next(j for j in range(len(s)) if s[j] != long_reply[j])
        assert 2 <= n <= 5 and s[-1] == EOS and s[:i] + long_reply[i:i + n] + s[i:] == long_reply
        spans.add((i, n))
    assert {n for _, n in spans} == {2, 3, 4, 5} and {i for i, _ in spans} == set(range(9))
    assert len(corrupt_reply([10, 11, EOS], "drop_span", EOS, rng)) == 2  # too short for a run: one token goes
    runs = set()
    for _ in range(300):  # a run of 2..max(4, half) of the 12 tokens said 1-2 more times right after itself
        body = list(range(10, 22))
        r = corrupt_reply(body + [EOS], "repeat_span", EOS, rng)[:-1]
        found = [(i, n, k) for n in range(2, 7) for k in (1, 2) for i in range(len(body) - n + 1)
                 if r == body[:i + n] + body[i:i + n] * k + body[i + n:]]
        assert len(found) == 1, r
        runs.add(found[0][1:])
    assert runs == {(n, k) for n in range(2, 7) for k in (1, 2)}  # a clause-long run too: "..., because it is dull"
    two = corrupt_reply([10, 11, EOS], "repeat_span", EOS, rng)
    assert two in ([10, 11, 10, 11, EOS], [10, 11, 10, 11, 10, 11, EOS])
    assert corrupt_reply([10, EOS], "truncate", EOS, rng) == [EOS]  # a one-token reply has no shorter fragment
    vocab = [10, 11, 12, 13, 50, 51]
    for _ in range(20):
        x = corrupt_reply(reply, "replace", EOS, rng, vocab)
        diff = [i for i in range(4) if x[i] != reply[i]]
        assert len(x) == 5 and x[-1] == EOS and len(diff) == 1 and x[diff[0]] in vocab
        w = corrupt_reply(reply, "swap", EOS, rng)
        i = next(i for i in range(4) if w[i] != reply[i])
        assert w[-1] == EOS and w[i:i + 2] == [reply[i + 1], reply[i]] and w[:i] + w[i + 2:] == reply[:i] + reply[i + 2:]
    assert corrupt_reply([10, 10, EOS], "swap", EOS, rng) == [10, 10, EOS]  # nothing to exchange: unchanged
    with pytest.raises(ValueError):
        corrupt_reply(reply, "replace", EOS, rng)  # needs the token ids to draw from
    with pytest.raises(ValueError):
        corrupt_reply(reply, "shuffle", EOS, rng)


def test_synthetic_pairs_keep_prompt_and_chosen_and_take_kinds_in_turn():
    from utils.encoding import IGNORE
    from utils.pairs import Pair

    items = [Pair([1, 7, 8, 20 + i, 30, EOS], [IGNORE] * 3 + [20 + i, 30, EOS], [1, 7, 8, 40, EOS],
                  [IGNORE] * 3 + [40, EOS], 3, 0.5, f"f:{i}") for i in range(8)]
    extra = synthetic_pairs(items, 1.0, EOS, seed=0)
    assert len(extra) == 8
    assert [e.where.split("synthetic ")[1].rstrip(")") for e in extra] == [*DEFAULT_KINDS, *DEFAULT_KINDS][:8]
    six = synthetic_pairs(items, 1.0, EOS, seed=0, kinds=KINDS)
    assert [e.where.split("synthetic ")[1].rstrip(")") for e in six] == [*KINDS, *KINDS][:8]
    two = synthetic_pairs(items, 1.0, EOS, seed=0, kinds=("drop", "swap"))
    assert [e.where.split("synthetic ")[1].rstrip(")") for e in two] == ["drop", "swap"] * 4
    for e in extra:
        src = next(it for it in items if it.where == e.where.split(" ")[0])
        assert e.chosen == src.chosen and e.rejected[:3] == src.chosen[:3] and e.rejected[-1] == EOS
        assert e.rejected != e.chosen and e.margin == 0.0
        assert e.rejected_labels == [IGNORE] * 3 + e.rejected[3:]
    assert len(synthetic_pairs(items, 0.5, EOS, seed=0)) == 4
    assert len(synthetic_pairs(items, 2.0, EOS, seed=0)) == 16
    assert synthetic_pairs(items, 1.0, EOS, seed=0) == extra  # seeded


def test_with_synthetic_negatives_adds_the_pairs_that_fit_and_says_how_many():
    """The one helper step 2 and DPO call: rate 0 leaves the items as they are; otherwise the extra
    pairs follow the items, those longer than max_seq_len (a repeated span can lengthen a reply) left out."""
    from utils.encoding import IGNORE
    from utils.negatives import with_synthetic_negatives
    from utils.pairs import Pair

    items = [Pair([1, 7, 8, 20 + i, 30, EOS], [IGNORE] * 3 + [20 + i, 30, EOS], [1, 7, 8, 40, EOS],
                  [IGNORE] * 3 + [40, EOS], 3, 0.0, f"f:{i}") for i in range(6)]
    said = []
    assert with_synthetic_negatives(items, 0.0, DEFAULT_KINDS, EOS, 6, 0, said.append) is items and not said
    out = with_synthetic_negatives(items, 1.0, ("repeat_span",), EOS, 6, 0, said.append)
    assert out[:6] == items and len(out) == 6 and said == ["synthetic negatives: 0 pairs of a chosen answer and a "
                                                           "corrupted copy of it; 6 longer than --max_seq_len 6 left "
                                                           "out"]  # every repeat is too long
    out = with_synthetic_negatives(items, 1.0, ("drop", "repeat_span"), EOS, 6, 0, said.append)
    assert len(out) == 9 and all("synthetic drop" in p.where for p in out[6:]) and said[-1].startswith(
        "synthetic negatives: 3 pairs")


def test_no_synthetic_negative_of_a_chosen_answer_cut_at_max_seq_len():
    """--overlong truncate leaves a chosen answer cut at --max_seq_len without its EOS; its corrupted copies
    end with one ("empty": the EOS alone), so such pairs taught that an answer which never ends beats a
    finished one, the habit step 3's --cut_answer_score exists to punish."""
    from utils.encoding import IGNORE
    from utils.negatives import with_synthetic_negatives
    from utils.pairs import Pair

    whole = Pair([1, 7, 8, 20, 30, EOS], [IGNORE] * 3 + [20, 30, EOS], [1, 7, 8, 40, EOS], [IGNORE] * 3 + [40, EOS],
                 3, 0.0, "f:1")
    cut = Pair([1, 7, 8, 21, 31, 32], [IGNORE] * 3 + [21, 31, 32], [1, 7, 8, 41, EOS], [IGNORE] * 3 + [41, EOS], 3,
               0.0, "f:2")
    assert synthetic_pairs([cut], 1.0, EOS, seed=0) == []
    said = []
    out = with_synthetic_negatives([whole, cut], 3.0, ("empty", "drop", "truncate"), EOS, 6, 0, said.append)
    assert len(out) == 2 + 3 and all(p.where.startswith("f:1 (synthetic") for p in out[2:])
    assert said == ["synthetic negatives: 3 pairs of a chosen answer and a corrupted copy of it; none of the 1 chosen "
                    "answers cut at --max_seq_len (no EOS)"]


def test_report_draws_health_panels_and_warnings(tmp_path):
    import json

    from launch.report import panels

    run = tmp_path / "dpo"
    run.mkdir()
    lines = [{"step": 0, "split": "eval", "loss": 0.69, "logps/chosen_shift": 0.0},
             {"step": 10, "split": "train", "loss": 0.5, "logps/chosen_shift": -2.5},
             {"step": 10, "split": "warning", "warning": "likelihood_displacement", "message": "..."},
             {"step": 20, "split": "train", "loss": 0.4, "logps/chosen_shift": -3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = {key: (series, warnings) for _, key, series, warnings in panels([("dpo", str(run))])}
    assert set(got) == {"loss", "logps/chosen_shift"}
    series, warnings = got["logps/chosen_shift"]
    assert series == {"eval": [(0, 0.0)], "train": [(10, -2.5), (20, -3.0)]}
    assert warnings == [(10, "likelihood_displacement")]


@pytest.mark.parametrize("line,message", [
    ('{"loss": 1.0}', "2: field 'step': missing or not a number: every metrics record names its step"),
    ('[1, 2]', "2: expected a JSON object (one metrics record), got a list"),
    ('{"step": 3, "split": "warning"}', "2: field 'warning': missing in a warning record")])
def test_report_names_the_line_of_a_metrics_record_it_cannot_draw(tmp_path, capsys, line, message):
    """A metrics.jsonl row without a step (or not an object) was a KeyError/AttributeError traceback."""
    from launch.report import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n' + line + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--runs", f"a={run}", "--out", str(tmp_path / "r.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {run}/metrics.jsonl:{message}"]
    assert not (tmp_path / "r.png").exists()


def test_monitors_carry_their_state_across_a_resume():
    """The warnings' baseline and what already fired travel in the checkpoint's client state: a resumed
    PPO run compared with its own first step (so drift before the stop went unseen) and warned again."""
    from utils.health import AnswerHealthMonitor, DisplacementMonitor

    m = AnswerHealthMonitor()
    assert m.check(1, {"eos_rate": 1.0, "distinct_ratio": 0.9, "finished_length": 10.0}) == []
    assert [w["warning"] for w in m.check(2, {"eos_rate": 0.5, "distinct_ratio": 0.9, "finished_length": 10.0})] == [
        "answers_without_eos"]
    resumed = AnswerHealthMonitor()
    resumed.load_state_dict(m.state_dict())
    drifted = {"eos_rate": 0.4, "distinct_ratio": 0.5, "finished_length": 10.0}
    assert [w["warning"] for w in resumed.check(3, drifted)] == ["repeating_answers"]  # not its first step; no repeat
    d = DisplacementMonitor(nats=1.0, beta=0.1, rpo_alpha=0.0)
    assert d.check(1, {"rewards/chosen": -0.5}) is not None
    again = DisplacementMonitor(nats=1.0, beta=0.1, rpo_alpha=0.0)
    again.load_state_dict(d.state_dict())
    assert again.check(2, {"rewards/chosen": -0.5}) is None


@pytest.mark.parametrize("loss, accuracy, margin, warns", [
    (0.6900935, 0.98, 0.0061, True),   # the demo's tiny Falcon: 98% ordered, yet PPO went 100% -> 2% preferred
    (0.6690124, 1.00, 0.0490, True),   # tiny Gemma: PPO and DPO moved nothing
    (0.5286060, 1.00, 0.4152, False),  # tiny Phi-3: PPO 72% -> 100% preferred
    (0.1678834, 1.00, 2.8465, False),  # the demo's Llama
    (0.6931472, 0.50, 0.0, True),      # chance
])
def test_flat_reward_model_warns_on_held_out_loss_near_log2(loss, accuracy, margin, warns):
    # Held-out numbers of step 2 on the demo data (2026-12-07); a warning when loss > log 2 - 0.05.
    w = flat_reward_warning(36, {"loss": loss, "accuracy": accuracy, "margin": margin})
    assert (w is not None) == warns
    if warns:
        assert w["split"] == "warning" and w["warning"] == "flat_reward_model" and w["step"] == 36
        assert "log 2" in w["message"] and "--learning_rate" in w["message"]


def test_flat_reward_warning_quiet_without_held_out_loss():
    assert flat_reward_warning(5, {}) is None
    assert flat_reward_warning(5, {"loss": float("nan")}) is None
