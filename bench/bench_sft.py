"""SFT throughput: this pipeline (2 DeepSpeed ranks) vs TRL's SFTTrainer (one process) on the same
tiny model, data and global batch. Prints samples/s, tokens/s and the ratio.

    python bench/bench_sft.py [--steps 60] [--hidden 128 --layers 4] [--batch 16]

Timing skips the first `--warmup` steps (start-up, first-call compilation of kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def bench_ours(model_dir: str, data: str, a, out: str) -> dict:
    per_rank = a.batch // a.ranks
    import socket

    with socket.socket() as sock:  # a free rendezvous port, so the bench can run beside other jobs
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", str(a.ranks), "--master_port", str(port), os.path.join(REPO, "step1_sft/main.py"),
           "--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out,
           "--per_device_train_batch_size", str(per_rank), "--max_steps", str(a.steps), "--zero_stage", str(a.zero_stage),
           "--log_interval", str(a.warmup), "--learning_rate", "1e-3", "--eval_fraction", "0.05"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True,
                   env=dict(os.environ, PYTHONPATH=REPO))
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > a.warmup]
    return {"samples_per_sec": sum(r["samples_per_sec"] for r in timed) / len(timed),
            "tokens_per_sec": sum(r["tokens_per_sec"] for r in timed) / len(timed)}


TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
model_dir, data, out, steps, batch, warmup = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
tok = AutoTokenizer.from_pretrained(model_dir)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
rows = [json.loads(l) for l in open(data)]
# Same rendered text as the pipeline's hh template; completion-only loss.
ds = Dataset.from_list([{"prompt": f"Human: {r['prompt']}\n\nAssistant:", "completion": " " + r["response"]} for r in rows])
class Clock(TrainerCallback):
    def __init__(self): self.t = None; self.tokens = 0
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == warmup: self.t = time.perf_counter()
clock = Clock()
cfg = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                max_length=512, completion_only_loss=True, bf16=False, fp16=False)
model = AutoModelForCausalLM.from_pretrained(model_dir)
tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
tr.train()
dt = time.perf_counter() - clock.t
print(json.dumps({"samples_per_sec": (steps - warmup) * batch / dt}))
"""


def bench_trl(model_dir: str, data: str, a, out: str) -> dict | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    p = subprocess.run([sys.executable, "-c", TRL_SCRIPT, model_dir, data, out, str(a.steps), str(a.batch),
                        str(a.warmup)], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="global batch (split over ranks for ours)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--zero_stage", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--data", default=os.path.join(REPO, "data", "sft.jsonl"))
    a = ap.parse_args()
    from utils.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model("llama", os.path.join(tmp, "model"), hidden=a.hidden, layers=a.layers,
                                    heads=4)
        t0 = time.perf_counter()
        ours = bench_ours(model_dir, a.data, a, os.path.join(tmp, "ours"))
        print(f"ours ({a.ranks} ranks, ZeRO-{a.zero_stage}): {ours['samples_per_sec']:.1f} samples/s, "
              f"{ours['tokens_per_sec']:.0f} tokens/s  [{time.perf_counter() - t0:.0f}s wall incl. start-up]")
        trl = bench_trl(model_dir, a.data, a, os.path.join(tmp, "trl"))
        if trl is None:
            print("trl: not installed (pip install trl) - no comparison")
        else:
            print(f"trl SFTTrainer (1 process): {trl['samples_per_sec']:.1f} samples/s")
            print(f"ratio ours/trl: {ours['samples_per_sec'] / trl['samples_per_sec']:.2f}x")


if __name__ == "__main__":
    main()
