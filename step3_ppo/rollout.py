"""Rollouts and experience: generate answers, score them with the four models, and batch samples.

Layout of a rollout batch: prompts left-padded to width P, answers right-padded to width W:
    seq  = [pad.. prompt | answer pad..]     [B, P + W]
    mask = [0..   1..    | 1..    0..  ]     (from the prompt lengths and answer lengths, never ids != pad)
The logits at positions P-1 .. P+W-2 score the answer tokens; the critic's value of the state before
answer token t is read at the same position P-1+t; the reward model reads the last real token (or, with
a tokenizer or template of its own, the answers as text: `text_scores`).
Position ids come from the mask in every forward (pitfall 4), as `generate()` computes them.
With --n_samples_per_prompt K each prompt is repeated K times in a row on its own rank, so the K
answers of a prompt (its group) never leave the rank that generated them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from step3_ppo.models import generation_mode
from utils import ds
from utils.encoding import pad_batch, position_ids_from_mask
from utils.errors import UserError, at_record
from utils.generation import only_our_settings
from utils.reward import reply_ids, score_ids, sequence_rewards, token_scores
from utils.reward_funcs import as_trl_inputs, score_with_funcs
from utils.rl import entropy_from_logits, mask_from_lengths, response_lengths, token_logprobs


@dataclass(frozen=True)
class PromptItem:
    ids: list          # prompt token ids, template and generation prompt included
    text: str          # the prompt's last turn, as reward functions receive it
    columns: dict      # the data row's other fields (e.g. "answer"), for reward functions
    where: str         # "file:line" of the row
    turns: tuple | None = None  # the prompt's turns where the row gave them as a list (TRL's conversational form)
    messages: tuple = ()        # the prompt's turns however the row gave them, for a reward model that reads text


def repeat_prompts(items: list[PromptItem], k: int, first_group: int = 0) -> tuple[list[PromptItem], torch.Tensor]:
    """Each prompt k times in a row, and the group id of every copy: [p0 x k, p1 x k, ...], ids
    first_group + position of the prompt. Ids come from positions, never from prompt contents, so a
    prompt drawn twice forms two groups and two prompts never share one (pitfall 25)."""
    out = [it for it in items for _ in range(k)]
    groups = torch.arange(first_group, first_group + len(items)).repeat_interleave(k)
    return out, groups


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict:
    return pad_batch(prompts, None, pad_id, left=True)


def generation_config(args, encoder, temperature: float | None = None, greedy: bool = False) -> GenerationConfig:
    """Only our flags and the run's resolved sampling `temperature` (Algorithm.temperature; not needed for
    greedy answers): a model's own generation_config.json (sampling defaults, penalties, min lengths) is
    kept out by `generate`, which calls with `only_our_settings`."""
    sample = args.do_sample and not greedy
    if sample and temperature is None:
        raise ValueError("sampled rollouts need the resolved temperature")
    return GenerationConfig(max_new_tokens=args.max_answer_seq_len, do_sample=sample,
                            temperature=temperature if sample else None, top_p=args.top_p if sample else None,
                            top_k=args.top_k if sample else None, eos_token_id=encoder.eos_id,
                            pad_token_id=encoder.pad_id, bos_token_id=None, use_cache=True)


# Generation's own logits stand in for the actor's experience forward only where they are the same
# numbers: in fp32 the cached decode and the full forward agree to ~1e-6 (checked once per run, see
# `experience`); in bf16/fp16 they differ by ~1e-2, which would make PPO's first ratio exp(logp - old) != 1.
REUSE_LOGITS_DTYPES = (torch.float32,)
REUSE_TOLERANCE = 1e-5


def reuses_generation_logits(actor) -> bool:
    return next(actor.module.parameters()).dtype in REUSE_LOGITS_DTYPES and not getattr(actor, "_gen_logits_off", False)


@torch.no_grad()
def generate(actor, prompts: list[list[int]], encoder, gen_cfg: GenerationConfig, keep_logits: bool = True) -> dict:
    """Answers for this rank's prompts. Generation stops once every sequence (on every rank, under ZeRO-3)
    has emitted EOS or reached the length limit. Returns the rollout batch on the training device:
    seq, attention_mask [B, P+W], answers, action_mask [B, W], has_eos [B], prompt_width P, and in fp32
    gen_logits [B, W, V], the raw logits each answer token was sampled from (unless keep_logits=False:
    a fused actor forward gives the log-probabilities)."""
    batch = {k: v.to(ds.device()) for k, v in collate_prompts(prompts, encoder.pad_id).items()}
    zero3 = actor.zero_optimization_stage() == 3
    keep = keep_logits and reuses_generation_logits(actor)
    with generation_mode(actor) as model, only_our_settings(model):
        # synced_gpus: under ZeRO-3 a rank whose answers are done keeps stepping until all ranks are.
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=gen_cfg, synced_gpus=zero3 and ds.world_size() > 1,
                             output_logits=keep, return_dict_in_generate=keep)
    seqs = out.sequences if keep else out
    P = batch["input_ids"].shape[1]
    answers = seqs[:, P:]
    lengths, has_eos = response_lengths(answers, encoder.eos_id)
    action_mask = mask_from_lengths(lengths, answers.shape[1])
    answers = answers.masked_fill(action_mask == 0, encoder.pad_id)
    b = {"seq": torch.cat([batch["input_ids"], answers], dim=1),
         "attention_mask": torch.cat([batch["attention_mask"], action_mask], dim=1),
         "answers": answers, "action_mask": action_mask, "has_eos": has_eos, "prompt_width": P}
    if keep:
        b["gen_logits"] = torch.stack(out.logits, dim=1)
    return b


def model_inputs(b: dict) -> dict:
    return {"input_ids": b["seq"], "attention_mask": b["attention_mask"],
            "position_ids": position_ids_from_mask(b["attention_mask"])}


def answer_logits(actor, b: dict, temperature: float) -> torch.Tensor:
    """Logits that predicted each answer token, [B, W, V], divided by the sampling temperature so that
    log-probabilities are those of the distribution the rollout sampled from."""
    W = b["answers"].shape[1]
    # Answers end the sequence, so only the last W + 1 positions need the LM head.
    logits = actor(**model_inputs(b), use_cache=False, logits_to_keep=W + 1).logits[:, :-1]
    return logits / temperature if temperature != 1.0 else logits


def answer_values(critic, b: dict) -> torch.Tensor:
    """Critic value of the state before each answer token, [B, W] (the score head's per-token outputs)."""
    P, W = b["prompt_width"], b["answers"].shape[1]
    return token_scores(critic, **model_inputs(b))[:, P - 1:P + W - 1].float()


def final_scores(reward, b: dict) -> torch.Tensor:
    """Reward-model score at the last real token of prompt + answer (the EOS, or the last token of a
    cut answer), [B] fp32."""
    return sequence_rewards(reward, **model_inputs(b))


# Rows per experience forward (reference, reward model, the actor's and critic's unfused forwards). The
# rollout is padded to its longest answer; a group estimator's K answers per prompt make it large (16
# prompts x 8 = 128 rows) and one answer run to --max_answer_seq_len made every row cost that length:
# a 5M-parameter GRPO step spent 25 s there against 3 s generating. Forwards of EXPERIENCE_ROWS rows of
# similar length, each cut to its own longest answer, do the same work without the padding. The count
# of forwards depends only on the rows per rank, the same on every rank (ZeRO-3 forwards are collective).
EXPERIENCE_ROWS = 16


def length_chunks(b: dict, rows: int = EXPERIENCE_ROWS):
    """(row indices, sub-batch) of at most `rows` rows each, sorted by answer length, every sub-batch cut
    to its longest answer (prompts keep their common left-padded width)."""
    lengths = b["action_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    P = b["prompt_width"]
    for start in range(0, len(order), rows):
        idx = order[start:start + rows]
        w = max(int(lengths[idx].max()), 1)
        yield idx, {"seq": b["seq"][idx, :P + w], "attention_mask": b["attention_mask"][idx, :P + w],
                    "answers": b["answers"][idx, :w], "action_mask": b["action_mask"][idx, :w], "prompt_width": P}


def by_length(fn, b: dict, rows: int = EXPERIENCE_ROWS) -> torch.Tensor:
    """fn(sub-batch) over length_chunks, put back in the rollout's row order at its full answer width:
    [B] outputs as they are, [B, w, ...] ones zero-filled past each chunk's width (under the action mask)."""
    B, W = b["answers"].shape
    out = None
    for idx, sub in length_chunks(b, rows):
        y = fn(sub)
        if out is None:
            out = y.new_zeros((B,) if y.dim() == 1 else (B, W) + tuple(y.shape[2:]))
        if y.dim() == 1:
            out[idx] = y
        else:
            out[idx, :y.shape[1]] = y
    return out


@torch.no_grad()
def experience(models, b: dict, temperature: float, critic: bool = True,
               actor_logits: torch.Tensor | None = None, keep_ref_logits: bool = False) -> dict:
    """Forward passes of the rollout batch through reference, critic and reward model (those that exist:
    without a reference ref_logp is absent, without a critic values, without a reward model the model
    score is 0 and the rule-based rewards are the whole score), and through the actor unless generation
    kept its logits (fp32). The first time generation's logits are used, they are checked against the
    actor's forward once; beyond REUSE_TOLERANCE the run goes back to forwards. critic=False leaves the
    values to the critic's training forward (trainer.fuses_critic_forward); actor_logits, the detached
    logits of the actor's training forward (trainer.fuses_actor_forward), stand in for the actor's."""
    gen = b.pop("gen_logits", None)
    if actor_logits is not None:
        logits = actor_logits
    elif gen is not None:
        logits = gen / temperature if temperature != 1.0 else gen
        if not getattr(models.actor, "_gen_logits_checked", False):
            forward = answer_logits(models.actor, b, temperature)
            diff = float(((token_logprobs(logits, b["answers"]) - token_logprobs(forward, b["answers"]))
                          * b["action_mask"]).abs().max())
            diff = max(ds.all_gather_objects(diff))  # one decision on every rank: ZeRO-3 forwards are collective
            models.actor._gen_logits_checked = True
            models.actor._gen_logits_off = diff > REUSE_TOLERANCE
            ds.print0(f"generation log-probs vs the actor's forward: max |difference| {diff:.2e} "
                      f"({'above' if diff > REUSE_TOLERANCE else 'within'} {REUSE_TOLERANCE:g}: "
                      f"{'the experience forward stays' if diff > REUSE_TOLERANCE else 'reused, no experience forward'})")
            logits = forward if diff > REUSE_TOLERANCE else logits
    else:
        logits = by_length(lambda sub: answer_logits(models.actor, sub, temperature), b)
    logp = token_logprobs(logits, b["answers"])
    out = {"logp": logp, "entropy": entropy_from_logits(logits)}
    if models.ref is not None:
        ref_logits = by_length(lambda sub: answer_logits(models.ref, sub, temperature), b)
        out["ref_logp"] = token_logprobs(ref_logits, b["answers"])
        if keep_ref_logits:  # the anchor's full-vocabulary KL (--anchor_coef)
            out["ref_logits"] = ref_logits
    if models.critic is not None and critic:
        out["values"] = by_length(lambda sub: answer_values(models.critic, sub), b)
    out["score"] = (by_length(lambda sub: final_scores(models.reward, sub), b) if reads_actor_ids(models)
                    else torch.zeros(logp.shape[0], dtype=torch.float32, device=logp.device))
    return out


def reads_actor_ids(models) -> bool:
    """The reward model scores the rollout's own token ids: it shares the actor's tokenizer and template.
    One that does not (`models.reward_encoder`) scores the answers as text (`text_scores`)."""
    return models.reward is not None and models.reward_encoder is None


def text_scores(models, tokenizer, b: dict, items: list[PromptItem]) -> torch.Tensor:
    """Scores of a reward model with its own tokenizer or template, [B] fp32: each answer decoded, put after
    its prompt's turns in the reward model's template and tokenized by its tokenizer (`reply_ids`), read at
    its reply-end token, or at the last token of an answer cut at the length limit."""
    texts, _ = completions(tokenizer, b)
    enc = models.reward_encoder
    seqs = []
    for it, text, ended in zip(items, texts, b["has_eos"].tolist()):
        try:
            seqs.append(reply_ids(enc, it.messages, text.strip(), bool(ended), models.reward_limit))
        except UserError as e:  # a template that refuses some answers: name the reward model, row and answer
            raise at_record(it.where, UserError(f"--reward_model_name_or_path: {e}; answer {text.strip()!r}")) from None
    device = b["answers"].device
    return torch.tensor(score_ids(models.reward, seqs, enc.pad_id, EXPERIENCE_ROWS, device=device),
                        dtype=torch.float32, device=device)


def completions(tokenizer, b: dict) -> tuple[list[str], list[list[int]]]:
    """Each answer as reward functions receive it: the decoded text without its EOS (special tokens
    skipped), and the generated ids with the EOS."""
    texts, ids = [], []
    for i in range(b["answers"].shape[0]):
        n = int(b["action_mask"][i].sum())
        row = b["answers"][i, :n].tolist()
        ids.append(row)
        texts.append(tokenizer.decode(row[:-1] if bool(b["has_eos"][i]) else row, skip_special_tokens=True))
    return texts, ids


def rule_scores(funcs, tokenizer, b: dict, items: list[PromptItem], max_len: int) -> tuple[torch.Tensor, dict]:
    """The weighted sum of the --reward_funcs for every answer of the batch ([B] fp32 on the batch's
    device) and each function's values (lists, None where a function does not apply)."""
    texts, ids = completions(tokenizer, b)
    prompts, answers = as_trl_inputs([it.text for it in items], [it.turns for it in items], texts)
    total, per_func = score_with_funcs(funcs, prompts, answers, [it.columns for it in items], ids, max_len,
                                       [it.where for it in items])
    return torch.tensor(total, dtype=torch.float32, device=b["answers"].device), per_func


# ----------------------------------------------------------------------------- buffer samples

def split_samples(b: dict, fields: dict) -> list[dict]:
    """One dict per row with its prompt, answer and per-token fields cut to the answer's length, so rows of
    different rollouts can be mixed into mini-batches."""
    out = []
    P = b["prompt_width"]
    # One device-to-host copy per tensor and one sync for the lengths, not one per row and field.
    seq, mask, answers = b["seq"].cpu(), b["attention_mask"].cpu(), b["answers"].cpu()
    # Per-token fields over the vocabulary (the anchor's reference logits) stay where they are: the copy
    # out and back would cost more than the rows' mixing saves.
    fields = {k: v.cpu() if v.dim() < 3 else v for k, v in fields.items()}
    for i, n in enumerate(b["action_mask"].sum(-1).tolist()):
        row = {"prompt": seq[i, :P][mask[i, :P].bool()], "answer": answers[i, :n]}
        row.update({k: v[i, :n] for k, v in fields.items()})
        out.append(row)
    return out


def collate_samples(rows: list[dict], pad_id: int) -> dict:
    """Mini-batch in the rollout layout (prompts left-padded, answers right-padded); per-token fields
    right-padded with 0 under action_mask 0."""
    prompts = collate_prompts([r["prompt"].tolist() for r in rows], pad_id)
    answers = pad_batch([r["answer"].tolist() for r in rows], None, pad_id)
    W = answers["input_ids"].shape[1]
    b = {"seq": torch.cat([prompts["input_ids"], answers["input_ids"]], dim=1),
         "attention_mask": torch.cat([prompts["attention_mask"], answers["attention_mask"]], dim=1),
         "answers": answers["input_ids"], "action_mask": answers["attention_mask"],
         "prompt_width": prompts["input_ids"].shape[1]}
    for k in rows[0]:
        if k in ("prompt", "answer"):
            continue
        t = torch.zeros(len(rows), W, *rows[0][k].shape[1:], dtype=rows[0][k].dtype, device=rows[0][k].device)
        for i, r in enumerate(rows):
            t[i, :len(r[k])] = r[k]
        b[k] = t
    return {k: v.to(ds.device()) if torch.is_tensor(v) else v for k, v in b.items()}
