"""Batched answers from a saved causal LM with the run's template (evaluation tools, chat, demo)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .encoding import Encoder, pad_batch
from .errors import UserError
from .reward import cut_left


@dataclass
class Answer:
    prompt: str       # rendered prompt text
    text: str         # decoded answer, without the EOS
    ended: bool       # the model emitted EOS (did not hit the length limit)
    ids: list         # answer token ids including the EOS when ended
    cut: int = 0      # prompt tokens left out at its start to fit the model's positions (`limit`)


@contextmanager
def only_our_settings(model):
    """`generate()` fills every setting its GenerationConfig leaves unset from the model's own
    generation_config.json: an instruct model's repetition_penalty, top_k, min_p or min_new_tokens would
    shape PPO's rollouts (which its log-probabilities then do not describe) and the evaluation's "greedy"
    answers. Inside this block the model's config is a blank one, so only transformers' neutral
    defaults fill the gaps; the model's own config is back on exit (and is what gets saved). Every module
    that holds one is restored: peft's wrapper copies its (blank) config onto the base model inside
    generate(), and the base model's is the one saved (a LoRA actor was saved with {"eos_token_id": ...}
    alone)."""
    from transformers import GenerationConfig

    holders = [m for m in model.modules() if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
    own = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = GenerationConfig()
    try:
        yield model
    finally:
        for m, config in zip(holders, own):
            m.generation_config = config


def check_room(max_new_tokens: int, limit: int | None) -> None:
    """Refuse a --max_new_tokens that leaves no room for a prompt in the model's `limit` positions."""
    if limit is not None and max_new_tokens >= limit:
        raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {limit} "
                        "positions; lower it")


@torch.no_grad()
def generate_answers(model, encoder: Encoder, prompts: list, max_new_tokens: int = 64, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
                     limit: int | None = None) -> list[Answer]:
    """prompts: list of message tuples. Left-padded batches; the attention mask comes from lengths.
    `limit` (the model's positions): a prompt longer than limit - max_new_tokens loses its start (a leading
    BOS kept, as step 3 cuts its prompts), counted in `Answer.cut`; it failed with an IndexError in a
    learned position table (GPT-2), and a long chat did so once its history outgrew the model."""
    check_room(max_new_tokens, limit)
    tok = encoder.tokenizer
    out: list[Answer] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        full = [encoder.encode_prompt(p) for p in chunk]
        ids = [cut_left(x, limit - max_new_tokens, encoder.bos_id) if limit else x for x in full]
        batch = pad_batch(ids, None, encoder.pad_id, left=True)
        dev = next(model.parameters()).device
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=encoder.pad_id,
                      eos_token_id=encoder.eos_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        with only_our_settings(model):
            gen = model.generate(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                                 **kwargs)[:, batch["input_ids"].size(1):]
        for p, row, x, y in zip(chunk, gen.tolist(), full, ids):
            ended = encoder.eos_id in row
            row = row[: row.index(encoder.eos_id) + 1] if ended else row
            text_ids = row[:-1] if ended else row
            out.append(Answer(encoder.render_prompt(p), tok.decode(text_ids, skip_special_tokens=True), ended, row,
                              len(x) - len(y)))
    return out

