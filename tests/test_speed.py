"""Speed changes that must not change numbers: PPO's experience reuses generation's log-probabilities."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from conftest import REPO, PlainEngine
from step3_ppo.rollout import answer_logits, generate, generation_config, reuses_generation_logits
from utils.encoding import Encoder
from utils.model import load_tokenizer
from utils.rl import token_logprobs


def test_generation_logits_equal_the_actor_forward_in_fp32(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    actor = PlainEngine(AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32))
    assert reuses_generation_logits(actor)
    enc = Encoder(load_tokenizer(tiny_dir("llama")), "auto", 64)
    prompts = [enc.encode_prompt(({"role": "user", "content": t},)) for t in
               ("Tell me about the owl.", "What do you think of the violin and the kitten?", "Hi")]
    args = types.SimpleNamespace(do_sample=True, max_answer_seq_len=12, temperature=0.7, top_p=0.9, top_k=0)
    b = generate(actor, prompts, enc, generation_config(args, enc, args.temperature))
    assert b["gen_logits"].shape[:2] == b["answers"].shape
    reused = token_logprobs(b["gen_logits"] / args.temperature, b["answers"])
    forward = token_logprobs(answer_logits(actor, b, args.temperature), b["answers"])
    mask = b["action_mask"].bool()
    assert (reused - forward)[mask].abs().max() < 1e-5

    bf16 = PlainEngine(AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.bfloat16))
    assert not reuses_generation_logits(bf16)  # bf16 decode and forward differ by ~1e-2: forwards stay
    assert "gen_logits" not in generate(bf16, prompts, enc, generation_config(args, enc, args.temperature))


def test_bench_times_the_same_steps_and_batches_on_both_sides():
    """bench/common.py: TRL's timed windows are our steps window+1 .. window*(windows+1), with the items
    our stream gives those steps (ours logs a window every `window` steps and drops the first)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import common

    from utils.stream import StepStream

    items = list(range(25))
    batch, window, windows = 4, 3, 3
    steps = window * (windows + 1)
    order = common.train_order(items, batch, steps)
    stream = StepStream(items, batch, 1, lambda b: b, common.SEED)
    assert order == [i for _ in range(steps) for i in stream.next_step()[0]]  # epochs wrap as in training
    assert sorted(order[:25]) == items  # the first epoch is a permutation of every item
    # Step s (1-based) takes order[(s-1)*batch : s*batch]; the timed windows are steps 4-6, 7-9, 10-12.
    wins = common.timed_windows(order, batch, window, windows)
    assert wins == [order[12:24], order[24:36], order[36:48]]
    assert common.timed_items(order, batch, window, windows) == order[12:48]
    # TRL's step_times[j] is the time of step j + 2 (steps 2..12): give step s the time s seconds.
    times = [float(s) for s in range(2, steps + 1)]
    r = common.trl_rates(times, order, batch, window, windows, lambda i: 1)
    secs = [4 + 5 + 6, 7 + 8 + 9, 10 + 11 + 12]
    assert r["rate"] == pytest.approx(sorted(window * batch / t for t in secs)[1])
    assert r["tokens_per_sec"] == r["rate"]


def test_bench_generate_decode_loop_gives_generates_tokens(tiny_dir):
    """bench/bench_generate.py compares generate() with a bare KV-cache loop only if both decode the same."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from bench_generate import decode_loop

    tok = load_tokenizer(tiny_dir("llama"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama")).eval()
    ids = torch.randint(5, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = ids.masked_fill(mask == 0, pad)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=pad)[:, 12:]
    got = decode_loop(model, ids, mask, 10, tok.eos_token_id, pad)
    assert torch.equal(got, want[:, :got.shape[1]]) and got.shape[1] >= 1


# common.py is a library; table.py takes one positional directory and has no flags.
@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(REPO, "bench"))
                                          if f.endswith(".py") and f not in ("common.py", "table.py")))
def test_every_bench_script_imports_and_parses_its_flags(script, monkeypatch, capsys):
    """The benches are not run by the tests (they take minutes); their `--help` is, in process, so a
    refactor of what they import (bench/common.py, the programs' helpers) cannot break one unseen."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_script_{script[:-3]}", os.path.join(REPO, "bench", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
