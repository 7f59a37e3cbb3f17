"""One definition of every argument.

Arguments are dataclass fields (`help`, `choices` and the allowed range in the field metadata). Each
step composes the shared groups with its own, and `parse` builds one argparse parser from them.
`--config FILE` (YAML or JSON, same keys) sets defaults; flags on the command line win. Values from
the file go through the same types, choices and ranges as flags (a scalar where a list is expected
becomes a one-element list), and every range is checked once parsing is done, before anything is
loaded, so a bad value is one line naming the flag or the key. The result is a flat namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

from .errors import UserError

LIMITS = ("gt", "ge", "lt", "le")  # value > gt, >= ge, < lt, <= le


def arg(default, help: str, choices=None, nargs=None, *, gt=None, ge=None, lt=None, le=None, comma=False):
    """A flag. `gt`/`ge`/`lt`/`le` bound a numeric value (checked for flags and --config values alike).
    `comma`: a comma-separated string, which a --config file may also give as a list."""
    limits = {k: v for k, v in zip(LIMITS, (gt, ge, lt, le)) if v is not None}
    meta = {"help": help, "choices": choices, "nargs": nargs, "limits": limits, "comma": comma}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def describe_limits(limits: dict) -> str:
    """{"gt": 0} -> "> 0"; {"ge": 0, "lt": 1} -> "in [0, 1)"."""
    lo = ("(", limits["gt"]) if "gt" in limits else ("[", limits["ge"]) if "ge" in limits else None
    hi = (")", limits["lt"]) if "lt" in limits else ("]", limits["le"]) if "le" in limits else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {_num(lo[1])}"
    return f"{'<' if hi[0] == ')' else '<='} {_num(hi[1])}"


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _rule(limits: dict, value) -> str:
    finite = not (isinstance(value, float) and not math.isfinite(value))
    if not limits:
        return "a finite number"
    return describe_limits(limits) if finite else f"a finite number {describe_limits(limits)}"


def within(value, limits: dict) -> bool:
    """In range, and finite: nan compares false with every bound, and inf passed every lower bound (an
    inf learning rate, beta or KL coefficient ran to a nan loss; inf epochs overflowed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if value is None or not limits:
        return True
    return (("gt" not in limits or value > limits["gt"]) and ("ge" not in limits or value >= limits["ge"])
            and ("lt" not in limits or value < limits["lt"]) and ("le" not in limits or value <= limits["le"]))


@dataclass
class ModelArgs:
    model_name_or_path: str = arg(None, "Hugging Face model directory or hub name to start from")
    trust_remote_code: bool = arg(False, "allow model code from the model repository (off by default)")
    dtype: str = arg("fp32", "training precision", choices=["fp32", "fp16", "bf16"])
    compute_fp32_loss: bool = arg(True, "upcast logits to fp32 before the loss (matters for fp16/bf16)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    lora_dim: int = arg(0, "LoRA rank; 0 disables LoRA (peft, merged into the weights on save)", ge=0)
    lora_alpha: int = arg(16, "LoRA alpha (scaling = alpha / rank)", gt=0)
    lora_module_name: str = arg("all-linear",
                                "modules that get LoRA adapters: all-linear (every Linear/Conv1D layer but the output "
                                "head, in any model family) or comma-separated module-name suffixes such as "
                                "q_proj,v_proj (missing ones ignored; a --config file may give a list)", comma=True)
    only_optimize_lora: bool = arg(False, "train only the LoRA adapters (base weights frozen)")
    freeze_embeddings: str = arg("none", "token embeddings kept fixed: input, output (the LM head), both, or none "
                                 "(tied embeddings are one matrix: input, output and both are the same)",
                                 choices=["none", "input", "output", "both"])
    disable_dropout: bool = arg(True, "set every dropout rate of the model(s) to 0 (modules and the rates HF code "
                                "reads; the saved config keeps its values)")


@dataclass
class DataArgs:
    data_path: list = arg([], "one or more .jsonl/.json/.parquet files or hub dataset names (mixed)", nargs="+")
    eval_data_path: list = arg([], "evaluation files; default: a seeded held-out --eval_fraction", nargs="*")
    eval_fraction: float = arg(0.05, "fraction held out for evaluation when --eval_data_path is not given",
                               gt=0, lt=1)
    template: str = arg("auto", "prompt template; auto = inherited from the model's args.json, else the "
                        "tokenizer's chat template, else hh", choices=["auto", "chat", "alpaca", "hh", "raw"])
    max_seq_len: int = arg(0, "longest sample in tokens; 0 = inherited from the model's args.json, else 512 "
                           "(the model's positions where it has fewer)",
                           ge=0)
    overlong: str = arg("skip", "samples longer than --max_seq_len: skip, truncate (each counted in the log), "
                        "or error", choices=["skip", "truncate", "error"])
    packing: bool = arg(False, "training micro-batches concatenate their samples into rows (position ids restart "
                        "per sample, attention never crosses samples) instead of padding each to the longest "
                        "one; the same losses (utils/packing.py); the families utils/packing.py verifies, PACKABLE")


@dataclass
class TrainArgs:
    per_device_train_batch_size: int = arg(8, "micro-batch size per rank", ge=1)
    per_device_eval_batch_size: int = arg(16, "evaluation batch size per rank", ge=1)
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step", ge=1)
    learning_rate: float = arg(0.0, "peak learning rate; 0 = scaled to the model size (utils/lr.py)", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norms)", ge=0)
    adam_beta1: float = arg(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = arg(0.95, "AdamW beta2", ge=0, lt=1)
    max_grad_norm: float = arg(1.0, "gradient clipping norm; 0 disables", ge=0)
    num_train_epochs: float = arg(1.0, "passes over the training data", gt=0)
    max_steps: int = arg(0, "optimizer steps; > 0 overrides --num_train_epochs", ge=0)
    lr_scheduler_type: str = arg("cosine", "learning-rate schedule",
                                 choices=["linear", "cosine", "constant", "constant_with_warmup"])
    num_warmup_steps: int = arg(0, "linear warm-up steps", ge=0)
    seed: int = arg(1234, "seed for initialisation, data order and splits", ge=0, le=2**32 - 1)


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
    log_interval: int = arg(10, "optimizer steps between train metric lines", ge=1)
    eval_interval: int = arg(0, "optimizer steps between evaluations (0: before and after training only)", ge=0)
    save_interval: int = arg(0, "optimizer steps between resumable checkpoints (0: none; a stop signal "
                             "always writes one)", ge=0)
    save_total_limit: int = arg(2, "checkpoints kept in OUTPUT_DIR/checkpoints (0: all)", ge=0)
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


@dataclass(frozen=True)
class Spec:
    """What parsing needs to know about one flag."""
    name: str
    type: type
    default: object
    choices: list | None
    nargs: str | None
    limits: dict
    help: str
    comma: bool = False


def specs_of(groups, limits: dict | None = None) -> dict[str, Spec]:
    """name -> Spec for every field of `groups`; `limits` replaces a field's range for one step."""
    out = {}
    for g in groups:
        for f in dataclasses.fields(g):
            meta = f.metadata
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = Spec(f.name, _base_type(f.type), default, meta.get("choices"), meta.get("nargs"),
                               dict((limits or {}).get(f.name, meta.get("limits") or {})), meta["help"],
                               meta.get("comma", False))
    return out


# Flags other trainers (transformers' Trainer, TRL, DeepSpeed-Chat, OpenRLHF) spell differently: a name a
# user brings -> this pipeline's flags that do its job (the first one the step has is named), or a note.
OTHER_NAMES = {
    "bf16": ["--dtype bf16"], "fp16": ["--dtype fp16"], "torch_dtype": ["--dtype"],
    "deepspeed": "the DeepSpeed config is built from --zero_stage, --offload and --dtype (this pipeline takes "
                 "no DeepSpeed JSON)",
    "lr": ["--learning_rate", "--actor_learning_rate"], "warmup_steps": ["--num_warmup_steps"],
    "warmup_ratio": ["--num_warmup_steps, a step count"], "num_epochs": ["--num_train_epochs"],
    "epochs": ["--num_train_epochs"], "model": ["--model_name_or_path", "--actor_model_name_or_path"],
    "model_name": ["--model_name_or_path", "--actor_model_name_or_path"],
    "pretrain": ["--model_name_or_path", "--actor_model_name_or_path"],
    "reward_pretrain": ["--reward_model_name_or_path"], "ref_model": ["--ref_model_name_or_path"],
    "dataset": ["--data_path"], "dataset_name": ["--data_path"], "train_file": ["--data_path"],
    "data_files": ["--data_path"], "eval_dataset": ["--eval_data_path"], "validation_file": ["--eval_data_path"],
    "max_length": ["--max_seq_len", "--max_answer_seq_len"], "max_len": ["--max_seq_len", "--max_answer_seq_len"],
    "max_seq_length": ["--max_seq_len"], "model_max_length": ["--max_seq_len"],
    "max_prompt_length": ["--max_prompt_seq_len"], "prompt_max_len": ["--max_prompt_seq_len"],
    "max_new_tokens": ["--max_answer_seq_len"], "generate_max_len": ["--max_answer_seq_len"],
    "max_completion_length": ["--max_answer_seq_len"], "num_generations": ["--n_samples_per_prompt"],
    "logging_steps": ["--log_interval"], "eval_steps": ["--eval_interval"], "save_steps": ["--save_interval"],
    "resume_from_checkpoint": ["--resume"],
    "report_to": ["--enable_tensorboard"], "use_tensorboard": ["--enable_tensorboard"],
    "lora_r": ["--lora_dim", "--actor_lora_dim"], "lora_rank": ["--lora_dim", "--actor_lora_dim"],
    "target_modules": ["--lora_module_name"], "lora_target_modules": ["--lora_module_name"],
    "use_peft": ["--lora_dim", "--actor_lora_dim"], "zero_stage": ["--actor_zero_stage"],
    "init_kl_coef": ["--kl_coef"], "kl_penalty": ["--kl_estimator"], "cliprange_reward": ["--clip_reward_value"],
    "micro_train_batch_size": ["--per_device_train_batch_size", "--per_device_training_batch_size"],
    "per_device_train_batch_size": ["--per_device_training_batch_size"],
    "per_device_training_batch_size": ["--per_device_train_batch_size"],
    "output": ["--output_dir"], "save_path": ["--output_dir"], "output_path": ["--output_dir"],
}


def other_name_hint(name: str, known: set[str]) -> str:
    """'; this pipeline's flag: --x' for an unknown flag or --config key `name` (without dashes): another
    trainer's spelling of one of ours, or a near miss of ours (a typo); '' when nothing fits."""
    import difflib

    name = name.lstrip("-").split("=", 1)[0].replace("-", "_")
    hint = OTHER_NAMES.get(name)
    if isinstance(hint, str):
        return f"; {hint}"
    for flag in hint or ():
        if flag.split()[0].rstrip(",")[2:] in known:
            return f"; this pipeline's flag: {flag}"
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    return f"; did you mean --{close[0]}?" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice or number) as one line: error: ... (exit 2).
    No abbreviations: `--lr 3e-5` was read as `--lr_scheduler_type 3e-5`. A negative number in exponent
    notation (`--learning_rate -1e-5`) is a value, as -0.5 is, so its range check can name it (argparse
    took it for a flag: "expected one argument")."""

    def __init__(self, *a, **k):
        super().__init__(*a, allow_abbrev=False, **k)
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            known = {o[2:] for o in self._option_string_actions if o.startswith("--")}
            flags = [w for w in message.split()[2:] if w.startswith("--")]
            message += "".join(other_name_hint(w, known) for w in flags[:1])
        raise UserError(f"{message} (see --help)")


class _ListOnce(argparse.Action):
    """A list flag given twice on the command line: argparse kept only the last list (`--data_path a
    --data_path b` trained on b alone); refuse it, naming the one way to give several values."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_lists_given", set())
        if self.dest in seen and not os.environ.get("RLHF_CALLER_CWD"):
            if self.nargs is None:  # --config: the first file was dropped without a word
                raise UserError(f"{option_string} is given twice; give one {option_string} file")
            raise UserError(f"{option_string} is given twice; give every value after one {option_string} "
                            f"({option_string} A B)")
        # Under launch/run.sh a flag after STEP replaces the one the launcher built from DATA, REWARD_FUNCS...
        # (documented: the user's flags win), so there the last one is kept.
        namespace._lists_given = seen | {self.dest}
        setattr(namespace, self.dest, values)


def build_parser(groups, description: str) -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, action=_ListOnce, help="YAML or JSON file with the same keys; flags win")
    specs = specs_of(groups)
    for g in groups:
        ag = p.add_argument_group(g.__name__)
        for f in dataclasses.fields(g):
            sp = specs[f.name]
            name, help = f"--{f.name}", sp.help + (f" ({describe_limits(sp.limits)})" if sp.limits else "")
            if sp.type is bool:
                ag.add_argument(name, action=argparse.BooleanOptionalAction, default=sp.default, help=help)
            elif sp.nargs:
                ag.add_argument(name, nargs=sp.nargs, default=sp.default, choices=sp.choices, help=help,
                                action=_ListOnce)
            else:
                ag.add_argument(name, type=sp.type, default=sp.default, choices=sp.choices, help=help)
    return p


class _DuplicateKey(ValueError):
    """A key given twice in one mapping of a --config file (YAML and JSON kept the last one silently)."""

    def __init__(self, key, line: int | None = None):
        super().__init__(key)
        self.key, self.line = key, line


def _unique_pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _yaml_unique_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return loader.construct_mapping(node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config file '{path}' cannot be read: {' '.join(str(e).split())}") from None
    is_yaml = path.lower().endswith((".yaml", ".yml"))  # config.YAML is YAML too
    try:
        if is_yaml:
            import yaml

            data = yaml.load(text, Loader=_yaml_unique_loader())
        else:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as e:
        where = f" (line {e.line})" if e.line else ""
        raise UserError(f"--config file '{path}': key '{e.key}' is given twice{where}; give each key once") from None
    except Exception as e:  # yaml and json raise different types; both are the user's syntax error
        how = "" if is_yaml or path.lower().endswith(".json") else " as JSON (its name ends in neither .yaml, .yml nor .json)"
        raise UserError(f"--config file '{path}' cannot be parsed{how}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config file '{path}' must hold a mapping of argument names to values")
    return data


KINDS = {int: "an integer", float: "a number", str: "a string"}


def config_value(sp: Spec, value):
    """A --config value as the flag would have parsed it: same type, choices and range. Raises
    ValueError with the problem (the caller names the file and the key)."""
    if sp.nargs:
        items = value if isinstance(value, list) else [value]  # `data_path: a.jsonl` means [a.jsonl]
        # `reward_weights: [0.5, 1.0]`: numbers, as the command line gives them, parsed by the flag itself
        items = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in items]
        if not all(isinstance(v, str) for v in items):
            raise ValueError(f"expected a string or a list of strings, got {value!r}")
        if sp.nargs == "+" and not items:  # the command line refuses an empty --synthetic_negative_kinds too
            raise ValueError("expected at least one value, got an empty list")
        bad = [v for v in items if sp.choices is not None and v not in sp.choices]
        if bad:
            raise ValueError(f"{bad[0]!r} is not one of {', '.join(map(str, sp.choices))}")
        return list(items)
    if value is None:
        if sp.default is None:
            return None
        raise ValueError(f"expected {KINDS.get(sp.type, sp.type.__name__)}, got null")
    if sp.type is bool:
        if isinstance(value, str):
            try:
                return _bool(value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(str(e)) from None
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if sp.comma and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return ",".join(value)  # `lora_module_name: [q_proj, v_proj]`, as peft's own target_modules
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ValueError(f"expected {KINDS.get(sp.type, sp.type.__name__)}, got {value!r}")
    if sp.type in (int, float):
        if isinstance(value, float) and sp.type is int and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            # YAML reads 1e-5 (no dot) as a string; the flag's own type parses it as on the command line.
            value = sp.type(value) if not isinstance(value, float) or sp.type is float else int(value)
        except ValueError:
            raise ValueError(f"expected {KINDS.get(sp.type, sp.type.__name__)}, got {value!r}") from None
    elif not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if sp.choices is not None and value not in sp.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, sp.choices))}")
    if not within(value, sp.limits):
        raise ValueError(f"must be {_rule(sp.limits, value)}, got {value!r}")
    return value


def check_output_dir(path: str | None, flag: str = "--output_dir") -> None:
    """An output directory must be a directory or creatable as one: checked by every rank at start-up,
    so no rank fails alone later (a rank that dies while the others wait in a collective is a gloo error)."""
    if not path:
        return
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = "is a file" if p == os.path.abspath(path) else f"is inside '{p}', which is a file"
        raise UserError(f"{flag} '{path}' {where}, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{path}': '{p}' is not writable here")


def expand_paths(ns) -> None:
    """`~` in a path flag: the shell expands it only at the start of a word, so `--data_path=~/x` and a
    --config file's `output_dir: ~/out` reached us as a literal `~` (and an output went to `./~/out`)."""
    for name, value in vars(ns).items():
        if not (name.endswith(("_path", "_dir", "name_or_path")) or name == "config"):
            continue
        if isinstance(value, str) and value.startswith("~"):
            setattr(ns, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(ns, name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v
                               for v in value])


def check_not_an_input(ns) -> None:
    """--output_dir must not be, or hold, a model or data the run reads: with --overwrite_output_dir the
    finished output replaces that directory and everything in it. Nor may it be another run's working
    directory (OUTPUT_DIR.partial), which a second run would replace under the first."""
    from .data import split_source

    out = getattr(ns, "output_dir", None)
    if not out:
        return
    if os.path.normpath(out).endswith(".partial"):
        raise UserError(f"--output_dir '{out}' is the working directory of a run of "
                        f"'{os.path.normpath(out)[:-len('.partial')]}' (utils/output.py); choose another directory")
    real = os.path.realpath(out)
    for name, value in sorted(vars(ns).items()):
        if not (name.endswith(("model_name_or_path", "data_path")) or name in ("config", "reward_funcs")) \
                or not value:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str):
                path = None
            elif name == "reward_funcs":  # FILE.py:NAME -> FILE.py (package.module:NAME is not a path)
                path = v.rpartition(":")[0] if v.rpartition(":")[0].endswith(".py") else None
            elif name == "config":
                path = v
            else:
                path = split_source(v)[0]  # SOURCE:SPLIT -> SOURCE
            if not (path and os.path.exists(path)):
                continue
            inside = os.path.realpath(path)
            if inside == real or inside.startswith(real + os.sep):
                what = "is" if inside == real else f"holds '{v}', given as"
                raise UserError(f"--output_dir '{out}' {what} --{name}, an input of this run; write the output to "
                                "another directory")


def refuse_unused(ns, defaults: dict, rules) -> None:
    """rules: (flag, off, message). A flag moved off its default (on the command line or in a --config file)
    while `off` (another setting of the same command turns it off) was dropped without a word: refuse it with
    its message, before anything is loaded."""
    for name, off, message in rules:
        if off and hasattr(ns, name) and getattr(ns, name) != defaults.get(name):
            raise UserError(message)


def check_not_dropped(ns, defaults: dict) -> None:
    """The shared flags' rules for `refuse_unused` (--lora_alpha without LoRA, --tensorboard_path without
    --enable_tensorboard, ...); step 3 adds its own (step3_ppo/models.py: check_not_dropped)."""
    dims = [d for d in ("lora_dim", "actor_lora_dim", "critic_lora_dim") if hasattr(ns, d)]
    lora_off = bool(dims) and not any(getattr(ns, d) for d in dims)
    # (step 3 names its own --only_optimize_lora error: models.check_args)
    lora_flags = ("lora_alpha", "lora_module_name") + (("only_optimize_lora",) if dims == ["lora_dim"] else ())
    rules = [("tensorboard_path", not getattr(ns, "enable_tensorboard", False),
              "--tensorboard_path is used with --enable_tensorboard only: add --enable_tensorboard or drop "
              "--tensorboard_path")]
    rules += [(name, lora_off, f"--{name} applies to LoRA adapters, and LoRA is off (--{dims[0]} 0): give "
                               f"--{dims[0]} > 0 or drop --{name}") for name in lora_flags if dims]
    rules += [("eval_fraction", bool(getattr(ns, "eval_data_path", None)),
               "--eval_fraction holds out part of --data_path only when no --eval_data_path is given; drop one of "
               "them"),
              ("synthetic_negative_kinds", not getattr(ns, "synthetic_negatives", 0),
               "--synthetic_negative_kinds chooses the corruptions of --synthetic_negatives, which is 0: give "
               "--synthetic_negatives > 0 or drop --synthetic_negative_kinds")]
    refuse_unused(ns, defaults, rules)


def parse(groups, description: str, argv=None, required=("output_dir",), defaults: dict | None = None,
          helps: dict | None = None, limits: dict | None = None) -> argparse.Namespace:
    """`defaults`/`helps`/`limits` let a step give a shared flag its own default, help text and range
    (e.g. its own help for --learning_rate). Under launch/run.sh, which starts the programs from the
    checkout, relative paths are the user's: the program first changes to the directory the launcher
    was started in (RLHF_CALLER_CWD)."""
    caller = os.environ.get("RLHF_CALLER_CWD")
    if caller and os.path.isdir(caller):
        os.chdir(caller)
    parser = build_parser(groups, description)
    specs = specs_of(groups, limits)
    if defaults:
        parser.set_defaults(**defaults)
    for action in parser._actions:
        if helps and action.dest in helps:
            sp = specs[action.dest]
            action.help = helps[action.dest] + (f" ({describe_limits(sp.limits)})" if sp.limits else "")
    step_defaults = {name: parser.get_default(name) for name in specs}  # before a --config file's values
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None and not pre.config.strip():  # `--config "$CFG"` with CFG unset ran on the defaults
        raise UserError("--config is given an empty file name")
    if pre.config and pre.config.startswith("~"):
        pre.config = os.path.expanduser(pre.config)
    if pre.config:
        cfg = _read_config(pre.config)
        unknown = sorted(set(cfg) - set(specs))
        if unknown:
            raise UserError(f"--config file '{pre.config}': unknown keys {', '.join(unknown)}"
                            f"{other_name_hint(unknown[0], set(specs))}")
        values = {}
        for key, value in cfg.items():
            try:
                values[key] = config_value(specs[key], value)
            except ValueError as e:
                raise UserError(f"--config file '{pre.config}': key '{key}': {e}") from None
        parser.set_defaults(**values)
    ns = parser.parse_args(argv)
    if hasattr(ns, "_lists_given"):
        del ns._lists_given
    expand_paths(ns)
    for name in required:
        if getattr(ns, name, None) in (None, "", []):
            raise UserError(f"--{name} is required")
    for sp in specs.values():
        value = getattr(ns, sp.name)
        if not within(value, sp.limits):
            raise UserError(f"--{sp.name} must be {_rule(sp.limits, value)}, got {value}")
    check_not_dropped(ns, step_defaults)
    check_output_dir(getattr(ns, "output_dir", None))
    if getattr(ns, "enable_tensorboard", False):
        check_output_dir(getattr(ns, "tensorboard_path", None), "--tensorboard_path")
    check_not_an_input(ns)
    return ns


def args_record(ns: argparse.Namespace, extra: dict | None = None) -> dict:
    """What args.json holds: the flags (without the launcher's --local_rank and --config) plus the
    settings resolved at run time."""
    d = {k: v for k, v in vars(ns).items() if k not in ("local_rank", "config")}
    d.update(extra or {})
    return d


def inherited(model_dir: str | None) -> dict:
    """The args.json saved next to a model by an earlier step ({} if none). Another tool may have left a
    file of that name there (ms-swift does): one that is not a JSON mapping is refused in one line."""
    path = os.path.join(model_dir or "", "args.json")
    if not (model_dir and os.path.isfile(path)):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise UserError(f"'{path}' cannot be read ({' '.join(str(e).split())}); this pipeline reads the template "
                        "and max_seq_len of the step that saved the model from it: rename it if another tool wrote "
                        "it") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' holds a {type(data).__name__}, not the mapping of flags this pipeline saves "
                        "next to a model: rename it if another tool wrote it")
    return data


DEFAULT_MAX_SEQ_LEN = 512


def resolve_data_settings(ns: argparse.Namespace, model_dir: str | None,
                          positions: int | None = None) -> tuple[str, int]:
    """Template and max_seq_len: explicit flags, else the model's args.json, else defaults (max_seq_len
    512, or the model's `positions` where it has fewer: a default that does not fit the model is no
    default)."""
    from .templates import TEMPLATES

    if ns.template != "auto" and ns.max_seq_len:
        return ns.template, int(ns.max_seq_len)  # the flags decide; the file is not read
    prev = inherited(model_dir)
    where = os.path.join(model_dir or "", "args.json")
    template = ns.template
    if template == "auto" and prev.get("template") is not None:
        template = prev["template"]
        if template not in TEMPLATES:
            raise UserError(f"'{where}' names template {template!r}, not one of this pipeline's "
                            f"({', '.join(TEMPLATES)}); give --template (the file may come from another tool)")
    max_seq_len = ns.max_seq_len
    if not max_seq_len and prev.get("max_seq_len") is not None:
        max_seq_len = prev["max_seq_len"]
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise UserError(f"'{where}' gives max_seq_len {max_seq_len!r}, not a positive whole number; give "
                            "--max_seq_len (the file may come from another tool)")
    return template, int(max_seq_len or min(DEFAULT_MAX_SEQ_LEN, positions or DEFAULT_MAX_SEQ_LEN))


def max_seq_len_flag(ns: argparse.Namespace, model_dir: str | None) -> str:
    """How an error names the max_seq_len in force: the flag, or the args.json it was inherited from."""
    if ns.max_seq_len or inherited(model_dir).get("max_seq_len") is None:
        return "--max_seq_len"
    return f"--max_seq_len (inherited from '{os.path.join(model_dir, 'args.json')}')"
