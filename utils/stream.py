"""Data streaming for the training loops: the micro-batch stream of optimizer steps and the sharded
evaluation batches."""
from __future__ import annotations

import math

import torch

from . import ds
from .errors import UserError


class StepStream:
    """Micro-batches grouped by optimizer step, continuing across epochs so no data is left out.

    Each epoch draws a fresh permutation from (seed, epoch) (the reshuffle DeepSpeed-Chat forgot,
    pitfall 6) and is cut into global batches of `batch_size x grad_accum x world` samples, the last
    one filled by wrapping around, so every rank runs the same number of micro-batches and collectives
    stay in lockstep. Micro-batch m of a step is the m-th slice of `batch_size x world` samples of its
    global batch and rank r takes the r-th piece of it. So the samples of every step depend only on the
    global batch size: 1 rank x 16, 2 ranks x 8 and 2 ranks x 4 x 2 accumulation steps see the same
    global batches. The saved position (epoch, samples consumed in it) is world-size independent, so a
    checkpoint resumes at the same next sample under any split of the same global batch.
    """

    def __init__(self, items: list, batch_size: int, grad_accum: int, collate, seed: int):
        self.items, self.bs, self.ga, self.collate, self.seed = items, batch_size, grad_accum, collate, seed
        self.world, self.rank = ds.world_size(), ds.rank()
        self.span = batch_size * self.world  # samples per micro-batch over all ranks
        self.global_batch = self.span * grad_accum
        if self.global_batch > len(items):  # an "epoch" of one step repeating each sample many times
            raise UserError(f"the global batch (--per_device_train_batch_size {batch_size} x "
                            f"--gradient_accumulation_steps {grad_accum} x {self.world} rank(s) = {self.global_batch}) "
                            f"is larger than the {len(items)} training samples; every step would repeat samples")
        self.steps_per_epoch = math.ceil(len(items) / self.global_batch)
        self.epoch, self.step_in_epoch = 0, 0
        self._perm_epoch, self._perm = None, None

    def steps_for(self, epochs: float) -> int:
        return max(1, int(epochs * self.steps_per_epoch))

    def _epoch_perm(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(self.items), generator=g).tolist()
            need = self.steps_per_epoch * self.global_batch
            self._perm = (perm * math.ceil(need / len(perm)))[:need]
            self._perm_epoch = self.epoch
        return self._perm

    def next_step(self) -> list:
        perm = self._epoch_perm()
        base = self.step_in_epoch * self.global_batch + self.rank * self.bs
        batches = [self.collate([self.items[i] for i in perm[base + m * self.span: base + m * self.span + self.bs]])
                   for m in range(self.ga)]
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "sample": self.step_in_epoch * self.global_batch, "n": len(self.items),
                "global_batch": self.global_batch, "split": f"{self.bs} x {self.ga} x {self.world}"}

    def load_state_dict(self, st: dict) -> None:
        check_resumable(st, self.state_dict())
        self.epoch, self.step_in_epoch = st["epoch"], st["sample"] // self.global_batch


def check_resumable(st: dict, now: dict) -> None:
    """Refuse a saved stream position `st` that the stream whose position is `now` cannot continue (other
    data, another global batch). The Checkpointer calls it first with the positions kept in the
    checkpoint's meta.json, before it loads (or converts) any model state."""
    if "sample" not in st:
        raise UserError("--resume: the checkpoint's data position is in an older format (per world size); "
                        "start a new run with --overwrite_output_dir")
    if st["n"] != now["n"]:
        raise UserError(f"--resume: the checkpoint was written with {st['n']} training samples, now there are "
                        f"{now['n']}; resuming would not continue the same run. Use the original data or "
                        "--overwrite_output_dir")
    if st["global_batch"] != now["global_batch"]:
        raise UserError(
            f"--resume: the checkpoint was written with a global batch of {st['global_batch']} samples, now it "
            f"is {now['global_batch']} (per-device batch x accumulation x ranks: {now.get('split', '?')}); "
            "a resumed run must keep the global batch (another world size is fine: adjust the per-device "
            "batch size or --gradient_accumulation_steps)")


def eval_batches(items: list, batch_size: int, collate):
    """This rank's evaluation batches and a 0/1 `valid` tensor per batch.

    Items are dealt round-robin; every rank runs the same number of batches (ZeRO-3 forwards are
    collective), and filler rows repeat item 0 with valid = 0 so each item counts exactly once.
    """
    r, w = ds.rank(), ds.world_size()
    mine = list(range(r, len(items), w))
    per_rank = math.ceil(len(items) / w)
    n_batches = math.ceil(per_rank / batch_size)
    mine += [-1] * (n_batches * batch_size - len(mine))
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        valid = torch.tensor([i >= 0 for i in chunk], dtype=torch.float32)
        batch = collate([items[max(i, 0)] for i in chunk])
        yield batch, valid
