"""The README's benchmark tables, from the JSON files the benches wrote (bench/run_all.sh names them).

    python bench/table.py [DIR]        (default bench_out/)

Prints one markdown table per bench file found: every runner's median rate with the spread, tokens/s,
MFU against the fp32 matmul peak measured in that run, peak RSS, and the ratio to the TRL runner of the
same kind (1 process vs 1 process); PPO files print samples/s, the phase split and the ratio to SFT.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

UNITS = {"sft": "samples/s", "reward": "pairs/s", "dpo": "pairs/s"}


def trl_match(name: str, names: list[str]) -> str | None:
    """The TRL runner an `ours, 1 process` runner is compared with (same reference mode for DPO)."""
    if not name.startswith("ours, 1 process"):
        return None
    trl = [n for n in names if n.startswith("trl") and "padding_free" not in n]
    for mode in ("live reference", "precomputed reference"):
        if mode in name:
            trl = [n for n in trl if mode in n]
    return trl[0] if trl else None


def pairs_table(title: str, d: dict) -> str:
    runners = d["runners"]
    names = list(runners)
    unit = UNITS[title.split("_")[0]]
    lines = [f"**{title}** ({d['model'].get('params', 0) / 1e6:.2f}M parameters, batch {d['batch']}, fp32 peak "
             f"{d['peak_gflops']['fp32']:.0f} GFLOP/s, load {d['load_average'][0]:.2f} -> {d['load_average'][1]:.2f})",
             "", f"| runner | {unit} | tokens/s | MFU (fp32) | peak RSS | vs TRL |", "|---|---|---|---|---|---|"]
    for n in names:
        r = runners[n]
        t = trl_match(n, names)
        ratio = f"{r['rate']['median'] / runners[t]['rate']['median']:.2f}x" if t else ""
        lines.append(f"| {n} | {common.fmt(r['rate'])} | {common.fmt(r['tokens_per_sec'], digits=0)} | "
                     f"{100 * r['mfu_fp32']:.1f}% | {r['peak_rss_mb']:.0f} MB | {ratio} |")
    return "\n".join(lines)


def ppo_table(title: str, d: dict) -> str:
    p, s = d["ppo"], d["setting"]
    step = sum(p[k]["median"] for k in ("generation_sec", "experience_sec", "train_sec"))
    line = (f"**{title}** (llama-{s.get('size', 'tiny')}, {s['prompts_per_step']} prompts/step, {s['ranks']} ranks, ZeRO-{s['zero_stage']}"
            f"{' + offload' if s['offload'] else ''}, {s['dtype']}): PPO {common.fmt(p['samples_per_sec'])} samples/s; "
            f"step {1000 * step:.0f} ms = generation {1000 * p['generation_sec']['median']:.0f} + experience "
            f"{1000 * p['experience_sec']['median']:.0f} + training {1000 * p['train_sec']['median']:.0f} ms")
    if "sft" in d:
        line += (f"; SFT on the same model and lengths {common.fmt(d['sft'])} samples/s, PPO / SFT "
                 f"{p['samples_per_sec']['median'] / d['sft']['median']:.2f}x")
    return line + f" (load {d['load_average'][0]:.2f} -> {d['load_average'][1]:.2f})"


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "bench_out"
    for name in ("sft_tiny", "reward_tiny", "dpo_tiny", "sft_realistic", "reward_realistic", "dpo_realistic",
                 "ppo_bf16_offload", "ppo_fp32"):
        path = os.path.join(root, name + ".json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            d = json.load(f)
        print((ppo_table if name.startswith("ppo") else pairs_table)(name, d) + "\n")


if __name__ == "__main__":
    main()
