"""Step 3 arguments: the shared groups that apply to PPO, and PPO's own.

The shared dataclasses in utils/args.py stay the one definition of a flag: `only` picks the fields
that mean the same thing here (dtype, seed, output_dir, ...) and leaves out those that would be
ambiguous with four models (--model_name_or_path, --zero_stage, --learning_rate, ...), which step 3
names per model instead (--actor_*, --critic_*).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from utils.args import DataArgs, DeepSpeedArgs, LogArgs, ModelArgs, TrainArgs, arg
from utils.lr import lr_help


def only(group, names: tuple[str, ...], defaults: dict | None = None, helps: dict | None = None):
    """A dataclass with the fields `names` of `group`: same types and choices; `defaults` and `helps`
    override a field's default or help text where step 3 reads it differently."""
    defaults, helps = defaults or {}, helps or {}
    fields = []
    by_name = {f.name: f for f in dataclasses.fields(group)}
    for name in names:
        f = by_name[name]
        if name in defaults:
            default = defaults[name]
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        fields.append((name, f.type, arg(default, helps.get(name, f.metadata["help"]), f.metadata.get("choices"),
                                         f.metadata.get("nargs"))))
    return dataclasses.make_dataclass(group.__name__, fields)


SharedModel = only(ModelArgs, ("trust_remote_code", "dtype", "lora_alpha", "lora_module_name",
                               "only_optimize_lora"))
SharedData = only(DataArgs, ("data_path", "eval_data_path", "template", "overlong"), helps={
    "data_path": "prompt files (.jsonl/.json/.parquet or hub names; any format with a prompt: {\"prompt\"}, chat "
                 "messages ending with a user turn, SFT and preference records)",
    "eval_data_path": "prompts answered greedily and scored by the reward model at step 0, every --eval_interval "
                      "steps and at the end (none: no evaluation)",
    "overlong": "prompts longer than --max_prompt_seq_len: skip (counted in the log), truncate (keeps the end, "
                "where the question and the generation prompt are), or error"})
SharedTrain = only(TrainArgs, ("gradient_accumulation_steps", "adam_beta1", "adam_beta2", "max_grad_norm",
                               "num_train_epochs", "max_steps", "lr_scheduler_type", "num_warmup_steps", "seed",
                               "per_device_eval_batch_size"),
                   defaults={"lr_scheduler_type": "constant"}, helps={
    "gradient_accumulation_steps": "PPO mini-batches per optimizer step",
    "num_train_epochs": "passes over the prompts (one PPO step uses --generation_batches x "
                        "--per_device_generation_batch_size prompts per rank)",
    "max_steps": "PPO steps (rollouts + update); > 0 overrides --num_train_epochs",
    "per_device_eval_batch_size": "prompts per rank in one evaluation generation batch"})
SharedDeepSpeed = only(DeepSpeedArgs, ("offload", "local_rank"), helps={
    "offload": "offload the actor's and critic's optimizer states to the CPU (DeepSpeedCPUAdam; needs ZeRO >= 1)"})
SharedLog = only(LogArgs, tuple(f.name for f in dataclasses.fields(LogArgs)), defaults={"log_interval": 1},
                 helps={"log_interval": "PPO steps between train metric lines",
                        "eval_interval": "PPO steps between evaluations of --eval_data_path (0: before and after "
                                         "training only)",
                        "save_interval": "PPO steps between resumable checkpoints of actor, critic, EMA, KL "
                                         "controller and data position (0: none)"})


@dataclass
class PPOModelArgs:
    actor_model_name_or_path: str = arg(None, "step-1 (SFT) model directory: the initial actor and the frozen "
                                              "reference model")
    critic_model_name_or_path: str = arg(None, "step-2 reward-model directory (sequence classification, one label): "
                                               "the initial critic")
    reward_model_name_or_path: str = arg(None, "frozen reward model directory (None: the "
                                               "--critic_model_name_or_path model)")
    actor_zero_stage: int = arg(2, "ZeRO stage of the actor (the reference model follows it to stage 3)",
                                choices=[0, 1, 2, 3])
    critic_zero_stage: int = arg(2, "ZeRO stage of the critic (the reward model follows it to stage 3)",
                                 choices=[0, 1, 2, 3])
    offload_reference_model: bool = arg(False, "keep the reference model's parameters on the CPU (runs it under "
                                               "ZeRO-3 with parameter offload, whatever the actor's stage)")
    offload_reward_model: bool = arg(False, "keep the reward model's parameters on the CPU (runs it under ZeRO-3 "
                                            "with parameter offload, whatever the critic's stage)")
    actor_lora_dim: int = arg(0, "LoRA rank of the actor; 0 trains all weights")
    critic_lora_dim: int = arg(0, "LoRA rank of the critic (the score head is always trained); 0 trains all weights")
    actor_gradient_checkpointing: bool = arg(False, "recompute the actor's activations in backward")
    critic_gradient_checkpointing: bool = arg(False, "recompute the critic's activations in backward")
    attn_implementation: str = arg("auto", "attention kernel of the four models (auto: the model's default; on a "
                                           "CPU in bf16, eager trains short sequences ~2x faster than sdpa)",
                                   choices=["auto", "eager", "sdpa", "flash_attention_2"])
    disable_dropout: bool = arg(True, "set every dropout probability of the four models to 0, so the policy "
                                      "that generated a rollout is the one its ratios are computed against")


@dataclass
class RolloutArgs:
    max_prompt_seq_len: int = arg(256, "longest prompt in tokens (template included); longer prompts follow "
                                       "--overlong, and truncate keeps the end of the prompt")
    max_answer_seq_len: int = arg(256, "most tokens generated per answer; answers cut here get "
                                       "--missing_eos_penalty")
    per_device_generation_batch_size: int = arg(16, "prompts per rank in one rollout")
    generation_batches: int = arg(1, "rollouts per PPO step; their samples form the experience buffer")
    temperature: float = arg(1.0, "sampling temperature; log-probabilities are computed at the same temperature")
    top_p: float = arg(1.0, "nucleus sampling threshold (1.0: off)")
    top_k: int = arg(0, "sample among the k most likely tokens (0: off)")
    do_sample: bool = arg(True, "sample the rollouts (--no-do_sample: greedy, which PPO rarely wants)")
    print_answers_interval: int = arg(10, "every N steps log a few (prompt, answer, reward) samples (0: never)")


@dataclass
class PPOArgs:
    actor_learning_rate: float = arg(0.0, lr_help("actor"))
    critic_learning_rate: float = arg(0.0, lr_help("critic"))
    actor_weight_decay: float = arg(0.0, "actor AdamW weight decay")
    critic_weight_decay: float = arg(0.0, "critic AdamW weight decay")
    per_device_training_batch_size: int = arg(16, "samples per rank in one PPO mini-batch")
    ppo_epochs: int = arg(1, "passes over the experience buffer per PPO step")
    cliprange: float = arg(0.2, "PPO policy ratio clip epsilon")
    cliprange_value: float = arg(0.2, "value clip range around the rollout values")
    entropy_coef: float = arg(0.0, "weight of the entropy bonus in the actor loss")
    kl_coef: float = arg(0.1, "initial coefficient of the per-token KL penalty against the reference model")
    kl_estimator: str = arg("k1", "per-token KL estimator (k1 = log ratio, k2 = half its square, k3 = "
                                  "exp(-r) - 1 + r)", choices=["k1", "k2", "k3"])
    target_kl: float = arg(0.0, "per-sequence KL the adaptive controller steers to (0: fixed --kl_coef)")
    kl_horizon: float = arg(10000.0, "adaptive KL controller horizon in samples")
    early_stop_kl: float = arg(0.0, "stop the remaining PPO epochs of a step when the approximate KL between "
                                    "the rollout and current policy exceeds this (0: never)")
    clip_reward_value: float = arg(5.0, "clip the reward-model score to +-value (0: no clip)")
    normalize_reward: bool = arg(False, "normalise scores by the running mean and std of all scores seen")
    missing_eos_penalty: float = arg(0.0, "subtracted from the score of answers cut at --max_answer_seq_len")
    gamma: float = arg(1.0, "discount factor of the per-token rewards")
    lam: float = arg(0.95, "GAE lambda (bias-variance trade-off of the advantages)")
    whiten_advantages: bool = arg(True, "normalise the advantages of each buffer to zero mean, unit variance")
    unsup_data_path: list = arg([], "PPO-ptx: SFT-format data whose language-modelling loss is added to the "
                                    "actor's (default: none)", nargs="*")
    unsup_coef: float = arg(27.8, "PPO-ptx loss weight (InstructGPT's gamma)")
    enable_ema: bool = arg(False, "keep an exponential moving average of the actor, saved to OUTPUT_DIR/actor_ema")
    ema_beta: float = arg(0.992, "EMA decay: ema = beta * ema + (1 - beta) * actor after every actor update")


GROUPS = (PPOModelArgs, SharedModel, SharedData, RolloutArgs, PPOArgs, SharedTrain, SharedDeepSpeed, SharedLog)
REQUIRED = ("actor_model_name_or_path", "critic_model_name_or_path", "data_path", "output_dir")
