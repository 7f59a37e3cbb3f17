"""Synthetic malformed negatives for reward-model training.

A reward model trained only on (chosen, rejected) pairs that are both well-formed has never seen a
broken answer, so its score for one is arbitrary, and PPO finds the broken answers it over-scores
("The movie is and." scored at the clip limit). Pairing each chosen answer with a corrupted copy of
itself as an extra rejected answer teaches it that well-formed beats broken. The corruptions work on
token ids, the space PPO's actor generates in, and every one still ends with EOS:

  drop      one reply token removed              ("The movie is and lovely.")
  repeat    one reply token repeated 2-3 times    ("The movie is lovely lovely lovely.")
  truncate  the reply cut after its first k tokens ("The movie is")
  empty     no reply, only the EOS
"""
from __future__ import annotations

import random

from .encoding import IGNORE

KINDS = ("drop", "repeat", "truncate", "empty")


def corrupt_reply(reply: list[int], kind: str, eos_id: int, rng: random.Random) -> list[int]:
    """A corrupted copy of `reply` (its token ids, ending with `eos_id`), also ending with EOS."""
    body = reply[:-1] if reply and reply[-1] == eos_id else list(reply)
    if kind == "empty" or not body:
        return [eos_id]
    if kind == "drop":
        i = rng.randrange(len(body))
        return body[:i] + body[i + 1:] + [eos_id]
    if kind == "repeat":
        i = rng.randrange(len(body))
        return body[:i + 1] + [body[i]] * rng.randint(2, 3) + body[i + 1:] + [eos_id]
    if kind == "truncate":
        return body[:rng.randint(1, len(body) - 1)] + [eos_id] if len(body) > 1 else [eos_id]
    raise ValueError(f"unknown corruption {kind!r}; expected one of {KINDS}")


def synthetic_pairs(items: list, rate: float, eos_id: int, seed: int) -> list:
    """Extra pairs (chosen, corrupted chosen) for a `rate` share of `items` (rate >= 1: every item,
    int(rate) times, plus the fraction). Items are `utils.pairs.Pair`s; the kinds take turns."""
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    count = int(round(rate * len(items)))
    out = []
    for j in range(count):
        it = items[order[j % len(items)]]
        kind = KINDS[j % len(KINDS)]
        reply = it.chosen[it.prompt_len:]
        bad = it.chosen[:it.prompt_len] + corrupt_reply(reply, kind, eos_id, rng)
        if bad != it.chosen:
            labels = [IGNORE] * it.prompt_len + bad[it.prompt_len:]  # loss/log-probs on the reply and its EOS
            out.append(it._replace(rejected=bad, rejected_labels=labels, margin=0.0,
                                   where=f"{it.where} (synthetic {kind})"))
    return out
