"""Batched answers from a saved causal LM with the run's template (evaluation tools, chat, demo)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoding import Encoder, pad_batch


@dataclass
class Answer:
    prompt: str       # rendered prompt text
    text: str         # decoded answer, without the EOS
    ended: bool       # the model emitted EOS (did not hit the length limit)
    ids: list         # answer token ids including the EOS when ended


@torch.no_grad()
def generate_answers(model, encoder: Encoder, prompts: list, max_new_tokens: int = 64, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16) -> list[Answer]:
    """prompts: list of message tuples. Left-padded batches; the attention mask comes from lengths."""
    tok = encoder.tokenizer
    out: list[Answer] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [encoder.encode_prompt(p) for p in chunk]
        batch = pad_batch(ids, None, encoder.pad_id, left=True)
        dev = next(model.parameters()).device
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=encoder.pad_id,
                      eos_token_id=encoder.eos_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        gen = model.generate(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                             **kwargs)[:, batch["input_ids"].size(1):]
        for p, row in zip(chunk, gen.tolist()):
            ended = encoder.eos_id in row
            row = row[: row.index(encoder.eos_id) + 1] if ended else row
            text_ids = row[:-1] if ended else row
            out.append(Answer(encoder.render_prompt(p), tok.decode(text_ids, skip_special_tokens=True), ended, row))
    return out

