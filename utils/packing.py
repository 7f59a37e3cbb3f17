"""Packing (padding-free micro-batches) for SFT, reward and DPO: `--packing`.

A packed micro-batch holds the same samples as the padded one, concatenated into rows instead of
each padded to the longest sample:

    padded   [a a a . . .]      packed  [a a a b b c]   position_ids [0 1 2 0 1 0]
             [b b . . . .]              [d d d d d .]                [0 1 2 3 4 0]
             [c . . . . .]
             [d d d d d .]

Rows are as long as the micro-batch's longest sample (never longer than --max_seq_len), so a packed
micro-batch never computes more tokens than the padded one. Position ids restart at 0 for every
sample and no attention mask is passed: transformers then builds a block-diagonal causal mask from
the position ids (`masking_utils.find_packed_sequence_indices`: a new sequence starts wherever the
position does not grow by one), so no token attends across samples, and flash-attention varlen on a
GPU reads the same position ids. Row padding forms its own block (positions 0, 1, ...) and is never read.

Every sample's first label is IGNORE: in a packed row the previous position belongs to another
sample, and a padded row never trains position 0 either. So `sft_loss` and `count_target_tokens`
give the padded numbers on packed rows unchanged. Per-sample read-outs (reward at the last token,
summed DPO log-probs) use the sample map the packer returns: `sample_row`, `sample_start`,
`sample_len` [N] and `segment_ids` [R, T] (the sample index of every position, -1 on padding), in the
order the samples were given. Samples stay in the micro-batch the stream drew them into, so a pair
(chosen, rejected) stays together, every rank runs the same number of micro-batches, and the
normalisation by the step's global token or pair counts is the padded one.

Verified for the families in PACKABLE (tests/test_packing.py compares packed and padded losses,
rewards and DPO log-probs per family). OPT builds its attention mask without the position ids, and
Bloom's ALiBi reads no positions at all, so their packed samples would attend to each other:
--packing is refused for them, and for any family not verified (Falcon: its causal LM packs, but its
sequence classifier does not pass the position ids on, so rewards would cross samples).
"""
from __future__ import annotations

import torch

from .encoding import IGNORE
from .errors import UserError

PACKABLE = ("llama", "qwen2", "gpt2", "mistral", "gemma", "qwen3", "phi", "phi3", "gpt_neox", "gptj")


def check_supported(model_name_or_path: str, trust_remote_code: bool = False) -> None:
    """Refuse --packing for a model family whose attention mask ignores packed position ids."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    family = config.get_text_config().model_type
    if family not in PACKABLE:
        raise UserError(f"--packing: the '{family}' model family is not supported (its attention would cross "
                        f"packed samples; verified: {', '.join(PACKABLE)}); run without --packing")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `capacity` tokens: longest first, each into the first
    row with room (ties by index, so the layout is deterministic). Every length must be <= capacity."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack(seqs: list[list[int]], labels: list[list[int]] | None, pad_id: int, capacity: int | None = None) -> dict:
    """Pack N token sequences into rows of `capacity` tokens (default: the longest sequence).

    Returns input_ids, position_ids [R, T] (T = the longest row), labels [R, T] when given (each
    sample's first label and the padding IGNORE), segment_ids [R, T] (sample index, -1 on padding),
    and the sample map sample_row, sample_start, sample_len [N]."""
    lengths = [len(s) for s in seqs]
    capacity = capacity or max(lengths)
    rows = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long) if labels is not None else None
    where = torch.zeros((3, len(seqs)), dtype=torch.long)  # row, start, length of every sample
    for r, row in enumerate(rows):
        start = 0
        for i in sorted(row):  # samples in their given order within a row
            n = lengths[i]
            ids[r, start:start + n] = torch.tensor(seqs[i], dtype=torch.long)
            pos[r, start:start + n] = torch.arange(n)
            seg[r, start:start + n] = i
            if lab is not None:
                lab[r, start + 1:start + n] = torch.tensor(labels[i][1:], dtype=torch.long)
            where[:, i] = torch.tensor([r, start, n])
            start += n
        pos[r, start:] = torch.arange(width - start)  # the padding is a block of its own
    out = {"input_ids": ids, "position_ids": pos, "segment_ids": seg,
           "sample_row": where[0], "sample_start": where[1], "sample_len": where[2]}
    if lab is not None:
        out["labels"] = lab
    return out


def is_packed(batch: dict) -> bool:
    return "segment_ids" in batch


def forward_inputs(batch: dict) -> dict:
    """The model inputs of a padded or packed batch. A packed batch passes no attention mask: that is
    what makes transformers derive the block-diagonal mask from the position ids."""
    if is_packed(batch):
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def sample_count(batch: dict) -> int:
    return batch["sample_len"].numel() if is_packed(batch) else batch["input_ids"].size(0)


def real_tokens(batch: dict) -> int:
    """Tokens of the samples themselves (no padding), for throughput."""
    return int(batch["sample_len"].sum() if is_packed(batch) else batch["attention_mask"].sum())


def last_token_scores(scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """scores [R, T] per position of a packed batch -> [N] at each sample's last token."""
    rows = batch["sample_row"].to(scores.device)
    cols = (batch["sample_start"] + batch["sample_len"] - 1).to(scores.device)
    return scores[rows, cols]


def sequence_logps(logits: torch.Tensor, batch: dict, fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums of log p over labelled tokens of a packed batch, and their counts: logits
    [R, T, V] -> ([N], [N]), the numbers `utils.losses.sequence_logps` gives on the padded batch."""
    shift_logits = logits[:, :-1, :]
    if fp32:
        shift_logits = shift_logits.float()
    labels, seg = batch["labels"][:, 1:], batch["segment_ids"][:, 1:]
    mask = labels != IGNORE  # also False on padding and on every sample's first token
    logp = torch.log_softmax(shift_logits, dim=-1).gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    n = batch["sample_len"].numel()
    idx = seg.masked_fill(~mask, 0).reshape(-1)
    sums = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, idx, (logp * mask).reshape(-1))
    counts = torch.zeros(n, dtype=torch.long, device=logp.device).index_add(0, idx, mask.reshape(-1).long())
    return sums, counts
