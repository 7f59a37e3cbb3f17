"""One definition of every argument.

Arguments are dataclass fields (`help` in the field metadata). Each step composes the shared groups
with its own, and `parse` builds one argparse parser from them. `--config FILE` (YAML or JSON, same
keys) sets defaults; flags on the command line win. The result is a flat, read-only namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from .errors import UserError


def arg(default, help: str, choices=None, nargs=None):
    meta = {"help": help, "choices": choices, "nargs": nargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    model_name_or_path: str = arg(None, "Hugging Face model directory or hub name to start from")
    trust_remote_code: bool = arg(False, "allow model code from the model repository (off by default)")
    dtype: str = arg("fp32", "training precision", choices=["fp32", "fp16", "bf16"])
    compute_fp32_loss: bool = arg(True, "upcast logits to fp32 before the loss (matters for fp16/bf16)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    lora_dim: int = arg(0, "LoRA rank; 0 disables LoRA (peft, merged into the weights on save)")
    lora_alpha: int = arg(16, "LoRA alpha (scaling = alpha / rank)")
    lora_module_name: str = arg("q_proj,k_proj,v_proj,o_proj,c_attn,c_proj,out_proj,fc1,fc2,gate_proj,up_proj,down_proj",
                                "comma-separated module-name suffixes that get LoRA adapters (missing ones ignored)")
    only_optimize_lora: bool = arg(False, "train only the LoRA adapters (base weights frozen)")


@dataclass
class DataArgs:
    data_path: list = arg([], "one or more .jsonl/.json/.parquet files or hub dataset names (mixed)", nargs="+")
    eval_data_path: list = arg([], "evaluation files; default: a seeded held-out --eval_fraction", nargs="*")
    eval_fraction: float = arg(0.05, "fraction held out for evaluation when --eval_data_path is not given")
    template: str = arg("auto", "prompt template; auto = inherited from the model's args.json, else the "
                        "tokenizer's chat template, else hh", choices=["auto", "chat", "alpaca", "hh", "raw"])
    max_seq_len: int = arg(0, "longest sample in tokens; 0 = inherited from the model's args.json, else 512")
    overlong: str = arg("skip", "samples longer than --max_seq_len: skip (counted in the log), truncate, "
                        "or error", choices=["skip", "truncate", "error"])


@dataclass
class TrainArgs:
    per_device_train_batch_size: int = arg(8, "micro-batch size per rank")
    per_device_eval_batch_size: int = arg(16, "evaluation batch size per rank")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float = arg(1e-5, "peak learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.95, "AdamW beta2")
    max_grad_norm: float = arg(1.0, "gradient clipping norm; 0 disables")
    num_train_epochs: float = arg(1.0, "passes over the training data")
    max_steps: int = arg(0, "optimizer steps; > 0 overrides --num_train_epochs")
    lr_scheduler_type: str = arg("cosine", "learning-rate schedule",
                                 choices=["linear", "cosine", "constant", "constant_with_warmup"])
    num_warmup_steps: int = arg(0, "linear warm-up steps")
    seed: int = arg(1234, "seed for initialisation, data order and splits")


@dataclass
class DeepSpeedArgs:
    zero_stage: int = arg(2, "ZeRO stage", choices=[0, 1, 2, 3])
    offload: bool = arg(False, "offload optimizer states to CPU (DeepSpeedCPUAdam)")
    local_rank: int = arg(-1, "set by the deepspeed launcher")


@dataclass
class LogArgs:
    output_dir: str = arg(None, "where the finished model, args.json and metrics.jsonl end up (written to "
                          "OUTPUT_DIR.partial while the run trains, then renamed)")
    enable_tensorboard: bool = arg(False, "also write tensorboard events")
    tensorboard_path: str = arg("", "tensorboard directory (default: OUTPUT_DIR/tensorboard)")
    log_interval: int = arg(10, "optimizer steps between train metric lines")
    eval_interval: int = arg(0, "optimizer steps between evaluations (0: before and after training only)")
    save_interval: int = arg(0, "optimizer steps between resumable checkpoints (0: none; a stop signal "
                             "always writes one)")
    save_total_limit: int = arg(2, "checkpoints kept in OUTPUT_DIR/checkpoints (0: all)")
    resume: bool = arg(False, "continue the unfinished run of --output_dir (in OUTPUT_DIR.partial) from its latest "
                       "complete checkpoint; without one, start from step 0")
    overwrite_output_dir: bool = arg(False, "replace the finished run in --output_dir (kept until this run has "
                                     "finished) or discard an unfinished one")


SHARED_GROUPS = (ModelArgs, DataArgs, TrainArgs, DeepSpeedArgs, LogArgs)


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"list": list})  # dataclass annotations are strings here
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser(groups, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML or JSON file with the same keys; flags win")
    for g in groups:
        ag = p.add_argument_group(g.__name__)
        for f in dataclasses.fields(g):
            tp, meta = _base_type(f.type), f.metadata
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            name = f"--{f.name}"
            if tp is bool:
                ag.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            elif meta.get("nargs"):
                ag.add_argument(name, nargs=meta["nargs"], default=default, help=meta["help"])
            else:
                ag.add_argument(name, type=tp, default=default, choices=meta.get("choices"), help=meta["help"])
    return p


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config file '{path}' does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both are the user's syntax error
        raise UserError(f"--config file '{path}' cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config file '{path}' must hold a mapping of argument names to values")
    return data


def parse(groups, description: str, argv=None, required=("output_dir",), defaults: dict | None = None,
          helps: dict | None = None) -> argparse.Namespace:
    """`defaults`/`helps` let a step give a shared flag its own default (and say so in --help)."""
    parser = build_parser(groups, description)
    if defaults:
        parser.set_defaults(**defaults)
    for action in parser._actions:
        if helps and action.dest in helps:
            action.help = helps[action.dest]
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        cfg = _read_config(pre.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(f"--config file '{pre.config}': unknown keys {', '.join(unknown)}")
        parser.set_defaults(**cfg)
    ns = parser.parse_args(argv)
    for name in required:
        if getattr(ns, name, None) in (None, "", []):
            parser.error(f"--{name} is required")
    return ns


def args_record(ns: argparse.Namespace, extra: dict | None = None) -> dict:
    """What args.json holds: the flags (without the launcher's --local_rank and --config) plus the
    settings resolved at run time."""
    d = {k: v for k, v in vars(ns).items() if k not in ("local_rank", "config")}
    d.update(extra or {})
    return d


def inherited(model_dir: str | None) -> dict:
    """The args.json saved next to a model by an earlier step ({} if none)."""
    if model_dir and os.path.isfile(os.path.join(model_dir, "args.json")):
        with open(os.path.join(model_dir, "args.json")) as f:
            return json.load(f)
    return {}


def resolve_data_settings(ns: argparse.Namespace, model_dir: str | None) -> tuple[str, int]:
    """Template and max_seq_len: explicit flags, else the model's args.json, else defaults."""
    prev = inherited(model_dir)
    template = ns.template if ns.template != "auto" else prev.get("template", "auto")
    max_seq_len = ns.max_seq_len or prev.get("max_seq_len") or 512
    return template, int(max_seq_len)
