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
from utils.errors import UserError
from utils.lr import lr_help
from utils.rl import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, LOSS_AGGREGATIONS


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
                                         f.metadata.get("nargs"), **f.metadata.get("limits", {}),
                                         comma=f.metadata.get("comma", False))))
    return dataclasses.make_dataclass(group.__name__, fields)


SharedModel = only(ModelArgs, ("trust_remote_code", "dtype", "lora_alpha", "lora_module_name",
                               "only_optimize_lora", "freeze_embeddings", "disable_dropout"),
                   helps={"disable_dropout": "set every dropout rate of the four models to 0, so the policy that "
                                             "generated a rollout is the one its ratios are computed against"})
SharedData = only(DataArgs, ("data_path", "eval_data_path", "template", "overlong"), helps={
    "data_path": "prompt files (.jsonl/.json/.parquet or hub names; any format with a prompt: {\"prompt\"}, chat "
                 "messages ending with a user turn, SFT and preference records)",
    "eval_data_path": "prompts answered greedily and scored by the reward model at step 0, every --eval_interval "
                      "steps and at the end (none: no evaluation)",
    "overlong": "prompts longer than --max_prompt_seq_len: skip, truncate (each counted in the log; keeps the end, "
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
                                               "the initial critic; needed by --advantage_estimator gae only")
    reward_model_name_or_path: str = arg(None, "frozen reward model directory (None: the "
                                               "--critic_model_name_or_path model, unless --reward_funcs are given)")
    actor_zero_stage: int = arg(2, "ZeRO stage of the actor (the reference model follows it to stage 3)",
                                choices=[0, 1, 2, 3])
    critic_zero_stage: int = arg(2, "ZeRO stage of the critic (the reward model follows it to stage 3)",
                                 choices=[0, 1, 2, 3])
    offload_reference_model: bool = arg(False, "keep the reference model's parameters on the CPU (runs it under "
                                               "ZeRO-3 with parameter offload, whatever the actor's stage)")
    offload_reward_model: bool = arg(False, "keep the reward model's parameters on the CPU (runs it under ZeRO-3 "
                                            "with parameter offload, whatever the critic's stage)")
    actor_lora_dim: int = arg(0, "LoRA rank of the actor; 0 trains all weights", ge=0)
    critic_lora_dim: int = arg(0, "LoRA rank of the critic (the score head is always trained); 0 trains all weights",
                               ge=0)
    actor_gradient_checkpointing: bool = arg(False, "recompute the actor's activations in backward")
    critic_gradient_checkpointing: bool = arg(False, "recompute the critic's activations in backward")
    attn_implementation: str = arg("auto", "attention kernel of the four models (auto: the model's default; on a "
                                           "CPU in bf16, eager trains short sequences ~2x faster than sdpa)",
                                   choices=["auto", "eager", "sdpa", "flash_attention_2"])


@dataclass
class RolloutArgs:
    max_prompt_seq_len: int = arg(0, "longest prompt in tokens (template included); longer prompts follow "
                                     "--overlong, and truncate keeps the end of the prompt; 0 = 256, or half the "
                                     "actor's positions where it has fewer than 512 (what --max_answer_seq_len "
                                     "leaves, when that is given)", ge=0)
    max_answer_seq_len: int = arg(0, "most tokens generated per answer; an answer cut here scores as "
                                     "--cut_answer_score says; 0 = 256, or what fits the actor's positions beside "
                                     "the prompt", ge=0)
    per_device_generation_batch_size: int = arg(16, "prompts per rank in one rollout (each answered "
                                                    "--n_samples_per_prompt times on this rank)", ge=1)
    generation_batches: int = arg(1, "rollouts per PPO step; their samples form the experience buffer", ge=1)
    temperature: float = arg(None, "sampling temperature; log-probabilities are computed at the same temperature "
                                   "(unset: 0.7 for PPO with a critic, 1.0 for the critic-free estimators; README, "
                                   "Alignment defaults)", gt=0)
    top_p: float = arg(1.0, "nucleus sampling threshold (1.0: off)", gt=0, le=1)
    top_k: int = arg(0, "sample among the k most likely tokens (0: off)", ge=0)
    do_sample: bool = arg(True, "sample the rollouts (--no-do_sample: greedy, which PPO rarely wants)")
    print_answers_interval: int = arg(10, "every N steps log a few (prompt, answer, reward) samples (0: never)",
                                      ge=0)


@dataclass
class PPOArgs:
    actor_learning_rate: float = arg(0.0, lr_help("actor"), ge=0)
    critic_learning_rate: float = arg(0.0, lr_help("critic"), ge=0)
    actor_weight_decay: float = arg(0.0, "actor AdamW weight decay", ge=0)
    critic_weight_decay: float = arg(0.0, "critic AdamW weight decay", ge=0)
    per_device_training_batch_size: int = arg(16, "answers per rank in one PPO mini-batch", ge=1)
    ppo_epochs: int = arg(1, "passes over the experience buffer per PPO step", ge=1)
    fuse_critic_forward: bool = arg(True, "when a step is one PPO epoch over one mini-batch per rank (the defaults: "
                                          "--ppo_epochs 1, one generation batch, one training micro-batch, no "
                                          "gradient accumulation, dropout off), take the rollout values from the "
                                          "critic's training forward instead of a separate experience forward: the "
                                          "same numbers, one forward fewer")
    fuse_actor_forward: bool = arg(True, "the same for the actor (any estimator) where generation's logits are not "
                                         "reused (bf16/fp16): the rollout log-probabilities (KL penalty, PPO's old "
                                         "policy) come from the actor's training forward, kept with its autograd "
                                         "state until the policy loss: one forward fewer, at the memory of holding "
                                         "that graph (and its answer logits) through the critic's update")
    critic_warmup_steps: int = arg(-1, "PPO steps at the start that train only the critic (the actor generates but is "
                                       "not updated), so the first policy updates use values fitted to the rollouts "
                                       "rather than the reward model's per-token outputs (-1: a tenth of the PPO "
                                       "steps, rounded, so none in runs of under 5 steps; 0: none)", ge=-1)
    cliprange: float = arg(0.2, "PPO policy ratio clip epsilon", gt=0)
    cliprange_value: float = arg(0.2, "value clip range around the rollout values", gt=0)
    entropy_coef: float = arg(0.0, "weight of the entropy bonus in the actor loss", ge=0)
    kl_coef: float = arg(0.1, "initial coefficient of the per-token KL penalty against the reference model", ge=0)
    kl_estimator: str = arg("k1", "per-token KL estimator (k1 = log ratio, k2 = half its square, k3 = "
                                  "exp(-r) - 1 + r)", choices=["k1", "k2", "k3"])
    anchor_coef: float = arg(0.0, "weight of the anchor in the actor loss: the full next-token KL(reference || "
                                  "actor) over the vocabulary at the answer tokens the reference is sure of "
                                  "(--anchor_confidence), aggregated as the policy loss; it sees probability "
                                  "moved among the tokens not sampled, which the per-token KL penalty does not. "
                                  "Keeps the reference's answer logits of a rollout in memory (0: none)", ge=0)
    anchor_confidence: float = arg(0.9, "the anchor holds only the answer positions where the reference's most "
                                        "likely next token (at the sampling temperature) has at least this "
                                        "probability: the tokens it is sure of (a copied name, the answer's fixed "
                                        "words), not those where it spreads over several (a choice the reward "
                                        "speaks about) (0: every position)", ge=0, le=1)
    target_kl: float = arg(0.0, "per-sequence KL the adaptive controller steers to (0: fixed --kl_coef)", ge=0)
    kl_horizon: float = arg(10000.0, "adaptive KL controller horizon in samples", gt=0)
    early_stop_kl: float = arg(0.0, "stop the remaining PPO epochs of a step when the approximate KL between "
                                    "the rollout and current policy exceeds this (0: never)", ge=0)
    clip_reward_value: float = arg(5.0, "clip the score (reward model plus the weighted --reward_funcs) to +-value "
                                   "(0: no clip)", ge=0)
    normalize_reward: bool = arg(False, "normalise scores by the running mean and std of all scores seen")
    missing_eos_penalty: float = arg(0.0, "subtracted from the score of answers cut at --max_answer_seq_len (with "
                                          "--cut_answer_score scored)", ge=0)
    cut_answer_score: str = arg("auto", "the score of an answer cut at --max_answer_seq_len (no EOS): lowest = "
                                        "-clip_reward_value, the lowest score any answer can get (a reward model is "
                                        "trained to score finished answers at their EOS, so its reading of a cut one "
                                        "is outside its training, and PPO can climb it with answers that never end); "
                                        "scored = the score as computed, minus --missing_eos_penalty; auto = lowest "
                                        "when a reward model scores the answers, --clip_reward_value > 0 and no "
                                        "--missing_eos_penalty is given, else scored",
                                choices=["auto", "lowest", "scored"])
    gamma: float = arg(1.0, "discount factor of the per-token rewards", ge=0, le=1)
    lam: float = arg(0.95, "GAE lambda (bias-variance trade-off of the advantages)", ge=0, le=1)
    whiten_advantages: bool = arg(True, "normalise the advantages of each buffer to zero mean, unit variance")
    unsup_data_path: list = arg([], "PPO-ptx: SFT-format data whose language-modelling loss is added to the "
                                    "actor's (default: none)", nargs="*")
    unsup_coef: float = arg(27.8, "PPO-ptx loss weight (InstructGPT's gamma)", ge=0)
    enable_ema: bool = arg(False, "keep an exponential moving average of the actor, saved to OUTPUT_DIR/actor_ema")
    ema_beta: float = arg(0.992, "EMA decay: ema = beta * ema + (1 - beta) * actor after every actor update",
                          ge=0, lt=1)


@dataclass
class AlgoArgs:
    advantage_estimator: str = arg("gae", "gae: PPO with a critic (GAE); grpo: (r - group mean) / group std; "
                                          "dr_grpo: r - group mean; rloo: r - mean of the other answers; "
                                          "reinforce_pp: discounted returns normalised over the batch; "
                                          "reinforce_pp_baseline: the same after subtracting the group mean. "
                                          "Every estimator but gae trains no critic", choices=list(ADVANTAGE_ESTIMATORS))
    n_samples_per_prompt: int = arg(1, "answers generated per prompt (K), all on the prompt's rank; the group "
                                       "estimators need K >= 2")
    scale_rewards: str = arg("auto", "divide the baselined rewards by the std of the prompt's group, of the whole "
                                     "batch, or not at all (auto: grpo group; dr_grpo and rloo none; reinforce_pp "
                                     "batch, which also subtracts the batch mean; gae uses --whiten_advantages)",
                             choices=["auto", "group", "batch", "none"])
    loss_agg: str = arg("auto", "how per-token losses become one loss, over the whole optimizer step: token_mean, "
                                "seq_mean_token_mean (each answer weighs the same) or seq_mean_token_sum_norm "
                                "(token sums / --max_answer_seq_len) (auto: grpo seq_mean_token_mean; dr_grpo and "
                                "rloo seq_mean_token_sum_norm; gae and reinforce_pp token_mean)",
                        choices=["auto", *LOSS_AGGREGATIONS])
    kl_in: str = arg("reward", "where the KL penalty against the reference goes: reward (per-token penalty in the "
                               "reward, as in PPO) or loss (kl_coef x --kl_estimator added to the policy loss; "
                               "GRPO's choice is k3, whose gradient is biased, while k2's is unbiased); "
                               "with --kl_coef 0 (and no --anchor_coef) no reference model is loaded at all",
                     choices=["reward", "loss"])
    reward_funcs: list = arg([], "rule-based rewards, FILE.py:NAME or package.module:NAME, called as "
                                 "fn(prompts, completions, **columns) -> list of floats (TRL's convention); added "
                                 "to the reward model's score, or used alone", nargs="*")
    reward_weights: list = arg([], "one weight per --reward_funcs entry (default 1.0 each)", nargs="*")


GROUPS = (PPOModelArgs, SharedModel, SharedData, RolloutArgs, PPOArgs, AlgoArgs, SharedTrain, SharedDeepSpeed,
          SharedLog)
REQUIRED = ("actor_model_name_or_path", "data_path", "output_dir")

# Each estimator's own choices (its paper's) where --scale_rewards / --loss_agg say auto.
AUTO_SCALE = {"gae": "none", "grpo": "group", "dr_grpo": "none", "rloo": "none", "reinforce_pp": "batch",
              "reinforce_pp_baseline": "batch"}
AUTO_LOSS_AGG = {"gae": "token_mean", "grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm",
                 "rloo": "seq_mean_token_sum_norm", "reinforce_pp": "token_mean", "reinforce_pp_baseline": "token_mean"}


@dataclass(frozen=True)
class Algorithm:
    """What the step-3 flags resolve to (the parsed flags themselves are never changed)."""
    estimator: str
    k: int               # answers per prompt
    scale: str           # group, batch or none
    loss_agg: str
    kl_in: str
    critic: bool         # a critic is loaded and trained
    reference: bool      # a reference model is loaded (kl_coef > 0 or anchor_coef > 0)
    reward_model: str | None  # frozen reward model directory, or None (rule-based rewards only)
    cut_score: str = "scored"  # lowest: an answer cut at --max_answer_seq_len scores -clip_reward_value
    temperature: float = 1.0   # rollout sampling temperature (--temperature, or the estimator's default)


# --temperature unset: PPO with a critic samples at 0.7 (measured on the alignment suite, README), the
# critic-free estimators at 1.0, which keeps the spread within a group their advantages are made of.
AUTO_TEMPERATURE = {"gae": 0.7, "grpo": 1.0, "dr_grpo": 1.0, "rloo": 1.0, "reinforce_pp": 1.0,
                    "reinforce_pp_baseline": 1.0}

CRITIC_WARMUP_SHARE = 0.1  # --critic_warmup_steps -1: this share of the steps (README, Alignment defaults)


def critic_warmup_steps(args, algo: Algorithm, total_steps: int) -> int:
    """How many of the first PPO steps train only the critic (0 without a critic)."""
    if not algo.critic:
        return 0
    if args.critic_warmup_steps >= 0:
        return min(args.critic_warmup_steps, total_steps)
    return int(CRITIC_WARMUP_SHARE * total_steps + 0.5)  # rounded half up: none in runs of under 5 steps


DEFAULT_PROMPT_LEN = DEFAULT_ANSWER_LEN = 256


def resolve_lengths(prompt: int, answer: int, positions: int | None) -> tuple[int, int]:
    """--max_prompt_seq_len and --max_answer_seq_len, 0 = auto: 256 each, or, for an actor of fewer than
    512 positions (a tiny config's max_position_embeddings 128), its positions shared: half each, or what
    the length given leaves to the other. Lengths given are kept (check_positions names them if too long)."""
    if prompt and answer:
        return prompt, answer
    auto_prompt, auto_answer = DEFAULT_PROMPT_LEN, DEFAULT_ANSWER_LEN
    if positions is not None and positions < auto_prompt + auto_answer:
        auto_prompt, auto_answer = positions // 2, positions - positions // 2
        if prompt:
            auto_answer = max(1, positions - prompt)
        if answer:
            auto_prompt = max(1, positions - answer)
    return prompt or auto_prompt, answer or auto_answer


def resolve_algorithm(args) -> Algorithm:
    """The run's algorithm from the flags; settings that cannot work together are refused (UserError)."""
    est, k = args.advantage_estimator, args.n_samples_per_prompt
    if k < 1:
        raise UserError("--n_samples_per_prompt must be >= 1")
    if est in GROUP_ESTIMATORS and k < 2:
        raise UserError(f"--advantage_estimator {est} compares the answers to one prompt, so it needs "
                        f"--n_samples_per_prompt >= 2 (got {k})")
    critic = est == "gae"
    if critic and not args.critic_model_name_or_path:
        raise UserError("--advantage_estimator gae (PPO) trains a critic: give --critic_model_name_or_path (a step-2 "
                        "model), or choose a critic-free --advantage_estimator")
    if not critic and args.critic_model_name_or_path:
        raise UserError(f"--advantage_estimator {est} trains no critic, so --critic_model_name_or_path is not used; "
                        "drop it (pass a reward model as --reward_model_name_or_path)")
    reward_model = args.reward_model_name_or_path or (args.critic_model_name_or_path if not args.reward_funcs
                                                      else None)
    if reward_model is None and not args.reward_funcs:
        raise UserError("no reward: give --reward_model_name_or_path, --reward_funcs, or both")
    scale = AUTO_SCALE[est] if args.scale_rewards == "auto" else args.scale_rewards
    if est == "gae" and args.scale_rewards != "auto":
        raise UserError("--scale_rewards applies to the critic-free estimators; gae normalises its advantages with "
                        "--whiten_advantages")
    if est in ("reinforce_pp", "reinforce_pp_baseline") and scale == "group":
        raise UserError(f"--advantage_estimator {est} normalises over the batch: --scale_rewards batch or none")
    if scale == "group" and k < 2:
        raise UserError("--scale_rewards group needs --n_samples_per_prompt >= 2")
    if args.kl_in == "loss" and args.kl_estimator == "k1":
        raise UserError("--kl_in loss with --kl_estimator k1: the gradient of k1 is zero in expectation, so the "
                        "penalty would do nothing; use k2 (unbiased gradient) or k3 (GRPO's, biased gradient)")
    if args.kl_coef < 0:
        raise UserError("--kl_coef must be >= 0")
    if args.kl_coef == 0 and args.target_kl > 0:
        raise UserError("--target_kl adapts --kl_coef multiplicatively, which cannot start from 0; give --kl_coef > 0")
    loss_agg = AUTO_LOSS_AGG[est] if args.loss_agg == "auto" else args.loss_agg
    return Algorithm(estimator=est, k=k, scale=scale, loss_agg=loss_agg, kl_in=args.kl_in, critic=critic,
                     reference=args.kl_coef > 0 or args.anchor_coef > 0, reward_model=reward_model,
                     cut_score=resolve_cut_score(args, reward_model),
                     temperature=AUTO_TEMPERATURE[est] if args.temperature is None else args.temperature)


def resolve_cut_score(args, reward_model: str | None) -> str:
    """--cut_answer_score resolved: lowest (an answer cut at --max_answer_seq_len scores -clip_reward_value)
    or scored."""
    if args.cut_answer_score == "lowest":
        if not args.clip_reward_value:
            raise UserError("--cut_answer_score lowest gives a cut answer -clip_reward_value, the lowest score; with "
                            "--clip_reward_value 0 there is none: give a --clip_reward_value > 0 or --cut_answer_score "
                            "scored")
        if args.missing_eos_penalty:
            raise UserError("--missing_eos_penalty applies with --cut_answer_score scored; with lowest a cut answer "
                            "already gets the lowest score")
        return "lowest"
    if args.cut_answer_score == "scored":
        return "scored"
    lowest = reward_model is not None and args.clip_reward_value > 0 and not args.missing_eos_penalty
    return "lowest" if lowest else "scored"
