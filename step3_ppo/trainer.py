"""Step 3 loop. One step:

  1. rollouts: --generation_batches batches of this rank's prompts, each answered
     --n_samples_per_prompt times on this rank -> answers, the models' forward passes and the
     rule-based rewards (rollout.py);
  2. rewards and advantages: score (reward model + weighted --reward_funcs, optionally normalised,
     minus --missing_eos_penalty, clipped; a cut answer scores -clip_reward_value by default:
     --cut_answer_score), the KL penalty in the reward (--kl_in reward), then the
     --advantage_estimator: GAE with advantages whitened over the buffer of all ranks (PPO), a group
     baseline (grpo, dr_grpo, rloo), or discounted returns normalised over the batch (reinforce_pp);
  3. --ppo_epochs passes over the buffer in shuffled mini-batches: clipped policy loss (+ entropy bonus,
     + KL term with --kl_in loss, + PPO-ptx) for the actor and clipped value loss for the critic (PPO
     only), aggregated by --loss_agg over the whole optimizer step, stepped together;
  4. the KL controller adapts to the step's KL, metrics go to metrics.jsonl.

Every rank holds the same number of samples and runs the same forwards and collectives in the same
order; nothing is dropped on one rank only (pitfall 10).
"""
from __future__ import annotations

import math
import resource
import time
from collections import defaultdict

import torch

from step3_ppo.models import ema_state, ema_update_, load_ema_state, step_together
from step3_ppo.rollout import (answer_logits, answer_values, collate_samples, experience, final_scores, generate,
                               generation_config, model_inputs, reads_actor_ids, repeat_prompts,
                               reuses_generation_logits, rule_scores, split_samples, text_scores)
from utils import ds
from utils.checkpoint import Checkpointer
from utils.errors import UserError
from utils.health import AnswerHealthMonitor, rollout_distinct_ratio
from utils.losses import kl_from_log_probs, log_probs, sft_loss, step_loss_scale
from utils.rl import (AdaptiveKLController, FixedKLController, RunningMoments, aggregate_loss, compute_rewards,
                      discounted_returns, entropy_from_logits, gae_advantages, grpo_advantages, group_stats,
                      masked_kl, policy_loss_per_token, rloo_advantages, std_from_sums, token_logprobs,
                      value_loss_per_token, whiten_from_sums)
from utils.stream import eval_batches
from utils.train import check_finite, to_device

GROUP_EPS = 1e-6  # added to a std before dividing by it (GRPO's epsilon)


def make_kl_controller(args):
    if args.target_kl > 0:
        return AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    return FixedKLController(args.kl_coef)


# ----------------------------------------------------------------------------- rewards and advantages

def final_score(args, algo, b: dict, reward_norm: RunningMoments) -> torch.Tensor:
    """The answer's scalar reward [B]: the score (reward model + rule-based rewards), optionally
    normalised, minus --missing_eos_penalty for cut answers, clipped to +-clip_reward_value; with
    --cut_answer_score lowest (algo.cut_score) a cut answer gets -clip_reward_value instead."""
    score = reward_norm.normalize(b["score"]) if args.normalize_reward else b["score"]
    score = score - args.missing_eos_penalty * (~b["has_eos"]).to(score.dtype)
    if args.clip_reward_value:
        score = score.clamp(-args.clip_reward_value, args.clip_reward_value)
    if algo.cut_score == "lowest":
        score = torch.where(b["has_eos"], score, torch.full_like(score, -args.clip_reward_value))
    return score


def sequence_advantages(algo, score: torch.Tensor, kl: torch.Tensor, kl_coef: float, groups: torch.Tensor,
                        batch_std: float | None = None) -> torch.Tensor:
    """grpo / dr_grpo / rloo: one advantage per answer [B] from its score [B], its summed KL [B] and group
    ids [B]: the score less the group's baseline, divided by the group's score std with --scale_rewards
    group, minus kl_coef x the KL less the group's baseline (--kl_in reward; kl_coef 0 otherwise).

    The KL part is never divided by a std. The reward being score - kl_coef x KL, dividing the whole of it
    by its group std turned a group of equal scores (no signal: every answer right, or every one wrong)
    into advantages of size 1 from its answers' KL alone, whatever kl_coef, so kl_coef no longer set the
    KL's weight. --scale_rewards batch divides the score part by `batch_std`, the scores' std over every
    rank's answers, in the same way."""
    adv = score_advantages(algo, score, groups, algo.scale == "group")
    if batch_std is not None:
        adv = adv / (batch_std + GROUP_EPS)
    return adv - kl_coef * score_advantages(algo, kl, groups, False) if kl_coef else adv


def score_advantages(algo, values: torch.Tensor, groups: torch.Tensor, scale_by_std: bool) -> torch.Tensor:
    """values [B] less their group's baseline (rloo: the mean of the other answers; else the group mean),
    divided by the group's std of `values` when scale_by_std (a group of equal values: exactly 0)."""
    if algo.estimator == "rloo":
        adv = rloo_advantages(values, groups)
        return adv / (group_stats(values, groups)["std"] + GROUP_EPS) if scale_by_std else adv
    return grpo_advantages(values, groups, scale_by_std=scale_by_std, eps=GROUP_EPS)


def build_buffer(args, algo, rollouts: list[dict], kl_coef: float, reward_norm: RunningMoments):
    """Per-token rewards and advantages for every rollout. Returns (rows, stats, n): rows are this rank's
    per-sample dicts for mini-batching, stats global (all ranks) means for logging, n the global
    sample count. `return` is the mean per-answer sum of rewards (score - kl_coef * KL with --kl_in
    reward), the objective; `reward` the mean score."""
    if args.normalize_reward:
        raw = torch.cat([b["score"] for b in rollouts]).double()
        reward_norm.update(*ds.all_reduce_sum([raw.numel(), raw.sum(), raw.square().sum()]).tolist())
    reward_kl_coef = kl_coef if algo.kl_in == "reward" else 0.0
    local = defaultdict(float)
    for b in rollouts:
        mask = b["action_mask"]
        score = final_score(args, algo, b, reward_norm)
        # Without a reference model the KL is 0 by definition (logp against itself) and is not logged.
        ref_logp = b["ref_logp"] if "ref_logp" in b else b["logp"]
        if algo.estimator == "reinforce_pp_baseline":  # group mean subtracted first (Hu et al.)
            placed = score - group_stats(score, b["groups"])["mean"]
        else:
            placed = score
        rewards, kl, _ = compute_rewards(b["logp"], ref_logp, placed, mask, reward_kl_coef, args.kl_estimator)
        objective = rewards.sum() if placed is score else score.sum() - reward_kl_coef * kl.sum()
        if algo.estimator == "gae":
            b["advantages"], b["returns"] = gae_advantages(rewards, b["values"], mask, args.gamma, args.lam)
        elif algo.estimator in ("reinforce_pp", "reinforce_pp_baseline"):
            b["advantages"] = discounted_returns(rewards, mask, args.gamma)
        else:
            b["seq_score"], b["seq_kl"] = score, kl.sum(-1)
            b["advantages"] = sequence_advantages(algo, score, b["seq_kl"], reward_kl_coef, b["groups"])[:, None] * mask
        adv = b["advantages"] * mask
        lengths = mask.sum(-1)
        for k, v in (("samples", mask.shape[0]), ("reward", b["score"].sum()), ("return", objective),
                     ("kl", kl.sum()), ("entropy", (b["entropy"] * mask).sum()), ("tokens", mask.sum()),
                     ("eos", b["has_eos"].sum()), ("eos_tokens", (lengths * b["has_eos"]).sum()),
                     ("adv_sum", adv.sum()), ("adv_sq", adv.square().sum())):
            local[k] += float(v)
        for name, values in b.get("func_rewards", {}).items():
            local[f"func_sum/{name}"] += sum(v for v in values if v is not None)
            local[f"func_n/{name}"] += sum(v is not None for v in values)
        if "seq_kl" in b:  # the scores' batch std (--scale_rewards batch)
            local["seq_sum"] += float(score.sum())
            local["seq_sq"] += float(score.square().sum())
        if algo.k > 1:  # group statistics of the score (before any KL penalty): is there a signal to learn?
            st = group_stats(score, b["groups"])
            first = torch.arange(score.numel(), device=score.device) % algo.k == 0
            for k, v in (("groups", first.sum()), ("group_mean", st["mean"][first].sum()),
                         ("group_std", st["std"][first].sum()), ("groups_equal", st["equal"][first].sum())):
                local[k] += float(v)
        b["lengths"] = lengths
    g = dict(zip(local, ds.all_reduce_sum(list(local.values())).tolist()))
    n = g["samples"]
    batch_std = std_from_sums(n, g["seq_sum"], g["seq_sq"]) if algo.scale == "batch" and "seq_sum" in g else None
    rows = []
    for b in rollouts:
        if algo.estimator == "gae" and args.whiten_advantages or (
                algo.estimator.startswith("reinforce_pp") and algo.scale == "batch"):
            b["advantages"] = whiten_from_sums(b["advantages"], b["action_mask"], g["tokens"], g["adv_sum"],
                                               g["adv_sq"])
        elif batch_std is not None:
            b["advantages"] = sequence_advantages(algo, b["seq_score"], b["seq_kl"], reward_kl_coef, b["groups"],
                                                  batch_std)[:, None] * b["action_mask"]
        fields = ["logp", "advantages"] + (["values", "returns"] if algo.critic else [])
        if algo.kl_in == "loss" and algo.reference:
            fields.append("ref_logp")
        if "ref_logits" in b:
            fields.append("ref_logits")
        rows += split_samples(b, {k: b[k] for k in fields})
    lengths = torch.cat([b["lengths"] for b in rollouts]).float()
    low_high = ds.all_gather_objects((float(lengths.min()), float(lengths.max())))
    stats = {"reward": g["reward"] / n, "return": g["return"] / n, "kl": g["kl"] / n, "kl_coef": kl_coef,
             "entropy": g["entropy"] / g["tokens"], "response_length": g["tokens"] / n, "eos_rate": g["eos"] / n,
             "response_length_min": min(x[0] for x in low_high), "response_length_max": max(x[1] for x in low_high),
             "clipped_rate": 1.0 - g["eos"] / n,
             "finished_length": g["eos_tokens"] / g["eos"] if g["eos"] else 0.0}
    if not algo.reference:
        del stats["kl"], stats["kl_coef"]
    for key in g:  # a function that applied to no answer (all None) has no mean: left out, not logged as 0
        if key.startswith("func_sum/") and g[f"func_n/{key.split('/', 1)[1]}"]:
            name = key.split("/", 1)[1]
            stats[f"reward/{name}"] = g[key] / g[f"func_n/{name}"]
    if algo.k > 1:
        stats.update(group_reward_mean=g["group_mean"] / g["groups"], group_reward_std=g["group_std"] / g["groups"],
                     groups_all_equal=g["groups_equal"] / g["groups"])
    return rows, stats, int(n)


# ----------------------------------------------------------------------------- PPO update

def actor_loss(args, algo, actor, b: dict, ptx: dict | None, kl_coef: float, n_tok: float, n_seq: float,
               logits: torch.Tensor | None = None):
    """Policy loss of one mini-batch as its part of the optimizer step's --loss_agg aggregate: clipped
    surrogate (+ entropy bonus, + kl_coef x KL estimate with --kl_in loss); ptx separately. Returns
    (loss, ptx_loss, stats) with stats as this mini-batch's parts of step-wide token means. `logits`:
    the mini-batch's answer logits from a fused forward (with autograd state); otherwise a forward here."""
    if logits is None:
        logits = answer_logits(actor, b, algo.temperature)
    logp = token_logprobs(logits, b["answers"])
    mask = b["action_mask"]
    per_token, terms = policy_loss_per_token(logp, b["logp"], b["advantages"], args.cliprange)
    if args.entropy_coef:
        per_token = per_token - args.entropy_coef * entropy_from_logits(logits)
    stats = {k: float((terms[k] * mask).sum()) / n_tok for k in ("clipped", "approx_kl")}
    stats["clipfrac"] = stats.pop("clipped")
    if algo.kl_in == "loss" and algo.reference:
        kl = masked_kl(logp, b["ref_logp"], mask, args.kl_estimator)
        per_token = per_token + kl_coef * kl
        stats["kl_loss"] = float(aggregate_loss(kl.detach(), mask, algo.loss_agg, n_tok, n_seq,
                                                args.max_answer_seq_len))
    if "ref_logits" in b:
        ref_log_probs = log_probs(b["ref_logits"])  # once, for the threshold and the KL
        held = mask
        if args.anchor_confidence:
            held = mask * (ref_log_probs.amax(-1) >= math.log(args.anchor_confidence))
        anchor = kl_from_log_probs(log_probs(logits), ref_log_probs) * held
        per_token = per_token + args.anchor_coef * anchor
        stats["kl/anchor"] = float(aggregate_loss(anchor.detach(), mask, algo.loss_agg, n_tok, n_seq,
                                                  args.max_answer_seq_len))
    loss = aggregate_loss(per_token, mask, algo.loss_agg, n_tok, n_seq, args.max_answer_seq_len)
    ptx_loss = None
    if ptx is not None:
        pos = model_inputs({"seq": ptx["input_ids"], "attention_mask": ptx["attention_mask"]})
        ptx_logits = actor(**pos, use_cache=False).logits
        ptx_loss, _ = sft_loss(ptx_logits, ptx["labels"], ptx["n_tokens"])
    return loss, ptx_loss, stats


def one_pass_step(args, algo) -> bool:
    """True when a step's training forward sees the rollout exactly as the experience forward would: one
    PPO epoch, one generation batch and one training micro-batch per rank, no gradient accumulation, no
    dropout. A model's training forward can then stand in for its experience forward (detached), and the
    same graph gives its loss."""
    return (args.ppo_epochs == 1 and args.generation_batches == 1 and args.gradient_accumulation_steps == 1
            and args.disable_dropout
            and args.per_device_generation_batch_size * algo.k <= args.per_device_training_batch_size)


def fuses_critic_forward(args, algo) -> bool:
    """The critic's values (detached) are the rollout values; GAE and whitening need only those, so
    nothing else changes. The value clip range is then a no-op (old and new values are the same
    numbers), as it is in the first epoch of every PPO step anyway."""
    return algo.critic and args.fuse_critic_forward and one_pass_step(args, algo)


def fuses_actor_forward(args, algo, actor) -> bool:
    """The actor's log-probabilities (detached) are the rollout's: the KL penalty and PPO's old policy.
    The first ratio is then exactly 1, as it is with a separate forward and no dropout. Used only where
    it saves a forward: not where generation's own logits stand in for the actor's (fp32), which would
    only trade their memory for the graph's."""
    return args.fuse_actor_forward and one_pass_step(args, algo) and not reuses_generation_logits(actor)


def rows_of(graph: torch.Tensor, part: list[int], width: int) -> torch.Tensor:
    """A fused forward's output for the rows `part` of the rollout, cut to the mini-batch's answer width."""
    return graph[torch.tensor(part, device=graph.device)][:, :width]


def ppo_update(args, algo, models, rows: list[dict], unsup, pad_id: int, step: int, kl_coef: float,
               values_graph: torch.Tensor | None = None, train_actor: bool = True,
               logits_graph: torch.Tensor | None = None) -> dict:
    """--ppo_epochs passes over this rank's buffer; returns global means over the optimizer steps.
    train_actor=False (critic warm-up): only the critic's loss, backward and step.
    values_graph / logits_graph: the critic's values / the actor's answer logits of the one rollout with
    autograd state (fuses_critic_forward / fuses_actor_forward), in the order of `rows`; its mini-batch
    then needs no forward of that model.

    Loss normalisation (pitfall 16): every micro-batch's loss is its part of the --loss_agg aggregate
    over the optimizer step's answers and tokens on all ranks (utils.rl.aggregate_loss), times
    world * grad_accum to undo DeepSpeed's averaging, so the gradient is that of the full batch however
    it is split. The value loss is a token mean over the step the same way.
    """
    world, ga, mb = ds.world_size(), args.gradient_accumulation_steps, args.per_device_training_batch_size
    actor, critic = models.actor, models.critic
    train_actor = train_actor or critic is None
    engines = models.trained() if train_actor else [critic]
    scale = step_loss_scale(world, ga)
    per_step = mb * ga
    totals, opt_steps, epochs_done = defaultdict(float), 0, 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(len(rows)).tolist()
        stop = False
        for start in range(0, len(rows), per_step):
            parts = [order[j:j + mb] for j in range(start, start + per_step, mb)]
            micro = [collate_samples([rows[i] for i in part], pad_id) for part in parts]
            ptx = [to_device(unsup.next_step()[0]) for _ in micro] if unsup is not None and train_actor else [None] * ga
            local_tokens = sum(float(b["action_mask"].sum()) for b in micro)
            local_seqs = sum(float(b["action_mask"].shape[0]) for b in micro)
            local_ptx = sum(float((p["labels"][:, 1:] != -100).sum()) if p is not None else 0.0 for p in ptx)
            n_tok, n_ptx, n_seq = ds.all_reduce_sum([local_tokens, local_ptx, local_seqs]).tolist()
            local = defaultdict(float)
            for b, p, part in zip(micro, ptx, parts):
                if critic is not None:  # first: a fused forward's graph is freed before the actor's is built
                    if values_graph is not None:  # the rollout's rows in this mini-batch's order and width
                        values = rows_of(values_graph, part, b["answers"].shape[1])
                    else:
                        values = answer_values(critic, b)
                    per_token, clipped = value_loss_per_token(values, b["values"], b["returns"], args.cliprange_value)
                    c_loss = aggregate_loss(per_token, b["action_mask"], "token_mean", n_tok, n_seq)
                    critic.backward(c_loss * scale)
                    local["critic_loss"] += c_loss.item()
                    local["value_clipfrac"] += float((clipped * b["action_mask"]).sum()) / n_tok
                if train_actor:
                    if p is not None:
                        p["n_tokens"] = max(n_ptx, 1.0)
                    fused = rows_of(logits_graph, part, b["answers"].shape[1]) if logits_graph is not None else None
                    a_loss, ptx_loss, a_stats = actor_loss(args, algo, actor, b, p, kl_coef, n_tok, n_seq, fused)
                    total = a_loss
                    if ptx_loss is not None:
                        total = total + args.unsup_coef * ptx_loss
                        local["ptx_loss"] += ptx_loss.item()
                    actor.backward(total * scale)
                    local["actor_loss"] += a_loss.item()
                    for k, v in a_stats.items():
                        local[k] += v
                else:  # warm-up: the actor is the rollout's policy, so its ratio is 1 (no clip, no drift)
                    for k in ("actor_loss", "clipfrac", "approx_kl", *(("ptx_loss",) if unsup is not None else ())):
                        local[k] += 0.0
                stepped = step_together(engines)  # after every backward: DeepSpeed counts the micro-batches
            if models.ema is not None and stepped and train_actor:
                ema_update_(models.ema, actor.module, args.ema_beta)
            g = dict(zip(local, ds.all_reduce_sum(list(local.values())).tolist()))
            check_finite(g["actor_loss"] + g.get("critic_loss", 0.0), step, "PPO loss")
            for k, v in g.items():
                totals[k] += v
            totals["skipped_steps"] += 0.0 if stepped else 1.0
            opt_steps += 1
            if args.early_stop_kl and g["approx_kl"] > args.early_stop_kl:
                stop = True  # the same global value on every rank, so all ranks stop together
                break
        epochs_done += 1
        if stop:
            break
    out = {k: v / opt_steps for k, v in totals.items() if k != "skipped_steps"}
    out.update(ppo_epochs_done=epochs_done, skipped_steps=int(totals["skipped_steps"]))
    return out


# ----------------------------------------------------------------------------- evaluation and samples

def score_rollout(models, funcs, tokenizer, b: dict, items: list, max_len: int) -> None:
    """Add the weighted rule-based rewards to the batch's score (the reward model's, or 0) in place,
    keeping each function's values for the metrics. A reward function that fails on one rank stops
    every rank with its message (the others would otherwise die in their next collective). A reward model
    that reads text (its own tokenizer or template) adds its scores here too."""
    if models.reward_encoder is not None:
        b["score"] = b["score"] + text_scores(models, tokenizer, b, items)
    if not funcs:
        return
    error = None
    try:
        total, b["func_rewards"] = rule_scores(funcs, tokenizer, b, items, max_len)
    except UserError as e:
        error = str(e)
    failed = [e for e in ds.all_gather_objects(error) if e]
    if failed:
        raise UserError(failed[0], every_rank=True)
    b["score"] = b["score"] + total


@torch.no_grad()
def evaluate(args, models, encoder, items: list, funcs) -> dict:
    """Greedy answers to the evaluation prompts: mean score (reward model + weighted reward functions),
    each reward function's mean, EOS rate, answer length."""
    cfg = generation_config(args, encoder, greedy=True)
    sums = defaultdict(float)
    for batch, valid in eval_batches(items, args.per_device_eval_batch_size, list):
        b = generate(models.actor, [it.ids for it in batch], encoder, cfg)
        valid = valid.to(b["seq"].device)
        b["score"] = final_scores(models.reward, b) if reads_actor_ids(models) else torch.zeros_like(valid)
        score_rollout(models, funcs, encoder.tokenizer, b, batch, args.max_answer_seq_len)
        sums["reward"] += float((b["score"] * valid).sum())
        sums["eos"] += float((b["has_eos"].float() * valid).sum())
        sums["length"] += float((b["action_mask"].sum(-1).float() * valid).sum())
        sums["count"] += float(valid.sum())
        for name, values in b.get("func_rewards", {}).items():
            sums[f"reward/{name}"] += sum(v * float(w) for v, w in zip(values, valid) if v is not None)
            sums[f"n/{name}"] += sum(float(w) for v, w in zip(values, valid) if v is not None)
    g = dict(zip(sums, ds.all_reduce_sum(list(sums.values())).tolist()))
    out = {"reward": g["reward"] / g["count"], "eos_rate": g["eos"] / g["count"],
           "response_length": g["length"] / g["count"]}
    for f in funcs:  # as in training: no mean for a function that applied to no answer
        if g[f"n/{f.name}"]:
            out[f"reward/{f.name}"] = g[f"reward/{f.name}"] / g[f"n/{f.name}"]
    return out


def sample_table(tokenizer, b: dict, k: int = 3) -> list[dict]:
    """A few (prompt, answer, reward) rows of a rollout; the answer keeps its EOS so stopping is visible."""
    rows = []
    P = b["prompt_width"]
    for i in range(min(k, b["seq"].shape[0])):
        prompt = b["seq"][i, :P][b["attention_mask"][i, :P].bool()]
        answer = b["answers"][i, :int(b["action_mask"][i].sum())]
        rows.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                     "answer": tokenizer.decode(answer), "reward": round(float(b["score"][i]), 4)})
    return rows


def peak_rss_mb() -> float:
    """The largest resident memory of any rank so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return max(ds.all_gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))


# ----------------------------------------------------------------------------- the loop

def client_state(models, stream, unsup, kl_ctl, reward_norm, health) -> dict:
    return {"prompts": stream.state_dict(), "unsup": unsup.state_dict() if unsup is not None else None,
            "kl_ctl": kl_ctl.state_dict(), "reward_norm": reward_norm.state_dict(),
            "ema": ema_state(models.ema) if models.ema is not None else None, "health": health.state_dict()}


def restore_client_state(state: dict, models, stream, unsup, kl_ctl, reward_norm, health) -> None:
    stream.load_state_dict(state["prompts"])
    health.load_state_dict(state.get("health"))
    if unsup is not None:
        unsup.load_state_dict(state["unsup"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    reward_norm.load_state_dict(state["reward_norm"])
    if models.ema is not None:
        sharded = 3 in (state["saved_zero_stage"].get("actor"), models.actor.zero_optimization_stage())
        if sharded and (state["saved_world_size"] != ds.world_size()
                        or state["saved_zero_stage"].get("actor") != models.actor.zero_optimization_stage()):
            raise UserError("--resume --enable_ema: under ZeRO-3 each rank's checkpoint holds its own shard of the "
                            "EMA, which cannot be regrouped for another world size or ZeRO stage")
        load_ema_state(models.ema, state["ema"])


def train(args, algo, models, encoder, stream, unsup, eval_items, funcs, logger, total_steps: int,
          critic_warmup: int = 0) -> dict:
    """Steps up to `total_steps`, the first `critic_warmup` of them updating only the critic; returns the
    last step's metrics."""
    kl_ctl, reward_norm = make_kl_controller(args), RunningMoments()
    health = AnswerHealthMonitor(cut_lowest=algo.cut_score == "lowest")
    gen_cfg = generation_config(args, encoder, algo.temperature)
    last = {}
    engines = {"critic": models.critic, "actor": models.actor}  # actor last: its client state is per rank
    engines = {k: v for k, v in engines.items() if v is not None}
    fused = fuses_critic_forward(args, algo)
    if fused:
        ds.print0("critic: one PPO epoch over one mini-batch per rank, so the rollout values come from the critic's "
                  "training forward (no experience forward for it; --no-fuse_critic_forward turns this off)")
    fused_actor = fuses_actor_forward(args, algo, models.actor)
    if fused_actor:
        ds.print0("actor: one PPO epoch over one mini-batch per rank, so the rollout log-probabilities come from the "
                  "actor's training forward (no experience forward for it; --no-fuse_actor_forward turns this off)")
    ckpt = Checkpointer(args, engines, logger,
                        lambda: client_state(models, stream, unsup, kl_ctl, reward_norm, health),
                        lambda st: restore_client_state(st, models, stream, unsup, kl_ctl, reward_norm, health))
    step = ckpt.resume()
    if step == 0 and eval_items:
        logger.log({"step": 0, "split": "eval", **evaluate(args, models, encoder, eval_items, funcs)})
    while step < total_steps:
        step += 1
        t0 = time.perf_counter()
        rollouts, gen_sec = [], 0.0
        train_actor = step > critic_warmup
        fuse_a = fused_actor and train_actor  # a warm-up step builds no actor graph: nothing would use it
        for j, prompts in enumerate(stream.next_step()):
            items, groups = repeat_prompts(prompts, algo.k, first_group=j * len(prompts))
            tg = time.perf_counter()
            b = generate(models.actor, [it.ids for it in items], encoder, gen_cfg, keep_logits=not fuse_a)
            gen_sec += time.perf_counter() - tg
            if fuse_a:  # with autograd state: the same forward gives the policy loss in ppo_update
                b["logits_graph"] = answer_logits(models.actor, b, algo.temperature)
            b.update(experience(models, b, algo.temperature, critic=not fused,
                                actor_logits=b["logits_graph"].detach() if fuse_a else None,
                                keep_ref_logits=args.anchor_coef > 0))
            if fused:  # with autograd state: the same forward gives the value loss in ppo_update
                b["values_graph"] = answer_values(models.critic, b)
                b["values"] = b["values_graph"].detach()
            score_rollout(models, funcs, encoder.tokenizer, b, items, args.max_answer_seq_len)
            b["groups"] = groups.to(b["score"].device)
            rollouts.append(b)
        t1 = time.perf_counter()
        kl_coef = kl_ctl.value
        rows, stats, n_samples = build_buffer(args, algo, rollouts, kl_coef, reward_norm)
        stats["distinct_ratio"] = rollout_distinct_ratio(rollouts, encoder.eos_id)
        t2 = time.perf_counter()
        update = ppo_update(args, algo, models, rows, unsup, encoder.pad_id, step, kl_coef,
                            rollouts[0].pop("values_graph") if fused else None, train_actor=train_actor,
                            logits_graph=rollouts[0].pop("logits_graph") if fuse_a else None)
        t3 = time.perf_counter()
        if algo.reference:
            kl_ctl.update(stats["kl"], n_samples)  # the KL reported is the KL the rewards were penalised with
        last = {"step": step, "split": "train", **stats, **update, "lr": models.actor.get_lr()[0],
                "generation_sec": gen_sec, "experience_sec": t1 - t0 - gen_sec + (t2 - t1),
                "train_sec": t3 - t2, "samples_per_sec": n_samples / (t3 - t0), "peak_rss_mb": peak_rss_mb()}
        logger.advance(1, reward=stats["reward"], **({"kl": stats["kl"]} if algo.reference else {}))
        if step % args.log_interval == 0 or step == total_steps:
            logger.log(last)
        for warning in health.check(step, stats):  # answers that stop ending at EOS or start repeating
            logger.log(warning)
        if args.print_answers_interval and step % args.print_answers_interval == 0:
            logger.log({"step": step, "split": "samples", "samples": sample_table(encoder.tokenizer, rollouts[0])})
        if eval_items and args.eval_interval and step % args.eval_interval == 0 and step != total_steps:
            logger.log({"step": step, "split": "eval", **evaluate(args, models, encoder, eval_items, funcs)})
        ckpt.after_step(step)  # periodic checkpoint; a stop request: checkpoint and exit (utils/signals.py)
    if eval_items:
        logger.log({"step": step, "split": "eval", **evaluate(args, models, encoder, eval_items, funcs)})
    return last
