"""The four PPO models as DeepSpeed engines, and the DeepSpeed-specific pieces of PPO.

actor      AutoModelForCausalLM from the step-1 model, trained (ZeRO --actor_zero_stage)
reference  frozen copy of the initial actor (ZeRO-3 when the actor is, or when it is offloaded);
           not loaded with --kl_coef 0 and --anchor_coef 0
critic     one-label sequence classifier from the step-2 model, trained; a value at every position
           (utils.reward.token_scores: the head's per-token outputs, not HF's pooled `logits`);
           only for --advantage_estimator gae
reward     frozen one-label sequence classifier; its score at the last real token
           (utils.reward.sequence_rewards); not loaded when only --reward_funcs score the answers

This module is where step 3 talks to DeepSpeed: engine construction, gathering ZeRO-3 parameters once
per rollout, stepping actor and critic together under fp16, and the EMA of the actor.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from step3_ppo.config import Algorithm, resolve_algorithm
from utils import ds
from utils.errors import UserError
from utils.lr import scaled_lr
from utils.model import disable_dropout, load_model, prepare_model
from utils.reward import load_reward_model


@dataclass
class Models:
    actor: object     # DeepSpeed engines; critic, ref and reward are None where the algorithm needs none
    critic: object
    ref: object
    reward: object
    ema: nn.Module | None  # plain module (ZeRO-3-partitioned like the actor, or full), fp32
    lr: dict               # {"actor": peak rate, "critic": peak rate}, resolved (utils/lr.py)
    reward_encoder: object = None  # the reward model's own Encoder where it reads text (`text_scores`), else None
    reward_limit: int | None = None  # its positions: a longer text loses the start of its prompt

    def trained(self) -> list:
        """The engines stepped together (pitfall 14)."""
        return [e for e in (self.actor, self.critic) if e is not None]


def _lora_args(args, which: str):
    return types.SimpleNamespace(gradient_checkpointing=getattr(args, f"{which}_gradient_checkpointing"),
                                 lora_dim=getattr(args, f"{which}_lora_dim"), lora_alpha=args.lora_alpha,
                                 lora_module_name=args.lora_module_name,
                                 # a model without LoRA trains whole: --only_optimize_lora speaks of the other one
                                 only_optimize_lora=args.only_optimize_lora and getattr(args, f"{which}_lora_dim") > 0,
                                 freeze_embeddings=args.freeze_embeddings if which == "actor" else "none")


def frozen_configs(args, world: int, critic: bool = True) -> tuple[dict, dict]:
    """DeepSpeed configs of the reference and reward models. A frozen model runs under ZeRO-3 when its
    trained twin (actor, critic; the actor when there is no critic) does, or when
    --offload_reference_model / --offload_reward_model asks for its parameters on the CPU: parameter
    offload exists only in ZeRO-3 (pitfall 13). Otherwise each rank holds a full copy (ZeRO-0)."""
    out = []
    for stage, offload in ((args.actor_zero_stage, args.offload_reference_model),
                           (args.critic_zero_stage if critic else args.actor_zero_stage, args.offload_reward_model)):
        out.append(ds.ds_eval_config(stage=3 if stage == 3 or offload else 0, dtype=args.dtype,
                                     micro_batch=args.per_device_training_batch_size, world=world,
                                     offload_params=offload))
    return out[0], out[1]


def check_args(args) -> Algorithm:
    """Settings that cannot work together, refused before anything is loaded; returns the algorithm."""
    algo = resolve_algorithm(args)
    stages = (args.actor_zero_stage, args.critic_zero_stage) if algo.critic else (args.actor_zero_stage,)
    if args.offload and min(stages) == 0:
        raise UserError("--offload moves optimizer states to the CPU, which needs ZeRO stage >= 1 for both "
                        "--actor_zero_stage and --critic_zero_stage")
    ds.check_dtype(args.dtype)
    if args.dtype == "fp16" and min(stages) == 0:
        raise UserError("--dtype fp16 needs ZeRO stage >= 1 for actor and critic (their overflow checks are "
                        "synchronised so an overflow skips both steps); use bf16 or a ZeRO stage >= 1")
    for name in ("per_device_generation_batch_size", "generation_batches", "per_device_training_batch_size",
                 "ppo_epochs"):  # (the two lengths: 0 = auto, `resolve_lengths`)
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if args.temperature is not None and args.temperature <= 0:
        raise UserError("--temperature must be > 0 (use --no-do_sample for greedy rollouts)")
    buffer = args.per_device_generation_batch_size * args.generation_batches * algo.k
    per_update = args.per_device_training_batch_size * args.gradient_accumulation_steps
    if buffer % per_update:
        answers = f" x {algo.k} answers" if algo.k > 1 else ""
        raise UserError(f"the experience buffer ({args.per_device_generation_batch_size} prompts x "
                        f"{args.generation_batches} generation batches{answers} = {buffer} per rank) must be a "
                        f"multiple of --per_device_training_batch_size x --gradient_accumulation_steps ({per_update})")
    if not 0.0 <= args.ema_beta < 1.0:
        raise UserError("--ema_beta must be in [0, 1)")
    check_not_dropped(args, algo)
    if args.only_optimize_lora and not (args.actor_lora_dim or (algo.critic and args.critic_lora_dim)):
        raise UserError("--only_optimize_lora needs --actor_lora_dim > 0" + (" or --critic_lora_dim > 0" if algo.critic
                                                                             else ""))
    return algo


CRITIC_ONLY = ("critic_learning_rate", "critic_weight_decay", "critic_zero_stage", "critic_lora_dim",
               "critic_gradient_checkpointing", "critic_warmup_steps", "cliprange_value", "lam")


def check_not_dropped(args, algo: Algorithm) -> None:
    """Step 3's flags that the rest of the command turns off (--ema_beta without --enable_ema,
    --critic_learning_rate under GRPO, ...), refused as the shared ones are (utils.args.refuse_unused)."""
    from step3_ppo.config import GROUPS
    from utils.args import refuse_unused, specs_of

    rules = [("ema_beta", not args.enable_ema, "--enable_ema is off"),
             ("unsup_coef", not args.unsup_data_path, "no --unsup_data_path is given"),
             ("eval_interval", not args.eval_data_path, "no --eval_data_path is given (nothing is evaluated)"),
             ("per_device_eval_batch_size", not args.eval_data_path, "no --eval_data_path is given (nothing is "
                                                                     "evaluated)"),
             ("top_k", not args.do_sample, "--no-do_sample generates greedily"),
             ("top_p", not args.do_sample, "--no-do_sample generates greedily"),
             ("anchor_confidence", not args.anchor_coef, "--anchor_coef is 0 (no anchor)"),
             ("offload_reference_model", not algo.reference, "no reference model is loaded (--kl_coef 0 and "
                                                             "--anchor_coef 0)"),
             ("offload_reward_model", algo.reward_model is None, "no reward model is loaded (--reward_funcs only)")]
    rules += [(name, not algo.critic, f"--advantage_estimator {algo.estimator} trains no critic") for name in CRITIC_ONLY]
    refuse_unused(args, {name: sp.default for name, sp in specs_of(GROUPS).items()},
                  [(name, off, f"--{name} is not used: {why}; drop --{name}") for name, off, why in rules])


def _causal(args, cfg: dict, dtype: str) -> nn.Module:
    model = load_model(AutoModelForCausalLM, args.actor_model_name_or_path, dtype=dtype,
                       trust_remote_code=args.trust_remote_code, zero3_config=cfg, what="--actor_model_name_or_path",
                       attn_implementation=args.attn_implementation)
    return _prepared(model, args)


def _classifier(args, path: str, cfg: dict, pad_id: int, what: str) -> nn.Module:
    model = load_reward_model(path, pad_id=pad_id, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                              zero3_config=cfg, what=what, attn_implementation=args.attn_implementation)
    return _prepared(model, args)


def _prepared(model: nn.Module, args) -> nn.Module:
    """Dropout off (PPO's ratio pi_new / pi_old assumes the rollout policy and the updated one are the same
    function; DeepSpeed-Chat's --disable_actor_dropout). The attention kernel is chosen at load time."""
    if args.disable_dropout:
        disable_dropout(model)
    return model


def _train_engine(args, model: nn.Module, cfg: dict, which: str, updates: int, lr: float):
    return ds.init_train_engine(model, cfg=cfg, lr=lr,
                                weight_decay=getattr(args, f"{which}_weight_decay"),
                                betas=(args.adam_beta1, args.adam_beta2), offload=args.offload,
                                scheduler=args.lr_scheduler_type, warmup=args.num_warmup_steps, total_steps=updates)


def build_models(args, algo: Algorithm, world: int, updates: int, pad_id: int, reward_encoder=None,
                 reward_limit: int | None = None) -> Models:
    """Load the models the algorithm needs (and the EMA) and wrap them in engines; `updates` = optimizer
    steps of the run. `pad_id` only fills the classifiers' in-memory config.pad_token_id (HF refuses
    batches without one); a reward model that reads text (`reward_encoder`, see main.reward_reader) gets
    its own tokenizer's."""
    mb, ga = args.per_device_training_batch_size, args.gradient_accumulation_steps
    train_cfg = {which: ds.ds_config(stage=getattr(args, f"{which}_zero_stage"), offload=args.offload,
                                     dtype=args.dtype, micro_batch=mb, grad_accum=ga, world=world,
                                     grad_clip=args.max_grad_norm) for which in ("actor", "critic")}
    ref_cfg, reward_cfg = frozen_configs(args, world, algo.critic)

    actor_model = prepare_model(_causal(args, train_cfg["actor"], args.dtype), _lora_args(args, "actor"))
    lr = {"actor": scaled_lr("actor", actor_model, args.actor_learning_rate)}
    actor = _train_engine(args, actor_model, train_cfg["actor"], "actor", updates, lr["actor"])
    ref = ds.init_eval_engine(_frozen(_causal(args, ref_cfg, args.dtype)), ref_cfg) if algo.reference else None
    critic = None
    if algo.critic:
        critic_model = prepare_model(_classifier(args, args.critic_model_name_or_path, train_cfg["critic"], pad_id,
                                                 "--critic_model_name_or_path"),
                                     _lora_args(args, "critic"), task_type="SEQ_CLS")
        lr["critic"] = scaled_lr("critic", critic_model, args.critic_learning_rate)
        critic = _train_engine(args, critic_model, train_cfg["critic"], "critic", updates, lr["critic"])
    ds.print0(" ".join(f"{k}_learning_rate={v:.3g}" for k, v in lr.items()) + " (0 = scaled to the model size)")
    reward = None
    if algo.reward_model is not None:
        reward_pad = reward_encoder.pad_id if reward_encoder is not None else pad_id
        reward = ds.init_eval_engine(_frozen(_classifier(args, algo.reward_model, reward_cfg, reward_pad,
                                                         "--reward_model_name_or_path")), reward_cfg)
    ema = None
    if args.enable_ema:
        # fp32 whatever the training precision: (1 - beta) * update is below bf16 resolution for beta ~ 0.99.
        ema_cfg = ds.ds_config(stage=args.actor_zero_stage, offload=False, dtype="fp32", micro_batch=mb,
                               grad_accum=ga, world=world)
        ema = _frozen(prepare_model(_causal(args, ema_cfg, "fp32"), _lora_args(args, "actor")))
        _partition_like_actor(ema, args.actor_zero_stage)
        ema_copy_(ema, actor.module)
    return Models(actor=actor, critic=critic, ref=ref, reward=reward, ema=ema, lr=lr,
                  reward_encoder=reward_encoder if reward is not None else None, reward_limit=reward_limit)


def require_reward_model(path: str, trust_remote_code: bool) -> None:
    """The frozen reward model must be a trained classifier: load_reward_model would also accept a causal
    LM (the critic may start from one) and give it a random score head."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise UserError(f"--reward_model_name_or_path '{path}' is not a sequence-classification model "
                        "(a step-2 reward model); its score head would be random")


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def _partition_like_actor(ema: nn.Module, stage: int) -> None:
    """Under ZeRO-3, parameters created after loading (LoRA adapters) are partitioned too, as
    deepspeed.initialize does for the actor, so EMA and actor shards line up one to one."""
    if stage != 3:
        return
    params = list(ema.parameters())
    loose = [p for p in params if not hasattr(p, "ds_id")]
    if loose:
        next(p for p in params if hasattr(p, "ds_id")).convert_to_zero_parameters(param_list=loose)


# ----------------------------------------------------------------------------- EMA

def _pairs(ema: nn.Module, module: nn.Module):
    for (n_e, p_e), (n_m, p_m) in zip(ema.named_parameters(), module.named_parameters(), strict=True):
        if n_e != n_m:
            raise RuntimeError(f"EMA parameter {n_e} does not match actor parameter {n_m}")
        # Under ZeRO-3 each rank updates its own shard (ds_tensor): both models are partitioned the same way.
        if hasattr(p_e, "ds_tensor"):
            yield p_e.ds_tensor, p_m.ds_tensor
        else:
            yield p_e.data, p_m.data


@torch.no_grad()
def ema_update_(ema: nn.Module, module: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * module, parameter by parameter, with no communication."""
    for e, m in _pairs(ema, module):
        e.lerp_(m.to(e.dtype), 1.0 - beta)


@torch.no_grad()
def ema_copy_(ema: nn.Module, module: nn.Module) -> None:
    for e, m in _pairs(ema, module):
        e.copy_(m)


def ema_state(ema: nn.Module) -> list[torch.Tensor]:
    """This rank's EMA tensors (its shards under ZeRO-3) for a checkpoint's client state."""
    return [e.detach().cpu().clone() for e, _ in _pairs(ema, ema)]


@torch.no_grad()
def load_ema_state(ema: nn.Module, state: list[torch.Tensor]) -> None:
    for (e, _), saved in zip(_pairs(ema, ema), state, strict=True):
        e.copy_(saved)


# ----------------------------------------------------------------------------- generation and stepping

def _zero3_offload(engine):
    opt = engine.optimizer
    return getattr(opt, "parameter_offload", None) if opt is not None else None


@contextlib.contextmanager
def generation_mode(engine):
    """The actor ready for `generate`: eval mode and, under ZeRO-3, every parameter gathered once for
    the whole rollout with the per-module gather/release hooks removed (TRL PR #1483: about 10x faster
    than gathering each layer at every generated token). The hooks are restored on exit."""
    engine.eval()
    offload = _zero3_offload(engine) if engine.zero_optimization_stage() == 3 else None
    try:
        if offload is None:
            yield engine.module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            for p in engine.module.parameters():
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield engine.module
            finally:
                # Re-registering invalidates the prefetch trace, which the next training forward re-records.
                offload._register_deepspeed_module(offload.module)
    finally:
        engine.train()


def _grad_overflow(engine) -> bool:
    """DeepSpeed's own overflow test on the reduced gradients (a collective: every rank calls it)."""
    engine.optimizer.check_overflow()
    return bool(engine.optimizer.overflow)


@contextlib.contextmanager
def _forced_overflow(optimizer, value: bool):
    """Make the ZeRO optimizer's step() see `value` as its overflow verdict (its check runs first thing in
    step(); stages 1-3 all call `self.check_overflow`)."""
    optimizer.check_overflow = lambda *a, **k: setattr(optimizer, "overflow", value)
    try:
        yield
    finally:
        del optimizer.check_overflow


def step_together(engines) -> bool:
    """`engine.step()` on every engine. Under fp16, an overflow in any engine's gradients skips every
    engine's step (pitfall 14): DeepSpeed's overflow verdicts are taken before any step, and their OR is
    imposed on each optimizer's step(), which then skips, zeroes its gradients and lowers its loss scale
    as for an overflow of its own. Returns False if the steps were skipped."""
    at_boundary = engines[0].is_gradient_accumulation_boundary()
    if not at_boundary or not any(e.fp16_enabled() for e in engines):
        for e in engines:
            e.step()
        return True
    overflow = [_grad_overflow(e) for e in engines]
    skip = any(overflow)
    for e in engines:
        with _forced_overflow(e.optimizer, skip):
            e.step()
    return not skip
