"""PNG report of training curves from the metrics.jsonl of each step.

    python launch/report.py --runs sft=out/sft reward=out/reward ppo=out/ppo dpo=out/dpo --out report.png

One panel per (run, metric) for the metrics each step is judged by; train and eval curves together.
Next to the losses: the answer-health signals (DPO's change of the chosen answers' log-probability,
PPO's EOS rate, distinct-token ratio, answer length and KL per answer), and a dashed red line at the
step of every warning a run logged (likelihood displacement, answers without EOS, repeating answers,
answers growing past twice their first length, a first rollout of cut answers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.args import Parser  # noqa: E402
from utils.errors import DataError, UserError, exit_on_user_error  # noqa: E402

KEYS = ["loss", "accuracy", "reward", "kl", "eos_rate", "distinct_ratio", "response_length", "rewards/accuracies",
        "rewards/margins", "logps/chosen_shift"]


def load(path: str) -> list[dict]:
    file = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(file):
        what = "does not exist" if not os.path.exists(path) else "has no metrics.jsonl"
        raise UserError(f"--runs: run directory '{path}' {what}")
    rows = []
    with open(file) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(file, i, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
            # panels() reads r["step"] (and a warning's name): a row without them was a KeyError traceback
            if not isinstance(row, dict):
                raise DataError(file, i, None, f"expected a JSON object (one metrics record), got a "
                                                f"{type(row).__name__}")
            if isinstance(row.get("step"), bool) or not isinstance(row.get("step"), (int, float)):
                raise DataError(file, i, "step", "missing or not a number: every metrics record names its step")
            if row.get("split") == "warning" and not isinstance(row.get("warning"), str):
                raise DataError(file, i, "warning", "missing in a warning record")
            rows.append(row)
    return rows


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    runs = [tuple(s.split("=", 1)) for s in specs]
    bad = [s for s, r in zip(specs, runs) if len(r) != 2 or not all(r)]
    if bad:
        raise UserError(f"--runs: expected NAME=DIR, got {bad[0]!r}")
    return runs


def panels(runs: list[tuple[str, str]]) -> list[tuple[str, str, dict, list]]:
    """(run name, metric, {split: [(step, value)]}, [(step, warning name)]) per panel."""
    out = []
    for name, path in runs:
        rows = load(path)
        warnings = [(r["step"], r["warning"]) for r in rows if r.get("split") == "warning"]
        for key in KEYS:
            series = {}
            for split in ("train", "eval"):
                pts = [(r["step"], r[key]) for r in rows if r.get("split", "train") == split
                       and isinstance(r.get(key), (int, float))]
                if pts:
                    series[split] = pts
            if series:
                out.append((name, key, series, warnings))
    return out


@exit_on_user_error
def main(argv=None) -> None:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=DIR pairs; DIR holds metrics.jsonl")
    ap.add_argument("--out", required=True, help="PNG file to write")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = panels(parse_runs(a.runs))
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if os.path.isdir(a.out) or not os.path.isdir(out_dir):
        raise UserError(f"--out '{a.out}': {'is a directory' if os.path.isdir(a.out) else 'its folder does not exist'}")
    cols = 4
    rows = max(1, math.ceil(len(ps) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, key, series, warnings) in zip(axes.flat, ps):
        for split, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if split == "eval" or len(pts) == 1 else None,  # one point: no line
                    markersize=3, label=split)
        for step, what in warnings:
            ax.axvline(step, color="red", linestyle="--", linewidth=1, label=f"warning: {what}")
        ax.set_title(f"{name}: {key}", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ps):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out} ({len(ps)} panels)")


if __name__ == "__main__":
    main()
