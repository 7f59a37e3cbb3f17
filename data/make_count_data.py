"""Generates the shipped verifiable task (deterministic; the .jsonl files are committed).

The task: "How many numbers are in: 3 8 5?" -> "The answer is 3." Lists hold 1 to 6 one-digit
numbers. The SFT answers come from a careless counter who is right only 40% of the time and
otherwise counts one too many, so a model trained on them answers right only some of the time;
the prompt files carry the true count in an `answer` column, which a rule-based reward checks
(utils/reward_funcs.py: exact_match). Held-out lists never appear in the training files.

  count_sft.jsonl        300 prompt/response pairs (40% right)
  count_prompts.jsonl    the same 300 prompts with their true `answer`
  count_heldout.jsonl    60 unseen lists with their true `answer`

Run: python data/make_count_data.py
"""
from __future__ import annotations

import random

from make_data import write  # this script runs from data/, beside make_data.py

TEMPLATES = ["How many numbers are in: {}?", "Count the numbers: {}.", "How many numbers does this list have: {}?"]
P_RIGHT = 0.4


def answer(n: int) -> str:
    return f"The answer is {n}."


def lists(rng: random.Random, n: int, avoid: set) -> list[str]:
    out = []
    while len(out) < n:
        s = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 6)))
        if s not in avoid:
            avoid.add(s)
            out.append(s)
    return out


def main() -> None:
    rng = random.Random(0)
    seen: set = set()
    train, heldout = lists(rng, 300, seen), lists(rng, 60, seen)
    sft, prompts = [], []
    for s in train:
        prompt, n = rng.choice(TEMPLATES).format(s), len(s.split())
        said = n if rng.random() < P_RIGHT else n + 1
        sft.append({"prompt": prompt, "response": answer(said)})
        prompts.append({"prompt": prompt, "answer": str(n)})
    write("count_sft.jsonl", sft)
    write("count_prompts.jsonl", prompts)
    write("count_heldout.jsonl", [{"prompt": rng.choice(TEMPLATES).format(s), "answer": str(len(s.split()))}
                                  for s in heldout])


if __name__ == "__main__":
    main()
