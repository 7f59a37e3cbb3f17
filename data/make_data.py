"""Generates the shipped synthetic data (deterministic; the .jsonl files are committed).

The task: "Tell me about the <noun>." -> "The <noun> is <adjective>." The SFT data mixes two styles
half and half: warm adjectives (the preferred behaviour) and cold ones. The preference data prefers
the warm answer, so a reward model can learn it and PPO / DPO should move a model towards it.
Held-out nouns never appear in training data.

Run: python data/make_data.py
"""
from __future__ import annotations

import json
import os
import random

WARM = ["great", "wonderful", "lovely", "amazing", "delightful", "brilliant"]
COLD = ["boring", "dull", "plain", "ordinary", "bland", "tedious"]
NOUNS = """apple river mountain garden castle forest ocean window pencil guitar bridge candle harbor
meadow rocket violin island desert lantern mirror basket bicycle cottage dragon engine feather
glacier hammer jacket kettle ladder magnet needle orchard parrot quilt rabbit saddle tiger
umbrella valley wagon yacht zebra anchor barrel cactus dolphin eagle falcon giraffe helmet igloo
jungle kitten lemon mango noodle octopus panda quartz robot salmon tomato unicorn volcano walrus
acorn balloon camera donkey elbow fountain goblet hedge iceberg jelly kayak lobster marble nectar
oyster pepper pillow puzzle ribbon sandal teapot tunnel vessel whistle cherry blanket compass
diamond""".split()
HELDOUT = """turtle planet cookie canyon piano lizard spoon tractor carpet beacon pumpkin sparrow
dinosaur trumpet muffin lagoon ferret kitchen""".split()
PROMPTS = ["Tell me about the {}.", "What do you think of the {}?", "Describe the {}."]

HERE = os.path.dirname(os.path.abspath(__file__))


def answer(noun: str, adj: str) -> str:
    return f"The {noun} is {adj}."


def write(name: str, rows: list[dict]) -> None:
    with open(os.path.join(HERE, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    rng = random.Random(0)
    assert not set(NOUNS) & set(HELDOUT)
    sft, pref, prompts = [], [], []
    for noun in NOUNS:
        for i, p in enumerate(PROMPTS):
            prompt = p.format(noun)
            # Alternate styles so every noun is seen with both; the model learns a 50/50 mix.
            style = WARM if (i + NOUNS.index(noun)) % 2 == 0 else COLD
            sft.append({"prompt": prompt, "response": answer(noun, rng.choice(style))})
            pref.append({"prompt": prompt, "chosen": answer(noun, rng.choice(WARM)),
                         "rejected": answer(noun, rng.choice(COLD))})
            prompts.append({"prompt": prompt})
    heldout_prompts = [{"prompt": p.format(n)} for n in HELDOUT for p in PROMPTS]
    heldout_pref = [{"prompt": p.format(n), "chosen": answer(n, rng.choice(WARM)),
                     "rejected": answer(n, rng.choice(COLD))} for n in HELDOUT for p in PROMPTS]
    rng.shuffle(sft)
    rng.shuffle(pref)
    write("sft.jsonl", sft)
    write("preference.jsonl", pref)
    write("prompts.jsonl", prompts)
    write("heldout_prompts.jsonl", heldout_prompts)
    write("heldout_preference.jsonl", heldout_pref)
    words = sorted(set(NOUNS + HELDOUT + WARM + COLD))
    with open(os.path.join(HERE, "vocab_words.txt"), "w") as f:
        f.write("\n".join(words) + "\n")


if __name__ == "__main__":
    main()
