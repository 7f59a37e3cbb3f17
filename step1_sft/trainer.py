"""Step 1 training loop: response-only NLL, normalised by the trained tokens of the whole optimizer step."""
from __future__ import annotations

import math

import torch

from utils import ds, packing
from utils.encoding import IGNORE, pad_batch
from utils.losses import count_target_tokens, sft_loss, step_loss_scale
from utils.metrics import Throughput
from utils.checkpoint import Checkpointer
from utils.stream import eval_batches
from utils.train import check_finite, to_device


def collate(items, pad_id: int, pack: bool = False) -> dict:
    """items: [((ids, labels),), ...] -> right-padded batch, padded to the longest sample only; or with
    `pack`, the samples concatenated into rows (utils/packing.py)."""
    return (packing.pack if pack else pad_batch)([it[0][0] for it in items], [it[0][1] for it in items], pad_id)


@torch.no_grad()
def evaluate(engine, items, batch_size: int, pad_id: int, fp32: bool) -> dict:
    """Token-mean NLL over the whole eval set (each sample counted once across ranks)."""
    engine.eval()
    nll, tokens = 0.0, 0
    for batch, valid in eval_batches(items, batch_size, lambda b: collate(b, pad_id)):
        batch["labels"][valid == 0] = IGNORE
        batch = to_device(batch)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        _, d = sft_loss(logits, batch["labels"], 1.0, fp32)
        nll += d["nll_sum"]
        tokens += d["tokens"]
    engine.train()
    nll, tokens = ds.all_reduce_sum([nll, tokens]).tolist()
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def train(args, engine, stream, eval_items, logger, pad_id: int, total_steps: int) -> dict:
    """Run optimizer steps up to `total_steps`; returns the last eval metrics."""
    world, ga, fp32 = ds.world_size(), args.gradient_accumulation_steps, args.compute_fp32_loss
    ckpt = Checkpointer(args, {"model": engine}, logger, lambda: {"stream": stream.state_dict()},
                        lambda st: stream.load_state_dict(st["stream"]))
    step = ckpt.resume()
    if step == 0:
        logger.log({"step": 0, "split": "eval", **evaluate(engine, eval_items, args.per_device_eval_batch_size,
                                                            pad_id, fp32)})
    speed, window = Throughput(), []
    while step < total_steps:
        batches = [to_device(b) for b in stream.next_step()]
        # The step's trained-token count over all ranks and micro-batches normalises every micro-batch.
        local_tokens = sum(int(count_target_tokens(b["labels"])) for b in batches)
        n_tokens = ds.all_reduce_sum([local_tokens])[0].item()
        step_loss = 0.0
        for b in batches:
            logits = engine(**packing.forward_inputs(b), use_cache=False).logits
            loss, _ = sft_loss(logits, b["labels"], n_tokens, fp32)
            engine.backward(loss * step_loss_scale(world, ga))
            engine.step()
            step_loss += loss.item()
            speed.add(packing.sample_count(b), packing.real_tokens(b))
        step += 1
        step_loss = ds.all_reduce_sum([step_loss])[0].item()
        check_finite(step_loss, step)
        window.append(step_loss)
        logger.advance(1, loss=step_loss)
        if step % args.log_interval == 0 or step == total_steps:
            logger.log({"step": step, "split": "train", "loss": sum(window) / len(window),
                        "lr": engine.get_lr()[0], **speed.rates()})
            window = []
        if args.eval_interval and step % args.eval_interval == 0 and step != total_steps:
            logger.log({"step": step, "split": "eval", **evaluate(engine, eval_items, args.per_device_eval_batch_size,
                                                                   pad_id, fp32)})
        ckpt.after_step(step)  # periodic checkpoint; a stop request: checkpoint and exit (utils/signals.py)
    final = evaluate(engine, eval_items, args.per_device_eval_batch_size, pad_id, fp32)
    logger.log({"step": step, "split": "eval", **final})
    return final
