"""What the steps share around their loops: data loading, the engine from the shared flags,
the run's start and finish in its output directory, and guards. Checkpoints are in utils/checkpoint.py,
the data stream in utils/stream.py, output directories in utils/output.py."""
from __future__ import annotations

import math
import os

import torch
from transformers import AutoModelForCausalLM

from . import ds, packing
from .args import args_record, max_seq_len_flag, resolve_data_settings
from .data import load_splits
from .encoding import Encoder, encode_all
from .errors import UserError
from .lr import scaled_lr
from .metrics import MetricsLogger
from .model import check_positions, load_model, load_tokenizer, position_limit, prepare_model
from .negatives import with_synthetic_negatives
from .output import finish_output_dir, partial_dir, prepare_partial
from .pairs import encode_pairs
from .stream import StepStream


def load_step_items(args, kind: str, world: int, note: str = ""):
    """(tokenizer, encoder, train items, eval items) of a one-model step, read, validated and encoded
    before any model is loaded so bad input fails fast. kind "sft": prompt/response rows; "pairs":
    preference pairs (plus --synthetic_negatives where the step has that flag). Template and max_seq_len
    come from the flags, else from the input model's args.json."""
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    template, max_seq_len = resolve_data_settings(args, args.model_name_or_path,
                                                  position_limit(args.model_name_or_path, args.trust_remote_code))
    check_positions(args.model_name_or_path, max_seq_len, max_seq_len_flag(args, args.model_name_or_path),
                    trust_remote_code=args.trust_remote_code)
    encoder = Encoder(tokenizer, template, max_seq_len, args.overlong)
    train, evals = load_splits(args.data_path, args.eval_data_path, args.eval_fraction, args.seed, kind,
                               log=ds.print0)
    if args.packing:
        packing.check_supported(args.model_name_or_path, args.trust_remote_code)
    def encode(rows, what):
        if kind == "sft":
            return encode_all(rows, lambda s: (encoder.encode_sft(s),), encoder, what, ds.print0).items
        return encode_pairs(rows, encoder, what, ds.print0)

    train, evals = encode(train, "train"), encode(evals, "eval")
    unit = ""
    if kind == "pairs":
        train = with_synthetic_negatives(train, args.synthetic_negatives, args.synthetic_negative_kinds,
                                         encoder.eos_id, encoder.max_seq_len, args.seed, ds.print0)
        unit = "_pairs"
    ds.print0(f"template={encoder.template} max_seq_len={encoder.max_seq_len} train{unit}={len(train)} "
              f"eval{unit}={len(evals)} world={world}{note}")
    return tokenizer, encoder, train, evals


def ds_config_from_args(args, world: int) -> dict:
    """The DeepSpeed config of a one-model step, from the shared flags."""
    ds.check_dtype(args.dtype)
    return ds.ds_config(stage=args.zero_stage, offload=args.offload, dtype=args.dtype,
                        micro_batch=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
                        world=world, grad_clip=args.max_grad_norm)


def init_engine_from_args(args, step: str, model, cfg: dict, items: list, collate_fn, encoder, world: int):
    """The trained model's data stream and DeepSpeed engine, configured from the shared flags: the run
    lasts --max_steps or --num_train_epochs over `items`; the rate is the flag, else `step`'s rate
    scaled to the model's size (utils/lr.py). Returns (engine, stream, resolved): resolved holds the
    settings decided at run time, which args.json records and the next step inherits."""
    stream = StepStream(items, args.per_device_train_batch_size, args.gradient_accumulation_steps, collate_fn,
                        args.seed)
    total_steps = args.max_steps or stream.steps_for(args.num_train_epochs)
    lr = scaled_lr(step, model, args.learning_rate)
    ds.print0(f"learning_rate={lr:.3g}{' (scaled to the model size)' if not args.learning_rate else ''}")
    engine = ds.init_train_engine(model, cfg=cfg, lr=lr, weight_decay=args.weight_decay,
                                  betas=(args.adam_beta1, args.adam_beta2), offload=args.offload,
                                  scheduler=args.lr_scheduler_type, warmup=args.num_warmup_steps,
                                  total_steps=total_steps)
    resolved = {"template": encoder.template, "max_seq_len": encoder.max_seq_len, "world_size": world,
                "total_steps": total_steps, "step": step, "learning_rate": lr}
    return engine, stream, resolved


def init_causal_lm_engine(args, step: str, items: list, collate_fn, encoder, world: int):
    """init_engine_from_args for a step that trains a causal LM from --model_name_or_path (SFT, DPO):
    the model loaded (under ZeRO-3 straight into its shards) and prepared (LoRA, frozen parts, dropout)."""
    cfg = ds_config_from_args(args, world)
    model = load_model(AutoModelForCausalLM, args.model_name_or_path, dtype=args.dtype,
                       trust_remote_code=args.trust_remote_code, zero3_config=cfg)
    return init_engine_from_args(args, step, prepare_model(model, args), cfg, items, collate_fn, encoder, world)


def start_run(args, total_steps: int, resolved: dict) -> MetricsLogger:
    """The run's directory (OUTPUT_DIR.partial until it finishes, see utils/output.py) and the metrics
    logger of every rank; the logger writes args.json (the flags plus the settings resolved at run time,
    which the next step inherits) once the loop's start-up checks have passed."""
    run_dir = partial_dir(args.output_dir)
    if ds.is_rank0():
        prepare_partial(args)
    ds.barrier()
    tb = args.tensorboard_path or os.path.join(run_dir, "tensorboard")
    out = os.path.normpath(args.output_dir)
    if os.path.normpath(tb).startswith(out + os.sep):  # inside OUTPUT_DIR: it moves with the run
        tb = os.path.join(run_dir, os.path.relpath(tb, out))
    return MetricsLogger(run_dir, args.enable_tensorboard, tb, total_steps, args_record(args, resolved))


def finish_run(args, resolved: dict) -> None:
    """After every model of the run is saved in its partial directory: rank 0 writes done.json and
    renames the directory to OUTPUT_DIR, replacing an earlier finished run only now."""
    if ds.is_rank0():
        finish_output_dir(args, resolved)
    ds.barrier()
    ds.print0(f"saved {os.path.normpath(args.output_dir)}")


def to_device(batch: dict) -> dict:
    dev = ds.device()
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_finite(value: float, step: int, what: str = "loss") -> None:
    """Stop on NaN/inf, naming the step; checkpoints already written stay intact."""
    if not math.isfinite(value):
        raise UserError(f"{what} is {value} at step {step}; stopping (the last checkpoint is intact). "
                        "Lower --learning_rate or check the data")
