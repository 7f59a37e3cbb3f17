"""Reward-model training throughput: our step-2 loop (default and --shared_prompt_forward) against
TRL's RewardTrainer when `trl` imports.

All runners train the same freshly built tiny model (same weights, same head initialisation) on the
same token ids (data/preference.jsonl rendered by our Encoder: prompt + reply + EOS), one process each,
same micro-batch, learning rate, fp32, no dropout, no gradient checkpointing. A step is timed from one
step's data request to the next (data, forward, backward, optimizer, bookkeeping).

The runners live in separate processes and take turns (chunks of steps, round after round), so load
from other programs on a shared machine hits them alike; the first round is warm-up. Two numbers per
runner: pairs/s from the median wall-clock step, and pairs per CPU-second from the median CPU time of
a step, which other programs hardly disturb (with --threads 1 there is no thread spinning in it).

    python bench/bench_reward.py [--hidden 128 --layers 4 --batch_size 8 --threads 1 --rounds 3 --chunk 12]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from step2_reward.main import encode_pairs  # noqa: E402
from step2_reward.trainer import collate, train  # noqa: E402
from utils import ds  # noqa: E402
from utils.data import load_samples  # noqa: E402
from utils.encoding import Encoder  # noqa: E402
from utils.metrics import MetricsLogger  # noqa: E402
from utils.model import load_tokenizer  # noqa: E402
from utils.reward import disable_dropout, load_reward_model  # noqa: E402
from utils.tiny import make_tiny_model  # noqa: E402
from utils.stream import StepStream  # noqa: E402

LR = 1e-4


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def durations(marks: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, cpu) seconds between consecutive marks."""
    return [(w1 - w0, c1 - c0) for (w0, c0), (w1, c1) in zip(marks[:-1], marks[1:])]


class TimedStream:
    """A StepStream that marks the clocks whenever an optimizer step asks for its data."""

    def __init__(self, stream: StepStream):
        self.stream, self.marks = stream, []

    def next_step(self) -> list:
        self.marks.append(clocks())
        return self.stream.next_step()


class Ours:
    """step2_reward.trainer.train on a DeepSpeed engine (--zero_stage as given), default log interval."""

    def __init__(self, model, items, pad_id: int, a, out_dir: str, shared: bool):
        cfg = ds.ds_config(stage=a.zero_stage, offload=False, dtype="fp32", micro_batch=a.batch_size, grad_accum=1,
                           world=1, grad_clip=1.0)
        self.engine = ds.init_train_engine(model, cfg=cfg, lr=LR, weight_decay=0.0, betas=(0.9, 0.95), offload=False,
                                           scheduler="constant", warmup=0, total_steps=10**6)
        self.collate = functools.partial(collate, pad_id=pad_id, shared_prompt=shared)
        self.stream = TimedStream(StepStream(items, a.batch_size, 1, self.collate, seed=0))
        self.args = SimpleNamespace(gradient_accumulation_steps=1, compute_fp32_loss=True,
                                    center_rewards_coefficient=0.0, per_device_eval_batch_size=a.batch_size,
                                    resume=False, log_interval=10, eval_interval=0, save_interval=0, output_dir=out_dir)
        self.logger = MetricsLogger(out_dir)
        self.few = items[:1]  # train() evaluates before and after its steps; one pair keeps that negligible

    def run(self, steps: int) -> list[tuple[float, float]]:
        self.stream.marks = []
        with contextlib.redirect_stdout(io.StringIO()):  # metric lines go to metrics.jsonl only
            train(self.args, self.engine, self.stream, self.few, self.logger, self.collate, steps + 1)
        return durations(self.stream.marks)  # steps + 1 data requests bound `steps` whole steps


class Trl:
    """trl.RewardTrainer on the same ids, timed from one step's end to the next (its data loading included)."""

    def __init__(self, model, tokenizer, items, a, out_dir: str):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import RewardConfig, RewardTrainer

        class StepEnds(TrainerCallback):
            def __init__(self):
                self.marks = []

            def on_step_end(self, args, state, control, **kw):
                self.marks.append(clocks())

        data = Dataset.from_dict({"chosen_ids": [it.chosen for it in items],
                                  "rejected_ids": [it.rejected for it in items]})
        cfg = RewardConfig(output_dir=out_dir, per_device_train_batch_size=a.batch_size, max_steps=1,
                           learning_rate=LR, lr_scheduler_type="constant", logging_steps=10**9, save_strategy="no",
                           report_to=[], use_cpu=not torch.cuda.is_available(), disable_dropout=True, seed=0,
                           max_length=None, dataloader_num_workers=0, adam_beta2=0.95, max_grad_norm=1.0,
                           disable_tqdm=True,
                           # RewardConfig defaults to bf16 autocast and gradient checkpointing; ours runs
                           # fp32 without recomputation, so TRL does too (a like-for-like step) unless
                           # --trl_defaults asks for what a user gets out of the box.
                           **({} if a.trl_defaults else {"bf16": False, "gradient_checkpointing": False}))
        self.ends = StepEnds()
        self.trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer,
                                     callbacks=[self.ends])

    def run(self, steps: int) -> list[tuple[float, float]]:
        self.trainer.args.max_steps = steps + 1  # a call's first step has no earlier end to time from
        self.ends.marks = []
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-train summary line
            self.trainer.train()
        return durations(self.ends.marks)


def build(kind: str, a, model_dir: str, out_dir: str):
    """One runner in its own process. Ours needs a (one-rank) process group; TRL must not see one, or
    accelerate would wrap its model in DistributedDataParallel, which a single process never pays for."""
    if kind != "trl":
        ds.init_distributed(seed=0)
    torch.set_num_threads(a.threads)
    tokenizer = load_tokenizer(model_dir)
    encoder = Encoder(tokenizer, "auto", 512)
    items = encode_pairs(load_samples([os.path.join(REPO, "data", "preference.jsonl")], "pairs", log=lambda *_: None),
                         encoder, "bench")
    torch.manual_seed(0)  # the same head initialisation in every process
    model = load_reward_model(model_dir, pad_id=encoder.pad_id)
    disable_dropout(model)
    if kind == "trl":
        return Trl(model, tokenizer, items, a, out_dir), items
    return Ours(model, items, encoder.pad_id, a, out_dir, shared=kind == "ours_shared"), items


def worker(kind: str, a, model_dir: str, out_dir: str, conn) -> None:
    """Build a runner, report the data shape, then run chunks of steps on request until told to stop."""
    with contextlib.redirect_stderr(io.StringIO()):  # library warnings; failures still raise
        runner, items = build(kind, a, model_dir, out_dir)
    conn.send((len(items), sum(len(it.chosen) + len(it.rejected) for it in items) / len(items)))
    while (steps := conn.recv()) is not None:
        conn.send((runner.run(steps), torch.get_num_threads()))


def interleaved(conns: dict, rounds: int, chunk: int) -> dict:
    """Per runner: (median wall s, median cpu s) per step and its thread count, taking turns in chunks."""
    steps, threads = {name: [] for name in conns}, {}
    for r in range(rounds + 1):
        for name, conn in conns.items():
            conn.send(chunk)
            times, threads[name] = conn.recv()
            if r > 0:  # round 0 is warm-up
                steps[name].extend(times)
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t), threads[name])
            for name, t in steps.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama", choices=["llama", "gpt2", "opt", "qwen2"],
                   help="tiny model family (utils/tiny.py)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny model")
    p.add_argument("--layers", type=int, default=4, help="layers of the tiny model")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per micro-batch (2x sequences per step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per runner (runners take turns)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--chunk", type=int, default=12, help="optimizer steps per runner per round")
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage for our engine")
    p.add_argument("--trl_defaults", action="store_true",
                   help="run TRL with RewardConfig's own defaults (bf16 autocast, gradient checkpointing)")
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench_reward_")
    model_dir = make_tiny_model(a.family, os.path.join(work, "model"), hidden=a.hidden, layers=a.layers)
    kinds = {"ours": f"ours (ZeRO-{a.zero_stage})", "ours_shared": "ours --shared_prompt_forward"}
    try:
        import trl

        kinds["trl"] = f"trl.RewardTrainer {trl.__version__}" + (" (defaults)" if a.trl_defaults else "")
    except ImportError:
        print("trl is not installed: no comparison (pip install trl)")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # read by the spawned runners at import
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for kind, name in kinds.items():
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=worker, args=(kind, a, model_dir, os.path.join(work, kind), child)))
        procs[-1].start()
        conns[name] = parent
    n_pairs, tokens = [conn.recv() for conn in conns.values()][0]
    print(f"model: {a.family} hidden={a.hidden} layers={a.layers} | pairs={n_pairs} tokens/pair={tokens:.1f} "
          f"batch={a.batch_size} pairs | {a.rounds} x {a.chunk} timed steps per runner", flush=True)
    result = interleaved(conns, a.rounds, a.chunk)
    for conn in conns.values():
        conn.send(None)
    for proc in procs:
        proc.join()
    for name, (wall, cpu, threads) in result.items():
        print(f"{name:32s} {a.batch_size / wall:8.1f} pairs/s (median step {1000 * wall:6.1f} ms) "
              f"{a.batch_size / cpu:8.1f} pairs/CPU-s  threads={threads}")
    if "trl" in kinds:
        trl_wall, trl_cpu, _ = result[kinds["trl"]]
        for kind in ("ours", "ours_shared"):
            wall, cpu, _ = result[kinds[kind]]
            print(f"ratio {kinds[kind]} / trl: {trl_wall / wall:.2f}x wall-clock, {trl_cpu / cpu:.2f}x CPU time")


if __name__ == "__main__":
    main()
