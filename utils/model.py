"""Loading models and tokenizers, LoRA through peft, and saving Hugging Face directories."""
from __future__ import annotations

import fnmatch
import json
import os

import torch

from . import data, ds
from .errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_source(path: str, what: str) -> None:
    if path is None:
        raise UserError(f"{what} is required")
    looks_local = data.looks_local(path)
    if os.path.exists(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
                os.path.join(path, "config.json")):
            raise UserError(f"{what} '{path}' is a LoRA/PEFT adapter (adapter_config.json), not a whole model: merge "
                            "it into its base model first (PeftModel.from_pretrained(base, dir).merge_and_unload()"
                            ".save_pretrained(out), with the tokenizer) and pass that directory")
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            inner = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "config.json"))) \
                if os.path.isdir(path) else []
            hint = (f"; it holds {', '.join(d + '/' for d in inner)}: pass one of them (step 3 saves actor/ and "
                    f"critic/), e.g. {os.path.join(path, inner[0])}") if inner else ""
            raise UserError(f"{what} '{path}' is not a Hugging Face model directory (no config.json){hint}")
    elif looks_local or data.local_parent(path):
        unfinished = path.rstrip("/") + ".partial"
        hint = (f" ('{unfinished}' holds an unfinished run: finish it with --resume first)"
                if os.path.isdir(unfinished) else
                f" (not read as a hub model name: '{data.local_parent(path)}/' is a directory here)"
                if not looks_local else "")
        raise UserError(f"{what} '{path}' does not exist{hint}")


def check_weight_files(path: str, what: str) -> None:
    """Refuse a local model directory whose safetensors files are damaged or cut short, naming the file
    (the loader's own error does not). Reads only each file's header: `safe_open` checks that the header
    parses and that the file covers every tensor it lists."""
    if not os.path.isdir(path):
        return
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"{what} '{path}': weights file '{file}' is damaged or truncated ({e})") from None


# Files a tokenizer is read from (any one); a model directory without them has weights only.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def load_tokenizer(path: str, trust_remote_code: bool = False, what: str = "--model_name_or_path"):
    """The directory's tokenizer. Refuses one that has none: transformers 5 then builds an empty tokenizer
    of the model's type (two special tokens, every text encoded to nothing), and training on it runs
    on empty samples until the loss is nan."""
    from transformers import AutoTokenizer

    _check_source(path, what)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"{what} '{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
                        "save the tokenizer next to the weights (tokenizer.save_pretrained(dir))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # missing files, unreachable hub name; a damaged tokenizer.json or config
        raise UserError(f"cannot load a tokenizer from {what} '{path}': {_first_line(e)}") from None
    if not tokenizer("Hello, world.", add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer of {what} '{path}' encodes text to no tokens (vocabulary of {len(tokenizer)}): "
                        "its vocabulary files are missing or empty")
    _check_vocabulary(path, tokenizer, what, trust_remote_code)
    return tokenizer


def _check_vocabulary(path: str, tokenizer, what: str, trust_remote_code: bool) -> None:
    """A tokenizer with more tokens than the model has embedding rows (tokens added without
    `resize_token_embeddings`) fails mid-run with an IndexError at the first added token, often the pad."""
    config = read_config(path, trust_remote_code)
    if config is None:
        return
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(rows, int) and rows > 0 and len(tokenizer) > rows:
        added = [t for i, t in sorted(tokenizer.added_tokens_decoder.items()) if i >= rows][:3]
        raise UserError(f"the tokenizer of {what} '{path}' has {len(tokenizer)} tokens but the model's config.json "
                        f"vocab_size is {rows} (ids from {rows} up, e.g. {[str(t) for t in added]}, have no "
                        "embedding): call model.resize_token_embeddings(len(tokenizer)) and save the model again")


def position_limit(path: str, trust_remote_code: bool = False) -> int | None:
    """The model's positions (`model_positions`), or None where its config gives none."""
    found = model_positions(path, trust_remote_code)
    return found[0] if found else None


def model_positions(path: str, trust_remote_code: bool = False) -> tuple[int, str] | None:
    """(positions, config key) of a model: config max_position_embeddings, or GPT-2's n_positions; None
    where the config gives neither (or cannot be read: the loaders report that in their own words)."""
    config = read_config(path, trust_remote_code)
    if config is None:
        return None
    config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit, name
    return None


def check_positions(path: str, length: int, flag: str, what: str = "--model_name_or_path",
                    trust_remote_code: bool = False) -> None:
    """Refuse a sequence length beyond the model's positions (config max_position_embeddings, GPT-2's
    n_positions) before anything runs: a learned position table fails mid-run with an IndexError at the
    first longer batch."""
    found = model_positions(path, trust_remote_code)
    if found is not None and length > found[0]:
        raise UserError(f"{flag} is {length} tokens, more than the {found[0]} positions of {what} '{path}' "
                        f"(config.json {found[1]})")


def _refuse_a_classifier(path: str, what: str, trust_remote_code: bool) -> None:
    """A reward model (a sequence classifier) where a causal LM is expected: say so, rather than list the
    score head as an unexpected weight."""
    config = read_config(path, trust_remote_code)
    archs = (config.architectures or []) if config is not None else []
    if archs and all(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"{what} '{path}' is a reward model ({', '.join(archs)}), not a causal LM: give a step-1 "
                        "(SFT) output or another causal LM")


_CONFIGS: dict = {}


def read_config(path: str, trust_remote_code: bool = False):
    """The model's config, or None where transformers cannot read it (the loaders then say why). The
    start-up checks (positions, vocabulary, classifier, attention kernel) share one read per file version."""
    from transformers import AutoConfig

    file = os.path.join(path, "config.json")
    key = (path, trust_remote_code, os.stat(file).st_mtime_ns if os.path.isfile(file) else None)
    if key not in _CONFIGS:
        try:
            _CONFIGS[key] = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            _CONFIGS[key] = None
    return _CONFIGS[key]


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _attention(path: str, trust_remote_code: bool, what: str) -> str | None:
    """The attention kernel to ask for when the model's config names one this machine cannot run (a
    checkpoint saved with flash_attention_2, loaded without the flash-attn package or a GPU): sdpa,
    said once. None keeps the config's choice."""
    from transformers.utils import is_flash_attn_2_available

    config = read_config(path, trust_remote_code)
    if config is None:
        return None
    named = getattr(config, "_attn_implementation_internal", None) or getattr(config, "attn_implementation", None)
    if isinstance(named, str) and named.startswith("flash_attention") and not (
            torch.cuda.is_available() and is_flash_attn_2_available()):
        if ds.is_rank0():
            print(f"{what} '{path}': config.json asks for {named}, which this machine cannot run (no flash-attn "
                  "package or no GPU); using sdpa", flush=True)
        return "sdpa"
    return None


def load_model(cls, path: str, *, dtype: str = "fp32", trust_remote_code: bool = False,
               zero3_config: dict | None = None, allow_missing=(), allow_unexpected=(),
               what: str = "--model_name_or_path", attn_implementation: str | None = None, **kwargs):
    """`cls.from_pretrained` that fails loudly on missing or unexpected weights (pitfall 18).

    `allow_missing` / `allow_unexpected` are glob patterns for the differences a step expects (a new
    reward head, a dropped LM head). With `zero3_config`, weights load straight into ZeRO-3 shards.
    `attn_implementation` (None or "auto": the config's, unless it names a kernel this machine lacks).
    """
    _check_source(path, what)
    check_weight_files(path, what)
    if cls.__name__.endswith("ForCausalLM"):
        _refuse_a_classifier(path, what, trust_remote_code)
    hf_ds = None
    if zero3_config is not None and zero3_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(zero3_config)  # must stay alive while the model exists
    else:
        # transformers keeps the last HfDeepSpeedConfig in a global; when a process loads several models
        # (PPO: four), a ZeRO-3 one loaded earlier would otherwise make this one load partitioned too.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    attn = attn_implementation if attn_implementation not in (None, "auto") else _attention(
        path, trust_remote_code, what)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    try:
        model, info = cls.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                          output_loading_info=True, **kwargs)
    except (OSError, ValueError, ImportError) as e:  # missing or damaged files, an unreadable config, a kernel
        raise UserError(f"cannot load a model from {what} '{path}': {_first_line(e)}") from None
    missing = [k for k in info.get("missing_keys", []) if not any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    unexpected = [k for k in info.get("unexpected_keys", [])
                  if not any(fnmatch.fnmatch(k, p) for p in allow_unexpected)]
    mismatched = info.get("mismatched_keys", [])
    if missing or unexpected or mismatched:
        raise UserError(f"{what} '{path}': weights do not match the model: missing {sorted(missing)[:8]}, "
                        f"unexpected {sorted(unexpected)[:8]}, mismatched {list(mismatched)[:8]}")
    model._hf_ds_config = hf_ds
    return model


# Dropout modules, and the float rates HF attention and decoder code read directly (llama's
# attention_dropout, OPT's dropout / activation_dropout / layerdrop, ...).
DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                   torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout: dropout modules, and every float attribute named like a dropout rate
    ("...dropout...", "...drop_prob...", "...pdrop", "layerdrop"; OPT's layerdrop skips whole layers
    in training). The reward model then trains the deterministic score that evaluation reads, DPO's
    policy equals its reference before the first step (loss log 2), and PPO's first ratio is 1. The
    config's rates too, which some models read at every forward (Falcon's dropout_add(...,
    config.hidden_dropout), Persimmon's attention): save_hf writes the model's own rates back."""
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and _is_dropout_rate(name):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        rates = {k: v for k, v in vars(config).items() if isinstance(v, float) and v and _is_dropout_rate(k)}
        model._saved_dropout_rates = {**rates, **getattr(model, "_saved_dropout_rates", {})}
        for k in rates:
            setattr(config, k, 0.0)


def _is_dropout_rate(name: str) -> bool:
    name = name.lower()
    return "dropout" in name or "drop_prob" in name or name.endswith("pdrop") or name == "layerdrop"


def apply_lora(model, lora_dim: int, lora_alpha: int, module_names: str, only_optimize_lora: bool,
               task_type: str = "CAUSAL_LM"):
    """Wrap with peft LoRA adapters on the named Linear/Conv1D modules."""
    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    if module_names.strip().lower() == "all-linear":
        # peft picks every Linear/Conv1D but the LM head (and a classifier's head, which is trained whole below)
        present = "all-linear"
    else:
        suffixes = [s.strip() for s in module_names.split(",") if s.strip()]
        present = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} & set(suffixes))
        if not present:
            raise UserError(f"--lora_module_name: none of {suffixes} names a module of this model "
                            "(all-linear takes every linear layer)")
    # GPT-2's Conv1D stores its weight transposed; a model has either kind of layer, not both
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    cfg = LoraConfig(r=lora_dim, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=present,
                     task_type=task_type, fan_in_fan_out=conv1d,
                     modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    model = get_peft_model(model, cfg)
    if not only_optimize_lora:
        for n, p in model.named_parameters():
            if "lora_" not in n:
                p.requires_grad_(True)
    return model


def prepare_model(model, args, task_type: str = "CAUSAL_LM"):
    """Dropout, gradient checkpointing, LoRA and frozen embeddings from the shared model arguments."""
    if getattr(args, "disable_dropout", False):
        disable_dropout(model)
    if args.gradient_checkpointing:
        # transformers >= 5.2x: activation_checkpointing_enable (gradient_checkpointing_enable warns, gone in v6).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model._saved_use_cache = model.config.use_cache  # save_hf writes the model's own setting back
        model.config.use_cache = False
    if args.lora_dim > 0:
        model = apply_lora(model, args.lora_dim, args.lora_alpha, args.lora_module_name,
                           args.only_optimize_lora, task_type)
    elif args.only_optimize_lora:
        raise UserError("--only_optimize_lora needs --lora_dim > 0")
    freeze_embeddings(model, getattr(args, "freeze_embeddings", "none"))
    return model


def freeze_embeddings(model, which: str) -> None:
    """Keep the token embeddings fixed: "input", "output" (the LM head; a classifier has none), "both"."""
    if which == "none":
        return
    mods = []
    if which in ("input", "both"):
        mods.append(model.get_input_embeddings())
    if which in ("output", "both"):
        mods.append(model.get_output_embeddings())
    for m in mods:
        if m is not None:
            m.requires_grad_(False)


def merge_lora_state_dict(state_dict: dict, peft_config) -> dict:
    """Plain-model weights from a gathered peft state dict: W = W0 + (alpha / r) * B @ A (Hu et al. 2021,
    eq. 3), transposed for GPT-2's Conv1D (fan_in_fan_out). Keys lose peft's prefixes."""
    scale = peft_config.lora_alpha / peft_config.r
    out = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            prefix = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            if key.endswith(".weight"):
                a = state_dict[f"{prefix}.lora_A.default.weight"].float()
                b = state_dict[f"{prefix}.lora_B.default.weight"].float()
                delta = (b @ a) * scale
                value = (value.float() + (delta.T if peft_config.fan_in_fan_out else delta)).to(value.dtype)
        elif ".modules_to_save." in key or ".original_module." in key:
            if ".original_module." in key:
                continue
            name = name.replace(".modules_to_save.default.", ".")
        out[name] = value
    return out


def save_hf(module, tokenizer, out_dir: str, args_dict: dict | None = None, encoder=None,
            dtype: str | None = None) -> None:
    """Write a Hugging Face directory (safetensors + tokenizer + args.json) from any ZeRO stage.

    All ranks must call it: ZeRO-3 parameters are gathered one at a time (buffers included).
    The steps call it on their run directory (OUTPUT_DIR.partial), which replaces OUTPUT_DIR only once
    the run has finished (utils/output.py); within it the files are written to a temporary name and
    moved in, so a rerun after a kill never finds a half-written file.
    With the run's `encoder`, the reply end (Encoder.eos_id) is added to generation_config.json's eos_token_id
    when missing, so plain `generate()` stops where the trained replies end (a chat template's turn end), and
    the tokenizer is saved with the chat template of the trained format (Encoder.chat_template).
    `dtype` ("fp32", "fp16", "bf16") casts the saved weights and config.json's dtype: step 3's EMA actor is
    averaged in fp32 but saved in the run's --dtype, as the actor is (`dtype="auto"` loads what was trained).
    """
    from peft import PeftModel

    sd = ds.gather_state_dict(module)
    if dtype is not None and sd is not None:  # rank 0 holds the gathered weights, the other ranks None
        sd = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    failed = None
    if ds.is_rank0():
        tmp = out_dir.rstrip("/") + ".tmp"
        if os.path.isdir(tmp):
            import shutil

            shutil.rmtree(tmp)
        base = module.get_base_model() if isinstance(module, PeftModel) else module
        gen = getattr(base, "generation_config", None)
        end_id = encoder.eos_id if encoder is not None else None
        if end_id is not None and gen is not None:
            ends = gen.eos_token_id if isinstance(gen.eos_token_id, list) else (
                [] if gen.eos_token_id is None else [gen.eos_token_id])
            if end_id not in ends:
                gen.eos_token_id = [end_id] + ends if ends else end_id
        training_use_cache = base.config.use_cache
        base.config.use_cache = getattr(base, "_saved_use_cache", training_use_cache)
        saved_rates = getattr(base, "_saved_dropout_rates", {})  # disable_dropout's: the model's own rates
        training_rates = {k: getattr(base.config, k) for k in saved_rates}
        for k, v in saved_rates.items():
            setattr(base.config, k, v)
        from safetensors import SafetensorError

        try:
            os.makedirs(tmp)
            if isinstance(module, PeftModel):
                base.save_pretrained(tmp, state_dict=merge_lora_state_dict(sd, module.peft_config["default"]))
            else:
                module.save_pretrained(tmp, state_dict=sd)
            if dtype is not None:  # save_pretrained wrote the in-memory model's dtype (the EMA's fp32)
                saved_dtype, base.config.dtype = base.config.dtype, str(DTYPES[dtype]).removeprefix("torch.")
                base.config.save_pretrained(tmp)
                base.config.dtype = saved_dtype
            _save_tokenizer(tokenizer, tmp, encoder.chat_template() if encoder is not None else tokenizer.chat_template)
            if args_dict is not None:
                with open(os.path.join(tmp, "args.json"), "w") as f:
                    json.dump(args_dict, f, indent=2, sort_keys=True)
        except (OSError, SafetensorError) as e:  # a full disk, a file-size limit: one line, no half model left
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            failed = (f"could not write the model to '{out_dir}': {_first_line(e)}; free space and rerun with "
                      "--resume (it continues from the last checkpoint that --save_interval wrote, or starts over "
                      "without one)")
        finally:
            base.config.use_cache = training_use_cache
            for k, v in training_rates.items():
                setattr(base.config, k, v)
        if failed is None:
            _replace_dir(tmp, out_dir)
    if ds.any_rank(failed is not None):  # every rank leaves with the one message (rank 0 prints it)
        raise UserError(failed or "rank 0 could not write the model", every_rank=True)


def _save_tokenizer(tokenizer, out_dir: str, chat_template: str | None) -> None:
    """save_pretrained with `chat_template`; the run's tokenizer object is left as it was."""
    own = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.chat_template = own


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Move the model files of `tmp` into `out_dir`, leaving other files (metrics, checkpoints) there."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
