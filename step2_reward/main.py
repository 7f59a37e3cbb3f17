"""Step 2: a reward model trained with the pairwise Bradley-Terry loss, saved as a standard
`AutoModelForSequenceClassification` directory (num_labels=1).

    deepspeed --num_gpus 2 step2_reward/main.py --model_name_or_path SFT_DIR --data_path pairs.jsonl --output_dir out
    python step2_reward/main.py ...   (one process)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from transformers.utils import logging as hf_logging

from step2_reward.trainer import train
from utils import ds
from utils.args import SHARED_GROUPS, arg, args_record, parse
from utils.errors import UserError, exit_on_user_error
from utils.lr import lr_help
from utils.model import prepare_model, save_hf
from utils.negatives import NegativeArgs
from utils.output import check_output_dir, partial_dir
from utils.pairs import collate_pairs
from utils.reward import export_pad_token_id, load_reward_model
from utils.train import ds_config_from_args, finish_run, init_engine_from_args, load_step_items, start_run


@dataclass
class RewardArgs(NegativeArgs):
    center_rewards_coefficient: float = arg(0.0, "weight of the reward-centering term coef * (r_chosen + "
                                            "r_rejected)^2 (Eisenstein et al. 2023); 0 disables it", ge=0)
    shared_prompt_forward: bool = arg(False, "run each pair's prompt once and both replies on its cached keys/"
                                      "values (prompt + 2 replies tokens instead of 2 x (prompt + reply)); the same "
                                      "rewards to float rounding; not with --gradient_checkpointing")


def parse_args(argv=None):
    return parse((*SHARED_GROUPS, RewardArgs), "Step 2: reward model (pairwise loss on the last-token score)",
                 argv, required=("model_name_or_path", "data_path", "output_dir"),
                 helps={"learning_rate": lr_help("reward")})


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    ds.check_launch_env()  # before the output lock, which only rank 0 takes
    check_output_dir(args)
    if args.shared_prompt_forward and args.gradient_checkpointing:
        raise UserError("--shared_prompt_forward needs the KV cache, which --gradient_checkpointing turns off")
    if args.shared_prompt_forward and args.packing:
        raise UserError("--shared_prompt_forward and --packing are two different batch layouts; choose one")
    hf_logging.disable_progress_bar()
    rank, world = ds.init_distributed(args.seed)

    # Data: read and validate everything before the model is touched, so bad input fails fast.
    tokenizer, encoder, train_items, eval_items = load_step_items(args, "pairs", world)

    # Model and engine.
    cfg = ds_config_from_args(args, world)
    model = load_reward_model(args.model_name_or_path, pad_id=encoder.pad_id, dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code, zero3_config=cfg)
    model = prepare_model(model, args, task_type="SEQ_CLS")
    collate_fn = functools.partial(collate_pairs, pad_id=encoder.pad_id, shared_prompt=args.shared_prompt_forward)
    engine, stream, resolved = init_engine_from_args(args, "reward", model, cfg, train_items,
                                                     functools.partial(collate_fn, pack=args.packing), encoder, world)
    total_steps = resolved["total_steps"]

    # Train and save.
    logger = start_run(args, total_steps, resolved)
    train(args, engine, stream, eval_items, logger, collate_fn, total_steps)
    logger.close()
    # The saved config's pad id is the one plain transformers needs to pool at the EOS (see export_pad_token_id).
    export_pad = export_pad_token_id(tokenizer, encoder.eos_id)
    config = engine.module.config.get_text_config()
    if config.pad_token_id != export_pad:
        ds.print0(f"saved config.pad_token_id = {export_pad} (was {config.pad_token_id} for training batches; "
                  f"tokenizer pad={tokenizer.pad_token_id} eos={tokenizer.eos_token_id})")
        config.pad_token_id = export_pad
    save_hf(engine.module, tokenizer, partial_dir(args.output_dir), args_record(args, resolved), encoder)
    finish_run(args, resolved)


if __name__ == "__main__":
    main()
    ds.finish()  # every rank finished and saved: exit without gloo teardown (see ds.finish)
