"""What every benchmark shares: the machine's matmul peak, model FLOPs, memory, load, repetitions.

Rules the benches follow (so that two numbers printed side by side compare like with like):
  * the same process count and threads on both sides (ours 1 process vs TRL 1 process; ours on 2 ranks
    is printed on its own line, never as the ratio), the same model, data, lengths and batch;
  * warm-up excluded; every figure is the median of --reps repetitions (each a fresh process) with
    the spread (min-max) beside it;
  * the machine's own fp32 and bf16 matmul peak is measured here, with the thread count of the measured
    process, and achieved model FLOP/s is printed as a fraction of it (CPU "MFU");
  * the load average at start and end is printed with every result: other processes slow a run down.

Model FLOPs (PaLM, Chowdhery et al. 2022, appendix B): a training step on a sequence of T tokens costs
    6 * N * T + 12 * L * d * T^2
with N the parameters that take part in matrix products (every nn.Linear / Conv1D weight, the LM head
included even when tied to the embedding; embedding lookups, norms and biases left out), L layers and
d the attention width; the second term is attention (QK^T and AV, forward and backward). A forward
pass alone is one third of it. Only real tokens count (padding is not useful work), so a packed run
and a padded run of the same data do the same model FLOPs and differ in time only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_VENV_PYTHON = os.path.join(REPO, ".venv-trl", "bin", "python")  # made by bench/setup_trl.sh
TRL_HELP = f"interpreter with trl installed (default: this one if it imports trl, else {TRL_VENV_PYTHON}, which " \
           "`bash bench/setup_trl.sh` makes)"
NO_TRL = "trl: no interpreter with trl found (run `bash bench/setup_trl.sh`, or pass --trl_python): no comparison"


# ----------------------------------------------------------------------------- machine

def load_average() -> float:
    return os.getloadavg()[0]


def matmul_peak_gflops(dtype: str, threads: int, n: int = 2048, reps: int = 15) -> float:
    """GFLOP/s of the fastest of `reps` n x n x n torch matmuls in `dtype` ("fp32" or "bf16") on `threads`
    threads, after 5 warm-up products: the peak is what the machine can do, and on a shared virtual
    machine the median of a few products moved by 20% (bf16 by 2x) between runs minutes apart.

    Measured in a child process so the caller's thread setting and allocator are not touched."""
    code = ("import statistics, sys, time, torch\n"
            "n, reps, dt, th = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])\n"
            "torch.set_num_threads(th)\n"
            "t = {'fp32': torch.float32, 'bf16': torch.bfloat16}[dt]\n"
            "a, b = torch.randn(n, n, dtype=t), torch.randn(n, n, dtype=t)\n"
            "for _ in range(5): a @ b\n"
            "times = []\n"
            "for _ in range(reps):\n"
            "    t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)\n"
            "print(2 * n ** 3 / min(times) / 1e9)\n")
    out = subprocess.run([sys.executable, "-c", code, str(n), str(reps), dtype, str(threads)], check=True,
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return float(out.stdout.strip().splitlines()[-1])


def peaks(threads: int) -> dict:
    return {"fp32": matmul_peak_gflops("fp32", threads), "bf16": matmul_peak_gflops("bf16", threads)}


# ----------------------------------------------------------------------------- model FLOPs

def matmul_params(model) -> int:
    """N of the FLOPs formula: weights of nn.Linear and GPT-2's Conv1D (tied LM head counted once as a matmul)."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - older transformers
        Conv1D = ()
    n = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)):
            n += m.weight.numel()
    return n


def attention_dims(config) -> tuple[int, int]:
    """(layers, attention width) of a decoder config."""
    c = config.get_text_config()
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    width = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    head_dim = getattr(c, "head_dim", None) or width // heads
    return layers, heads * head_dim


def train_flops(n_matmul: int, layers: int, width: int, lengths) -> float:
    """Model FLOPs of one training pass (forward + backward) over sequences of the given lengths."""
    return float(sum(6 * n_matmul * t + 12 * layers * width * t * t for t in lengths))


# ----------------------------------------------------------------------------- memory

def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_max_allocated_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


RUN_MEASURED = r"""
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:])
print(f"\n@@peak_rss_kb {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(p.returncode)
"""


def run_measured(cmd: list[str], env: dict | None = None, cwd: str = REPO, timeout: float = 3600):
    """Run `cmd` and return (CompletedProcess, peak RSS in MiB of its largest process).

    A fresh wrapper process runs the command, so RUSAGE_CHILDREN covers this command's process tree
    only; for `deepspeed --num_gpus 2` the largest process is the biggest rank (peak RSS per rank)."""
    p = subprocess.run([sys.executable, "-c", RUN_MEASURED, *cmd], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    rss = None
    lines = p.stderr.rstrip().splitlines()
    if lines and lines[-1].startswith("@@peak_rss_kb "):
        rss = int(lines[-1].split()[1]) / 1024
        p.stderr = "\n".join(lines[:-1])
    return p, rss


# ----------------------------------------------------------------------------- repetitions and printing

def interleaved_cpu_ms(fns: dict, reps: int) -> dict:
    """{name: median ms} of each function's process CPU time over `reps` interleaved repetitions, with
    each one's median and spread printed (one thread: the time the work needs, hardly changed by load)."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            times[name].append(1000 * (time.process_time() - t))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:9s} {med[k]:8.1f} ms  ({min(v):.1f}-{max(v):.1f})")
    return med


def summary(values: list[float]) -> dict:
    """Median and spread of the repetitions."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, unit: str = "", digits: int = 1) -> str:
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def ratios(medians: dict, pairs: list[tuple[str, str]]) -> None:
    """Print ours / theirs for each (ours, theirs) pair of runner names that both ran."""
    for ours, theirs in pairs:
        if ours in medians and theirs in medians:
            print(f"ratio {ours} / {theirs}: {medians[ours] / medians[theirs]:.2f}x")


def bench_parser(doc: str, kind: str, runners: str, runners_help: str, data_file: str):
    """The flags the three training benches share; kind "sft" (samples) or "pairs". The caller adds its
    own and the worker's (--worker, --model_dir and its input file are the TRL/torch worker's)."""
    unit, batch, corpus = ("samples", "16 tiny, 8 realistic", 400) if kind == "sft" else ("pairs", "8 tiny, 4 realistic", 300)
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=list(SIZES), help="model size (bench/common.py)")
    ap.add_argument("--data", default=None, help=f"{'SFT data' if kind == 'sft' else 'preference pairs'}; default: "
                                                 f"data/{data_file}, or a generated variable-length corpus for realistic")
    ap.add_argument("--corpus", action=argparse.BooleanOptionalAction, default=None,
                    help="use the generated variable-length corpus (default: on for realistic)")
    ap.add_argument("--corpus_size", type=int, default=corpus, help="records in the generated corpus")
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help=f"{unit} per optimizer step ({batch})")
    ap.add_argument("--window", type=int, default=None, help="steps per timing window (10 tiny, 3 realistic)")
    ap.add_argument("--windows", type=int, default=3, help="timed windows per run (after one warm-up window)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (fresh processes) per runner")
    ap.add_argument("--runners", default=runners, help=runners_help)
    ap.add_argument("--trl_python", default=None, help=TRL_HELP)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads of every 1-process runner, ours and TRL's (default: all cores)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


def bench_inputs(a, step: str, kind: str, default_data: str, reward: bool = False):
    """The start of a training bench: the batch and window defaults of its size, the load average, the
    measured matmul peaks, a work directory, the model and its stats, and the data (the flag, else the
    generated variable-length corpus of `kind`, sft or pairs, else `default_data`). Returns (load0,
    peak, work, model_dir, stats, data)."""
    realistic = a.size == "realistic"
    a.corpus = realistic if a.corpus is None else a.corpus
    a.batch = a.batch or ((8 if realistic else 16) if kind == "sft" else (4 if realistic else 8))
    a.window = a.window or (3 if realistic else 10)
    load0 = load_average()
    peak = peaks(a.threads)
    work = tempfile.mkdtemp(prefix=f"bench_{step}_")
    model_dir = make_model(work, a.size)
    stats = model_stats(model_dir, reward=reward)
    data = a.data or os.path.join(REPO, "data", default_data)
    if a.corpus and not a.data:
        from utils.model import load_tokenizer

        data = os.path.join(work, "corpus.jsonl" if kind == "sft" else "pairs.jsonl")
        make_corpus(data, load_tokenizer(model_dir), kind, a.corpus_size, 16, a.max_seq_len - 32)
    return load0, peak, work, model_dir, stats, data


def describe_pairs(a, what: str, model: str, stats: dict, lengths: list, data: str, peak: dict, load0: float):
    """The pair benches' timed pairs (the items of the timed windows, common.timed_items) and their
    header lines; returns (pairs' [chosen, rejected] lengths, training FLOPs per pair, tokens per pair)."""
    lengths = timed_items(lengths, a.batch, a.window, a.windows)
    flat = [n for pair in lengths for n in pair]
    flops = train_flops(stats["matmul_params"], stats["layers"], stats["width"], flat) / len(lengths)
    tokens = sum(flat) / len(lengths)
    header(what, a.threads, peak, f"load average {load0:.2f} at start")
    print(f"model llama-{a.size}{model}: {stats['params'] / 1e6:.2f}M parameters, fp32 | data "
          f"{'generated pairs' if a.corpus else os.path.relpath(data, REPO)}: the {len(lengths)} pairs of the timed "
          f"windows (the same batches on every side), {tokens:.0f} tokens/pair (sequences "
          f"{min(flat)}-{max(flat)}) | batch {a.batch} pairs | {a.reps} reps x {a.windows} windows of {a.window} "
          "steps after 1 warm-up window", flush=True)
    return lengths, flops, tokens


def run_worker(script: str, a, python: str, worker: str, label: str, flags: list) -> dict:
    """Run `script --worker WORKER FLAGS` (a bench's TRL or bare-PyTorch side) under `python` with the
    bench's batch, windows and threads; its JSON result with the process's peak RSS added."""
    cmd = [python, os.path.abspath(script), "--worker", worker, *flags, "--batch", str(a.batch), "--window",
           str(a.window), "--windows", str(a.windows), "--threads", str(a.threads)]
    p, rss = run_measured(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    res = worker_json(p, f"{label} worker")
    res["rss_mb"] = rss
    return res


def step_marks():
    """(Clock, a transformers TrainerCallback that marks it at every step's end): how the TRL workers
    time their steps (imports transformers: call it in the TRL interpreter only)."""
    from transformers import TrainerCallback

    clock = Clock()

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.mark()

    return clock, Marks()


def trl_python(flag: str | None) -> str | None:
    """The interpreter for the TRL side: the flag, else this one if it imports trl, else the separate
    TRL virtual environment if it exists; None when there is none (the comparison is skipped)."""
    if flag:
        return flag
    try:
        import trl  # noqa: F401

        return sys.executable
    except ImportError:
        return TRL_VENV_PYTHON if os.path.exists(TRL_VENV_PYTHON) else None


def header(what: str, threads: int, peak: dict, extra: str = "") -> None:
    print(f"== {what} | {os.cpu_count()} cores, {threads} thread(s) per process | matmul peak "
          f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s{(' | ' + extra) if extra else ''}",
          flush=True)


def worker_json(p: subprocess.CompletedProcess, what: str) -> dict:
    """The last JSON line a worker printed, or exit with its error."""
    if p.returncode != 0:
        raise SystemExit(f"{what} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{what} printed no result:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


class Clock:
    """(wall, CPU) marks; CPU time per step barely depends on other processes, wall time does."""

    def __init__(self):
        self.marks = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self, skip: int = 0) -> list[tuple[float, float]]:
        d = [(w1 - w0, c1 - c0) for (w0, c0), (w1, c1) in zip(self.marks[:-1], self.marks[1:])]
        return d[skip:]


# ----------------------------------------------------------------------------- models and data

# Model sizes: "tiny" is the test model (utils/tiny.py defaults); "realistic" is a CPU-sized Llama
# (about 24M parameters; the shipped tokenizer's 512-token vocabulary keeps the LM head small).
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4),
    "small": dict(hidden=256, layers=4, heads=4),
    "realistic": dict(hidden=512, layers=10, heads=8),
}


def make_model(root: str, size: str, family: str = "llama") -> str:
    """A random-init model directory of the named size (fixed seed: every process sees the same weights)."""
    from utils.tiny import make_tiny_model

    path = os.path.join(root, f"{family}-{size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_model(family, path, seed=0, **SIZES[size])
    return path


def model_stats(model_dir: str, reward: bool = False) -> dict:
    """N (matmul parameters), all parameters, layers and attention width of a saved causal LM, or of the
    one-label sequence classifier built on it (`reward`: no LM head, a d x 1 score head)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir, **({"num_labels": 1} if reward else {}))
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_config(config)
    layers, width = attention_dims(config)
    return {"matmul_params": matmul_params(model), "params": sum(p.numel() for p in model.parameters()),
            "layers": layers, "width": width}


def _words() -> list[str]:
    with open(os.path.join(REPO, "data", "vocab_words.txt")) as f:
        return [w.strip() for w in f if w.strip()]


def make_corpus(path: str, tokenizer, kind: str, n: int, lo: int, hi: int, seed: int = 0) -> None:
    """A variable-length corpus: `n` records whose replies are about lo..hi tokens, log-uniformly spread
    (many short, a few long, as in real instruction data). kind "sft": {"prompt", "response"}; "pairs":
    {"prompt", "chosen", "rejected"} with the two replies of independent lengths."""
    import math
    import random

    rng = random.Random(seed)
    words = _words()
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}

    def reply(target: int) -> str:
        out, t = [], 0
        while t < target:
            w = rng.choice(words)
            out.append(w)
            t += cost[w]
        return (" ".join(out)).capitalize() + "."

    def length() -> int:
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    with open(path, "w") as f:
        for _ in range(n):
            prompt = f"Tell me about the {rng.choice(words)} and the {rng.choice(words)}."
            if kind == "sft":
                row = {"prompt": prompt, "response": reply(length())}
            else:
                row = {"prompt": prompt, "chosen": reply(length()), "rejected": reply(length())}
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- running our programs

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_program(script: str, args: list[str], out: str, ranks: int, rate_key: str,
                threads: int | None = None) -> dict:
    """One of our programs as a user runs it (python for 1 process, deepspeed for more ranks), with
    --log_interval windows; returns the median `rate_key` and tokens/s of the windows after the first
    (warm-up), and the peak RSS of the largest process. `threads` sets OMP_NUM_THREADS for a 1-process
    run (utils/ds.py keeps an explicit setting); ranks of a multi-rank run share the cores."""
    env = dict(os.environ, PYTHONPATH=REPO, MASTER_PORT=str(free_port()))
    if threads and ranks == 1:
        env["OMP_NUM_THREADS"] = str(threads)
    prog = [os.path.join(REPO, script), *args, "--output_dir", out]
    if ranks == 1:
        cmd = [sys.executable, *prog]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", env["MASTER_PORT"], *prog]
    p, rss = run_measured(cmd, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    timed = train[1:] or train
    return {"rate": statistics.median(r[rate_key] for r in timed),
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed), "rss_mb": rss}


# Our programs' --seed default and the --eval_fraction every bench passes them: the train split and the
# order of its samples follow from these two (utils/data.train_eval_split, utils/stream.StepStream).
SEED, EVAL_FRACTION = 1234, 0.02


def train_split(data: str, kind: str) -> list:
    """The samples our program trains on when given `data` with --eval_fraction EVAL_FRACTION."""
    from utils.data import load_splits

    return load_splits([data], None, EVAL_FRACTION, SEED, kind, log=lambda *_: None)[0]


def train_order(items: list, batch: int, steps: int) -> list:
    """`items` in the order our program's first `steps` optimizer steps take them (global batch `batch`,
    fresh permutation every epoch). The other trainer reads its dataset in this order without shuffling,
    so both sides train on the same batches: on a variable-length corpus the padded length of a batch
    (its longest sample) changes the work of a step several-fold."""
    from utils.stream import StepStream

    stream = StepStream(items, batch, 1, lambda b: b, SEED)
    return [it for _ in range(steps) for it in stream.next_step()[0]]


def timed_windows(order: list, batch: int, window: int, windows: int) -> list[list]:
    """The items of each timed window (the windows after the first, warm-up one) of a run over `order`."""
    return [order[(w + 1) * window * batch:(w + 2) * window * batch] for w in range(windows)]


def timed_items(order: list, batch: int, window: int, windows: int) -> list:
    """All the items of the timed windows, in order (what the FLOPs and tokens per item are taken over)."""
    return order[window * batch:(windows + 1) * window * batch]


def trl_rates(step_times: list[float], order: list, batch: int, window: int, windows: int, tokens) -> dict:
    """Median items/s and tokens/s over the timed windows of a TRL run, from the times between its step
    ends (`step_times[j]` is the time of step j + 2; the run has window * (windows + 1) steps, like ours).
    `tokens(item)` counts an item's real tokens."""
    times = step_times[-window * windows:]
    assert len(times) == window * windows, (len(step_times), window, windows)
    secs = [sum(times[w * window:(w + 1) * window]) for w in range(windows)]
    wins = timed_windows(order, batch, window, windows)
    return {"rate": statistics.median(len(items) / t for items, t in zip(wins, secs)),
            "tokens_per_sec": statistics.median(sum(map(tokens, items)) / t for items, t in zip(wins, secs))}


def interleave(runners: dict, reps: int) -> dict:
    """Call every runner once per repetition, taking turns, so a load change hits all of them alike."""
    results = {name: [] for name in runners}
    for rep in range(reps):
        for name, fn in runners.items():
            results[name].append(fn(rep))
    return results


def print_table(results: dict, unit: str, per_item_flops, per_item_tokens: float, peak: dict) -> dict:
    """Rows of median (spread) rate, tokens/s, MFU against the fp32 peak and peak RSS; returns medians.
    `per_item_flops`: model FLOPs per sample (or pair) of the timed windows, or a dict of them per runner."""
    w = max([len(name) for name in results] + [6])
    print(f"{'runner':{w}s} {unit + '/s':>20s} {'tokens/s':>20s} {'MFU (fp32 peak)':>16s} {'peak RSS':>10s}")
    out = {}
    for name, reps in results.items():
        rate = summary([r["rate"] for r in reps])
        tps = summary([r.get("tokens_per_sec") or r["rate"] * per_item_tokens for r in reps])
        flops = per_item_flops[name] if isinstance(per_item_flops, dict) else per_item_flops
        mfu = rate["median"] * flops / (peak["fp32"] * 1e9)
        rss = max((r.get("rss_mb") or 0) for r in reps)
        out[name] = {"rate": rate, "tokens_per_sec": tps, "mfu_fp32": mfu, "peak_rss_mb": rss}
        print(f"{name:{w}s} {fmt(rate):>20s} {fmt(tps, digits=0):>20s} {100 * mfu:15.1f}% {rss:8.0f} MB")
    return out
