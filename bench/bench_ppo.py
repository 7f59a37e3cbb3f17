"""PPO (step 3) throughput on a fixed tiny setting: samples/s and the time split per PPO step.

    python bench/bench_ppo.py [--steps 40] [--prompts_per_step 16] [--dtype bf16] [--zero_stage 2]

Setting (issue 4 quotes DeepSpeed-Chat's step 3 at about 78 samples/s on this CPU for it): 16 prompts of
exactly 32 tokens per PPO step over 2 ranks (8 per rank; --prompts_per_step 32 for 16 per rank), answers
of up to 16 tokens (the random-init actor rarely emits EOS, so nearly all are 16), one PPO epoch over one
mini-batch per rank, actor and critic on ZeRO-2 with optimizer offload, bf16, tiny llama (hidden 64,
2 layers) for all four models, eager attention (see --attn_implementation).
samples/s = prompts answered and trained on per second of PPO step (generation + experience + training),
averaged over the steps after `--warmup`; start-up (loading four models) is not counted. The load
average is printed because other processes on a shared machine slow some steps down.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEEPSPEED_CHAT_SAMPLES_PER_SEC = 78.0


def make_models(root: str) -> tuple[str, str]:
    """A random-init tiny llama (actor) and a one-label classifier on the same weights (critic, reward)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from utils.tiny import make_tiny_model

    actor = make_tiny_model("llama", os.path.join(root, "actor"))
    critic = os.path.join(root, "critic")
    model = AutoModelForSequenceClassification.from_pretrained(actor, num_labels=1)
    model.save_pretrained(critic)
    AutoTokenizer.from_pretrained(actor).save_pretrained(critic)
    return actor, critic


def make_prompts(path: str, n: int = 256) -> None:
    """Prompts longer than 32 tokens; --overlong truncate cuts every one to exactly 32."""
    nouns = [json.loads(line)["prompt"] for line in open(os.path.join(REPO, "data", "prompts.jsonl"))]
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(nouns[(i + k) % len(nouns)] for k in range(4))
            f.write(json.dumps({"prompt": text}) + "\n")


def run(a, actor: str, critic: str, prompts: str, out: str) -> list[dict]:
    per_rank = a.prompts_per_step // a.ranks
    cmd = ["deepspeed", "--num_gpus", str(a.ranks), os.path.join(REPO, "step3_ppo/main.py"),
           "--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic, "--data_path", prompts,
           "--output_dir", out, "--max_steps", str(a.steps), "--max_prompt_seq_len", "32", "--overlong", "truncate",
           "--max_answer_seq_len", "16", "--per_device_generation_batch_size", str(per_rank),
           "--per_device_training_batch_size", str(per_rank), "--actor_zero_stage", str(a.zero_stage),
           "--critic_zero_stage", str(a.zero_stage), "--dtype", a.dtype, "--actor_learning_rate", "1e-4",
           "--critic_learning_rate", "1e-4", "--print_answers_interval", "0",
           "--attn_implementation", a.attn_implementation]
    if a.offload:
        cmd.append("--offload")
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    if p.returncode != 0:
        raise SystemExit(f"step 3 failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if r["split"] == "train" and r["step"] > a.warmup]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="PPO steps to run")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the averages")
    ap.add_argument("--prompts_per_step", type=int, default=16, help="prompts per PPO step over all ranks")
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks")
    ap.add_argument("--zero_stage", type=int, default=2, help="ZeRO stage of actor and critic")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="training precision")
    ap.add_argument("--attn_implementation", default="eager", choices=["auto", "eager", "sdpa"],
                    help="attention kernel (eager: torch's bf16 CPU flash-attention backward is slow for short "
                         "sequences; DeepSpeed-Chat's OPT models ran eager attention)")
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                    help="optimizer states on the CPU (DeepSpeedCPUAdam)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        actor, critic = make_models(root)
        prompts = os.path.join(root, "prompts.jsonl")
        make_prompts(prompts)
        load_before = os.getloadavg()[0]
        timed = run(a, actor, critic, prompts, os.path.join(root, "ppo"))
        load_after = os.getloadavg()[0]

    def mean(key):
        return statistics.mean(r[key] for r in timed)

    # Other processes on the machine slow some steps down; the median and the fastest quartile of steps
    # show what the code does when it has the cores, the mean what this run got.
    rates = sorted(r["samples_per_sec"] for r in timed)

    result = {"setting": {"prompts_per_step": a.prompts_per_step, "prompt_tokens": 32, "max_answer_tokens": 16,
                          "ranks": a.ranks, "zero_stage": a.zero_stage, "offload": a.offload, "dtype": a.dtype,
                          "attn_implementation": a.attn_implementation,
                          "timed_steps": len(timed)},
              "samples_per_sec": mean("samples_per_sec"), "samples_per_sec_median": statistics.median(rates),
              "samples_per_sec_best_quartile": statistics.mean(rates[-max(1, len(rates) // 4):]),
              "load_average_1min": [round(load_before, 2), round(load_after, 2)],
              "response_length": mean("response_length"),
              "generation_sec": mean("generation_sec"), "experience_sec": mean("experience_sec"),
              "train_sec": mean("train_sec"),
              "vs_deepspeed_chat": mean("samples_per_sec") / DEEPSPEED_CHAT_SAMPLES_PER_SEC}
    step = result["generation_sec"] + result["experience_sec"] + result["train_sec"]
    print(json.dumps(result, indent=2))
    print(f"\nPPO step: {step * 1000:.0f} ms = generation {result['generation_sec'] * 1000:.0f} ms "
          f"({100 * result['generation_sec'] / step:.0f}%) + experience {result['experience_sec'] * 1000:.0f} ms "
          f"({100 * result['experience_sec'] / step:.0f}%) + training {result['train_sec'] * 1000:.0f} ms "
          f"({100 * result['train_sec'] / step:.0f}%)")
    print(f"{result['samples_per_sec']:.1f} samples/s (median {result['samples_per_sec_median']:.1f}, fastest quartile "
          f"{result['samples_per_sec_best_quartile']:.1f}) = {result['vs_deepspeed_chat']:.2f}x DeepSpeed-Chat's "
          f"{DEEPSPEED_CHAT_SAMPLES_PER_SEC:.0f} samples/s; load average {load_before:.1f} -> {load_after:.1f} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
