"""The GPU benchmark: one prepared script, under 8 minutes on one GPU (written for an H200).

    python bench/gpu_bench.py                 # ~1.2B random-init Llama, bf16, on the GPU
    python bench/gpu_bench.py --smoke         # the same steps at a tiny size (runs on a CPU too)

Records, each from our own programs as a user runs them (python, one process):
  1. SFT tokens/s and MFU in bf16 with ZeRO-0 and ZeRO-2, FusedAdam (what utils/ds.py picks on CUDA),
     --packing on a generated variable-length corpus (256-2048 tokens); target MFU >= 40%;
  2. DPO pairs/s with precomputed reference log-probabilities (--precompute_ref_logprobs), packed;
  3. PPO generation tokens/s (answers generated per second of the generation phase) and samples/s.
MFU = model FLOP/s (bench/common.py: 6 N T + 12 L d T^2 per sequence) / the GPU's bf16 matmul peak
measured here (8192^3 matmuls), and against the datasheet's dense bf16 figure when the GPU is an H200.
Peak CUDA memory comes from each program's metrics (`cuda_max_allocated_mb`). Results go to stdout
and to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet, dense (no sparsity)
# ~1.2B parameters: Llama-3.2-1B-like widths with a 32k vocabulary.
FULL = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000, max_len=2048)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, max_len=128)


def make_model(root: str, dims: dict) -> tuple[str, str]:
    """A random-init Llama causal LM (bf16 weights) and a one-label classifier on it (PPO critic/reward).
    The tokenizer is the shipped BPE one; the vocabulary is padded up to dims["vocab"] rows so the LM
    head and the loss cost what a real 32k vocabulary costs."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from utils.tiny import build_tokenizer

    tok = build_tokenizer("llama")
    cfg = LlamaConfig(hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                      num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                      num_key_value_heads=dims["kv_heads"], max_position_embeddings=dims["max_len"],
                      vocab_size=max(dims["vocab"], len(tok)), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    actor = os.path.join(root, "actor")
    model.save_pretrained(actor)
    tok.save_pretrained(actor)
    del model
    critic = os.path.join(root, "critic")
    cls = AutoModelForSequenceClassification.from_pretrained(actor, num_labels=1, dtype=torch.bfloat16)
    cls.config.pad_token_id = tok.eos_token_id
    cls.save_pretrained(critic)
    tok.save_pretrained(critic)
    return actor, critic


def gpu_peak_tflops(n: int) -> float:
    """Median bf16 matmul TFLOP/s of n x n x n products on the GPU (CPU in --smoke without one)."""
    import torch

    if not torch.cuda.is_available():
        return common.matmul_peak_gflops("bf16", os.cpu_count() or 1, n=n) / 1e3
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def metrics(out: str, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if json.loads(line)["split"] == split]


def run(script: str, args: list[str], out: str) -> list[dict]:
    """One of our programs in one process; its train metric lines after the first (warm-up)."""
    env = dict(os.environ, PYTHONPATH=REPO, MASTER_PORT=str(common.free_port()))
    t0 = time.perf_counter()
    p, rss = common.run_measured([sys.executable, os.path.join(REPO, script), *args, "--output_dir", out], env=env)
    if p.returncode != 0:
        raise SystemExit(f"{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    rows = metrics(out)
    print(f"  [{script}: {time.perf_counter() - t0:.0f} s wall incl. start-up, peak host RSS {rss:.0f} MB]",
          flush=True)
    return rows[1:] or rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and few steps: checks the script on a CPU")
    ap.add_argument("--steps", type=int, default=None, help="SFT/DPO steps per run (default 30, smoke 4)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per SFT step (default 16, smoke 4)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    import torch

    dims = SMOKE if a.smoke else FULL
    steps = a.steps or (4 if a.smoke else 30)
    batch = a.batch or (4 if a.smoke else 16)
    dtype = "bf16"
    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="gpu_bench_")
    peak = gpu_peak_tflops(256 if a.smoke else 8192)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)"
    print(f"== GPU bench on {device}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    actor, critic = make_model(work, dims)
    stats = common.model_stats(actor)
    from utils.model import load_tokenizer

    tok = load_tokenizer(actor)
    sft_data, pair_data, prompt_data = (os.path.join(work, f) for f in ("sft.jsonl", "pairs.jsonl", "prompts.jsonl"))
    lo, hi = (16, dims["max_len"] - 32) if a.smoke else (256, dims["max_len"] - 64)
    common.make_corpus(sft_data, tok, "sft", max(64, steps * batch), lo, hi)
    common.make_corpus(pair_data, tok, "pairs", max(64, steps * batch // 2), lo, hi // 2)
    with open(prompt_data, "w") as f:
        for i in range(256):
            f.write(json.dumps({"prompt": f"Tell me a long story about the number {i}."}) + "\n")
    print(f"model: {stats['params'] / 1e9:.2f}B parameters ({stats['matmul_params'] / 1e9:.2f}B in matmuls), "
          f"{stats['layers']} layers, width {stats['width']}, vocab {dims['vocab']}; {dtype}", flush=True)
    results = {"device": device, "peak_bf16_tflops": peak, "model": stats}

    from bench_sft import encode_corpus

    lengths = encode_corpus(actor, sft_data, dims["max_len"], os.path.join(work, "enc.jsonl"))
    per_token = common.train_flops(stats["matmul_params"], stats["layers"], stats["width"], lengths) / sum(lengths)
    common_sft = ["--model_name_or_path", actor, "--data_path", sft_data, "--dtype", dtype, "--packing",
                  "--max_seq_len", str(dims["max_len"]), "--per_device_train_batch_size", str(batch),
                  "--max_steps", str(steps), "--log_interval", str(max(1, steps // 5)), "--learning_rate", "1e-5",
                  "--lr_scheduler_type", "constant", "--eval_fraction", "0.02", "--per_device_eval_batch_size", "4"]
    for stage in (0, 2):
        rows = run("step1_sft/main.py", common_sft + ["--zero_stage", str(stage)], os.path.join(work, f"sft{stage}"))
        tps = statistics.median(r["tokens_per_sec"] for r in rows)
        mfu = tps * per_token / (peak * 1e12)
        mem = max((r.get("cuda_max_allocated_mb") or 0) for r in rows)
        line = {"tokens_per_sec": tps, "mfu_measured_peak": mfu, "cuda_max_allocated_mb": mem}
        if "H200" in device:
            line["mfu_datasheet"] = tps * per_token / (H200_BF16_DENSE_TFLOPS * 1e12)
        results[f"sft_zero{stage}"] = line
        datasheet = f", {100 * line['mfu_datasheet']:.1f}% of the datasheet" if "mfu_datasheet" in line else ""
        print(f"SFT ZeRO-{stage} bf16 FusedAdam --packing: {tps:.0f} tokens/s, MFU {100 * mfu:.1f}% of the measured "
              f"peak{datasheet}, CUDA max allocated {mem:.0f} MB", flush=True)

    rows = run("dpo/main.py", ["--model_name_or_path", actor, "--data_path", pair_data, "--dtype", dtype,
                               "--precompute_ref_logprobs", "--anchor_coef", "0", "--packing",
                               "--max_seq_len", str(dims["max_len"]),
                               "--per_device_train_batch_size", str(max(1, batch // 2)), "--max_steps", str(steps),
                               "--log_interval", str(max(1, steps // 5)), "--learning_rate", "1e-6",
                               "--zero_stage", "0", "--eval_fraction", "0.02", "--per_device_eval_batch_size", "4"],
               os.path.join(work, "dpo"))
    results["dpo_precomputed"] = {"pairs_per_sec": statistics.median(r["pairs_per_sec"] for r in rows),
                                  "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows)}
    print(f"DPO precomputed reference, packed: {results['dpo_precomputed']['pairs_per_sec']:.1f} pairs/s "
          f"({results['dpo_precomputed']['tokens_per_sec']:.0f} tokens/s)", flush=True)

    gen_batch, answer = (4, 16) if a.smoke else (64, 256)
    rows = run("step3_ppo/main.py", ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic,
                                     "--data_path", prompt_data, "--dtype", dtype, "--max_steps",
                                     str(3 if a.smoke else 6), "--max_prompt_seq_len", "64", "--max_answer_seq_len",
                                     str(answer), "--per_device_generation_batch_size", str(gen_batch),
                                     "--per_device_training_batch_size", str(max(1, gen_batch // 4)),
                                     "--actor_zero_stage", "0", "--critic_zero_stage", "0", "--log_interval", "1",
                                     "--print_answers_interval", "0", "--actor_learning_rate", "1e-6",
                                     "--critic_learning_rate", "1e-6", "--critic_warmup_steps", "0"],
               os.path.join(work, "ppo"))
    gen_tps = statistics.median(gen_batch * r["response_length"] / r["generation_sec"] for r in rows)
    results["ppo"] = {"generation_tokens_per_sec": gen_tps,
                      "samples_per_sec": statistics.median(r["samples_per_sec"] for r in rows),
                      "split_sec": {k: statistics.median(r[k] for r in rows)
                                    for k in ("generation_sec", "experience_sec", "train_sec")}}
    print(f"PPO: generation {gen_tps:.0f} tokens/s ({gen_batch} prompts x up to {answer} tokens), "
          f"{results['ppo']['samples_per_sec']:.1f} samples/s, split {results['ppo']['split_sec']}", flush=True)
    results["wall_sec"] = time.perf_counter() - t_start
    print(f"total {results['wall_sec']:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
