"""Preference pairs as token ids and batches: the one encoding path of step 2 (reward model) and DPO.

A pair is prompt + chosen reply + EOS and prompt + rejected reply + EOS, encoded by
`Encoder.encode_reply` with the same prompt ids in front of both; labels mark the reply and its EOS only
(masks come from lengths, so an EOS equal to the pad id stays in the loss; pitfalls 1-3). Over-long
pairs follow --overlong as a whole.

Batch layouts (`collate_pairs`):
  concatenated   one right-padded batch of 2B rows, rows [0, B) chosen and [B, 2B) rejected:
                 input_ids, attention_mask, labels, position_ids [2B, T]; margin [B]; ref_logps [2B]
                 when the pairs carry precomputed reference log-probs (DPO)
  shared prompt  (reward model, --shared_prompt_forward) B left-padded prompts and 2B right-padded
                 replies, chosen and rejected of pair b in rows 2b and 2b + 1:
                 prompt_ids, prompt_mask [B, P]; reply_ids, reply_mask [2B, R]; margin [B]
  packed         (--packing) the 2B sequences of the concatenated layout, chosen first, packed into rows
                 with per-sample position ids (utils/packing.py); margin [B], ref_logps as above
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import packing
from .encoding import IGNORE, Encoder, encode_all, pad_batch, position_ids_from_mask


class Pair(NamedTuple):
    chosen: list[int]            # prompt + chosen reply + EOS
    chosen_labels: list[int]     # IGNORE on the prompt, the token ids on the reply and its EOS
    rejected: list[int]          # prompt + rejected reply + EOS
    rejected_labels: list[int]
    prompt_len: int              # leading tokens the two share (the rendered prompt)
    margin: float                # 0.0 when the row has none
    where: str                   # "file:line" (or "source row i")
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected), DPO


def encode_pairs(samples, encoder: Encoder, what: str, log=print) -> list[Pair]:
    """Samples with chosen and rejected -> Pairs (over-long pairs follow --overlong, counted in the log)."""
    encoded = encode_all(samples, lambda s: (encoder.encode_reply(s.prompt, s.chosen),
                                             encoder.encode_reply(s.prompt, s.rejected)), encoder, what, log)
    pairs = []
    for ((chosen, chosen_labels), (rejected, rejected_labels)), i in zip(encoded.items, encoded.kept):
        s = samples[i]
        prompt_len = next(t for t, label in enumerate(chosen_labels) if label != IGNORE)
        pairs.append(Pair(chosen, chosen_labels, rejected, rejected_labels, prompt_len, s.margin or 0.0, s.where))
    return pairs


def collate_pairs(items: list[Pair], pad_id: int, shared_prompt: bool = False, pack: bool = False) -> dict:
    """Pairs -> one batch in the concatenated layout, with `shared_prompt` the shared-prompt layout, or
    with `pack` the 2B sequences (chosen first) packed into rows (see the module docstring)."""
    margin = torch.tensor([it.margin for it in items], dtype=torch.float32)
    seqs = [it.chosen for it in items] + [it.rejected for it in items]
    labels = [it.chosen_labels for it in items] + [it.rejected_labels for it in items]
    ref = None
    if items[0].ref is not None:
        ref = torch.tensor([it.ref[0] for it in items] + [it.ref[1] for it in items])
    if pack:
        batch = {**packing.pack(seqs, labels, pad_id), "margin": margin}
        return batch if ref is None else {**batch, "ref_logps": ref}
    if shared_prompt:
        prompts = pad_batch([it.chosen[:it.prompt_len] for it in items], None, pad_id, left=True)
        replies = pad_batch([r for it in items for r in (it.chosen[it.prompt_len:], it.rejected[it.prompt_len:])],
                            None, pad_id)
        return {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"],
                "reply_ids": replies["input_ids"], "reply_mask": replies["attention_mask"], "margin": margin}
    batch = pad_batch(seqs, labels, pad_id)
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    batch["margin"] = margin
    if ref is not None:
        batch["ref_logps"] = ref
    return batch


def pair_tokens(batch: dict) -> int:
    """Real tokens of a batch's chosen and rejected sequences (the same count for either layout)."""
    if "prompt_ids" in batch:
        return int(2 * batch["prompt_mask"].sum() + batch["reply_mask"].sum())
    return packing.real_tokens(batch)
