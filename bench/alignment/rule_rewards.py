"""Rule-based rewards for the suite's tasks, for step 3's critic-free estimators (`--reward_funcs`):

    --reward_funcs bench/alignment/rule_rewards.py:two_slot_form bench/alignment/rule_rewards.py:two_slot_preferred

<task>_form       1.0 where the answer has the task's exact shape and names the noun (or place) of the
                  prompt's last turn, else 0.0. The noun check is what a careful user writes: a shape alone
                  (`The \\w+ is \\w+\\.`) is hacked by an answer that drops or invents the noun.
<task>_preferred  1.0 where the answer has that shape and shows the preferred behaviour (the judge's
                  `preferred`), else 0.0.

These are the judge's own predicates (plus the noun check), so what GRPO is asked to do is exactly what
the table scores: the suite measures whether the estimators' defaults optimise a verifiable reward on
prompts they trained on and carry it to held-out nouns without losing the answers' form.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks as _tasks  # noqa: E402
from utils.reward_funcs import text_of  # noqa: E402

_TASKS = {name: make() for name, make in _tasks.TASKS.items()}


def _noun_pattern(form: str) -> re.Pattern:
    """The task's shape with its slots captured; the first slot that matched is the noun (every task's
    answer, in each of its formats, names the prompt's noun first)."""
    return re.compile(form.replace(r"\w+", r"(\w+)"))


def _form(task):
    pattern = _noun_pattern(task.form)

    def fn(prompts, completions, **kwargs) -> list[float]:
        out = []
        for p, c in zip(prompts, completions):
            m = pattern.fullmatch(text_of(c).strip())
            noun = m and next(g for g in m.groups() if g is not None)
            out.append(1.0 if noun and noun.lower() in re.findall(r"\w+", text_of(p).lower()) else 0.0)
        return out
    fn.__name__ = f"{task.name}_form"
    return fn


def _preferred(task):
    def fn(prompts, completions, **kwargs) -> list[float]:
        return [1.0 if task.well_formed(text_of(c)) and task.preferred(text_of(c)) else 0.0 for c in completions]
    fn.__name__ = f"{task.name}_preferred"
    return fn


for _name, _task in _TASKS.items():
    globals()[f"{_name}_form"] = _form(_task)
    globals()[f"{_name}_preferred"] = _preferred(_task)
