"""Score responses with a trained reward model (one process, no DeepSpeed).

    python step2_reward/rw_eval.py --model OUT --prompt "Tell me about the cat." \
        --responses "The cat is great." "The cat is dull."
    python step2_reward/rw_eval.py --model OUT --pairs data/heldout_preference.jsonl [--output scores.jsonl]

Texts are rendered with the template the model was trained with (from its args.json) and end with
EOS, exactly as in training, so the scores are the ones training and evaluation computed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from utils.args import arg, max_seq_len_flag, parse, resolve_data_settings
from utils.data import load_samples
from utils.encoding import Encoder
from utils.errors import UserError, exit_on_user_error
from utils.losses import pairwise_reward_loss
from utils.model import check_positions, load_tokenizer, position_limit
from utils.pairs import encode_pairs
from utils.reward import load_reward_model, score_ids


@dataclass
class RwEvalArgs:
    model: str = arg(None, "reward model directory (a step-2 output or any one-label sequence classifier)")
    prompt: str = arg(None, "a user prompt to score --responses for")
    responses: list = arg([], "responses to --prompt, scored in the order given", nargs="+")
    pairs: list = arg([], "preference files (same formats as training): prints accuracy and mean rewards",
                      nargs="+")
    output: str = arg("", "with --pairs: also write one JSON line per pair (where, chosen_reward, rejected_reward)")
    template: str = arg("auto", "prompt template; auto = the model's args.json, else the tokenizer's chat "
                        "template, else hh", choices=["auto", "chat", "alpaca", "hh", "raw"])
    max_seq_len: int = arg(0, "longest sequence in tokens; 0 = the model's args.json, else 512", ge=0)
    overlong: str = arg("error", "sequences longer than --max_seq_len: error, skip (counted) or truncate",
                        choices=["skip", "truncate", "error"])
    batch_size: int = arg(16, "sequences per forward pass", ge=1)
    dtype: str = arg("fp32", "model precision", choices=["fp32", "fp16", "bf16"])
    trust_remote_code: bool = arg(False, "allow model code from the model directory")


def score_responses(model, encoder: Encoder, prompt: str, responses: list[str], batch_size: int) -> list[float]:
    msgs = ({"role": "user", "content": prompt},)
    samples = [({"role": "assistant", "content": r},) for r in responses]
    seqs = []
    for reply in samples:
        ids, labels = encoder.encode_reply(msgs, reply)
        fitted = encoder.fit(ids, labels)
        if fitted is None:  # often the prompt's length, not the response's: say the whole sequence's
            raise UserError(f"--prompt + response {reply[0]['content'][:40]!r} is {len(ids)} tokens, more than "
                            f"--max_seq_len {encoder.max_seq_len} (--overlong {encoder.overlong})")
        if len(fitted[0]) < len(ids):
            print(f"response {reply[0]['content'][:40]!r}: cut to --max_seq_len {encoder.max_seq_len} (--overlong "
                  "truncate), scored at its last kept token")
        seqs.append(fitted[0])
    return score_ids(model, seqs, encoder.pad_id, batch_size)


def score_pairs(model, encoder: Encoder, samples: list, batch_size: int) -> tuple[dict, list[dict]]:
    """Summary (loss with any per-row margins, accuracy, mean rewards) and one row per pair."""
    items = encode_pairs(samples, encoder, "pairs")
    scores = torch.tensor(score_ids(model, [it.chosen for it in items] + [it.rejected for it in items],
                                    encoder.pad_id, batch_size))
    r_c, r_r = scores.chunk(2)
    _, d = pairwise_reward_loss(r_c, r_r, torch.tensor([it.margin for it in items]))
    n = d["pairs"]
    summary = {"pairs": n, "loss": d["loss_sum"] / n, "accuracy": d["correct"] / n,
               "chosen_reward": d["chosen_sum"] / n, "rejected_reward": d["rejected_sum"] / n,
               "margin": d["margin_sum"] / n}
    rows = [{"where": it.where, "chosen_reward": c, "rejected_reward": r}
            for it, c, r in zip(items, r_c.tolist(), r_r.tolist())]
    return summary, rows


@exit_on_user_error
def main(argv=None) -> None:
    args = parse((RwEvalArgs,), "Score responses or preference pairs with a reward model", argv, required=("model",))
    if bool(args.pairs) == bool(args.prompt):
        raise UserError("give either --prompt with --responses, or --pairs FILE")
    if args.prompt and not args.responses:
        raise UserError("--prompt needs --responses")
    if args.output and os.path.isdir(args.output):
        raise UserError(f"--output '{args.output}' is a directory; give a file name")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UserError(f"--output '{args.output}': its folder does not exist")  # was a traceback after scoring
    if args.output and os.path.realpath(args.output) in {os.path.realpath(p) for p in args.pairs}:
        raise UserError(f"--output '{args.output}' is a --pairs file, which the scores would replace; write them to "
                        "another file")
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.model, args.trust_remote_code, what="--model")
    template, max_seq_len = resolve_data_settings(args, args.model, position_limit(args.model, args.trust_remote_code))
    # A --max_seq_len beyond the model's positions failed with an IndexError in its position table.
    check_positions(args.model, max_seq_len, max_seq_len_flag(args, args.model), "--model", args.trust_remote_code)
    encoder = Encoder(tokenizer, template, max_seq_len, args.overlong)
    samples = load_samples(args.pairs, "pairs") if args.pairs else None  # bad files fail before the model loads
    model = load_reward_model(args.model, pad_id=encoder.pad_id, dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code, what="--model", new_head=False)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    print(f"model={args.model} template={encoder.template}")
    if args.prompt:
        for score, response in zip(score_responses(model, encoder, args.prompt, args.responses, args.batch_size),
                                    args.responses):
            print(f"{score:+.4f}\t{response}")
        return
    summary, rows = score_pairs(model, encoder, samples, args.batch_size)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if args.output:
        with open(args.output, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
