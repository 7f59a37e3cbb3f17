"""DPO training throughput: our loop (dpo/trainer.py) against TRL's DPOTrainer (when `trl` imports),
each with a live reference model and with precomputed reference log-probabilities.

All runners train copies of one freshly built tiny model on data/preference.jsonl (prompts rendered by
our template; TRL tokenizes the same prompt and reply texts), one process, same micro-batch, learning
rate, beta and loss, fp32, no gradient checkpointing, dropout off. Warm-up steps (and TRL's own
precompute pass) are excluded; pairs/s is the micro-batch size over the median step time, with runners
alternating in short chunks so a shared machine's load spikes hit all of them alike. One thread by
default: that is what each rank of a 2-rank run on a 2-core machine gets, and with one thread the
process's CPU time per step hardly depends on other processes, so the pairs per CPU-second column
stays comparable on a loaded machine where wall time does not.

    python bench/bench_dpo.py [--hidden 128 --layers 4 --batch_size 8 --rounds 6 --chunk 4 --threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dpo.trainer import collate_pairs, disable_dropout, precompute_reference, train  # noqa: E402
from utils import ds  # noqa: E402
from utils.data import load_samples  # noqa: E402
from utils.encoding import Encoder  # noqa: E402
from utils.metrics import MetricsLogger  # noqa: E402
from utils.model import load_tokenizer  # noqa: E402
from utils.tiny import make_tiny_model  # noqa: E402
from utils.stream import StepStream  # noqa: E402

LR, BETA = 1e-4, 0.1


class TimedStream:
    """A StepStream that notes when each optimizer step asks for its data: consecutive notes bound one
    whole step of the trainer (data, forwards, backward, optimizer, bookkeeping)."""

    def __init__(self, stream: StepStream):
        self.stream, self.times = stream, []

    def next_step(self) -> list:
        self.times.append((time.perf_counter(), time.process_time()))
        return self.stream.next_step()


class Ours:
    """dpo.trainer.train on a DeepSpeed engine; `ref` is a DeepSpeed eval engine, or None when the
    items carry precomputed reference log-probs."""

    def __init__(self, model, ref, items, pad_id: int, a, out_dir: str):
        cfg = ds.ds_config(stage=a.zero_stage, offload=False, dtype="fp32", micro_batch=a.batch_size, grad_accum=1,
                           world=1, grad_clip=1.0)
        self.engine = ds.init_train_engine(model, cfg=cfg, lr=LR, weight_decay=0.0, betas=(0.9, 0.95), offload=False,
                                           scheduler="constant", warmup=0, total_steps=10**6)
        self.ref = ref
        self.stream = TimedStream(StepStream(items, a.batch_size, 1, lambda b: collate_pairs(b, pad_id), seed=0))
        self.args = SimpleNamespace(gradient_accumulation_steps=1, compute_fp32_loss=True, beta=BETA,
                                    loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0,
                                    per_device_eval_batch_size=a.batch_size, resume=False, log_interval=10,
                                    eval_interval=0, save_interval=0, output_dir=out_dir)
        self.logger, self.pad_id = MetricsLogger(out_dir), pad_id
        self.few = items[:1]  # train() evaluates before and after its steps; one pair keeps that negligible

    def run(self, steps: int) -> list[float]:
        self.stream.times = []
        with contextlib.redirect_stdout(io.StringIO()):  # metric lines go to metrics.jsonl only
            train(self.args, self.engine, self.ref, self.stream, self.few, self.logger, self.pad_id, steps + 1)
        return deltas(self.stream.times)  # steps + 1 starts: `steps` whole steps between them


class Trl:
    """trl.DPOTrainer on the same texts; per-step times between consecutive step ends."""

    def __init__(self, model, ref, tokenizer, texts: dict, a, out_dir: str, precompute: bool):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        class StepEnds(TrainerCallback):
            def __init__(self):
                self.times = []

            def on_step_end(self, args, state, control, **kw):
                self.times.append((time.perf_counter(), time.process_time()))

        cfg = DPOConfig(output_dir=out_dir, per_device_train_batch_size=a.batch_size, max_steps=1, learning_rate=LR,
                        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                        precompute_ref_batch_size=a.batch_size, lr_scheduler_type="constant",
                        logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                        bf16=False, gradient_checkpointing=False, disable_dropout=True, seed=0, max_length=None,
                        dataloader_num_workers=0, ddp_find_unused_parameters=False, adam_beta2=0.95,
                        max_grad_norm=1.0, disable_tqdm=True)
        self.ends = StepEnds()
        self.trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_dict(texts),
                                  processing_class=copy.deepcopy(tokenizer), callbacks=[self.ends])

    def run(self, steps: int) -> list[float]:
        self.trainer.args.max_steps = steps + 1  # the first step of a call has no previous end to time from
        self.ends.times = []
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-train summary line
            self.trainer.train()
        return deltas(self.ends.times)


def deltas(marks: list) -> list[tuple[float, float]]:
    """(wall, CPU) seconds between consecutive (perf_counter, process_time) marks."""
    return [(w1 - w0, c1 - c0) for (w0, c0), (w1, c1) in zip(marks[:-1], marks[1:])]


def interleaved(runners: dict, rounds: int, chunk: int) -> dict:
    """Median (wall, CPU) step time per runner, alternating chunks of steps; the first round is warm-up."""
    times = {name: [] for name in runners}
    for r in range(rounds + 1):
        for name, runner in runners.items():
            t = runner.run(chunk)
            if r > 0:
                times[name].extend(t)
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama", choices=["llama", "gpt2", "opt", "qwen2"],
                   help="tiny model family (utils/tiny.py)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny model")
    p.add_argument("--layers", type=int, default=4, help="layers of the tiny model")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per micro-batch (2x sequences per forward)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument("--chunk", type=int, default=4, help="optimizer steps per runner per round")
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage for our engine")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: as init_distributed sets them)")
    a = p.parse_args()

    ds.init_distributed(seed=0)
    if a.threads:
        torch.set_num_threads(a.threads)
    work = tempfile.mkdtemp(prefix="bench_dpo_")
    model_dir = make_tiny_model(a.family, os.path.join(work, "model"), hidden=a.hidden, layers=a.layers)
    tokenizer = load_tokenizer(model_dir)
    encoder = Encoder(tokenizer, "auto", 512)
    samples = load_samples([os.path.join(REPO, "data", "preference.jsonl")], "pairs", log=lambda *_: None)
    items = [(encoder.encode_reply(s.prompt, s.chosen), encoder.encode_reply(s.prompt, s.rejected)) for s in samples]
    # TRL gets the same texts: our rendered prompt, and each reply as the template renders it (EOS added by TRL).
    texts = {"prompt": [encoder.render_prompt(s.prompt) for s in samples],
             "chosen": [" " + s.chosen[0]["content"] for s in samples],
             "rejected": [" " + s.rejected[0]["content"] for s in samples]}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    disable_dropout(base)
    n_tokens = sum(len(c[0]) + len(r[0]) for c, r in items) / len(items)
    print(f"model: {a.family} hidden={a.hidden} layers={a.layers} params={sum(p.numel() for p in base.parameters())}"
          f" | pairs={len(items)} tokens/pair={n_tokens:.1f} batch={a.batch_size} pairs | "
          f"{a.rounds} x {a.chunk} timed steps each | threads={torch.get_num_threads()}", flush=True)

    ref = ds.init_eval_engine(copy.deepcopy(base).requires_grad_(False),
                              ds.ds_eval_config(stage=0, dtype="fp32", micro_batch=a.batch_size, world=1))
    t0 = time.perf_counter()
    cached = precompute_reference(ref, items, 2 * a.batch_size, encoder.pad_id)
    print(f"our reference precompute: {len(items) / (time.perf_counter() - t0):.1f} pairs/s", flush=True)
    runners = {
        "ours, live reference": Ours(copy.deepcopy(base), ref, items, encoder.pad_id, a, os.path.join(work, "o1")),
        "ours, precomputed reference": Ours(copy.deepcopy(base), None, cached, encoder.pad_id, a,
                                            os.path.join(work, "o2")),
    }
    try:
        import trl
    except ImportError:
        trl = None
        print("trl is not installed: no comparison (pip install trl)")
    if trl is not None:
        for pre in (False, True):
            name = f"trl {trl.__version__} DPOTrainer, {'precomputed' if pre else 'live'} reference"
            with contextlib.redirect_stderr(io.StringIO()):  # its tokenizing progress bars
                runners[name] = Trl(copy.deepcopy(base), copy.deepcopy(base).eval(), tokenizer, texts, a,
                                    os.path.join(work, f"t{int(pre)}"), pre)
    if a.threads:
        torch.set_num_threads(a.threads)  # accelerate (inside TRL's trainer) resets it to the core count
    step_time = interleaved(runners, a.rounds, a.chunk)
    assert not a.threads or torch.get_num_threads() == a.threads, "something changed the thread count"
    rates = {name: (a.batch_size / wall, a.batch_size / cpu) for name, (wall, cpu) in step_time.items()}
    print(f"{'':52s} {'pairs/s':>8s} {'pairs/CPU-s':>12s}  median step: wall, CPU")
    for name, (wall, cpu) in rates.items():
        wall_ms, cpu_ms = (1000 * t for t in step_time[name])
        print(f"{name:52s} {wall:8.1f} {cpu:12.1f}  {wall_ms:.1f} ms, {cpu_ms:.1f} ms")
    if trl is not None:
        names = list(rates)
        for ours, theirs, mode in ((names[0], names[2], "live"), (names[1], names[3], "precomputed")):
            print(f"ratio ours / trl, {mode} reference: {rates[ours][0] / rates[theirs][0]:.2f}x (wall), "
                  f"{rates[ours][1] / rates[theirs][1]:.2f}x (CPU time)")


if __name__ == "__main__":
    main()
