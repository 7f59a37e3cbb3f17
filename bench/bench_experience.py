"""Step 3's experience forwards over a group estimator's rollout: one padded forward, or by length?

    OMP_NUM_THREADS=1 python bench/bench_experience.py [--size small] [--reps 5] [--rows 128] [--long 1]

One rank's rollout as GRPO makes it (16 prompts x K = 8 answers = --rows rows, prompts of 32 tokens),
answers of 8-16 tokens but --long of them run to --max_len (an answer that never ended), through the
reference's experience forward (`step3_ppo/rollout.py:answer_logits` then log-probabilities) two ways,
interleaved, each timed in process CPU time (`time.process_time`; with one thread the time the work
needs, hardly changed by other processes):

  whole      one forward over the rollout padded to its longest answer (before 2026-12-07)
  by_length  `rollout.by_length`: sub-batches of EXPERIENCE_ROWS rows of similar length, each cut to its
             own longest answer (what step 3 does)

The log-probabilities must agree under the action mask (checked). Printed: the median and spread in ms
and whole / by_length.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=list(common.SIZES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--max_len", type=int, default=256, help="the long answers' length (--max_answer_seq_len)")
    p.add_argument("--long", type=int, default=1, help="answers that run to --max_len")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM

    from step3_ppo import rollout
    from utils.rl import token_logprobs

    model_dir = common.make_model(tempfile.mkdtemp(prefix="bench_experience_"), a.size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    B, P, W = a.rows, a.prompt_len, a.max_len
    lengths = torch.randint(8, 17, (B,), generator=g)
    lengths[:a.long] = W
    W = int(lengths.max())  # generation stops at the longest answer: the rollout's width
    action_mask = (torch.arange(W)[None] < lengths[:, None]).long()
    answers = torch.randint(5, model.config.vocab_size, (B, W), generator=g) * action_mask
    prompt = torch.randint(5, model.config.vocab_size, (B, P), generator=g)
    b = {"seq": torch.cat([prompt, answers], 1), "attention_mask": torch.cat([torch.ones_like(prompt), action_mask], 1),
         "answers": answers, "action_mask": action_mask, "prompt_width": P}

    def whole():
        with torch.no_grad():
            return token_logprobs(rollout.answer_logits(model, b, 1.0), answers)

    def by_length():
        with torch.no_grad():
            return token_logprobs(rollout.by_length(lambda sub: rollout.answer_logits(model, sub, 1.0), b), answers)

    mask = action_mask.bool()
    diff = float((whole() - by_length())[mask].abs().max())
    print(f"{a.size} llama, fp32, {B} rows x ({P} prompt + up to {W} answer tokens; {a.long} at {W}, the rest 8-16), "
          f"width {W}, {torch.get_num_threads()} thread(s), load {common.load_average():.2f}; max |difference| {diff:.1e}")
    if diff > 1e-4:
        raise SystemExit("the two ways disagree")
    med = common.interleaved_cpu_ms({"whole": whole, "by_length": by_length}, a.reps)
    print(f"  whole / by_length {med['whole'] / med['by_length']:.2f}x; load at the end {common.load_average():.2f}")


if __name__ == "__main__":
    main()
