"""Reward-model throughput, like for like: our step2_reward/main.py against TRL's RewardTrainer.

    python bench/bench_reward.py                     # tiny test model on data/preference.jsonl
    python bench/bench_reward.py --size realistic    # ~24M-parameter Llama on generated variable-length pairs

Both sides train a one-label sequence classifier on the same random-init model and the same token ids
(TRL gets our encoded chosen/rejected ids, in our steps' batches, unshuffled), same pairs per step, fp32, no gradient checkpointing
(RewardConfig defaults to bf16 autocast and checkpointing; --trl_defaults runs those instead), dropout
off, learning rate, Adam betas, clipping and constant schedule, and the same threads (1 process each).
Ours also runs with --packing and --shared_prompt_forward, and on 2 ranks (ZeRO-2) on a line of its own.
Method as in bench_sft.py: fresh processes per repetition, windows of --window steps after a warm-up
window, medians over --reps with the spread, MFU against the measured fp32 matmul peak, peak RSS, load.
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


def encode_pairs_file(model_dir: str, data: str, max_seq_len: int, out_path: str, batch: int,
                      steps: int) -> list[tuple[int, int]]:
    """Our encoding of the pairs of our first `steps` steps, in their order (common.train_order), as
    {"chosen_ids", "rejected_ids"} rows that TRL reads unshuffled; returns their (chosen, rejected) lengths."""
    from utils.encoding import Encoder
    from utils.model import load_tokenizer
    from utils.pairs import encode_pairs

    enc = Encoder(load_tokenizer(model_dir), "auto", max_seq_len)
    items = encode_pairs(common.train_split(data, "pairs"), enc, "bench", log=lambda *_: None)
    items = common.train_order(items, batch, steps)
    with open(out_path, "w") as f:
        for it in items:
            f.write(json.dumps({"chosen_ids": it.chosen, "rejected_ids": it.rejected}) + "\n")
    return [(len(it.chosen), len(it.rejected)) for it in items]


def run_ours(a, model_dir: str, data: str, out: str, ranks: int, extra: list[str]) -> dict:
    args = ["--model_name_or_path", model_dir, "--data_path", data, "--per_device_train_batch_size",
            str(a.batch // ranks), "--max_steps", str(a.window * (a.windows + 1)), "--log_interval", str(a.window),
            "--zero_stage", "2" if ranks > 1 else "0", "--learning_rate", str(LR), "--lr_scheduler_type", "constant",
            "--max_seq_len", str(a.max_seq_len), "--eval_fraction", "0.02", "--per_device_eval_batch_size",
            str(a.batch), *extra]
    return common.run_program("step2_reward/main.py", args, out, ranks, "pairs_per_sec", a.threads)


def run_trl(a, python: str, model_dir: str, encoded: str, out: str) -> dict:
    return common.run_worker(__file__, a, python, "trl", "TRL reward", ["--model_dir", model_dir, "--encoded", encoded,
                                                                 "--out", out] + ["--trl_defaults"] * a.trl_defaults)


def trl_worker(a) -> None:
    """Runs under the TRL interpreter: RewardTrainer on our token ids, steps timed between step ends."""
    import contextlib
    import io

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = [json.loads(line) for line in open(a.encoded)]
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(a.model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    clock, marks = common.step_marks()
    steps = a.window * (a.windows + 1)
    cfg = RewardConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=steps, learning_rate=LR,
                       train_sampling_strategy="sequential",  # our steps' pairs in our order (encode_pairs_file)
                       lr_scheduler_type="constant", adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10**9,
                       save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_dropout=True,
                       seed=0, max_length=None, dataloader_num_workers=0, disable_tqdm=True,
                       **({} if a.trl_defaults else {"bf16": False, "gradient_checkpointing": False}))
    with contextlib.redirect_stderr(io.StringIO()):
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                callbacks=[marks])
    torch.set_num_threads(a.threads)  # accelerate may have changed it; the same threads as ours
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    rates = common.trl_rates([w for w, _ in clock.steps()], rows, a.batch, a.window, a.windows,
                             lambda r: len(r["chosen_ids"]) + len(r["rejected_ids"]))
    print(json.dumps({**rates, "threads": torch.get_num_threads()}))


def main() -> None:
    ap = common.bench_parser(__doc__, "pairs", "ours,ours_packed,ours_shared,ours_2ranks,trl",
                             "comma list of: ours, ours_packed, ours_shared, ours_2ranks, trl", "preference.jsonl")
    ap.add_argument("--trl_defaults", action="store_true",
                    help="run TRL with RewardConfig's own defaults (bf16 autocast, gradient checkpointing)")
    ap.add_argument("--encoded", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "trl":
        return trl_worker(a)
    load0, peak, work, model_dir, stats, data = common.bench_inputs(a, "reward", "pairs", "preference.jsonl",
                                                                    reward=True)
    encoded = os.path.join(work, "encoded.jsonl")
    lengths = encode_pairs_file(model_dir, data, a.max_seq_len, encoded, a.batch, a.window * (a.windows + 1))
    lengths, flops_per_pair, tokens_per_pair = common.describe_pairs(a, "reward model", " + score head", stats,
                                                                     lengths, data, peak, load0)

    trl_py = common.trl_python(a.trl_python)
    names = {"ours": ("ours, 1 process", 1, []),
             "ours_packed": ("ours, 1 process, --packing", 1, ["--packing"]),
             "ours_shared": ("ours, 1 process, --shared_prompt_forward", 1, ["--shared_prompt_forward"]),
             "ours_2ranks": ("ours, 2 ranks ZeRO-2", 2, [])}
    runners = {}
    for name in a.runners.split(","):
        if name in names:
            label, ranks, extra = names[name]
            runners[label] = (lambda rep, name=name, ranks=ranks, extra=extra: run_ours(
                a, model_dir, data, os.path.join(work, f"{name}-{rep}"), ranks, extra))
        elif name == "trl":
            if trl_py is None:
                print(common.NO_TRL)
                continue
            trl_name = "trl RewardTrainer, 1 process" + (" (its defaults)" if a.trl_defaults else "")
            runners[trl_name] = lambda rep: run_trl(a, trl_py, model_dir, encoded, os.path.join(work, f"trl-{rep}"))
        else:
            raise SystemExit(f"--runners: unknown runner {name!r}")
    results = common.interleave(runners, a.reps)
    load1 = common.load_average()
    table = common.print_table(results, "pairs", flops_per_pair, tokens_per_pair, peak)
    med = {name: r["rate"]["median"] for name, r in table.items()}
    trl_name = next((n for n in med if n.startswith("trl")), None)
    common.ratios(med, [(names[k][0], trl_name) for k in ("ours", "ours_packed", "ours_shared")])
    common.ratios(med, [(names["ours_packed"][0], names["ours"][0])])
    print(f"load average: {load0:.2f} at start, {load1:.2f} at end ({os.cpu_count()} cores)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": a.size, "batch": a.batch, "peak_gflops": peak, "load_average": [load0, load1],
                       "model": stats, "tokens_per_pair": tokens_per_pair, "runners": table}, f, indent=2)


if __name__ == "__main__":
    main()
