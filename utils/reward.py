"""Reward models: which token carries the reward, loading a sequence classifier, and scoring a batch.

The reward of a (prompt, response) is the classification head's output at the last real token of
prompt + response + EOS (pitfall 7). "Real" comes from the attention mask, which the collator builds
from known lengths, never from `input_ids != pad_id`: that test is wrong where pad == eos (it would
drop the EOS), where the tokenizer has no pad token, and where a leading BOS equals pad (pitfall 8).
Hugging Face's own sequence-classification pooling is exactly that id test, so we do not use its
pooled output; we read the head's per-token outputs and pick the token ourselves.
"""
from __future__ import annotations

import copy
import inspect

import torch

from .encoding import pad_batch, position_ids_from_mask
from .errors import UserError
from .model import _check_source, load_model

# Weights that legitimately differ when a causal LM becomes a one-label sequence classifier, where the
# family's two classes cannot be compared (see `head_swap_patterns`).
NEW_HEAD = ("score.weight",)
DROPPED_LM_HEAD = ("lm_head.weight",)


def head_swap_patterns(config, trust_remote_code: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(new, dropped): the weight names a one-label sequence classifier has and the causal LM of the
    same config lacks (the score head), and the reverse (the LM head: `lm_head.weight`, but
    `embed_out.weight` on GPT-NeoX and `lm_head.bias` on GPT-J and Phi). Both classes are built from
    the config on the meta device, so this costs no memory at any size; a family whose classes
    cannot be built that way gets the common names."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    clf_config = copy.deepcopy(config)
    clf_config.num_labels = 1
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            clf = AutoModelForSequenceClassification.from_config(clf_config, trust_remote_code=trust_remote_code)
        lm_state, clf_keys = lm.state_dict(), set(clf.state_dict())
    except Exception:  # noqa: BLE001 - remote code or a family without one of the classes
        return NEW_HEAD, DROPPED_LM_HEAD
    new = clf_keys - set(lm_state)
    dropped = {k: v for k, v in lm_state.items() if k not in clf_keys}
    names = set(dropped)
    try:  # the names a checkpoint holds them under (transformers renames some on load: embed_out -> lm_head)
        from transformers.core_model_loading import revert_weight_conversion

        names |= set(revert_weight_conversion(lm, dropped))
    except Exception:  # noqa: BLE001 - an internal API that may move; the in-memory names stay
        pass
    return tuple(sorted(new)) or NEW_HEAD, tuple(sorted(names)) or DROPPED_LM_HEAD


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row: attention_mask [B, T] (1 = real) -> [B] long.

    Works for right, left or no padding because it reads only the mask. A row with no real token
    is a collator bug and raises.
    """
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("a row of the batch has no real token (attention mask all zero)")
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(-1).values


def gather_last(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """token_scores [B, T] -> the score at each row's last real token, [B]."""
    idx = last_token_index(attention_mask).to(token_scores.device)
    return token_scores.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def _head(model) -> torch.nn.Module:
    """The classification head of a HF sequence classifier (under peft: its modules_to_save wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise UserError(f"{type(base).__name__} has no 'score' head; expected a *ForSequenceClassification "
                        "model of a decoder-only family")
    return head


def _cache_kwarg(model) -> str:
    """The name the model's forward takes a KV cache by: `cache` in transformers >= 5.2x, where
    `past_key_values` is deprecated (a FutureWarning on every call, even for None; gone in 5.40)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, past_key_values=None) -> torch.Tensor:
    """Per-token head outputs [B, T] of a one-label sequence classifier (a DeepSpeed engine or a plain model).

    The whole model runs through its own forward (so ZeRO-3 hooks and peft wrappers behave as usual)
    and a forward hook on the head keeps its [B, T, 1] output, which HF would otherwise reduce with
    its pad-id pooling. Reward models read one token of it; a PPO critic reads all of them.
    With `past_key_values` (a cache of earlier tokens), `attention_mask` covers cached + new tokens.
    """
    captured = []
    cached = {} if past_key_values is None else {_cache_kwarg(model): past_key_values}
    handle = _head(model).register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=past_key_values is not None, **cached)
    finally:
        handle.remove()
    out = captured[-1]
    if out.size(-1) != 1:
        raise UserError(f"the reward head has {out.size(-1)} outputs; a reward model needs num_labels=1")
    return out.squeeze(-1)


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None, fp32: bool = True) -> torch.Tensor:
    """One reward per row [B]: the head's output at the last real token (see module docstring)."""
    scores = token_scores(model, input_ids, attention_mask, position_ids)
    rewards = gather_last(scores, attention_mask)
    return rewards.float() if fp32 else rewards


def shared_prompt_rewards(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, reply_ids: torch.Tensor,
                          reply_mask: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """Rewards of K replies per prompt with each prompt run once: the same numbers as
    `sequence_rewards` on the K concatenated prompt + reply rows, for fewer tokens (P + K*R, not K*(P + R)).

    prompt_ids/mask [B, P] left-padded; reply_ids/mask [B*K, R] right-padded, the K replies of prompt b
    in rows b*K .. b*K + K - 1. Returns [B*K]. The prompt's keys and values are computed once, repeated
    K times in the cache, and the replies attend to them; positions and masks are those of the
    concatenated rows, and gradients flow through the cache into the prompt's forward.
    Needs the KV cache, which HF switches off under gradient checkpointing in training.
    """
    k = reply_ids.size(0) // prompt_ids.size(0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True)
    cache = out.past_key_values
    if cache is None or cache.get_seq_length() == 0:  # gradient checkpointing empties it silently
        raise UserError("the model kept no KV cache for the prompts (gradient checkpointing turns it off in "
                        "training); the shared-prompt forward needs it")
    cache.batch_repeat_interleave(k)
    mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), reply_mask], dim=1)
    position_ids = position_ids_from_mask(mask)[:, prompt_mask.size(1):]
    scores = token_scores(model, reply_ids, mask, position_ids, past_key_values=cache)
    rewards = gather_last(scores, reply_mask)
    return rewards.float() if fp32 else rewards


def export_pad_token_id(tokenizer, end_id: int | None = None) -> int | None:
    """The `pad_token_id` a saved reward model's config gets, so that plain
    `AutoModelForSequenceClassification` scores an unpadded text at its last token, the reply's end
    token `end_id` (Encoder.eos_id: the EOS, or the chat template's turn end).

    HF pools at the last token whose id != config.pad_token_id. That is right when the pad token
    differs from EOS (then right or left padding with it also works); where pad == eos or there is
    no pad token, it must be None: HF then takes the last position of a batch of one (and refuses
    larger batches rather than scoring the wrong token).
    """
    pad = tokenizer.pad_token_id
    end = tokenizer.eos_token_id if end_id is None else end_id
    return pad if pad is not None and pad != end else None


def load_reward_model(path: str, *, pad_id: int, dtype: str = "fp32", trust_remote_code: bool = False,
                      zero3_config: dict | None = None, what: str = "--model_name_or_path", new_head: bool = True,
                      attn_implementation: str | None = None):
    """A one-label `AutoModelForSequenceClassification` from a causal LM or an earlier reward model.

    From a causal LM the head `score.weight` is new (HF's init: normal(0, config.initializer_range),
    no bias) and the LM head is dropped (`head_swap_patterns`); from a sequence classifier nothing may differ.
    `new_head=False` (scoring with a trained model) refuses a model without a trained score head,
    whose scores would be those of a random head and change with every load.
    `pad_id` is set on the in-memory config only when it has none, because HF's forward refuses
    batches > 1 without one; its pooled output is never used (see `sequence_rewards`).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    _check_source(path, what)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # unreachable hub name, or a config transformers does not know
        raise UserError(f"cannot load a model config from {what} '{path}': {e}") from None
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if is_classifier and config.num_labels != 1:
        raise UserError(f"{what} '{path}' is a classifier with {config.num_labels} labels; a reward model has one")
    if not is_classifier and not new_head:
        arch = ", ".join(config.architectures or []) or config.model_type
        raise UserError(f"{what} '{path}' is not a reward model ({arch}, not a *ForSequenceClassification with a "
                        "trained score head): its scores would come from a random head; give a step-2 output")
    new, dropped = ((), ()) if is_classifier else head_swap_patterns(config, trust_remote_code)
    # HF prints the expected head swap as a warning table; the key check below is ours and stricter.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = load_model(AutoModelForSequenceClassification, path, dtype=dtype,
                           trust_remote_code=trust_remote_code, zero3_config=zero3_config, what=what, num_labels=1,
                           allow_missing=new, allow_unexpected=dropped, attn_implementation=attn_implementation)
    finally:
        hf_logging.set_verbosity(verbosity)
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        text_config.pad_token_id = pad_id
    return model


@torch.no_grad()
def score_ids(model, seqs: list[list[int]], pad_id: int, batch_size: int = 16, fp32: bool = True,
              device=None) -> list[float]:
    """Rewards of already-encoded sequences (each prompt + response + EOS), scored in right-padded batches
    on `device` (default: the model's first parameter's; a ZeRO-3 engine whose parameters are offloaded
    gives the rollout's). The number of forwards depends only on len(seqs) (ZeRO-3 forwards are collective)."""
    device = device if device is not None else next(model.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = pad_batch(seqs[start:start + batch_size], None, pad_id)
        mask = batch["attention_mask"].to(device)
        rewards = sequence_rewards(model, batch["input_ids"].to(device), mask, position_ids_from_mask(mask), fp32)
        out.extend(rewards.tolist())
    return out


def cut_left(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The last `limit` ids, a leading BOS kept: a text too long for a model loses the start of its prompt,
    never the answer being scored or generated from."""
    if len(ids) <= limit:
        return ids
    head = [bos_id] if bos_id is not None and ids and ids[0] == bos_id else []
    return head + ids[len(ids) - (limit - len(head)):]


def reply_ids(encoder, prompt, answer: str, ended: bool = True, limit: int | None = None) -> list[int]:
    """A (prompt, answer text) as `encoder` (a reward model's own tokenizer and template) reads it: ending
    at the reply-end token where the answer ended, the token step 2 trained the score at; at the answer's
    last token where it was cut at the length limit, as for answers scored from the actor's own ids.
    Text in the answer that this tokenizer reads as one of its special tokens (an actor of another family
    can spell ChatML's `<|im_end|>` in plain pieces) is removed first: read as the turn end, it would end
    the reply there and hide everything after it from the score."""
    answer = encoder.without_special_text(answer)
    try:
        ids = encoder.encode_reply(tuple(prompt), ({"role": "assistant", "content": answer},))[0]
    except UserError as e:  # the rendering's advice names --template, which chooses the actor's template, not this
        reason = str(e).split(" (--template ")[0]
        raise UserError(f"{reason} (the reward model's own template '{encoder.template}', from its args.json or "
                        "tokenizer; --template does not change it: fix the record or use a reward model trained "
                        "with another template)") from None
    if not ended and ids and ids[-1] == encoder.eos_id:
        ids = ids[:-1]
    return cut_left(ids, limit, encoder.bos_id) if limit else ids
