"""Interactive multi-turn chat with a saved model in the terminal, using the model's own template.

    python launch/chat.py --model out/ppo/actor [--max_new_tokens 128] [--sample]

Type a message and press Enter. `/reset` starts a new conversation, `/quit` (or Ctrl-D) leaves.
The whole conversation is re-rendered every turn with the template in the model's args.json, so the
model sees exactly the prompt form it was trained on.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.args import Parser  # noqa: E402
from utils.errors import exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv=None) -> None:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face causal-LM directory")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from launch.compare import encoder_for
    from utils.errors import UserError
    from utils.generation import check_room, generate_answers
    from utils.model import load_model, load_tokenizer, position_limit

    if a.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {a.max_new_tokens}")
    tok = load_tokenizer(a.model, what="--model")
    enc = encoder_for(a.model, tok)
    limit = position_limit(a.model)
    check_room(a.max_new_tokens, limit)  # before the model loads, not at the first turn
    model = load_model(AutoModelForCausalLM, a.model, what="--model").eval()
    history: list[dict] = []
    print(f"chatting with {a.model} (template {enc.template}); /reset, /quit", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ans = generate_answers(model, enc, [tuple(history)], max_new_tokens=a.max_new_tokens, do_sample=a.sample,
                               temperature=0.7, top_p=0.9, limit=limit)[0]
        if ans.cut:
            print(f"[the conversation's first {ans.cut} tokens were left out to fit the model's {limit} positions; "
                  "/reset starts a new one]", flush=True)
        reply = ans.text.strip()
        print(f"bot> {reply}{'' if ans.ended else ' [cut at --max_new_tokens]'}", flush=True)
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
