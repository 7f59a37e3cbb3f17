"""Step 3: PPO with actor, critic, reference and reward models, or a critic-free estimator
(GRPO, Dr. GRPO, RLOO, REINFORCE++) with a reward model and/or rule-based reward functions.

    deepspeed --num_gpus 2 step3_ppo/main.py --actor_model_name_or_path <step-1 dir> \
        --critic_model_name_or_path <step-2 dir> --data_path prompts.jsonl --output_dir out
    deepspeed --num_gpus 2 step3_ppo/main.py --actor_model_name_or_path <step-1 dir> --advantage_estimator grpo \
        --n_samples_per_prompt 8 --reward_funcs utils.reward_funcs:exact_match --data_path rows_with_answer.jsonl \
        --output_dir out
    python step3_ppo/main.py ...   (one process)

Writes OUTPUT_DIR/actor (causal LM), OUTPUT_DIR/critic (sequence classification, PPO only),
OUTPUT_DIR/actor_ema (with --enable_ema), args.json and metrics.jsonl.
"""
from __future__ import annotations

import argparse
import os
import types

from transformers.utils import logging as hf_logging

from step1_sft.trainer import collate as sft_collate
from step3_ppo.config import (DEFAULT_ANSWER_LEN, DEFAULT_PROMPT_LEN, GROUPS, REQUIRED, critic_warmup_steps,
                              resolve_lengths)
from step3_ppo.models import build_models, check_args, require_reward_model
from step3_ppo.rollout import PromptItem
from step3_ppo.trainer import train
from utils import ds
from utils.args import args_record, inherited, parse, resolve_data_settings
from utils.data import load_samples
from utils.encoding import Encoder, encode_all, without_special_text
from utils.errors import UserError, at_record, exit_on_user_error
from utils.model import check_positions, load_tokenizer, model_positions, position_limit, save_hf
from utils.output import check_output_dir, partial_dir
from utils.reward import cut_left, export_pad_token_id, reply_ids
from utils.reward_funcs import as_trl_inputs, call_reward_func, load_reward_funcs
from utils.stream import StepStream
from utils.train import finish_run, start_run


def encode_prompts(samples, encoder: Encoder, max_len: int, what: str) -> list[list[int]]:
    """Prompt ids (template and generation prompt included). Over-long prompts follow --overlong; truncate
    keeps the last tokens, where the question and the generation prompt are (and a leading BOS)."""
    return [ids for _, ids in _encoded_prompts(samples, encoder, max_len, what)]


def prompt_items(samples, encoder: Encoder, max_len: int, what: str) -> list[PromptItem]:
    """encode_prompts' ids with what the reward functions need: the prompt's last turn, the row's other
    fields and its file:line."""
    return [PromptItem(ids, s.prompt[-1]["content"], s.columns or {}, s.where,
                       tuple(s.prompt) if s.conversational else None, tuple(s.prompt))
            for s, ids in _encoded_prompts(samples, encoder, max_len, what)]


def _encoded_prompts(samples, encoder: Encoder, max_len: int, what: str) -> list[tuple]:
    out, skipped, first, cut, first_cut = [], 0, None, 0, None
    for _, s in without_special_text(samples, encoder, what, ds.print0, prompt_only=True):
        try:
            ids = encoder.encode_prompt(s.prompt)
        except UserError as e:  # a chat template that refuses the record: name the record
            raise at_record(s.where, e) from None
        if len(ids) > max_len:
            if encoder.overlong == "error":
                raise UserError(f"{s.where}: prompt has {len(ids)} tokens, more than --max_prompt_seq_len "
                                f"{max_len} (--overlong error)")
            if encoder.overlong == "skip":
                skipped, first = skipped + 1, first or s.where
                continue
            ids = cut_left(ids, max_len, encoder.bos_id)
            cut, first_cut = cut + 1, first_cut or s.where
        out.append((s, ids))
    if cut:
        ds.print0(f"{what}: cut {cut} of {len(samples)} prompts to their last {max_len} tokens (--max_prompt_seq_len; "
                  f"--overlong truncate: the start of the conversation, a system turn included, is lost; first: "
                  f"{first_cut})")
    if skipped:
        ds.print0(f"{what}: skipped {skipped} of {len(samples)} prompts longer than --max_prompt_seq_len "
                  f"{max_len} (--overlong skip; first: {first})")
    if not out:
        raise UserError(f"{what}: no prompt fits in --max_prompt_seq_len {max_len}")
    return out


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def check_critic_tokenizer(actor_tok, path: str, trust_remote_code: bool) -> None:
    """The critic gives a value per actor token: it must read the rollout's ids with the actor's vocabulary."""
    if not same_tokenizer(actor_tok, load_tokenizer(path, trust_remote_code, "--critic_model_name_or_path")):
        raise UserError(f"--critic_model_name_or_path '{path}' uses a different tokenizer from the actor; the critic "
                        "values every actor token, so it must share the actor's tokenizer: start it from the step-1 "
                        "model (or a step-2 model trained from it), and give a reward model with its own tokenizer "
                        "as --reward_model_name_or_path")


def reward_reader(actor_tok, template: str, path: str, trust_remote_code: bool):
    """(None, None) where the reward model reads the rollout's token ids: it has the actor's tokenizer and was
    trained on the actor's template (or records none). Otherwise (its own Encoder, its positions): it scores
    every answer as text, rendered with its own template and tokenizer (rollout.text_scores), as a reward
    model trained elsewhere, on another family's tokenizer, must be read."""
    what = "--reward_model_name_or_path"
    tok = load_tokenizer(path, trust_remote_code, what)
    theirs = inherited(path).get("template") or "auto"
    same = same_tokenizer(actor_tok, tok)
    if same and theirs in ("auto", template):
        return None, None
    try:
        enc = Encoder(tok, theirs, 0)
    except UserError as e:
        raise UserError(f"{what} '{path}': {e}") from None
    limit = position_limit(path, trust_remote_code)
    ds.print0(f"{what} '{path}' has {'the template ' + enc.template if same else 'a tokenizer of its own'}: it "
              f"scores every answer as text, after the prompt in its template '{enc.template}'"
              + (f" (at most {limit} tokens, a longer prompt cut from the start)" if limit else ""))
    return enc, limit


def check_reward_prompts(enc: Encoder, items: list[PromptItem], limit: int | None) -> None:
    """Render every prompt as the text-reading reward model will (with an empty answer), so a template of
    its that refuses a row stops the run before any model is loaded, naming the row."""
    for it in items:
        special = enc.special_text_in(m["content"] for m in it.messages)
        if special is not None:  # its tokenizer would read that text as its special tokens (a turn end)
            raise UserError(f"{it.where}: --reward_model_name_or_path: the prompt holds text its tokenizer reads as "
                            f"a special token ({special!r}); step 2 drops such rows, fix or remove the row")
        try:
            reply_ids(enc, it.messages, "", True, limit)
        except UserError as e:
            raise at_record(it.where, UserError(f"--reward_model_name_or_path: {e}")) from None


def with_lengths(args):
    """The run's settings with --max_prompt_seq_len and --max_answer_seq_len resolved (`resolve_lengths`;
    a copy: the parsed flags are never changed). args.json records the lengths the run used."""
    found = model_positions(args.actor_model_name_or_path, args.trust_remote_code)
    prompt, answer = resolve_lengths(args.max_prompt_seq_len, args.max_answer_seq_len, found and found[0])
    if found is not None and (prompt, answer) != (args.max_prompt_seq_len or DEFAULT_PROMPT_LEN,
                                                  args.max_answer_seq_len or DEFAULT_ANSWER_LEN):
        ds.print0(f"--max_prompt_seq_len {prompt} --max_answer_seq_len {answer}: fitted to the {found[0]} positions "
                  f"of --actor_model_name_or_path (config.json {found[1]})")
    return argparse.Namespace(**{**vars(args), "max_prompt_seq_len": prompt, "max_answer_seq_len": answer})


def check_reward_funcs(funcs, items: list[PromptItem], max_len: int, chunk: int = 512) -> None:
    """Call every reward function on every prompt row with an empty answer, in batches, so a function
    that cannot run on some row (a missing column, an `answer` without a number in row 900) stops the run
    before any model is loaded, naming the row, rather than mid-run."""
    for f in funcs:
        for i in range(0, len(items), chunk):
            part = items[i:i + chunk]
            prompts, answers = as_trl_inputs([it.text for it in part], [it.turns for it in part], [""] * len(part))
            call_reward_func(f, prompts, answers, [it.columns for it in part], [[] for _ in part], max_len,
                             [it.where for it in part])


def check_critic_template(template: str, path: str | None) -> None:
    """The critic reads the text the actor's template renders: refuse one trained (args.json) on another
    template, whose values would start from text it never saw. (A reward model on another template reads
    the answers as text in its own: `reward_reader`.)"""
    theirs = inherited(path).get("template") if path else None
    if theirs and theirs != "auto" and theirs != template:
        raise UserError(f"--critic_model_name_or_path '{path}' was trained with --template {theirs}, and step 3 "
                        f"renders the prompts with {template}: its values would be of text it never saw; give step 3 "
                        f"--template {theirs} or train it with --template {template}")


def parse_args(argv=None):
    return parse(GROUPS, "Step 3: PPO with actor, critic, reference and reward models, or a critic-free "
                         "estimator (GRPO, Dr. GRPO, RLOO, REINFORCE++)", argv, required=REQUIRED)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    algo = check_args(args)
    ds.check_launch_env()  # before the output lock, which only rank 0 takes
    check_output_dir(args)
    funcs = load_reward_funcs(args.reward_funcs, args.reward_weights)
    rank, world = ds.init_distributed(args.seed)

    # Data first, so bad input fails before the models are loaded.
    tokenizer = load_tokenizer(args.actor_model_name_or_path, args.trust_remote_code, "--actor_model_name_or_path")
    critic_path = args.critic_model_name_or_path if algo.critic else None
    if critic_path is not None:
        check_critic_tokenizer(tokenizer, critic_path, args.trust_remote_code)
    if algo.reward_model is not None:
        require_reward_model(algo.reward_model, args.trust_remote_code)
    template, sft_len = resolve_data_settings(types.SimpleNamespace(template=args.template, max_seq_len=0),
                                              args.actor_model_name_or_path)
    args = with_lengths(args)
    check_positions(args.actor_model_name_or_path, args.max_prompt_seq_len + args.max_answer_seq_len,
                    "--max_prompt_seq_len + --max_answer_seq_len", "--actor_model_name_or_path", args.trust_remote_code)
    encoder = Encoder(tokenizer, template, args.max_prompt_seq_len, args.overlong)
    check_critic_template(encoder.template, critic_path)
    reward_encoder, reward_limit = (reward_reader(tokenizer, encoder.template, algo.reward_model,
                                                  args.trust_remote_code) if algo.reward_model else (None, None))
    # The critic, and a reward model that reads the rollout's ids, see the whole prompt + answer: a model of
    # fewer positions failed mid-run, after the first rollout, with an IndexError in its position table (a
    # rotary one silently read positions it was never trained on). A text-reading one cuts its own input.
    for path, what in ((critic_path, "--critic_model_name_or_path"),
                       (algo.reward_model if reward_encoder is None else None, "--reward_model_name_or_path")):
        if path is not None:
            check_positions(path, args.max_prompt_seq_len + args.max_answer_seq_len,
                            "--max_prompt_seq_len + --max_answer_seq_len", what, args.trust_remote_code)
    prompts = prompt_items(load_samples(args.data_path, "prompts", ds.print0), encoder, args.max_prompt_seq_len,
                           "prompts")
    eval_prompts = (prompt_items(load_samples(args.eval_data_path, "prompts", ds.print0), encoder,
                                 args.max_prompt_seq_len, "eval prompts") if args.eval_data_path else [])
    check_reward_funcs(funcs, prompts + eval_prompts, args.max_answer_seq_len)
    if reward_encoder is not None:
        check_reward_prompts(reward_encoder, prompts + eval_prompts, reward_limit)
    stream = StepStream(prompts, args.per_device_generation_batch_size, args.generation_batches, list, args.seed)
    unsup = None
    if args.unsup_data_path:
        ptx_encoder = Encoder(tokenizer, template, args.max_prompt_seq_len + args.max_answer_seq_len, args.overlong)
        items = encode_all(load_samples(args.unsup_data_path, "sft", ds.print0), lambda s: (ptx_encoder.encode_sft(s),),
                           ptx_encoder, "unsup", ds.print0).items
        unsup = StepStream(items, args.per_device_training_batch_size, 1, lambda b: sft_collate(b, encoder.pad_id),
                           args.seed)
    total_steps = args.max_steps or stream.steps_for(args.num_train_epochs)
    updates_per_step = args.ppo_epochs * args.per_device_generation_batch_size * args.generation_batches * algo.k // (
        args.per_device_training_batch_size * args.gradient_accumulation_steps)
    ds.print0(f"template={encoder.template} prompts={len(prompts)} eval_prompts={len(eval_prompts)} world={world} "
              f"steps={total_steps} optimizer_steps={total_steps * updates_per_step} estimator={algo.estimator} "
              f"k={algo.k} scale_rewards={algo.scale} loss_agg={algo.loss_agg} critic={algo.critic} "
              f"reference={algo.reference} reward_model={algo.reward_model} reward_funcs={[f.name for f in funcs]} "
              f"cut_answer_score={algo.cut_score} temperature={algo.temperature}")

    warmup = critic_warmup_steps(args, algo, total_steps)
    if warmup:
        ds.print0(f"critic warm-up: the first {warmup} of {total_steps} steps train only the critic "
                  "(--critic_warmup_steps)")
    models = build_models(args, algo, world, total_steps * updates_per_step, encoder.pad_id, reward_encoder,
                          reward_limit)
    resolved = {"template": encoder.template, "max_seq_len": max(sft_len, args.max_prompt_seq_len +
                                                                 args.max_answer_seq_len),
                "world_size": world, "total_steps": total_steps, "step": "ppo",
                "reward_model_name_or_path": algo.reward_model, "resolved_scale_rewards": algo.scale,
                "resolved_loss_agg": algo.loss_agg, "resolved_critic_warmup_steps": warmup,
                "resolved_cut_answer_score": algo.cut_score, "resolved_temperature": algo.temperature,
                **{f"{k}_learning_rate": v for k, v in models.lr.items()}}
    logger = start_run(args, total_steps, resolved)
    train(args, algo, models, encoder, stream, unsup, eval_prompts, funcs, logger, total_steps, warmup)
    logger.close()

    meta, out = args_record(args, resolved), partial_dir(args.output_dir)
    save_hf(models.actor.module, tokenizer, os.path.join(out, "actor"), meta, encoder)
    saved = ["actor"]
    if models.critic is not None:
        # As in step 2: the saved config's pad id is the one plain transformers needs to pool at the EOS.
        critic_config = models.critic.module.config.get_text_config()
        critic_config.pad_token_id = export_pad_token_id(tokenizer, encoder.eos_id)
        save_hf(models.critic.module, tokenizer, os.path.join(out, "critic"), meta, encoder)
        saved.append("critic")
    if models.ema is not None:
        save_hf(models.ema, tokenizer, os.path.join(out, "actor_ema"), meta, encoder, dtype=args.dtype)
        saved.append("actor_ema")
    finish_run(args, resolved)
    ds.print0(f"saved {args.output_dir}/{{{', '.join(saved)}}}")


if __name__ == "__main__":
    main()
    ds.finish()  # every rank finished and saved: exit without gloo teardown (see ds.finish)
