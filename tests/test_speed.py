"""Speed changes that must not change numbers: PPO's experience reuses generation's log-probabilities."""
from __future__ import annotations

import types

import torch

from step3_ppo.rollout import answer_logits, generate, generation_config, reuses_generation_logits
from utils.encoding import Encoder
from utils.model import load_tokenizer
from utils.rl import token_logprobs


class Engine:
    """The few DeepSpeed-engine methods generation uses, around a plain model (ZeRO-0, one process)."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)

    def zero_optimization_stage(self):
        return 0

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


def test_generation_logits_equal_the_actor_forward_in_fp32(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    actor = Engine(AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32))
    assert reuses_generation_logits(actor)
    enc = Encoder(load_tokenizer(tiny_dir("llama")), "auto", 64)
    prompts = [enc.encode_prompt(({"role": "user", "content": t},)) for t in
               ("Tell me about the owl.", "What do you think of the violin and the kitten?", "Hi")]
    args = types.SimpleNamespace(do_sample=True, max_answer_seq_len=12, temperature=0.7, top_p=0.9, top_k=0)
    b = generate(actor, prompts, enc, generation_config(args, enc))
    assert b["gen_logits"].shape[:2] == b["answers"].shape
    reused = token_logprobs(b["gen_logits"] / args.temperature, b["answers"])
    forward = token_logprobs(answer_logits(actor, b, args.temperature), b["answers"])
    mask = b["action_mask"].bool()
    assert (reused - forward)[mask].abs().max() < 1e-5

    bf16 = Engine(AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.bfloat16))
    assert not reuses_generation_logits(bf16)  # bf16 decode and forward differ by ~1e-2: forwards stay
    assert "gen_logits" not in generate(bf16, prompts, enc, generation_config(args, enc))
