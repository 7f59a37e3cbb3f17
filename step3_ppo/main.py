"""Step 3: PPO with actor, critic, reference and reward models.

    deepspeed --num_gpus 2 step3_ppo/main.py --actor_model_name_or_path <step-1 dir> \
        --critic_model_name_or_path <step-2 dir> --data_path prompts.jsonl --output_dir out
    python step3_ppo/main.py ...   (one process)

Writes OUTPUT_DIR/actor (causal LM), OUTPUT_DIR/critic (sequence classification), OUTPUT_DIR/actor_ema
(with --enable_ema), args.json and metrics.jsonl.
"""
from __future__ import annotations

import os
import types

from transformers.utils import logging as hf_logging

from step1_sft.trainer import collate as sft_collate
from step3_ppo.config import GROUPS, REQUIRED
from step3_ppo.models import build_models, check_args, require_reward_model
from step3_ppo.trainer import train
from utils import ds
from utils.args import parse, resolve_data_settings
from utils.data import load_samples
from utils.encoding import Encoder, encode_all
from utils.errors import UserError, exit_on_user_error
from utils.model import load_tokenizer, save_hf
from utils.reward import export_pad_token_id
from utils.train import StepStream, start_run


def encode_prompts(samples, encoder: Encoder, max_len: int, what: str) -> list[list[int]]:
    """Prompt ids (template and generation prompt included). Over-long prompts follow --overlong; truncate
    keeps the last tokens, where the question and the generation prompt are (and a leading BOS)."""
    out, skipped, first = [], 0, None
    for s in samples:
        ids = encoder.encode_prompt(s.prompt)
        if len(ids) > max_len:
            if encoder.overlong == "error":
                raise UserError(f"{s.where}: prompt has {len(ids)} tokens, more than --max_prompt_seq_len "
                                f"{max_len} (--overlong error)")
            if encoder.overlong == "skip":
                skipped, first = skipped + 1, first or s.where
                continue
            head = [encoder.bos_id] if encoder.bos_id is not None and ids[0] == encoder.bos_id else []
            ids = head + ids[len(ids) - (max_len - len(head)):]
        out.append(ids)
    if skipped:
        ds.print0(f"{what}: skipped {skipped} of {len(samples)} prompts longer than --max_prompt_seq_len "
                  f"{max_len} (--overlong skip; first: {first})")
    if not out:
        raise UserError(f"{what}: no prompt fits in --max_prompt_seq_len {max_len}")
    return out


def check_tokenizers(actor_tok, other_path: str, what: str, trust_remote_code: bool) -> None:
    """Rollouts are token ids: the critic and reward model must read them with the actor's vocabulary."""
    other = load_tokenizer(other_path, trust_remote_code, what)
    if other.get_vocab() != actor_tok.get_vocab() or other.eos_token_id != actor_tok.eos_token_id:
        raise UserError(f"{what} '{other_path}' uses a different tokenizer from the actor; step 3 passes token "
                        "ids between the models, so they must share one (train step 2 from the step-1 model)")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse(GROUPS, "Step 3: PPO with actor, critic, reference and reward models", argv, required=REQUIRED)
    hf_logging.disable_progress_bar()
    check_args(args)
    rank, world = ds.init_distributed(args.seed)
    reward_path = args.reward_model_name_or_path or args.critic_model_name_or_path

    # Data first, so bad input fails before four models are loaded.
    tokenizer = load_tokenizer(args.actor_model_name_or_path, args.trust_remote_code, "--actor_model_name_or_path")
    for path, what in ((args.critic_model_name_or_path, "--critic_model_name_or_path"),
                       (reward_path, "--reward_model_name_or_path")):
        check_tokenizers(tokenizer, path, what, args.trust_remote_code)
    require_reward_model(reward_path, args.trust_remote_code)
    template, sft_len = resolve_data_settings(types.SimpleNamespace(template=args.template, max_seq_len=0),
                                              args.actor_model_name_or_path)
    encoder = Encoder(tokenizer, template, args.max_prompt_seq_len, args.overlong)
    prompts = encode_prompts(load_samples(args.data_path, "prompts", ds.print0), encoder, args.max_prompt_seq_len,
                             "prompts")
    eval_prompts = (encode_prompts(load_samples(args.eval_data_path, "prompts", ds.print0), encoder,
                                   args.max_prompt_seq_len, "eval prompts") if args.eval_data_path else [])
    stream = StepStream(prompts, args.per_device_generation_batch_size, args.generation_batches, list, args.seed)
    unsup = None
    if args.unsup_data_path:
        ptx_encoder = Encoder(tokenizer, template, args.max_prompt_seq_len + args.max_answer_seq_len, args.overlong)
        items = encode_all(load_samples(args.unsup_data_path, "sft", ds.print0), lambda s: (ptx_encoder.encode_sft(s),),
                           ptx_encoder, "unsup", ds.print0).items
        unsup = StepStream(items, args.per_device_training_batch_size, 1, lambda b: sft_collate(b, encoder.pad_id),
                           args.seed)
    total_steps = args.max_steps or stream.steps_for(args.num_train_epochs)
    updates_per_step = args.ppo_epochs * args.per_device_generation_batch_size * args.generation_batches // (
        args.per_device_training_batch_size * args.gradient_accumulation_steps)
    ds.print0(f"template={encoder.template} prompts={len(prompts)} eval_prompts={len(eval_prompts)} world={world} "
              f"steps={total_steps} optimizer_steps={total_steps * updates_per_step}")

    models = build_models(args, world, total_steps * updates_per_step, encoder.pad_id)
    resolved = {"template": encoder.template, "max_seq_len": max(sft_len, args.max_prompt_seq_len +
                                                                 args.max_answer_seq_len),
                "world_size": world, "total_steps": total_steps, "step": "ppo",
                "reward_model_name_or_path": reward_path, "actor_learning_rate": models.lr["actor"],
                "critic_learning_rate": models.lr["critic"]}
    logger = start_run(args, total_steps, resolved)
    train(args, models, encoder, stream, unsup, eval_prompts, logger, total_steps)
    logger.close()

    meta = {**vars(args), **resolved}
    save_hf(models.actor.module, tokenizer, os.path.join(args.output_dir, "actor"), meta)
    # As in step 2: the saved config's pad id is the one plain transformers needs to pool at the EOS.
    critic_config = models.critic.module.config.get_text_config()
    critic_config.pad_token_id = export_pad_token_id(tokenizer)
    save_hf(models.critic.module, tokenizer, os.path.join(args.output_dir, "critic"), meta)
    if models.ema is not None:
        save_hf(models.ema, tokenizer, os.path.join(args.output_dir, "actor_ema"), meta)
    ds.print0(f"saved {args.output_dir}/actor, critic{', actor_ema' if models.ema is not None else ''}")


if __name__ == "__main__":
    main()
    ds.finish()  # every rank finished and saved: exit without gloo teardown (see ds.finish)
