"""Side-by-side evaluation of several models on the same prompts.

    python launch/compare.py --models sft=out/sft ppo=out/ppo/actor dpo=out/dpo \
        --prompts data/heldout_prompts.jsonl --reward_model out/reward \
        --preferred great,wonderful --form '^The \\w+ is \\w+\\.$' --json results.json
    python launch/compare.py --models sft=out/sft grpo=out/grpo/actor --prompts data/count_heldout.jsonl \
        --reward_funcs utils.reward_funcs:exact_match

For every model: greedy answers (each rendered with the template in that model's args.json), the
reward model's mean score of them (prompt + answer + EOS, scored at the last token), the rate of
answers containing a preferred word, the EOS rate, with --form the rate of well-formed answers, and with
--reward_funcs the mean of each rule-based reward (step 3's functions, given each prompt row's fields).
Then a few prompts with every model's answer side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.args import Parser, inherited  # noqa: E402
from utils.data import load_samples  # noqa: E402
from utils.encoding import Encoder  # noqa: E402
from utils.errors import UserError, exit_on_user_error  # noqa: E402


def encoder_for(model_dir: str, tokenizer) -> Encoder:
    prev = inherited(model_dir)
    return Encoder(tokenizer, prev.get("template", "auto"), int(prev.get("max_seq_len") or 512))


def evaluate_model(model_dir: str, prompts: list, max_new_tokens: int):
    from transformers import AutoModelForCausalLM

    from utils.generation import generate_answers
    from utils.model import load_model, load_tokenizer, position_limit

    tok = load_tokenizer(model_dir, what="--models")
    model = load_model(AutoModelForCausalLM, model_dir, what="--models").eval()
    limit = position_limit(model_dir)
    answers = generate_answers(model, encoder_for(model_dir, tok), prompts, max_new_tokens=max_new_tokens, limit=limit)
    cut = [i for i, a in enumerate(answers) if a.cut]
    if cut:
        print(f"{model_dir}: cut {len(cut)} of {len(answers)} prompts to their last {limit - max_new_tokens} tokens "
              f"(the model's {limit} positions less --max_new_tokens; first: prompt {cut[0] + 1})")
    return answers


def reward_scores(reward_dir: str, prompts: list, answers: list) -> list[float]:
    from utils.model import load_tokenizer, position_limit
    from utils.reward import load_reward_model, reply_ids, score_ids

    tok = load_tokenizer(reward_dir, what="--reward_model")
    enc = encoder_for(reward_dir, tok)
    model = load_reward_model(reward_dir, pad_id=enc.pad_id, what="--reward_model", new_head=False).eval()
    limit = position_limit(reward_dir)
    # As step 3 scores answers as text: read at the reply end where the answer ended, at its last token
    # where it was cut at --max_new_tokens.
    seqs = [reply_ids(enc, p, a.text.strip(), a.ended, limit) for p, a in zip(prompts, answers)]
    return score_ids(model, seqs, enc.pad_id)


def rule_means(funcs, samples: list, answers, max_new_tokens: int) -> dict:
    """Mean of each reward function over the answers (values of None left out; None where it applied to none,
    as step 3 logs no mean then: a 0 would read as every answer scoring 0)."""
    from utils.reward_funcs import score_with_funcs

    _, per = score_with_funcs(funcs, [s.prompt[-1]["content"] for s in samples], [a.text for a in answers],
                              [s.columns for s in samples], [a.ids for a in answers], max_new_tokens,
                              [s.where for s in samples])
    means = {}
    for name, vals in per.items():
        applied = [v for v in vals if v is not None]
        means[f"reward/{name}"] = sum(applied) / len(applied) if applied else None
    return means


def summarise(answers, scores, preferred: list[str], form) -> dict:
    n = len(answers)
    words = [set(re.findall(r"\w+", a.text.lower())) for a in answers]
    row = {"n": n, "eos_rate": sum(a.ended for a in answers) / n,
           "preferred_rate": sum(bool(w & set(preferred)) for w in words) / n if preferred else None,
           "well_formed_rate": sum(a.ended and bool(form.match(a.text.strip())) for a in answers) / n
           if form else None,
           "reward": sum(scores) / n if scores else None,
           "mean_length_tokens": sum(len(a.ids) for a in answers) / n}
    return row


def print_table(results: dict) -> None:
    cols = ["reward", "preferred_rate", "eos_rate", "well_formed_rate", "mean_length_tokens"]
    cols = [c for c in cols if any(r[c] is not None for r in results.values())]
    cols += [c for c in next(iter(results.values())) if c.startswith("reward/")]
    width = max(len(k) for k in results) + 2
    widths = [max(20, len(c) + 2) for c in cols]
    print("model".ljust(width) + "".join(c.rjust(w) for c, w in zip(cols, widths)))
    for name, r in results.items():
        print(name.ljust(width) + "".join(f"{r[c]:{w}.3f}" if r[c] is not None else "-".rjust(w)
                                          for c, w in zip(cols, widths)))


@exit_on_user_error
def main(argv=None) -> dict:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR pairs (Hugging Face causal-LM directories)")
    ap.add_argument("--prompts", required=True, help="file with prompts (any format with a prompt)")
    ap.add_argument("--reward_model", default=None, help="step-2 reward model directory to score the answers")
    ap.add_argument("--preferred", default="", help="comma-separated words that mark the preferred behaviour")
    ap.add_argument("--form", default=None, help="regex a well-formed answer matches (EOS required too)")
    ap.add_argument("--reward_funcs", nargs="*", default=[], help="rule-based rewards FILE.py:NAME or "
                    "package.module:NAME (step 3's convention, with each prompt row's other fields); their means")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="prompts shown side by side")
    ap.add_argument("--json", default=None, help="also write the summary and answers here")
    a = ap.parse_args(argv)
    pairs = []
    for spec in a.models:
        if "=" not in spec:
            raise UserError(f"--models: expected NAME=DIR, got '{spec}'")
        pairs.append(spec.split("=", 1))
    if a.max_new_tokens < 1 or a.samples < 0:
        raise UserError("--max_new_tokens must be >= 1 and --samples >= 0")
    if a.json and os.path.isdir(a.json):
        raise UserError(f"--json '{a.json}' is a directory; give a file name")
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        raise UserError(f"--json '{a.json}': its folder does not exist")  # was a traceback after every model ran
    if a.json and os.path.realpath(a.json) == os.path.realpath(a.prompts):
        raise UserError(f"--json '{a.json}' is the --prompts file, which the results would replace; write them to "
                        "another file")
    try:
        form = re.compile(a.form) if a.form else None
    except re.error as e:
        raise UserError(f"--form {a.form!r} is not a regular expression: {e}") from None
    samples = load_samples([a.prompts], "prompts")
    prompts = [s.prompt for s in samples]
    from utils.reward_funcs import load_reward_funcs

    funcs = load_reward_funcs(a.reward_funcs, [])
    preferred = [w.strip().lower() for w in a.preferred.split(",") if w.strip()]
    results, answers = {}, {}
    for name, path in pairs:
        answers[name] = evaluate_model(path, prompts, a.max_new_tokens)
        scores = reward_scores(a.reward_model, prompts, answers[name]) if a.reward_model else None
        results[name] = summarise(answers[name], scores, preferred, form)
        if funcs:
            results[name].update(rule_means(funcs, samples, answers[name], a.max_new_tokens))
    print(f"\n{len(prompts)} prompts from {a.prompts}")
    print_table(results)
    for i in range(min(a.samples, len(prompts))):
        print(f"\nprompt: {prompts[i][-1]['content']}")
        for name in answers:
            ans = answers[name][i]
            print(f"  {name:>8}: {ans.text.strip()!r}{'' if ans.ended else '  [no EOS]'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": results, "answers": {k: [x.text for x in v] for k, v in answers.items()}}, f,
                      indent=2)
    return results


if __name__ == "__main__":
    main()
