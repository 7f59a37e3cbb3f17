"""Step 2 training loop: pairwise Bradley-Terry loss on the reward read at the last real token.

Chosen and rejected responses of a micro-batch go through one forward: rows [0, B) are the chosen
sequences and rows [B, 2B) the rejected ones, right-padded together (batches from
utils.pairs.collate_pairs, the encoding DPO uses too). With --shared_prompt_forward the
shared prompt runs once and both replies attend to its cached keys and values (same rewards, fewer
tokens; see utils.reward.shared_prompt_rewards).
"""
from __future__ import annotations

import json
import os
import torch

from utils import ds, packing
from utils.losses import pairwise_reward_loss, step_loss_scale
from utils.metrics import Throughput
from utils.checkpoint import Checkpointer
from utils.health import flat_reward_warning
from utils.output import partial_dir
from utils.pairs import pair_tokens
from utils.reward import sequence_rewards, shared_prompt_rewards, token_scores
from utils.stream import eval_batches
from utils.train import check_finite, to_device

SUMS = ("loss_sum", "correct", "chosen_sum", "rejected_sum", "margin_sum", "pairs")


def pair_rewards(engine, batch: dict, fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) from either batch layout of `utils.pairs.collate_pairs`."""
    if "prompt_ids" in batch:
        rewards = shared_prompt_rewards(engine, batch["prompt_ids"], batch["prompt_mask"], batch["reply_ids"],
                                        batch["reply_mask"], fp32)
        return rewards[0::2], rewards[1::2]
    if packing.is_packed(batch):
        rewards = packing.last_token_scores(token_scores(engine, batch["input_ids"], None, batch["position_ids"]), batch)
        return (rewards.float() if fp32 else rewards).chunk(2)
    rewards = sequence_rewards(engine, batch["input_ids"], batch["attention_mask"], batch["position_ids"], fp32)
    return rewards.chunk(2)


def summarize(sums: dict) -> dict:
    """Summed diagnostics (over pairs, ranks, micro-batches) -> the logged means."""
    n = max(sums["pairs"], 1)
    return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n, "chosen_reward": sums["chosen_sum"] / n,
            "rejected_reward": sums["rejected_sum"] / n, "margin": sums["margin_sum"] / n}


def reduce_sums(sums: dict) -> dict:
    return dict(zip(SUMS, ds.all_reduce_sum([sums[k] for k in SUMS]).tolist()))


@torch.no_grad()
def evaluate(engine, items, batch_size: int, collate_fn, center_coef: float, fp32: bool,
             scores_path: str | None = None) -> dict:
    """Loss, accuracy and mean rewards over the whole eval set (each pair counted once across ranks).

    With `scores_path` (every rank passes it), rank 0 also writes each pair's rewards there in data
    order, one JSON line with the data file and line: the numbers a reloaded model must reproduce.
    """
    engine.eval()
    sums = dict.fromkeys(SUMS, 0.0)
    rewards = []  # this rank's (r_chosen, r_rejected) for items rank, rank + world, ... in order
    for batch, valid in eval_batches(items, batch_size, collate_fn):
        batch = to_device(batch)
        r_c, r_r = pair_rewards(engine, batch, fp32)
        keep = valid.bool().to(r_c.device)
        _, d = pairwise_reward_loss(r_c[keep], r_r[keep], batch["margin"][keep], center_coef)
        for k in SUMS:
            sums[k] += d[k]
        rewards.extend(zip(r_c[keep].tolist(), r_r[keep].tolist()))
    engine.train()
    if scores_path is not None:
        per_rank, world = ds.all_gather_objects(rewards), ds.world_size()
        if ds.is_rank0():
            with open(scores_path, "w") as f:
                for i, item in enumerate(items):  # eval_batches deals item i to rank i % world
                    c, r = per_rank[i % world][i // world]
                    f.write(json.dumps({"where": item.where, "chosen_reward": c, "rejected_reward": r}) + "\n")
    return summarize(reduce_sums(sums))


def train(args, engine, stream, eval_items, logger, collate_fn, total_steps: int) -> dict:
    """Run optimizer steps up to `total_steps` (`collate_fn` batches eval pairs as `stream` does training
    pairs); returns the final eval metrics."""
    world, ga, fp32 = ds.world_size(), args.gradient_accumulation_steps, args.compute_fp32_loss
    center, eval_bs = args.center_rewards_coefficient, args.per_device_eval_batch_size
    ckpt = Checkpointer(args, {"model": engine}, logger, lambda: {"stream": stream.state_dict()},
                        lambda st: stream.load_state_dict(st["stream"]))
    step = ckpt.resume()
    if step == 0:
        logger.log({"step": 0, "split": "eval", **evaluate(engine, eval_items, eval_bs, collate_fn, center, fp32)})
    speed, window = Throughput(), dict.fromkeys(SUMS, 0.0)
    while step < total_steps:
        batches = [to_device(b) for b in stream.next_step()]
        # The step's pair count over all ranks and micro-batches normalises every micro-batch, so the
        # gradient is the mean over the global batch however it is split (pitfall 16).
        n_pairs = ds.all_reduce_sum([sum(b["margin"].numel() for b in batches)])[0].item()
        sums = dict.fromkeys(SUMS, 0.0)
        for b in batches:
            r_c, r_r = pair_rewards(engine, b, fp32)
            loss, d = pairwise_reward_loss(r_c, r_r, b["margin"], center, num_pairs=n_pairs)
            engine.backward(loss * step_loss_scale(world, ga))
            engine.step()
            for k in SUMS:
                sums[k] += d[k]
            speed.add(r_c.numel(), pair_tokens(b))
        step += 1
        sums = reduce_sums(sums)
        check_finite(sums["loss_sum"], step)
        for k in SUMS:
            window[k] += sums[k]
        logger.advance(1, loss=sums["loss_sum"] / sums["pairs"])
        if step % args.log_interval == 0 or step == total_steps:
            rates = speed.rates()
            logger.log({"step": step, "split": "train", **summarize(window), "lr": engine.get_lr()[0],
                        "pairs_per_sec": rates["samples_per_sec"], "tokens_per_sec": rates["tokens_per_sec"]})
            window = dict.fromkeys(SUMS, 0.0)
        if args.eval_interval and step % args.eval_interval == 0 and step != total_steps:
            logger.log({"step": step, "split": "eval",
                        **evaluate(engine, eval_items, eval_bs, collate_fn, center, fp32)})
        ckpt.after_step(step)  # periodic checkpoint; a stop request: checkpoint and exit (utils/signals.py)
    final = evaluate(engine, eval_items, eval_bs, collate_fn, center, fp32,
                     scores_path=os.path.join(partial_dir(args.output_dir), "eval_rewards.jsonl"))
    logger.log({"step": step, "split": "eval", **final})
    warning = flat_reward_warning(step, final)
    if warning:
        logger.log(warning)
    return final
