"""metrics.jsonl (one JSON object per event), optional tensorboard, and a rank-0 progress bar."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from . import ds


class MetricsLogger:
    """Appends to OUTPUT_DIR/metrics.jsonl (a resumed run continues the file; nothing deletes it).
    `args_json`, when given, is written to OUTPUT_DIR/args.json by `write_args()`, which the loop calls
    once its start-up checks (resume included) have passed."""

    def __init__(self, output_dir: str, enable_tensorboard: bool = False, tensorboard_path: str = "",
                 total_steps: int = 0, args_json: dict | None = None):
        self.active = ds.is_rank0()
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.args_path, self.args_json = os.path.join(output_dir, "args.json"), args_json
        self.tb = None
        self.bar = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_path or os.path.join(output_dir, "tensorboard"))
        if total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, mininterval=2.0)

    def write_args(self) -> None:
        if self.active and self.args_json is not None:
            with open(self.args_path + ".tmp", "w") as f:
                json.dump(self.args_json, f, indent=2, sort_keys=True)
            os.replace(self.args_path + ".tmp", self.args_path)

    def log(self, event: dict) -> None:
        if not self.active:
            return
        event = {k: (float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in event.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        if self.tb is not None:
            split, step = event.get("split", "train"), event.get("step", 0)
            for k, v in event.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items())
        self.write(msg)

    def write(self, msg: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Global samples/s and tokens/s over a logging window."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0, self.samples, self.tokens = time.perf_counter(), 0, 0

    def add(self, samples: int, tokens: int):
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> dict:
        samples, tokens = ds.all_reduce_sum([self.samples, self.tokens]).tolist()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.reset()
        out = {"samples_per_sec": samples / dt, "tokens_per_sec": tokens / dt}
        if torch.cuda.is_available():  # this rank's peak so far, for the memory columns of the benches
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out
