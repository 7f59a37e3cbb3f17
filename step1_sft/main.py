"""Step 1: supervised fine-tuning on the response tokens of instruction data.

    deepspeed --num_gpus 2 step1_sft/main.py --model_name_or_path M --data_path d.jsonl --output_dir out
    python step1_sft/main.py ...   (one process)
"""
from __future__ import annotations

from transformers.utils import logging as hf_logging

from step1_sft.trainer import collate, train
from utils import ds
from utils.args import SHARED_GROUPS, args_record, parse
from utils.errors import exit_on_user_error
from utils.lr import lr_help
from utils.model import save_hf
from utils.output import check_output_dir, partial_dir
from utils.train import finish_run, init_causal_lm_engine, load_step_items, start_run

DROPOUT_HELP = "set every dropout rate of the model to 0 while training (the saved config keeps its values)"


def parse_args(argv=None):
    return parse(SHARED_GROUPS, "Step 1: supervised fine-tuning (loss on response tokens only)", argv,
                 required=("model_name_or_path", "data_path", "output_dir"),
                 defaults={"disable_dropout": False},
                 helps={"learning_rate": lr_help("sft"), "disable_dropout": DROPOUT_HELP})


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    ds.check_launch_env()  # before the output lock, which only rank 0 takes
    check_output_dir(args)
    hf_logging.disable_progress_bar()
    rank, world = ds.init_distributed(args.seed)

    # Data: read and validate everything before the model is touched, so bad input fails fast.
    tokenizer, encoder, train_items, eval_items = load_step_items(args, "sft", world)

    # Model and engine.
    engine, stream, resolved = init_causal_lm_engine(args, "sft", train_items,
                                                     lambda b: collate(b, encoder.pad_id, args.packing), encoder, world)
    total_steps = resolved["total_steps"]

    # Train and save.
    logger = start_run(args, total_steps, resolved)
    train(args, engine, stream, eval_items, logger, encoder.pad_id, total_steps)
    logger.close()
    save_hf(engine.module, tokenizer, partial_dir(args.output_dir), args_record(args, resolved), encoder)
    finish_run(args, resolved)


if __name__ == "__main__":
    main()
    ds.finish()  # every rank finished and saved: exit without gloo teardown (see ds.finish)
