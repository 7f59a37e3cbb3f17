"""Is Hugging Face `generate()` the cost of PPO's rollouts, or the model's own decode steps?

    OMP_NUM_THREADS=1 python bench/bench_generate.py [--size small] [--reps 9] [--dtype fp32|bf16]

One rank's rollout of bench/bench_ppo.py (8 left-padded prompts of 32 tokens, 16 new tokens, eager
attention, the llama of --size) answered greedily three ways, interleaved, each timed in process CPU
time (`time.process_time`; with one thread that is the time the work needs, and other processes on a
shared machine hardly change it):

  generate   `model.generate()` as step3_ppo/rollout.py calls it (logits kept, as fp32 PPO does)
  loop       a hand-written decode loop over the same KV cache: one prefill forward, then one forward
             per token, argmax, nothing else (the floor of any custom loop)
  forward    one full forward over prompt + 16 tokens (what the experience forwards cost)

The two decoders must give the same tokens (checked). Printed: the median and spread in ms, and
generate / loop: how much a custom decode loop could save at most.
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


@torch.no_grad()
def decode_loop(model, ids, mask, new_tokens: int, eos_id: int, pad_id: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    last, toks = pos[:, -1:], []
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1).masked_fill(done, pad_id)
        toks.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, past_key_values=cache,
                    use_cache=True)
    return torch.stack(toks, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small", choices=list(common.SIZES))
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    root = tempfile.mkdtemp(prefix="bench_generate_")
    model_dir = common.make_model(root, a.size)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (a.batch, a.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(a.batch // 2):  # half the prompts shorter: left padding as in a rollout
        mask[i, : 1 + 3 * i] = 0
        ids[i, : 1 + 3 * i] = pad
    cfg = GenerationConfig(max_new_tokens=a.new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                           bos_token_id=None, use_cache=True)
    full = torch.cat([ids, ids[:, : a.new_tokens]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(mask[:, : a.new_tokens])], dim=1)

    def hf():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, output_logits=True,
                                 return_dict_in_generate=True)
        return out.sequences[:, ids.shape[1]:]

    def loop():
        return decode_loop(model, ids, mask, a.new_tokens, eos, pad)

    def forward():
        with torch.no_grad():
            model(input_ids=full, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))

    a_hf, a_loop = hf(), loop()
    n = min(a_hf.shape[1], a_loop.shape[1])
    same = torch.equal(a_hf[:, :n], a_loop[:, :n])
    print(f"{a.size} llama, {a.dtype}, batch {a.batch} x {a.prompt_len} prompt tokens, {a.new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s), load {common.load_average():.2f}; same greedy tokens: {same}")
    if not same:
        raise SystemExit("the decode loop and generate() disagree")
    med = common.interleaved_cpu_ms({"generate": hf, "loop": loop, "forward": forward}, a.reps)
    print(f"  generate / loop {med['generate'] / med['loop']:.2f}x; generate / forward {med['generate'] / med['forward']:.2f}x; "
          f"load at the end {common.load_average():.2f}")


if __name__ == "__main__":
    main()
