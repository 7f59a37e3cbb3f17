"""bench/alignment/tasks.py: every task's judge agrees with its own data, and held-out entities stay held out."""
from __future__ import annotations

import os
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench", "alignment"))
import tasks  # noqa: E402


def _reply(answer) -> str:
    return answer if isinstance(answer, str) else answer[-1]["content"]


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_the_judge_prefers_every_chosen_answer_and_no_rejected_or_malformed_one(name):
    task = tasks.TASKS[name]()
    for pairs in (task.pairs, task.heldout_pairs):
        for p in pairs:
            chosen, rejected = _reply(p["chosen"]), _reply(p["rejected"])
            assert task.well_formed(chosen) and task.preferred(chosen), chosen
            assert task.well_formed(rejected) and not task.preferred(rejected), rejected
    for r in task.sft:
        reply = _reply(r["messages"]) if "messages" in r else r["response"]
        assert task.well_formed(reply), reply
    assert len(task.probes) == len(task.heldout_prompts)
    for probe in task.probes:
        assert all(task.well_formed(a) and task.preferred(a) for a in probe["preferred"])
        assert set(probe["malformed"]) == set(tasks.MALFORMED_KINDS)
        for kind, answers in probe["malformed"].items():
            assert answers and not any(task.well_formed(a) for a in answers), (kind, answers)


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_held_out_entities_never_appear_in_the_training_text_and_tasks_are_deterministic(name):
    task = tasks.TASKS[name]()
    text = " ".join(task.text_lines())
    held = tasks.HELDOUT_PLACES if name == "cold_start" else tasks.HELDOUT
    assert not set(re.findall(r"\w+", text)) & set(held)
    again = tasks.TASKS[name]()
    assert again.sft == task.sft and again.pairs == task.pairs and again.heldout_prompts == task.heldout_prompts


def test_the_detail_probe_counts_a_second_reason_as_malformed():
    task = tasks.detail()
    assert task.well_formed("The kettle is lovely.") and not task.preferred("The kettle is lovely.")
    assert task.preferred("The kettle is lovely, because it is plain.")
    assert not task.well_formed("The kettle is lovely, because it is plain, because it is great.")
    sft_detailed = sum(task.preferred(r["response"]) for r in task.sft) / len(task.sft)
    assert 0.15 < sft_detailed < 0.25  # the preferred format is rare in the SFT data


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_the_rule_rewards_score_what_the_judge_scores_and_ask_for_the_prompts_noun(name):
    """rule_rewards (GRPO's rewards in the suite): the form reward is 1 for a well-formed answer that names
    the prompt's noun and 0 for every malformed probe or another noun; the preference reward is 1 exactly
    where the judge finds the answer well-formed and preferred."""
    import rule_rewards

    task = rule_rewards._TASKS[name]
    form, pref = getattr(rule_rewards, f"{name}_form"), getattr(rule_rewards, f"{name}_preferred")
    for probe, pair in zip(task.probes, task.heldout_pairs):
        prompt = _reply(probe["prompt"])
        malformed = [a for answers in probe["malformed"].values() for a in answers]
        answers = probe["preferred"] + [_reply(pair["rejected"])] + malformed
        assert form([prompt] * len(answers), answers) == [1.0, 1.0] + [0.0] * len(malformed), answers
        assert pref([prompt] * len(answers), answers) == [1.0] + [0.0] * (1 + len(malformed)), answers
        other = next(p for p in task.prompts if _reply(p.get("messages", p.get("prompt"))) != prompt)
        assert form([_reply(other.get("messages", other.get("prompt")))], probe["preferred"]) == [0.0]
