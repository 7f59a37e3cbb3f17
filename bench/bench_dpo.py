"""DPO throughput, like for like: our dpo/main.py against TRL's DPOTrainer, live and precomputed reference.

    python bench/bench_dpo.py                       # tiny test model on data/preference.jsonl
    python bench/bench_dpo.py --size realistic      # ~24M-parameter Llama on generated variable-length pairs

Both sides train copies of one random-init model against a frozen copy of it, on the same texts (our
rendered prompt and each reply; TRL tokenizes them and adds the EOS) in the same batches (TRL reads
them unshuffled in the order our steps take them), same pairs per step, beta,
sigmoid loss, fp32, no gradient checkpointing, dropout off, learning rate, Adam betas, clipping and
constant schedule, and the same threads (1 process each). Ours also runs with --packing, and on 2 ranks
(ZeRO-2) on a line of its own. Method as in bench_sft.py: fresh processes per repetition, windows of
--window steps after a warm-up window (TRL's precompute pass and ours happen before the first step and
are not timed), medians over --reps with the spread, MFU against the measured fp32 matmul peak (a live
reference's forward counts as model work), peak RSS, load.
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

LR, BETA = 1e-4, 0.1


def texts_and_lengths(model_dir: str, data: str, max_seq_len: int, out_path: str, batch: int,
                      steps: int) -> list[tuple[int, int]]:
    """The TRL dataset (rendered prompt, " " + reply texts) of our first `steps` steps' pairs in their
    order (common.train_order; TRL reads it unshuffled), written to `out_path`; returns our encoded
    (chosen, rejected) sequence lengths in that order."""
    from utils.encoding import Encoder
    from utils.model import load_tokenizer
    from utils.pairs import encode_pairs

    enc = Encoder(load_tokenizer(model_dir), "auto", max_seq_len)
    samples = common.train_split(data, "pairs")
    by_where = {s.where: s for s in samples}
    pairs = common.train_order(encode_pairs(samples, enc, "bench", log=lambda *_: None), batch, steps)
    with open(out_path, "w") as f:
        for p in pairs:
            s = by_where[p.where]
            f.write(json.dumps({"prompt": enc.render_prompt(s.prompt), "chosen": " " + s.chosen[-1]["content"],
                                "rejected": " " + s.rejected[-1]["content"],
                                "tokens": len(p.chosen) + len(p.rejected)}) + "\n")
    return [(len(p.chosen), len(p.rejected)) for p in pairs]


def run_ours(a, model_dir: str, data: str, out: str, ranks: int, extra: list[str]) -> dict:
    args = ["--model_name_or_path", model_dir, "--data_path", data, "--per_device_train_batch_size",
            str(a.batch // ranks), "--max_steps", str(a.window * (a.windows + 1)), "--log_interval", str(a.window),
            "--zero_stage", "2" if ranks > 1 else "0", "--learning_rate", str(LR), "--lr_scheduler_type", "constant",
            "--beta", str(BETA), "--max_seq_len", str(a.max_seq_len), "--eval_fraction", "0.02",
            "--per_device_eval_batch_size", str(a.batch), "--anchor_coef", "0", *extra]  # TRL's objective, no anchor
    return common.run_program("dpo/main.py", args, out, ranks, "pairs_per_sec", a.threads)


def run_trl(a, python: str, model_dir: str, texts: str, out: str, precompute: bool) -> dict:
    return common.run_worker(__file__, a, python, "trl", "TRL DPO", ["--model_dir", model_dir, "--texts", texts, "--out", out]
                                 + ["--precompute"] * precompute)


def trl_worker(a) -> None:
    """Runs under the TRL interpreter: DPOTrainer on the same texts, steps timed between step ends."""
    import contextlib
    import io

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(a.texts)]
    tokens = [r.pop("tokens") for r in rows]  # our token count of each pair (for tokens/s), not a TRL column
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    clock, marks = common.step_marks()
    steps = a.window * (a.windows + 1)
    cfg = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=steps, learning_rate=LR,
                    train_sampling_strategy="sequential",  # our steps' pairs in our order (texts_and_lengths)
                    beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=a.precompute,
                    precompute_ref_batch_size=a.batch, lr_scheduler_type="constant", logging_steps=10**9,
                    save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False,
                    gradient_checkpointing=False, disable_dropout=True, seed=0, max_length=None,
                    dataloader_num_workers=0, adam_beta2=0.95, max_grad_norm=1.0, disable_tqdm=True)
    with contextlib.redirect_stderr(io.StringIO()):
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[marks])
    torch.set_num_threads(a.threads)  # accelerate may have changed it; the same threads as ours
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.train()
    rates = common.trl_rates([w for w, _ in clock.steps()], tokens, a.batch, a.window, a.windows, lambda n: n)
    print(json.dumps({**rates, "threads": torch.get_num_threads()}))


def main() -> None:
    ap = common.bench_parser(__doc__, "pairs", "ours,ours_pre,ours_pre_packed,ours_2ranks,trl,trl_pre",
                             "comma list of: ours, ours_pre, ours_packed, ours_pre_packed, ours_2ranks, trl, trl_pre "
                             "(_pre: precomputed reference log-probs)", "preference.jsonl")
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    ap.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "trl":
        return trl_worker(a)
    load0, peak, work, model_dir, stats, data = common.bench_inputs(a, "dpo", "pairs", "preference.jsonl")
    texts = os.path.join(work, "texts.jsonl")
    lengths = texts_and_lengths(model_dir, data, a.max_seq_len, texts, a.batch, a.window * (a.windows + 1))
    lengths, policy, tokens_per_pair = common.describe_pairs(a, "DPO", "", stats, lengths, data, peak, load0)

    trl_py = common.trl_python(a.trl_python)
    ours = {"ours": ("ours, 1 process, live reference", 1, []),
            "ours_pre": ("ours, 1 process, precomputed reference", 1, ["--precompute_ref_logprobs"]),
            "ours_packed": ("ours, 1 process, live reference, --packing", 1, ["--packing"]),
            "ours_pre_packed": ("ours, 1 process, precomputed reference, --packing", 1,
                                ["--precompute_ref_logprobs", "--packing"]),
            "ours_2ranks": ("ours, 2 ranks ZeRO-2, live reference", 2, [])}
    trl = {"trl": ("trl DPOTrainer, 1 process, live reference", False),
           "trl_pre": ("trl DPOTrainer, 1 process, precomputed reference", True)}
    runners, flops = {}, {}
    for name in a.runners.split(","):
        if name in ours:
            label, ranks, extra = ours[name]
            runners[label] = (lambda rep, name=name, ranks=ranks, extra=extra: run_ours(
                a, model_dir, data, os.path.join(work, f"{name}-{rep}"), ranks, extra))
        elif name in trl:
            if trl_py is None:
                print(common.NO_TRL)
                continue
            label, pre = trl[name]
            runners[label] = (lambda rep, name=name, pre=pre: run_trl(a, trl_py, model_dir, texts,
                                                                      os.path.join(work, f"{name}-{rep}"), pre))
        else:
            raise SystemExit(f"--runners: unknown runner {name!r}")
        # The policy's forward + backward, plus the live reference's forward (a third of it).
        flops[label] = policy * (1.0 if "precomputed" in label else 4.0 / 3.0)
    results = common.interleave(runners, a.reps)
    load1 = common.load_average()
    table = common.print_table(results, "pairs", flops, tokens_per_pair, peak)
    med = {name: r["rate"]["median"] for name, r in table.items()}
    common.ratios(med, [(ours["ours"][0], trl["trl"][0]), (ours["ours_pre"][0], trl["trl_pre"][0]),
                        (ours["ours_packed"][0], trl["trl"][0]), (ours["ours_pre_packed"][0], trl["trl_pre"][0]),
                        (ours["ours_pre_packed"][0], ours["ours_pre"][0]), (ours["ours_packed"][0], ours["ours"][0])])
    print(f"load average: {load0:.2f} at start, {load1:.2f} at end ({os.cpu_count()} cores)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": a.size, "batch": a.batch, "peak_gflops": peak, "load_average": [load0, load1],
                       "model": stats, "tokens_per_pair": tokens_per_pair, "runners": table}, f, indent=2)


if __name__ == "__main__":
    main()
