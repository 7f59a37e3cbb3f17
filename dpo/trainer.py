"""DPO training loop: chosen and rejected in one forward, a frozen reference (live or precomputed),
losses normalised by the pairs (and chosen tokens) of the whole optimizer step. Pairs and batches
come from utils.pairs (the encoding step 2 uses too): 2B right-padded rows, the B chosen rows first."""
from __future__ import annotations

import inspect

import torch

from utils import ds, packing
from utils.encoding import IGNORE
from utils.losses import (chosen_nll_loss, count_target_tokens, dpo_loss, labelled_logps, sequence_logps,
                          shifted_log_probs, step_loss_scale, token_kl_sums)
from utils.health import DisplacementMonitor
from utils.metrics import Throughput
from utils.checkpoint import Checkpointer
from utils.pairs import Pair, collate_pairs
from utils.stream import eval_batches
from utils.train import check_finite, to_device

# Per-pair diagnostics averaged over a logging window or the eval set ("losses" is reported as "loss").
PAIR_KEYS = ("losses", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")
def accepts_logits_to_keep(model) -> bool:
    m = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    m = m.get_base_model() if hasattr(m, "get_base_model") else m  # so does peft
    return "logits_to_keep" in inspect.signature(m.forward).parameters


def concatenated_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B padded rows: the logits and the labels they predict, aligned.

    Only the logits that predict response tokens are computed where the model supports it
    (`logits_to_keep`: the last K positions, from the one before the batch's first response token):
    with long prompts and large vocabularies the prompt positions' logits are most of the memory.
    """
    labels = batch["labels"]
    kwargs = {}
    if accepts_logits_to_keep(model):
        first = int((labels != IGNORE).int().argmax(-1).min())  # every row has a labelled response
        keep = labels.size(1) - max(first - 1, 0)
        kwargs["logits_to_keep"] = keep
        labels = labels[:, labels.size(1) - keep:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **kwargs).logits
    return logits, labels


def concatenated_logps(model, batch: dict, fp32: bool = True):
    """Summed response log-probs [2B] and response token counts [2B] of a padded or packed batch."""
    if packing.is_packed(batch):
        return packing.sequence_logps(model(**packing.forward_inputs(batch), use_cache=False).logits, batch, fp32)
    return sequence_logps(*concatenated_logits(model, batch), fp32)


def pair_counts(batch: dict) -> tuple[int, int]:
    """(pairs, trained chosen tokens) of a padded or packed batch (chosen samples come first in both)."""
    if packing.is_packed(batch):
        b = packing.sample_count(batch) // 2
        return b, int(((batch["segment_ids"][:, 1:] < b) & (batch["labels"][:, 1:] != IGNORE)).sum())
    chosen = batch["labels"][: batch["labels"].size(0) // 2]
    return chosen.size(0), int(count_target_tokens(chosen))


def reference_logps(ref, batch: dict, fp32: bool = True) -> torch.Tensor:
    """The reference's [2B] log-probs: precomputed in the batch, else one no-grad forward of `ref`."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    with torch.no_grad():
        return concatenated_logps(ref, batch, fp32)[0]


def forward_pair(engine, ref, batch: dict, args):
    """Policy [2B] log-probs and counts, the reference's log-probs, and (with --anchor_coef) the chosen
    rows' summed token KL to the reference over `anchored_labels` [B] (else None)."""
    fp32 = args.compute_fp32_loss
    if not args.anchor_coef:
        logps, counts = concatenated_logps(engine, batch, fp32)
        return logps, counts, reference_logps(ref, batch, fp32), None
    b = batch["input_ids"].size(0) // 2
    # One log-softmax per model serves both the sequence log-probs and the anchor's KL.
    with torch.no_grad():
        ref_logits, labels = concatenated_logits(ref, batch)
        ref_log_probs = shifted_log_probs(ref_logits, fp32)
        del ref_logits
        ref_logps = labelled_logps(ref_log_probs, labels)[0]
        ref_log_probs = ref_log_probs[:b].clone()  # only the chosen rows' are kept through the policy's forward
    logits, labels = concatenated_logits(engine, batch)
    log_probs = shifted_log_probs(logits, fp32)
    logps, counts = labelled_logps(log_probs, labels)
    return logps, counts, ref_logps, token_kl_sums(log_probs[:b], ref_log_probs, anchored_labels(batch, labels))


def anchored_labels(batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """The chosen rows' labels [B, K] (K = the last positions kept) that the anchor holds: every chosen
    token but the one where the chosen answer first departs from its rejected answer, the choice DPO is
    there to move. Rows [chosen; rejected] share their prompt and are right-padded alike."""
    ids = batch["input_ids"]
    b = ids.size(0) // 2
    differs = ids[:b] != ids[b:]
    col = differs.int().argmax(-1) - (ids.size(1) - labels.size(1))  # the first differing position, in labels
    rows = torch.arange(b, device=ids.device)
    part = differs.any(-1) & (col >= 0)  # identical answers (a pair of equals) keep every token
    out = labels[:b].clone()
    out[rows[part], col[part]] = IGNORE
    return out


def pair_loss(logps, counts, ref_logps, args, num_pairs=None, num_chosen_tokens=None, kl_sums=None):
    """DPO loss (+ rpo_alpha * chosen NLL per token, + anchor_coef * chosen token KL per token) of one
    micro-batch from its [2B] log-probs and counts.

    num_pairs / num_chosen_tokens normalise the sums (default: this micro-batch's); the trainer passes
    the totals of the whole optimizer step so the gradient does not depend on how it is split.
    Returns (loss, per-pair diagnostics [B] incl. logps/chosen, logps/rejected and chosen token counts).
    """
    b = logps.size(0) // 2
    loss, d = dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], args.beta, args.loss_type,
                       args.label_smoothing, counts[:b], counts[b:], num_pairs)
    tokens = counts[:b].sum() if num_chosen_tokens is None else num_chosen_tokens
    if args.rpo_alpha:
        nll, _ = chosen_nll_loss(logps[:b], tokens)
        loss = loss + args.rpo_alpha * nll
    if kl_sums is not None:
        loss = loss + args.anchor_coef * kl_sums.sum() / tokens
    d.update({"logps/chosen": logps[:b].detach(), "logps/rejected": logps[b:].detach(),
              "chosen_tokens": counts[:b].detach(),
              "anchor_kl": torch.zeros_like(logps[:b]) if kl_sums is None else kl_sums.detach()})
    return loss, d


class PairStats:
    """Sums of per-pair diagnostics over a window (a logging interval or the eval set); `reduce` sums
    them over ranks so the metrics cover every pair of the window, not only the last batch."""

    def __init__(self):
        self.sums = dict.fromkeys(PAIR_KEYS, 0.0)
        self.pairs = self.nll = self.tokens = self.kl = 0.0

    def add(self, d: dict, weight: torch.Tensor | None = None) -> None:
        w = torch.ones_like(d["losses"]) if weight is None else weight.to(d["losses"])
        for k in PAIR_KEYS:
            self.sums[k] += float((d[k] * w).sum())
        self.pairs += float(w.sum())
        self.nll -= float((d["logps/chosen"] * w).sum())
        self.tokens += float((d["chosen_tokens"] * w).sum())
        self.kl += float((d["anchor_kl"] * w).sum())

    def reduce(self, rpo_alpha: float, anchor_coef: float = 0.0) -> dict:
        *sums, pairs, nll, tokens, kl = ds.all_reduce_sum(
            [*self.sums.values(), self.pairs, self.nll, self.tokens, self.kl]).tolist()
        out = {k: s / max(pairs, 1.0) for k, s in zip(PAIR_KEYS, sums)}
        nll, kl = nll / max(tokens, 1.0), kl / max(tokens, 1.0)
        # The objective that was trained: mean pair loss plus the RPO term (chosen NLL per token) plus the
        # anchor (the chosen tokens' KL to the reference, per chosen token).
        out["loss"] = out.pop("losses") + rpo_alpha * nll + anchor_coef * kl
        out["nll/chosen"] = nll
        if anchor_coef:
            out["kl/chosen"] = kl
        return out


@torch.no_grad()
def local_reference_logps(ref, items: list, batch_size: int, pad_id: int, fp32: bool = True) -> list:
    """[(ref_chosen, ref_rejected)] for this rank's share of `items`: eval_batches deals items
    round-robin (rank r holds items r, r+w, r+2w, ...) and every rank runs the same forwards."""
    mine = []
    for batch, valid in eval_batches(items, batch_size, lambda b: collate_pairs(b, pad_id)):
        logps = concatenated_logps(ref, to_device(batch), fp32)[0].cpu()
        b = logps.size(0) // 2
        mine += [(c, r) for c, r, v in zip(logps[:b].tolist(), logps[b:].tolist(), valid.tolist()) if v]
    return mine


def attach_reference(items: list[Pair], per_rank: list[list]) -> list[Pair]:
    """Pairs with their reference log-probs set, from every rank's `local_reference_logps`."""
    out = [None] * len(items)
    for r, logps in enumerate(per_rank):
        for j, ref_pair in enumerate(logps):
            i = r + j * len(per_rank)
            out[i] = items[i]._replace(ref=tuple(ref_pair))
    assert all(it is not None for it in out), "reference log-probs missing for some items"
    return out


def precompute_reference(ref, items: list, batch_size: int, pad_id: int, fp32: bool = True) -> list:
    """Reference log-probs computed once, sharded over ranks and gathered, so training needs no reference."""
    return attach_reference(items, ds.all_gather_objects(local_reference_logps(ref, items, batch_size, pad_id, fp32)))


@torch.no_grad()
def evaluate(engine, ref, items: list, args, pad_id: int) -> dict:
    """Pair metrics over the whole eval set (each pair counted once across ranks)."""
    engine.eval()
    stats = PairStats()
    for batch, valid in eval_batches(items, args.per_device_eval_batch_size, lambda b: collate_pairs(b, pad_id)):
        batch = to_device(batch)
        logps, counts, ref_logps, kl = forward_pair(engine, ref, batch, args)
        _, d = pair_loss(logps, counts, ref_logps, args, kl_sums=kl)
        stats.add(d, valid)
    engine.train()
    return stats.reduce(args.rpo_alpha, args.anchor_coef)


def train(args, engine, ref, stream, eval_items, logger, pad_id: int, total_steps: int) -> dict:
    """Run optimizer steps up to `total_steps`; `ref` is None when the items carry precomputed
    reference log-probs. Returns the last eval metrics."""
    world, ga = ds.world_size(), args.gradient_accumulation_steps
    # Every line gets logps/chosen_shift, and a warning goes out once in the run (resumes included) if it
    # falls too far.
    monitor = DisplacementMonitor(args.displacement_warn_nats, args.beta, args.rpo_alpha, logger)
    log = monitor.log

    def restore(st: dict) -> None:
        stream.load_state_dict(st["stream"])
        monitor.load_state_dict(st.get("displacement"))

    ckpt = Checkpointer(args, {"model": engine}, logger,
                        lambda: {"stream": stream.state_dict(), "displacement": monitor.state_dict()}, restore)
    step = ckpt.resume()
    if step == 0:
        log({"step": 0, "split": "eval", **evaluate(engine, ref, eval_items, args, pad_id)})
    speed, window = Throughput(), PairStats()
    while step < total_steps:
        batches = [to_device(b) for b in stream.next_step()]
        # Pairs and chosen tokens of the whole step (all ranks, all micro-batches) normalise every
        # micro-batch, so the gradient is the full-batch mean however the batch is split (pitfall 16).
        counts = [pair_counts(b) for b in batches]
        n_pairs, n_tokens = ds.all_reduce_sum([sum(c[0] for c in counts), sum(c[1] for c in counts)]).tolist()
        step_loss = 0.0
        for b in batches:
            logps, counts, ref_logps, kl = forward_pair(engine, ref, b, args)
            loss, d = pair_loss(logps, counts, ref_logps, args, n_pairs, n_tokens, kl)
            engine.backward(loss * step_loss_scale(world, ga))
            engine.step()
            step_loss += loss.item()
            window.add(d)
            speed.add(logps.size(0) // 2, packing.real_tokens(b))
        step += 1
        step_loss = ds.all_reduce_sum([step_loss])[0].item()
        check_finite(step_loss, step)
        logger.advance(1, loss=step_loss)
        if step % args.log_interval == 0 or step == total_steps:
            rates = speed.rates()
            log({"step": step, "split": "train", **window.reduce(args.rpo_alpha, args.anchor_coef),
                 "lr": engine.get_lr()[0], "pairs_per_sec": rates["samples_per_sec"],
                 "tokens_per_sec": rates["tokens_per_sec"]})
            window = PairStats()
        if args.eval_interval and step % args.eval_interval == 0 and step != total_steps:
            log({"step": step, "split": "eval", **evaluate(engine, ref, eval_items, args, pad_id)})
        ckpt.after_step(step)  # periodic checkpoint; a stop request: checkpoint and exit (utils/signals.py)
    final = evaluate(engine, ref, eval_items, args, pad_id)
    log({"step": step, "split": "eval", **final})
    return final
