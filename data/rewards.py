"""Rule-based rewards for the shipped preference task (data/make_data.py), for step 3's --reward_funcs:

    --reward_funcs data/rewards.py:warm_word data/rewards.py:well_formed

warm_word    1.0 where the answer uses one of the warm adjectives the preference data prefers
well_formed  1.0 where the answer is exactly one sentence "The <word> is <word>." (a format reward)

The counting task (data/make_count_data.py) needs no file of its own: its rows carry the true count in
an `answer` column, which utils.reward_funcs:exact_match checks.
"""
from __future__ import annotations

import re

from make_data import WARM  # this file's directory is importable while --reward_funcs loads it

from utils.reward_funcs import regex_reward

well_formed = regex_reward(r"The \w+ is \w+\.", "well_formed")


def warm_word(prompts, completions, **kwargs) -> list[float]:
    """1.0 where a word of the answer is one of data/make_data.py's WARM adjectives, else 0.0."""
    return [1.0 if set(re.findall(r"\w+", c.lower())) & set(WARM) else 0.0 for c in completions]
