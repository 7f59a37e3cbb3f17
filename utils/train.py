"""Pieces every training loop shares: the micro-batch stream, sharded evaluation, checkpoints, guards."""
from __future__ import annotations

import math
import os
import random
import re
import shutil
from pickle import UnpicklingError  # what torch.load(weights_only=True) raises; nothing is unpickled here

import numpy as np
import torch

from . import ds
from .args import resolve_data_settings, save_args
from .data import load_splits
from .encoding import Encoder
from .errors import UserError
from .metrics import MetricsLogger
from .model import load_tokenizer


class StepStream:
    """Micro-batches grouped by optimizer step, continuing across epochs so no data is left out.

    Each epoch draws a fresh permutation from (seed, epoch) (the reshuffle DeepSpeed-Chat forgot,
    pitfall 6). Global batches are contiguous slices of it and rank r takes the r-th piece of each,
    so the same global batch is seen whatever the world size (1 rank x 8 == 2 ranks x 4). The last
    global batch of an epoch is filled by wrapping around, so every rank runs the same number of
    micro-batches and collectives stay in lockstep. The position (epoch, micro-batch) is saved in
    checkpoints.
    """

    def __init__(self, items: list, batch_size: int, grad_accum: int, collate, seed: int):
        self.items, self.bs, self.ga, self.collate, self.seed = items, batch_size, grad_accum, collate, seed
        self.world, self.rank = ds.world_size(), ds.rank()
        span = batch_size * self.world  # samples per micro-batch over all ranks
        self.micro_per_epoch = math.ceil(len(items) / span)
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = None, None

    def steps_for(self, epochs: float) -> int:
        return max(1, int(epochs * self.micro_per_epoch) // self.ga)

    def _epoch_perm(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(self.items), generator=g).tolist()
            need = self.micro_per_epoch * self.bs * self.world
            self._perm = (perm * math.ceil(need / len(perm)))[:need]
            self._perm_epoch = self.epoch
        return self._perm

    def next_step(self) -> list:
        batches = []
        while len(batches) < self.ga:
            perm = self._epoch_perm()
            start = (self.offset * self.world + self.rank) * self.bs
            batches.append(self.collate([self.items[i] for i in perm[start: start + self.bs]]))
            self.offset += 1
            if self.offset >= self.micro_per_epoch:
                self.epoch, self.offset = self.epoch + 1, 0
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": len(self.items), "bs": self.bs,
                "ga": self.ga, "world": self.world}

    def load_state_dict(self, st: dict) -> None:
        now = {"n": len(self.items), "bs": self.bs, "ga": self.ga, "world": self.world}
        changed = {k: (st[k], v) for k, v in now.items() if st.get(k) != v}
        if changed:
            names = {"n": "training samples", "bs": "--per_device_train_batch_size",
                     "ga": "--gradient_accumulation_steps", "world": "world size"}
            detail = ", ".join(f"{names[k]} {a} -> {b}" for k, (a, b) in changed.items())
            raise UserError(f"--resume: the checkpoint was written with different settings ({detail}); "
                            "resuming would not continue the same run. Use the original settings or a new --output_dir")
        self.epoch, self.offset = st["epoch"], st["offset"]


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


def load_step_data(args, kind: str):
    """(tokenizer, encoder, train samples, eval samples) of a one-model step, read and validated before
    any model is loaded so bad input fails fast. Template and max_seq_len come from the flags, else
    from the input model's args.json."""
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    template, max_seq_len = resolve_data_settings(args, args.model_name_or_path)
    encoder = Encoder(tokenizer, template, max_seq_len, args.overlong)
    train, evals = load_splits(args.data_path, args.eval_data_path, args.eval_fraction, args.seed, kind,
                               log=ds.print0)
    return tokenizer, encoder, train, evals


def ds_config_from_args(args, world: int) -> dict:
    """The DeepSpeed config of a one-model step, from the shared flags."""
    return ds.ds_config(stage=args.zero_stage, offload=args.offload, dtype=args.dtype,
                        micro_batch=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
                        world=world, grad_clip=args.max_grad_norm)


def init_engine_from_args(args, model, cfg: dict, total_steps: int, lr: float | None = None):
    """The trained model's DeepSpeed engine, configured from the shared optimisation flags."""
    return ds.init_train_engine(model, cfg=cfg, lr=args.learning_rate if lr is None else lr,
                                weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                                offload=args.offload, scheduler=args.lr_scheduler_type,
                                warmup=args.num_warmup_steps, total_steps=total_steps)


def start_run(args, total_steps: int, resolved: dict) -> MetricsLogger:
    """Rank 0 writes OUTPUT_DIR/args.json (the flags plus the settings resolved at run time, which the
    next step inherits); every rank gets the metrics logger."""
    if ds.is_rank0():
        os.makedirs(args.output_dir, exist_ok=True)
        save_args(args, os.path.join(args.output_dir, "args.json"), resolved)
    return MetricsLogger(args.output_dir, args.enable_tensorboard, args.tensorboard_path, total_steps, args.resume)


def count_parameters(model) -> int:
    """Parameters of a model, also when ZeRO-3 has already partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def size_scaled_lr(n_params: int, anchor_lr: float, anchor_params: float = 7e9, max_lr: float = 1e-3) -> float:
    """A learning rate for `n_params` scaled from a known-good one at `anchor_params` by
    sqrt(anchor_params / n_params): larger models need smaller steps, and a tiny demo model needs
    far larger ones than a 7B model. Capped at `max_lr`."""
    return min(max_lr, anchor_lr * math.sqrt(anchor_params / max(n_params, 1)))


def to_device(batch: dict) -> dict:
    dev = ds.device()
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_finite(value: float, step: int, what: str = "loss") -> None:
    """Stop on NaN/inf, naming the step; checkpoints already written stay intact."""
    if not math.isfinite(value):
        raise UserError(f"{what} is {value} at step {step}; stopping (the last checkpoint is intact). "
                        "Lower --learning_rate or check the data")


# ----------------------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    """Every generator a step draws from, as tensors and plain Python data (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # sampling in PPO generation draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _weights_only_loader(engine) -> None:
    """Make `engine.load_checkpoint` read its files with `torch.load(weights_only=True)`.

    DeepSpeed's own loader unpickles anything (`weights_only=False`), so resuming from a tampered
    checkpoint could run code. Its files hold tensors and plain data plus four DeepSpeed classes (the
    ZeRO stage enum, the loss scalers and ZeRO-1/2's parameter-slice addresses), which are allowed by
    name; anything else is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except UnpicklingError as e:
                found = re.search(r"GLOBAL (\S+)", str(e))
                raise UserError(f"--resume: '{path}' holds {found.group(1) if found else 'an object'}, which is "
                                "neither a tensor nor plain data; it is not loaded") from None

    engine.checkpoint_engine.load = load


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(output_dir: str, step: int, engines: dict, client_state: dict, keep: int) -> None:
    """Engines' model/optimizer/scheduler states + client state, written under a temporary tag and
    renamed once every rank has finished, so a kill never leaves a half checkpoint (pitfall 19)."""
    root = checkpoint_dir(output_dir)
    tmp_tag, tag = f"tmp-step-{step}", f"step-{step}"
    state = dict(client_state, step=step, rng=ds.all_gather_objects(_rng_state()))
    for name, engine in engines.items():
        engine.save_checkpoint(os.path.join(root, tmp_tag), tag=name, client_state=state, save_latest=False)
    ds.barrier()
    if ds.is_rank0():
        final = os.path.join(root, tag)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(os.path.join(root, tmp_tag), final)
        done = sorted((d for d in os.listdir(root) if d.startswith("step-")), key=lambda d: int(d.split("-")[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old))
    ds.barrier()


def latest_checkpoint(output_dir: str) -> str | None:
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith("step-")]
    if not done:
        return None
    return os.path.join(root, max(done, key=lambda d: int(d.split("-")[1])))


def resume_step(args, engines: dict, stream, logger) -> int:
    """With --resume, restore the latest complete checkpoint (engines, RNG, data position) and return
    its step; 0 for a fresh start."""
    if not args.resume or not (ckpt := latest_checkpoint(args.output_dir)):
        return 0
    state = load_checkpoint(ckpt, engines)
    stream.load_state_dict(state["stream"])
    logger.write(f"resumed from {ckpt} at step {state['step']}")
    logger.advance(state["step"])
    return state["step"]


def load_checkpoint(path: str, engines: dict) -> dict:
    """Restore engines and RNG states; returns the client state (step, data position, ...)."""
    state = None
    for name, engine in engines.items():
        _weights_only_loader(engine)
        _, state = engine.load_checkpoint(path, tag=name)
        if state is None:
            raise UserError(f"--resume: checkpoint '{path}' has no state for '{name}'")
    _set_rng_state(state["rng"][ds.rank()])
    return state
