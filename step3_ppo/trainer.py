"""Step 3 loop. One PPO step:

  1. rollouts: --generation_batches batches of this rank's prompts -> answers and the four models'
     forward passes (rollout.py);
  2. rewards: score (optionally normalised, minus --missing_eos_penalty, clipped) at the last action,
     per-token KL penalty, GAE, advantages whitened over the whole buffer of all ranks;
  3. --ppo_epochs passes over the buffer in shuffled mini-batches: clipped policy loss (+ entropy bonus,
     + PPO-ptx) for the actor and clipped value loss for the critic, stepped together;
  4. the KL controller adapts to the step's KL, metrics go to metrics.jsonl.

Every rank holds the same number of samples and runs the same forwards and collectives in the same
order; nothing is dropped on one rank only (pitfall 10).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from step3_ppo.models import ema_state, ema_update_, load_ema_state, step_together
from step3_ppo.rollout import (answer_logits, answer_values, collate_samples, experience, final_scores, generate,
                               generation_config, model_inputs, split_samples)
from utils import ds
from utils.losses import sft_loss
from utils.rl import (AdaptiveKLController, FixedKLController, RunningMoments, compute_rewards,
                      entropy_from_logits, gae_advantages, masked_mean, policy_loss, token_logprobs, value_loss,
                      whiten_from_sums)
from utils.health import AnswerHealthMonitor, rollout_distinct_ratio
from utils.train import check_finite, eval_batches, latest_checkpoint, load_checkpoint, save_checkpoint, to_device


def make_kl_controller(args):
    if args.target_kl > 0:
        return AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    return FixedKLController(args.kl_coef)


# ----------------------------------------------------------------------------- rewards and advantages

def build_buffer(args, rollouts: list[dict], kl_coef: float, reward_norm: RunningMoments):
    """Per-token rewards, GAE and whitened advantages for every rollout. Returns (rows, stats, n): rows are
    this rank's per-sample dicts for mini-batching, stats global (all ranks) means for logging, n the global
    sample count. `return` is the mean per-answer sum of rewards (score - kl_coef * KL), PPO's objective."""
    if args.normalize_reward:
        raw = torch.cat([b["score"] for b in rollouts]).double()
        reward_norm.update(*ds.all_reduce_sum([raw.numel(), raw.sum(), raw.square().sum()]).tolist())
    local = defaultdict(float)
    for b in rollouts:
        mask = b["action_mask"]
        score = reward_norm.normalize(b["score"]) if args.normalize_reward else b["score"]
        score = score - args.missing_eos_penalty * (~b["has_eos"]).to(score.dtype)
        rewards, kl, _ = compute_rewards(b["logp"], b["ref_logp"], score, mask, kl_coef, args.kl_estimator,
                                         args.clip_reward_value or None)
        b["advantages"], b["returns"] = gae_advantages(rewards, b["values"], mask, args.gamma, args.lam)
        adv = b["advantages"] * mask
        for k, v in (("samples", mask.shape[0]), ("reward", b["score"].sum()), ("return", rewards.sum()),
                     ("kl", kl.sum()), ("entropy", (b["entropy"] * mask).sum()), ("tokens", mask.sum()),
                     ("eos", b["has_eos"].sum()), ("adv_sum", adv.sum()), ("adv_sq", adv.square().sum())):
            local[k] += float(v)
    g = dict(zip(local, ds.all_reduce_sum(list(local.values())).tolist()))
    rows = []
    for b in rollouts:
        if args.whiten_advantages:
            b["advantages"] = whiten_from_sums(b["advantages"], b["action_mask"], g["tokens"], g["adv_sum"],
                                               g["adv_sq"])
        rows += split_samples(b, {k: b[k] for k in ("logp", "values", "advantages", "returns")})
    n = g["samples"]
    stats = {"reward": g["reward"] / n, "return": g["return"] / n, "kl": g["kl"] / n, "kl_coef": kl_coef,
             "entropy": g["entropy"] / g["tokens"], "response_length": g["tokens"] / n, "eos_rate": g["eos"] / n}
    return rows, stats, int(n)


# ----------------------------------------------------------------------------- PPO update

def actor_loss(args, actor, b: dict, ptx: dict | None):
    """Clipped policy loss (+ entropy bonus) as a token mean over this mini-batch; ptx separately."""
    logits = answer_logits(actor, b, args.temperature)
    logp = token_logprobs(logits, b["answers"])
    loss, stats = policy_loss(logp, b["logp"], b["advantages"], b["action_mask"], args.cliprange)
    if args.entropy_coef:
        entropy = masked_mean(entropy_from_logits(logits), b["action_mask"].float())
        loss = loss - args.entropy_coef * entropy
    ptx_loss = None
    if ptx is not None:
        pos = model_inputs({"seq": ptx["input_ids"], "attention_mask": ptx["attention_mask"]})
        ptx_logits = actor(**pos, use_cache=False).logits
        ptx_loss, _ = sft_loss(ptx_logits, ptx["labels"], ptx["n_tokens"])
    return loss, ptx_loss, stats


def ppo_update(args, models, rows: list[dict], unsup, pad_id: int, step: int) -> dict:
    """--ppo_epochs passes over this rank's buffer; returns global means over the optimizer steps.

    Loss normalisation (pitfall 16): each micro-batch's token mean is reweighted by its share of the
    optimizer step's action tokens over all ranks, times world * grad_accum to undo DeepSpeed's
    averaging, so the gradient is the full-batch token mean however the batch is split.
    """
    world, ga, mb = ds.world_size(), args.gradient_accumulation_steps, args.per_device_training_batch_size
    actor, critic = models.actor, models.critic
    per_step = mb * ga
    totals, opt_steps, epochs_done = defaultdict(float), 0, 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(len(rows)).tolist()
        stop = False
        for start in range(0, len(rows), per_step):
            micro = [collate_samples([rows[i] for i in order[j:j + mb]], pad_id)
                     for j in range(start, start + per_step, mb)]
            ptx = [to_device(unsup.next_step()[0]) for _ in micro] if unsup is not None else [None] * ga
            local_tokens = [float(b["action_mask"].sum()) for b in micro]
            local_ptx = [float((p["labels"][:, 1:] != -100).sum()) if p is not None else 0.0 for p in ptx]
            n_tok, n_ptx = ds.all_reduce_sum([sum(local_tokens), sum(local_ptx)]).tolist()
            local = defaultdict(float)
            for b, p, nt in zip(micro, ptx, local_tokens):
                share = nt / n_tok
                if p is not None:
                    p["n_tokens"] = max(n_ptx, 1.0)
                a_loss, ptx_loss, a_stats = actor_loss(args, actor, b, p)
                total = a_loss * share
                if ptx_loss is not None:
                    total = total + args.unsup_coef * ptx_loss
                    local["ptx_loss"] += ptx_loss.item()
                actor.backward(total * world * ga)
                values = answer_values(critic, b)
                c_loss, c_stats = value_loss(values, b["values"], b["returns"], b["action_mask"],
                                             args.cliprange_value)
                critic.backward(c_loss * share * world * ga)
                stepped = step_together([actor, critic])
                local["actor_loss"] += a_loss.item() * share
                local["critic_loss"] += c_loss.item() * share
                for k in ("clipfrac", "approx_kl"):
                    local[k] += a_stats[k] * share
                local["value_clipfrac"] += c_stats["value_clipfrac"] * share
            if models.ema is not None and stepped:
                ema_update_(models.ema, actor.module, args.ema_beta)
            g = dict(zip(local, ds.all_reduce_sum(list(local.values())).tolist()))
            check_finite(g["actor_loss"] + g["critic_loss"], step, "PPO loss")
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

@torch.no_grad()
def evaluate(args, models, encoder, items: list[list[int]]) -> dict:
    """Greedy answers to the evaluation prompts: mean reward-model score, EOS rate, answer length."""
    cfg = generation_config(args, encoder, greedy=True)
    score, eos, length, count = 0.0, 0.0, 0.0, 0.0
    for prompts, valid in eval_batches(items, args.per_device_eval_batch_size, list):
        b = generate(models.actor, prompts, encoder, cfg)
        valid = valid.to(b["seq"].device)
        score += float((final_scores(models.reward, b) * valid).sum())
        eos += float((b["has_eos"].float() * valid).sum())
        length += float((b["action_mask"].sum(-1).float() * valid).sum())
        count += float(valid.sum())
    score, eos, length, count = ds.all_reduce_sum([score, eos, length, count]).tolist()
    return {"reward": score / count, "eos_rate": eos / count, "response_length": length / count}


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


# ----------------------------------------------------------------------------- the loop

def train(args, models, encoder, stream, unsup, eval_items, logger, total_steps: int) -> dict:
    """PPO steps up to `total_steps`; returns the last step's metrics."""
    kl_ctl, reward_norm, health = make_kl_controller(args), RunningMoments(), AnswerHealthMonitor()
    gen_cfg = generation_config(args, encoder)
    step, last = 0, {}
    engines = {"critic": models.critic, "actor": models.actor}  # actor last: its client state is per rank
    if args.resume and (ckpt := latest_checkpoint(args.output_dir)):
        state = load_checkpoint(ckpt, engines)
        stream.load_state_dict(state["prompts"])
        if unsup is not None:
            unsup.load_state_dict(state["unsup"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        reward_norm.load_state_dict(state["reward_norm"])
        if models.ema is not None:
            load_ema_state(models.ema, state["ema"])
        step = state["step"]
        logger.write(f"resumed from {ckpt} at step {step}")
        logger.advance(step)
    if step == 0 and eval_items:
        logger.log({"step": 0, "split": "eval", **evaluate(args, models, encoder, eval_items)})
    while step < total_steps:
        step += 1
        t0 = time.perf_counter()
        rollouts, gen_sec = [], 0.0
        for prompts in stream.next_step():
            tg = time.perf_counter()
            b = generate(models.actor, prompts, encoder, gen_cfg)
            gen_sec += time.perf_counter() - tg
            b.update(experience(models, b, args.temperature))
            rollouts.append(b)
        t1 = time.perf_counter()
        kl_coef = kl_ctl.value
        rows, stats, n_samples = build_buffer(args, rollouts, kl_coef, reward_norm)
        stats["distinct_ratio"] = rollout_distinct_ratio(rollouts, encoder.eos_id)
        t2 = time.perf_counter()
        update = ppo_update(args, models, rows, unsup, encoder.pad_id, step)
        t3 = time.perf_counter()
        kl_ctl.update(stats["kl"], n_samples)  # the KL reported is the KL the rewards were penalised with
        last = {"step": step, "split": "train", **stats, **update, "lr": models.actor.get_lr()[0],
                "generation_sec": gen_sec, "experience_sec": t1 - t0 - gen_sec + (t2 - t1),
                "train_sec": t3 - t2, "samples_per_sec": n_samples / (t3 - t0)}
        logger.advance(1, reward=stats["reward"], kl=stats["kl"])
        if step % args.log_interval == 0 or step == total_steps:
            logger.log(last)
        for warning in health.check(step, stats):  # answers that stop ending at EOS or start repeating
            logger.log(warning)
        if args.print_answers_interval and step % args.print_answers_interval == 0:
            logger.log({"step": step, "split": "samples", "samples": sample_table(encoder.tokenizer, rollouts[0])})
        if eval_items and args.eval_interval and step % args.eval_interval == 0 and step != total_steps:
            logger.log({"step": step, "split": "eval", **evaluate(args, models, encoder, eval_items)})
        if args.save_interval and step % args.save_interval == 0:
            client = {"prompts": stream.state_dict(), "unsup": unsup.state_dict() if unsup is not None else None,
                      "kl_ctl": kl_ctl.state_dict(), "reward_norm": reward_norm.state_dict(),
                      "ema": ema_state(models.ema) if models.ema is not None else None}
            save_checkpoint(args.output_dir, step, engines, client, args.save_total_limit)
    if eval_items:
        logger.log({"step": step, "split": "eval", **evaluate(args, models, encoder, eval_items)})
    return last
