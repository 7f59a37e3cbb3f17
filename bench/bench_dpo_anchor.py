"""What DPO's anchor costs per micro-batch, and what sharing one log-softmax per model saves.

    python bench/bench_dpo_anchor.py [--vocab 32000] [--reps 3]

One DPO micro-batch (4 pairs, prompts of 96 tokens, answers of 160, a 2-layer Llama of hidden 128 with
the given vocabulary, fp32, one thread) through `dpo.trainer.forward_pair` with the anchor on, forward +
backward, two ways, each in a fresh process (peak RSS is per process), interleaved:

  shared     forward_pair as it is: each model's log-softmax over the vocabulary once, read for the
             answers' log-probs and for the anchor's KL
  separate   the same numbers with the anchor computing its own log-softmaxes (policy and reference)
             from the logits, as the code did before

Both must give the same KL (checked). Printed: ms per micro-batch (median of 5 after one warm-up, per
process; then the median over --reps processes, and the spread) and peak RSS, and separate / shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def one(mode: str, vocab: int) -> dict:
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo.trainer import anchored_labels, concatenated_logits, forward_pair
    from utils.losses import IGNORE, kl_from_log_probs, log_probs, sequence_logps

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg).eval()
    b, prompt, answer = 4, 96, 160
    ids = torch.randint(0, vocab, (2 * b, prompt + answer))
    ids[b:, prompt + 5:] = torch.randint(0, vocab, (b, answer - 5))  # rejected parts from chosen at token 5
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    args = SimpleNamespace(compute_fp32_loss=True, anchor_coef=5.0)

    def separate(engine, ref, batch, args):
        with torch.no_grad():
            ref_logits, lab = concatenated_logits(ref, batch)
            ref_logps = sequence_logps(ref_logits, lab)[0]
            ref_logits = ref_logits[:b].clone()
        logits, lab = concatenated_logits(engine, batch)
        logps, counts = sequence_logps(logits, lab)
        held = anchored_labels(batch, lab)[:, 1:] != IGNORE
        kl = kl_from_log_probs(log_probs(logits[:b, :-1]), log_probs(ref_logits[:, :-1]))
        return logps, counts, ref_logps, (kl * held).sum(-1)

    fn = forward_pair if mode == "shared" else separate
    times = []
    for _ in range(6):
        t = time.perf_counter()
        logps, _, _, kl = fn(policy, ref, batch, args)
        (logps.sum() + kl.sum()).backward()
        times.append(time.perf_counter() - t)
        policy.zero_grad(set_to_none=True)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": 1000 * statistics.median(times[1:]), "rss_mb": rss_mb, "kl": float(kl.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        print(json.dumps(one(a._one, a.vocab)))
        return
    runs = {"shared": [], "separate": []}
    for _ in range(a.reps):
        for mode in runs:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_one", mode, "--vocab", str(a.vocab)],
                                 capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    kls = {round(r["kl"], 3) for rs in runs.values() for r in rs}
    assert len(kls) == 1, f"the two ways gave different anchor KLs: {kls}"
    print(f"DPO micro-batch with the anchor, vocabulary {a.vocab}, load average {os.getloadavg()[0]:.2f}")
    med = {}
    for mode, rs in runs.items():
        ms = [r["ms"] for r in rs]
        med[mode] = (statistics.median(ms), statistics.median(r["rss_mb"] for r in rs))
        print(f"  {mode:9s} {med[mode][0]:7.0f} ms ({min(ms):.0f}-{max(ms):.0f})  peak RSS {med[mode][1]:6.0f} MB")
    print(f"  separate / shared: {med['separate'][0] / med['shared'][0]:.2f}x time, "
          f"{med['separate'][1] - med['shared'][1]:+.0f} MB peak RSS")


if __name__ == "__main__":
    main()
