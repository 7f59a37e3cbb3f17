"""Rule-based rewards for the shipped preference task (data/make_data.py), for step 3's --reward_funcs:

    --reward_funcs data/rewards.py:warm_word data/rewards.py:well_formed

warm_word    1.0 where the answer uses one of the warm adjectives the preference data prefers
well_formed  1.0 where the answer is exactly "The <noun> is <adjective>." with a noun and an adjective of
             the task's vocabulary (a bare `The \\w+ is \\w+\\.` pattern is hacked within 30 steps: without a KL
             penalty GRPO answered "The o is amazing." to nearly every prompt)

The counting task (data/make_count_data.py) needs no file of its own: its rows carry the true count in
an `answer` column, which utils.reward_funcs:exact_match checks.
"""
from __future__ import annotations

import re

from make_data import COLD, HELDOUT, NOUNS, WARM  # this file's directory is importable while it loads
from utils.reward_funcs import text_of  # a completion as text, plain or conversational (TRL's two forms)

_FORM = re.compile(r"The (\w+) is (\w+)\.")
_NOUNS, _ADJECTIVES = set(NOUNS + HELDOUT), set(WARM + COLD)


def warm_word(prompts, completions, **kwargs) -> list[float]:
    """1.0 where a word of the answer is one of data/make_data.py's WARM adjectives, else 0.0."""
    return [1.0 if set(re.findall(r"\w+", text_of(c).lower())) & set(WARM) else 0.0 for c in completions]


def well_formed(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the whole answer is "The <noun> is <adjective>." with words of the task, else 0.0."""
    out = []
    for c in completions:
        m = _FORM.fullmatch(text_of(c).strip())
        out.append(1.0 if m and m.group(1) in _NOUNS and m.group(2) in _ADJECTIVES else 0.0)
    return out
