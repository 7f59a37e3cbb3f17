"""Synthetic malformed negatives for reward-model and DPO training.

A reward model trained only on (chosen, rejected) pairs that are both well-formed has never seen a
broken answer, so its score for one is arbitrary, and PPO finds the broken answers it over-scores
("The movie is and." scored at the clip limit). Pairing each chosen answer with a corrupted copy of
itself as an extra rejected answer teaches it that well-formed beats broken. The corruptions work on
token ids, the space PPO's actor generates in, and every one still ends with EOS:

  drop      one reply token removed              ("The movie is and lovely.")
  drop_span a run of 2 to half the reply's tokens removed, anywhere in it ("The lovely.", "is lovely.",
            "My visit to the charming."): words spelt in several pieces lose more than one token when a
            slot goes missing, which one dropped token rarely imitates
  repeat    one reply token repeated 2-3 times    ("The movie is lovely lovely lovely.")
  repeat_span a run of 2 to max(4, half the reply's) tokens said once or twice more right after itself
            ("lovely and lovely and", "..., because it is dull, because it is dull."): a word spelt in
            several pieces repeated whole, or a clause said again, the longer answer a reward model that
            learned "longer is better" over-scores (length hacking)
  truncate  the reply cut after its first k tokens ("The movie is")
  empty     no reply, only the EOS
  replace   one reply token replaced by another token that occurs in the training replies
            ("The movie is sup lendid." for "splendid": the misspelt words PPO finds otherwise)
  swap      two neighbouring reply tokens exchanged ("The movie lovely is.")

Step 2 trains on them by default. DPO takes the same pairs with its own --synthetic_negatives, off by
default: on the alignment suite they stopped DPO's repeated words and clauses and broke a task whose
preferred answer is the shorter one (bench/alignment/EXPERIMENTS.md).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .args import arg
from .encoding import IGNORE

KINDS = ("drop", "drop_span", "repeat", "repeat_span", "truncate", "empty", "replace", "swap")
# What --synthetic_negatives takes by default. repeat_span joined on 2026-12-06: without it PPO on the
# alignment suite's detail task (the longer answer preferred) climbed a reward model that learned "longer
# is better" by saying a clause again and again. replace and swap are offered but not on by default: on
# the cold_start task they moved PPO's outcome less than the PPO seed did (README).
DEFAULT_KINDS = ("drop", "drop_span", "repeat", "repeat_span", "truncate", "empty")


@dataclass
class NegativeArgs:
    """The flags of the steps that train on preference pairs: step 2 as written here; DPO's `parse` call
    gives --synthetic_negatives its own default (0) and help."""
    synthetic_negatives: float = arg(1.0, "extra training pairs per pair whose rejected answer is a corrupted copy "
                                     "of the chosen one (see --synthetic_negative_kinds; utils/negatives.py), so "
                                     "broken answers score below well-formed ones and PPO cannot exploit them; 0 "
                                     "disables", ge=0)
    synthetic_negative_kinds: list = arg(list(DEFAULT_KINDS), "the corruptions --synthetic_negatives takes in "
                                         "turn: drop, drop_span, repeat, repeat_span, truncate, empty, and also "
                                         "replace (a token swapped for another reply token: misspelt words) and "
                                         "swap (two neighbouring tokens exchanged)",
                                         choices=list(KINDS), nargs="+")


def corrupt_reply(reply: list[int], kind: str, eos_id: int, rng: random.Random,
                  vocab: list[int] | None = None) -> list[int]:
    """A corrupted copy of `reply` (its token ids, ending with `eos_id`), also ending with EOS; `replace`
    draws the new token from `vocab`. A reply too short for the kind comes back unchanged."""
    body = reply[:-1] if reply and reply[-1] == eos_id else list(reply)
    if kind == "replace":
        if not vocab:
            raise ValueError("the 'replace' corruption needs the token ids to draw from")
        if not body or len(vocab) < 2:
            return body + [eos_id]
        i = rng.randrange(len(body))
        new = rng.choice(vocab)
        while new == body[i]:  # a draw, not a copy of the vocabulary per pair: real vocabularies are large
            new = rng.choice(vocab)
        return body[:i] + [new] + body[i + 1:] + [eos_id]
    if kind == "swap":
        pos = [i for i in range(len(body) - 1) if body[i] != body[i + 1]]
        if not pos:
            return body + [eos_id]
        i = rng.choice(pos)
        return body[:i] + [body[i + 1], body[i]] + body[i + 2:] + [eos_id]
    if kind == "empty" or not body:
        return [eos_id]
    if kind == "drop":
        return _without_run(body, 1, rng) + [eos_id]
    if kind == "drop_span":  # a reply of under 3 tokens has no run of 2+ that leaves something: one token goes
        n = rng.randint(2, max(2, len(body) // 2)) if len(body) >= 3 else 1
        return _without_run(body, n, rng) + [eos_id]
    if kind == "repeat_span" and len(body) >= 2:
        return _with_run_repeated(body, rng.randint(2, min(len(body), max(4, len(body) // 2))), rng, 1, 2) + [eos_id]
    if kind in ("repeat", "repeat_span"):  # repeat_span of a one-token reply: that token repeated
        return _with_run_repeated(body, 1, rng, 2, 3) + [eos_id]
    if kind == "truncate":
        return body[:rng.randint(1, len(body) - 1)] + [eos_id] if len(body) > 1 else [eos_id]
    raise ValueError(f"unknown corruption {kind!r}; expected one of {KINDS}")


def _without_run(body: list[int], n: int, rng: random.Random) -> list[int]:
    """`body` with a run of `n` tokens removed at a random place."""
    i = rng.randrange(len(body) - n + 1)
    return body[:i] + body[i + n:]


def _with_run_repeated(body: list[int], n: int, rng: random.Random, lo: int, hi: int) -> list[int]:
    """`body` with a run of `n` tokens at a random place followed by lo..hi more copies of itself."""
    i = rng.randrange(len(body) - n + 1)
    return body[:i + n] + body[i:i + n] * rng.randint(lo, hi) + body[i + n:]


def reply_tokens(items: list, eos_id: int) -> list[int]:
    """The token ids that occur in the replies (chosen and rejected) of `items`, EOS left out."""
    seen = set()
    for it in items:
        seen.update(it.chosen[it.prompt_len:])
        seen.update(it.rejected[it.prompt_len:])
    seen.discard(eos_id)
    return sorted(seen)


def synthetic_pairs(items: list, rate: float, eos_id: int, seed: int, kinds=DEFAULT_KINDS) -> list:
    """Extra pairs (chosen, corrupted chosen) for a `rate` share of `items` (rate >= 1: every item,
    int(rate) times, plus the fraction). Items are `utils.pairs.Pair`s; the `kinds` take turns."""
    rng = random.Random(seed)
    vocab = reply_tokens(items, eos_id) if "replace" in kinds else None
    # A chosen answer cut at --max_seq_len (--overlong truncate) has no EOS: it is broken itself, and its
    # corrupted copies end with one, so they would teach that an answer which never ends beats one that does.
    items = [it for it in items if it.chosen[-1:] == [eos_id]]
    if not items:
        return []
    order = list(range(len(items)))
    rng.shuffle(order)
    count = int(round(rate * len(items)))
    out = []
    for j in range(count):
        it = items[order[j % len(items)]]
        kind = kinds[j % len(kinds)]
        reply = it.chosen[it.prompt_len:]
        bad = it.chosen[:it.prompt_len] + corrupt_reply(reply, kind, eos_id, rng, vocab)
        if bad != it.chosen:
            labels = [IGNORE] * it.prompt_len + bad[it.prompt_len:]  # loss/log-probs on the reply and its EOS
            out.append(it._replace(rejected=bad, rejected_labels=labels, margin=0.0,
                                   where=f"{it.where} (synthetic {kind})"))
    return out


def with_synthetic_negatives(items: list, rate: float, kinds, eos_id: int, max_seq_len: int, seed: int,
                             print0=print) -> list:
    """`items` plus `synthetic_pairs` of them (those that fit `max_seq_len`), with one log line."""
    if rate <= 0:
        return items
    made = synthetic_pairs(items, rate, eos_id, seed, tuple(kinds))
    extra = [p for p in made if len(p.rejected) <= max_seq_len]
    cut = sum(it.chosen[-1:] != [eos_id] for it in items)
    print0(f"synthetic negatives: {len(extra)} pairs of a chosen answer and a corrupted copy of it"
           + (f"; {len(made) - len(extra)} longer than --max_seq_len {max_seq_len} left out" if len(made) > len(extra)
              else "")
           + (f"; none of the {cut} chosen answers cut at --max_seq_len (no EOS)" if cut else ""))
    return items + extra
