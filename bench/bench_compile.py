"""What torch.compile would buy an SFT step on this CPU: eager against compiled (inductor), side by side.

    python bench/bench_compile.py                       # tiny test model, batch 16 x 48 tokens
    python bench/bench_compile.py --size realistic --batch 4 --seq_len 256 --steps 8

One process, the same random-init model (bench/common.py sizes), the same fixed-shape random batches,
the same thread count. Two timings per mode: forward + backward alone, and the whole training step
(forward, our SFT loss, backward, gradient clipping, fused AdamW). Compilation and the first steps are
warm-up, excluded; the two modes then alternate in --reps repetitions of --steps steps (load changes hit
both alike); printed: the median milliseconds of the timed steps, their spread, and compiled / eager
speed-ups. The bench answers whether a compiled model (fewer, fused kernels) would close the gap
that an eager trainer cannot (README, Benchmarks); the pipeline itself has no --compile flag.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

from utils.losses import sft_loss  # noqa: E402


class Runner:
    """One model (eager or compiled) with its optimizer and its two timed functions."""

    def __init__(self, model_dir: str, compiled: bool):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.vocab = self.model.config.vocab_size

    def forward_backward(self, ids):
        logits = self.fwd(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        loss, _ = sft_loss(logits, ids, ids[:, 1:].numel())
        loss.backward()

    def step(self, ids):
        self.forward_backward(ids)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def time(self, what: str, batch: int, seq_len: int, steps: int) -> list[float]:
        ms = []
        for _ in range(steps):
            ids = torch.randint(0, self.vocab, (batch, seq_len))
            t = time.perf_counter()
            getattr(self, what)(ids)
            ms.append((time.perf_counter() - t) * 1e3)
            self.opt.zero_grad(set_to_none=True)
        return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=list(common.SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=48)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode, timing and repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, the two modes interleaved")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", default="/tmp/bench_compile")
    a = ap.parse_args()
    for name in ("batch", "seq_len", "steps", "reps", "warmup", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    torch.set_num_threads(a.threads)
    model_dir = common.make_model(a.work, a.size)
    load0 = common.load_average()
    runners = {mode: Runner(model_dir, mode == "compiled") for mode in ("eager", "compiled")}
    ms = {(mode, what): [] for mode in runners for what in ("forward_backward", "step")}
    for what in ("forward_backward", "step"):  # warm-up: compilation, allocations
        for r in runners.values():
            r.time(what, a.batch, a.seq_len, a.warmup)
    for _ in range(a.reps):  # interleaved, so load changes hit both modes alike
        for what in ("forward_backward", "step"):
            for mode, r in runners.items():
                ms[(mode, what)] += r.time(what, a.batch, a.seq_len, a.steps)
    res = {mode: {what: common.summary(ms[(mode, what)]) for what in ("forward_backward", "step")}
           for mode in runners}
    print(f"{a.size} model, batch {a.batch} x {a.seq_len} tokens, {a.threads} threads, fp32, {a.steps * a.reps} timed "
          f"steps per cell ({a.reps} interleaved repetitions) (load {load0:.2f} -> {common.load_average():.2f})")
    print("| timing | eager ms | compiled ms | compiled speed-up |")
    print("|---|---|---|---|")
    for what in ("forward_backward", "step"):
        e, c = res["eager"][what], res["compiled"][what]
        print(f"| {what.replace('_', ' + ')} | {common.fmt(e, digits=2)} | {common.fmt(c, digits=2)} | "
              f"{e['median'] / c['median']:.2f}x |")


if __name__ == "__main__":
    main()
