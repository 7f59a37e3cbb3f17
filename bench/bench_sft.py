"""SFT throughput, like for like: our step1_sft/main.py against TRL's SFTTrainer, and against the machine.

    python bench/bench_sft.py                          # tiny test model on data/sft.jsonl
    python bench/bench_sft.py --size realistic         # ~24M-parameter Llama on a variable-length corpus
    python bench/bench_sft.py --size realistic --memory    # peak RSS per rank for ZeRO-0/2/3 and offload

Both sides get the same random-init model, the same token ids (TRL receives our encoded samples with
their completion masks, so templates and truncation cannot differ) in the same batches (TRL reads them
unshuffled in the order our steps take them), micro-batch, fp32, learning rate,
Adam betas, clipping and constant schedule, and the same thread count (1 process each, all cores).
Ours also runs with --packing, and on 2 DeepSpeed ranks (ZeRO-2, global batch unchanged) on a line of
its own; a bare PyTorch loop over the same batches (forward, loss, backward, clipping, fused AdamW) shows
the floor any eager trainer runs into: the ratio against TRL compares 1 process with 1 process only. Each runner is a fresh process
per repetition (repetitions interleaved, so load changes hit all runners alike); within a run, steps
are timed in windows of --window steps, the first window is warm-up, and the run's rate is the median
window. Printed: the median over --reps repetitions and the spread, model FLOP/s as a fraction of the
measured fp32 matmul peak (bench/common.py says how FLOPs are counted), peak RSS, and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

LR = 1e-4


# ----------------------------------------------------------------------------- data

def encode_corpus(model_dir: str, data: str, max_seq_len: int, out_path: str, batch: int | None = None,
                  steps: int | None = None) -> list[int]:
    """Our encoding of the samples our program trains on, written as {"input_ids", "completion_mask"} rows
    (what TRL is given); returns every row's length. With `batch` and `steps`, the rows are those of our
    first `steps` steps in their order (common.train_order), which TRL reads unshuffled: the same batches."""
    from utils.encoding import IGNORE, Encoder, encode_all
    from utils.model import load_tokenizer

    enc = Encoder(load_tokenizer(model_dir), "auto", max_seq_len)
    items = encode_all(common.train_split(data, "sft"), lambda s: (enc.encode_sft(s),), enc, "bench",
                       log=lambda *_: None).items
    if batch and steps:
        items = common.train_order(items, batch, steps)
    with open(out_path, "w") as f:
        for ((ids, labels),) in items:
            f.write(json.dumps({"input_ids": ids, "completion_mask": [int(l != IGNORE) for l in labels]}) + "\n")
    return [len(ids) for ((ids, _),) in items]


# ----------------------------------------------------------------------------- runners

def run_ours(a, model_dir: str, data: str, out: str, ranks: int, packing: bool, zero_stage: int,
             offload: bool = False, steps: int | None = None) -> dict:
    """step1_sft/main.py as a user runs it; the median rate of its metrics windows after the first."""
    steps = steps or a.window * (a.windows + 1)
    args = ["--model_name_or_path", model_dir, "--data_path", data, "--per_device_train_batch_size",
            str(a.batch // ranks), "--max_steps", str(steps), "--log_interval", str(a.window), "--zero_stage",
            str(zero_stage), "--learning_rate", str(LR), "--lr_scheduler_type", "constant", "--max_seq_len",
            str(a.max_seq_len), "--eval_fraction", "0.02", "--per_device_eval_batch_size", str(a.batch)]
    args += ["--packing"] * packing + ["--offload"] * offload
    return common.run_program("step1_sft/main.py", args, out, ranks, "samples_per_sec", a.threads)


def run_trl(a, python: str, model_dir: str, encoded: str, out: str, padding_free: bool = False) -> dict:
    return common.run_worker(__file__, a, python, "trl", "TRL SFT", ["--model_dir", model_dir, "--encoded", encoded,
                                                              "--out", out] + ["--padding_free"] * padding_free)


def trl_worker(a) -> None:
    """Runs under the TRL interpreter: SFTTrainer on our token ids, steps timed between step ends."""
    import contextlib
    import io

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(a.encoded)]
    data = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    clock, marks = common.step_marks()
    steps = a.window * (a.windows + 1)
    # Our steps' batches in our order (encode_corpus), read unshuffled.
    cfg = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=steps, learning_rate=LR,
                    train_sampling_strategy="sequential",
                    lr_scheduler_type="constant", adam_beta2=0.95, max_grad_norm=1.0, weight_decay=0.0,
                    logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                    dataloader_num_workers=0, max_length=None, completion_only_loss=True, bf16=False, fp16=False,
                    gradient_checkpointing=False, padding_free=a.padding_free, disable_tqdm=True, seed=0)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    with contextlib.redirect_stderr(io.StringIO()):
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[marks])
    torch.set_num_threads(a.threads)  # accelerate may have changed it; the same threads as ours
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    rates = common.trl_rates([w for w, _ in clock.steps()], rows, a.batch, a.window, a.windows,
                             lambda r: len(r["input_ids"]))
    print(json.dumps({**rates, "threads": torch.get_num_threads(), "rss_self_mb": common.peak_rss_mb()}))


def run_torch(a, model_dir: str, encoded: str) -> dict:
    return common.run_worker(__file__, a, sys.executable, "torch", "plain PyTorch SFT",
                             ["--model_dir", model_dir, "--encoded", encoded])


def torch_worker(a) -> None:
    """The floor of any eager trainer: the same batches through a bare PyTorch loop (forward, our loss,
    backward, clipping, fused AdamW), no trainer, no DeepSpeed, no logging."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils.encoding import IGNORE, pad_batch
    from utils.losses import sft_loss

    torch.set_num_threads(a.threads)
    rows = [json.loads(line) for line in open(a.encoded)]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    clock = common.Clock()
    for i in range(0, len(rows), a.batch):
        b = rows[i:i + a.batch]
        batch = pad_batch([r["input_ids"] for r in b], [[t if m else IGNORE for t, m in zip(r["input_ids"],
                                                         r["completion_mask"])] for r in b], 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss, _ = sft_loss(logits, batch["labels"], max(1, int((batch["labels"][:, 1:] != IGNORE).sum())))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()
    rates = common.trl_rates([w for w, _ in clock.steps()], rows, a.batch, a.window, a.windows,
                             lambda r: len(r["input_ids"]))
    print(json.dumps({**rates, "threads": torch.get_num_threads()}))


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = common.bench_parser(__doc__, "sft", "ours,ours_packed,ours_2ranks,trl,torch",
                             "comma list of: ours, ours_packed, ours_2ranks, ours_2ranks_packed, trl, trl_padding_free, "
                             "torch (a bare PyTorch loop on the same batches: what any eager trainer can reach)",
                             "sft.jsonl")
    ap.add_argument("--memory", action="store_true", help="only the peak-RSS table (2 ranks, ZeRO-0/2/3, offload)")
    ap.add_argument("--encoded", help=argparse.SUPPRESS)
    ap.add_argument("--padding_free", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "trl":
        return trl_worker(a)
    if a.worker == "torch":
        return torch_worker(a)
    load0, peak, work, model_dir, stats, data = common.bench_inputs(a, "sft", "sft", "sft.jsonl")
    encoded = os.path.join(work, "encoded.jsonl")
    lengths = encode_corpus(model_dir, data, a.max_seq_len, encoded, a.batch, a.window * (a.windows + 1))
    timed = common.timed_items(lengths, a.batch, a.window, a.windows)
    flops_per_sample = common.train_flops(stats["matmul_params"], stats["layers"], stats["width"], timed) / len(timed)
    tokens_per_sample = sum(timed) / len(timed)
    common.header("SFT", a.threads, peak, f"load average {load0:.2f} at start")
    print(f"model llama-{a.size}: {stats['params'] / 1e6:.2f}M parameters ({stats['matmul_params'] / 1e6:.2f}M in "
          f"matmuls), fp32 | data {'generated corpus' if a.corpus else os.path.relpath(data, REPO)}: the "
          f"{len(timed)} samples of the timed windows, {tokens_per_sample:.0f} tokens/sample (min {min(timed)}, max "
          f"{max(timed)}), the same batches on every side | batch "
          f"{a.batch} | {a.reps} reps x {a.windows} windows of {a.window} steps after 1 warm-up window", flush=True)

    if a.memory:
        return memory_table(a, model_dir, data, work, load0)

    trl_py = common.trl_python(a.trl_python)
    runners = {}
    for name in a.runners.split(","):
        packed = name.endswith("packed")
        if name.startswith("ours"):
            ranks = 2 if "2ranks" in name else 1
            label = f"ours, {'2 ranks ZeRO-2' if ranks == 2 else '1 process'}{', --packing' if packed else ''}"
            runners[label] = (lambda rep, ranks=ranks, packed=packed, name=name: run_ours(
                a, model_dir, data, os.path.join(work, f"{name}-{rep}"), ranks, packed, 2 if ranks == 2 else 0))
        elif name == "torch":
            runners["plain PyTorch loop, 1 process (floor)"] = lambda rep: run_torch(a, model_dir, encoded)
        elif name.startswith("trl"):
            if trl_py is None:
                print(common.NO_TRL)
                continue
            pf = name == "trl_padding_free"
            runners[f"trl SFTTrainer, 1 process{', padding_free' if pf else ''}"] = (
                lambda rep, pf=pf: run_trl(a, trl_py, model_dir, encoded, os.path.join(work, f"trl-{rep}"), pf))
        else:
            raise SystemExit(f"--runners: unknown runner {name!r}")
    results = common.interleave(runners, a.reps)
    load1 = common.load_average()
    report(a, results, peak, flops_per_sample, tokens_per_sample, stats, load0, load1)


def report(a, results: dict, peak: dict, flops_per_sample: float, tokens_per_sample: float, stats: dict,
           load0: float, load1: float) -> None:
    table = common.print_table(results, "samples", flops_per_sample, tokens_per_sample, peak)
    med = {name: r["rate"]["median"] for name, r in table.items()}
    trl = med.get("trl SFTTrainer, 1 process")
    for name, v in med.items():
        if trl and name.startswith("ours, 1 process"):
            print(f"ratio {name} / trl SFTTrainer (1 process vs 1 process): {v / trl:.2f}x")
    floor = med.get("plain PyTorch loop, 1 process (floor)")
    if floor and trl:
        print(f"ratio plain PyTorch loop / trl SFTTrainer: {floor / trl:.2f}x (the most any eager trainer gains)")
    if floor and "ours, 1 process" in med:
        print(f"ratio ours, 1 process / plain PyTorch loop: {med['ours, 1 process'] / floor:.2f}x")
    if "ours, 1 process" in med and "ours, 1 process, --packing" in med:
        print(f"packing: {med['ours, 1 process, --packing'] / med['ours, 1 process']:.2f}x samples/s and tokens/s "
              "over padding (the same samples)")
    print(f"load average: {load0:.2f} at start, {load1:.2f} at end ({os.cpu_count()} cores)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": a.size, "batch": a.batch, "peak_gflops": peak, "load_average": [load0, load1],
                       "model": stats, "tokens_per_sample": tokens_per_sample, "runners": table}, f, indent=2)


def memory_table(a, model_dir: str, data: str, work: str, load0: float) -> None:
    """Peak RSS of the largest rank, 2 ranks, a few steps each: where ZeRO's partitioning shows on a CPU."""
    print(f"{'2 ranks, global batch ' + str(a.batch):34s} {'peak RSS per rank':>18s}")
    for stage, offload in ((0, False), (2, False), (3, False), (2, True), (3, True)):
        r = run_ours(a, model_dir, data, os.path.join(work, f"mem-z{stage}{'o' * offload}"), 2, False, stage,
                     offload=offload, steps=3)
        print(f"{'ZeRO-' + str(stage) + (' + optimizer offload' if offload else ''):34s} {r['rss_mb']:15.0f} MB",
              flush=True)
    print(f"load average: {load0:.2f} at start, {common.load_average():.2f} at end ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
