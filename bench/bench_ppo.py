"""PPO (step 3) throughput: samples/s, the split per phase, and the ratio to SFT on the same model and lengths.

    python bench/bench_ppo.py                              # bf16, ZeRO-2 + optimizer offload (DeepSpeed-Chat's setting)
    python bench/bench_ppo.py --dtype fp32 --no-offload

Setting: 16 prompts of exactly 32 tokens per PPO step over 2 ranks (8 per rank), answers of up to 16
tokens (the random-init actor rarely emits EOS, so nearly all are 16), one PPO epoch over one
mini-batch per rank, actor and critic on ZeRO-2 with optimizer offload, bf16, a 2.6M-parameter llama
(--size small: hidden 256, 4 layers; --size tiny: the test model) for all four models, eager attention
(see --attn_implementation). DeepSpeed-Chat's step 3 ran this setting at 11.1 samples/s end to end on
this machine with a 3.3M-parameter Llama (issue 14: 1 epoch of 3,600 prompts, 16 per step, ZeRO-2 +
offload, bf16); that figure is quoted, not rerun here (bench/DEEPSPEED_CHAT.md says how to run it beside).

samples/s = prompts answered and trained on per second of PPO step (generation + experience +
training), the median over the steps after --warmup of each run; start-up (loading four models) is
not counted. The SFT reference trains the same model on 48-token samples (the PPO sequence length)
with the same global batch, ranks, ZeRO stage, offload and dtype: a PPO step does 3 forwards of the
frozen/critic models, the actor's and critic's forward + backward, and generation, so its FLOPs alone
allow about 1/3.3 of the SFT rate. Each figure is the median over --reps fresh runs with the spread,
with the peak RSS of the largest rank and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

DEEPSPEED_CHAT_SAMPLES_PER_SEC = 11.1  # measured beside this project, ZeRO-2 + offload + bf16 (issue 14)
PROMPT_TOKENS, ANSWER_TOKENS = 32, 16


def make_models(root: str, size: str = "small") -> tuple[str, str]:
    """A random-init llama of `size` (bench/common.py SIZES; actor) and a one-label classifier on the same
    weights (critic, reward)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from utils.tiny import make_tiny_model

    actor = make_tiny_model("llama", os.path.join(root, "actor"), seed=0, **common.SIZES[size])
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


def make_sft_texts(path: str, tokenizer, n: int = 256, seed: int = 0) -> None:
    """{"text"} records of exactly PROMPT_TOKENS + ANSWER_TOKENS tokens once BOS and EOS are added."""
    import random

    rng = random.Random(seed)
    words = [w.strip() for w in open(os.path.join(REPO, "data", "vocab_words.txt")) if w.strip()]
    target = PROMPT_TOKENS + ANSWER_TOKENS - 2  # BOS and EOS
    with open(path, "w") as f:
        while n:
            ws = []
            while len(tokenizer(" ".join(ws), add_special_tokens=False)["input_ids"]) < target:
                ws.append(rng.choice(words))
            text = " ".join(ws)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == target:
                f.write(json.dumps({"text": text}) + "\n")
                n -= 1


def ds_flags(a) -> list[str]:
    return ["--dtype", a.dtype] + (["--offload"] if a.offload else [])


def run_ppo(a, actor: str, critic: str, prompts: str, out: str) -> dict:
    per_rank = a.prompts_per_step // a.ranks
    args = ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic, "--data_path", prompts,
            "--max_steps", str(a.steps), "--max_prompt_seq_len", str(PROMPT_TOKENS), "--overlong", "truncate",
            "--max_answer_seq_len", str(ANSWER_TOKENS), "--per_device_generation_batch_size", str(per_rank),
            "--per_device_training_batch_size", str(per_rank), "--actor_zero_stage", str(a.zero_stage),
            "--critic_zero_stage", str(a.zero_stage), "--actor_learning_rate", "1e-4", "--critic_learning_rate",
            "1e-4", "--print_answers_interval", "0", "--attn_implementation", a.attn_implementation,
            "--log_interval", "1", *ds_flags(a), *a.extra.split()]
    env = dict(os.environ, PYTHONPATH=REPO)
    port = str(common.free_port())
    cmd = ["deepspeed", "--num_gpus", str(a.ranks), "--master_port", port, os.path.join(REPO, "step3_ppo/main.py"),
           *args, "--output_dir", out]
    p, rss = common.run_measured(cmd, env=env)
    if p.returncode != 0:
        raise SystemExit(f"step 3 failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > a.warmup]
    res = {k: statistics.median(r[k] for r in timed)
           for k in ("samples_per_sec", "generation_sec", "experience_sec", "train_sec", "response_length")}
    res["rss_mb"] = rss
    return res


def run_sft(a, actor: str, data: str, out: str) -> dict:
    window = 5
    args = ["--model_name_or_path", actor, "--data_path", data, "--per_device_train_batch_size",
            str(a.prompts_per_step // a.ranks), "--max_steps", str(window * 5), "--log_interval", str(window),
            "--zero_stage", str(a.zero_stage), "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
            "--eval_fraction", "0.02", *ds_flags(a)]
    r = common.run_program("step1_sft/main.py", args, out, a.ranks, "samples_per_sec")
    return {"samples_per_sec": r["rate"], "rss_mb": r["rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"],
                    help="model size of all four models (bench/common.py): small (2.6M parameters) is the closest "
                         "to the 3.3M-parameter model of the DeepSpeed-Chat figure; tiny is the test model")
    ap.add_argument("--steps", type=int, default=30, help="PPO steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of each run's median")
    ap.add_argument("--reps", type=int, default=3, help="fresh runs of PPO and of SFT, interleaved")
    ap.add_argument("--prompts_per_step", type=int, default=16, help="prompts per PPO step over all ranks")
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks")
    ap.add_argument("--zero_stage", type=int, default=2, help="ZeRO stage of actor and critic (and of the SFT run)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="training precision")
    ap.add_argument("--attn_implementation", default="eager", choices=["auto", "eager", "sdpa"],
                    help="attention kernel (eager: torch's bf16 CPU flash-attention backward is slow for short "
                         "sequences; DeepSpeed-Chat's OPT models ran eager attention)")
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                    help="optimizer states on the CPU (DeepSpeedCPUAdam)")
    ap.add_argument("--no_sft", action="store_true", help="skip the SFT reference runs")
    ap.add_argument("--extra", default="", help="more step-3 flags, space-separated")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    load0 = common.load_average()
    root = tempfile.mkdtemp(prefix="bench_ppo_")
    actor, critic = make_models(root, a.size)
    prompts, texts = os.path.join(root, "prompts.jsonl"), os.path.join(root, "sft.jsonl")
    make_prompts(prompts)
    from utils.model import load_tokenizer

    make_sft_texts(texts, load_tokenizer(actor))
    runners = {"ppo": lambda rep: run_ppo(a, actor, critic, prompts, os.path.join(root, f"ppo-{rep}"))}
    if not a.no_sft:
        runners["sft"] = lambda rep: run_sft(a, actor, texts, os.path.join(root, f"sft-{rep}"))
    res = common.interleave(runners, a.reps)
    load1 = common.load_average()

    ppo = {k: common.summary([r[k] for r in res["ppo"]])
           for k in ("samples_per_sec", "generation_sec", "experience_sec", "train_sec", "response_length")}
    step = sum(ppo[k]["median"] for k in ("generation_sec", "experience_sec", "train_sec"))
    print(f"== PPO | {a.prompts_per_step} prompts x ({PROMPT_TOKENS} + up to {ANSWER_TOKENS}) tokens per step, "
          f"{a.ranks} ranks, ZeRO-{a.zero_stage}{' + offload' if a.offload else ''}, {a.dtype}, llama-{a.size} x 4 | "
          f"{a.reps} runs x {a.steps - a.warmup} timed steps")
    print(f"PPO samples/s: {common.fmt(ppo['samples_per_sec'])}; answer length {ppo['response_length']['median']:.1f}; "
          f"peak RSS per rank {max(r['rss_mb'] or 0 for r in res['ppo']):.0f} MB")
    print(f"PPO step {1000 * step:.0f} ms = generation {1000 * ppo['generation_sec']['median']:.0f} ms "
          f"({100 * ppo['generation_sec']['median'] / step:.0f}%) + experience "
          f"{1000 * ppo['experience_sec']['median']:.0f} ms ({100 * ppo['experience_sec']['median'] / step:.0f}%) + "
          f"training {1000 * ppo['train_sec']['median']:.0f} ms ({100 * ppo['train_sec']['median'] / step:.0f}%)")
    out = {"setting": vars(a), "ppo": ppo, "load_average": [load0, load1]}
    ratio = ppo["samples_per_sec"]["median"] / DEEPSPEED_CHAT_SAMPLES_PER_SEC
    caveats = [c for c, bad in (("not its setting: compare with offload + bf16", not (a.offload and a.dtype == "bf16")),
                                ("not its model size: compare with --size small", a.size != "small")) if bad]
    print(f"vs DeepSpeed-Chat's {DEEPSPEED_CHAT_SAMPLES_PER_SEC} samples/s (quoted from issue 14, 3.3M parameters, "
          f"ZeRO-2 + offload, bf16; not rerun here): {ratio:.2f}x" + (f" ({'; '.join(caveats)})" if caveats else ""))
    if "sft" in res:
        sft = common.summary([r["samples_per_sec"] for r in res["sft"]])
        out["sft"] = sft
        print(f"SFT samples/s, same model, {PROMPT_TOKENS + ANSWER_TOKENS}-token samples, same batch/ranks/ZeRO/dtype: "
              f"{common.fmt(sft)}; PPO / SFT = {ppo['samples_per_sec']['median'] / sft['median']:.2f}x")
    print(f"load average: {load0:.2f} at start, {load1:.2f} at end ({os.cpu_count()} cores)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
