"""DPO: preference optimisation of a step-1 model against a frozen reference (Rafailov et al. 2023).

    deepspeed --num_gpus 2 dpo/main.py --model_name_or_path SFT_DIR --data_path pairs.jsonl --output_dir out
    python dpo/main.py ...   (one process)

The reference defaults to the starting model itself (frozen, eval mode); --precompute_ref_logprobs
computes its log-probabilities once before training and frees it.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from dpo.trainer import precompute_reference, train
from utils import ds
from utils.args import SHARED_GROUPS, arg, args_record, parse
from utils.errors import UserError, exit_on_user_error
from utils.losses import DPO_LOSS_TYPES
from utils.lr import lr_help
from utils.model import disable_dropout, load_model, load_tokenizer, save_hf
from utils.output import check_output_dir, partial_dir
from utils.negatives import NegativeArgs
from utils.pairs import collate_pairs
from utils.train import finish_run, init_causal_lm_engine, load_step_items, start_run


@dataclass
class DPOArgs(NegativeArgs):
    ref_model_name_or_path: str = arg(None, "frozen reference model (same tokenizer); default: --model_name_or_path")
    loss_type: str = arg("sigmoid", "sigmoid: DPO paper; ipo: squared loss on per-token-average log-ratios; "
                         "hinge: SLiC", choices=list(DPO_LOSS_TYPES))
    beta: float = arg(0.1, "strength of the KL anchor to the reference (IPO: its tau, target margin 1/(2 beta))",
                      gt=0)
    label_smoothing: float = arg(0.0, "conservative DPO: assumed probability that a pair's labels are flipped "
                                 "(sigmoid only)", ge=0, lt=0.5)
    rpo_alpha: float = arg(1.0, "weight of the NLL of chosen responses per token (RPO), which keeps their "
                           "log-probabilities from falling (likelihood displacement); 0 disables", ge=0)
    anchor_coef: float = arg(5.0, "weight of the anchor: the KL from the reference's next-token distribution to "
                             "the policy's at every chosen-answer token but the one where it parts from the "
                             "rejected answer, per chosen token; it holds what the preference does not speak "
                             "about (a copied name, the answer's form); needs the live reference; 0 disables",
                             ge=0)
    precompute_ref_logprobs: bool = arg(False, "compute the reference log-probs once before training and free "
                                        "the reference model (faster steps, less memory)")
    displacement_warn_nats: float = arg(2.0, "warn once (log and metrics.jsonl) when the chosen answers' "
                                        "log-probability falls more than this many nats below the reference's "
                                        "(likelihood displacement); 0 disables", ge=0)


FREEZE_HELP = ("token embeddings kept fixed: input, output (the LM head), both, or none (tied embeddings are one "
               "matrix). DPO's default keeps both: "
               "raising a preferred word's pieces then stays in the contexts that were trained instead of "
               "leaking into every position (bench/alignment, README)")


DPO_NEGATIVES_HELP = ("extra training pairs per pair whose rejected answer is a corrupted copy of the chosen one "
                      "(see --synthetic_negative_kinds; utils/negatives.py): DPO then also pushes down broken "
                      "forms of the answers it raises (a word repeated or dropped); 0 disables")


def check_args(args) -> None:
    """Settings that cannot work together (each flag's own range is checked by `parse`)."""
    if args.label_smoothing and args.loss_type != "sigmoid":
        raise UserError(f"--label_smoothing applies to --loss_type sigmoid only, not {args.loss_type}")
    if args.anchor_coef and args.precompute_ref_logprobs:
        raise UserError(f"--precompute_ref_logprobs frees the reference model, whose next-token distributions the "
                        f"anchor (--anchor_coef {args.anchor_coef:g}) reads at every step: add --anchor_coef 0 to "
                        "precompute")
    if args.anchor_coef and args.packing:
        raise UserError(f"--packing: the anchor (--anchor_coef {args.anchor_coef:g}) is not computed on packed rows; "
                        "add --anchor_coef 0 to pack")


def load_reference(args, tokenizer, world: int):
    """The frozen reference as a DeepSpeed eval engine (sharded too under ZeRO-3)."""
    path = args.ref_model_name_or_path or args.model_name_or_path
    if path != args.model_name_or_path:
        ref_tok = load_tokenizer(path, args.trust_remote_code, what="--ref_model_name_or_path")
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"--ref_model_name_or_path '{path}' has a different tokenizer than "
                            f"--model_name_or_path; log-probabilities would not be comparable")
    cfg = ds.ds_eval_config(stage=args.zero_stage, dtype=args.dtype, micro_batch=args.per_device_train_batch_size,
                            world=world)
    what = "--ref_model_name_or_path" if args.ref_model_name_or_path else "--model_name_or_path (the reference)"
    ref = load_model(AutoModelForCausalLM, path, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                     zero3_config=cfg, what=what)
    ref.requires_grad_(False)
    if args.disable_dropout:
        disable_dropout(ref)
    return ds.init_eval_engine(ref, cfg)


def parse_args(argv=None):
    return parse((*SHARED_GROUPS, DPOArgs), "DPO: preference optimisation against a frozen reference", argv,
                 required=("model_name_or_path", "data_path", "output_dir"),
                 defaults={"learning_rate": 0.0, "freeze_embeddings": "both", "synthetic_negatives": 0.0},
                 helps={"learning_rate": lr_help("dpo"), "freeze_embeddings": FREEZE_HELP,
                        "synthetic_negatives": DPO_NEGATIVES_HELP})


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    ds.check_launch_env()  # before the output lock, which only rank 0 takes
    check_output_dir(args)
    hf_logging.disable_progress_bar()
    rank, world = ds.init_distributed(args.seed)

    # Data: chosen and rejected are each prompt + reply with only the reply and its EOS labelled.
    tokenizer, encoder, train_items, eval_items = load_step_items(
        args, "pairs", world, f" loss={args.loss_type} beta={args.beta}")

    # Reference: live engine, or log-probs attached to every item and the model freed.
    ref = load_reference(args, tokenizer, world)
    if args.precompute_ref_logprobs:
        bs = args.per_device_eval_batch_size
        train_items = precompute_reference(ref, train_items, bs, encoder.pad_id, args.compute_fp32_loss)
        eval_items = precompute_reference(ref, eval_items, bs, encoder.pad_id, args.compute_fp32_loss)
        ref.destroy()
        ref = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ds.print0("reference log-probs precomputed; reference model freed")

    # Policy and engine.
    engine, stream, resolved = init_causal_lm_engine(
        args, "dpo", train_items, lambda b: collate_pairs(b, encoder.pad_id, pack=args.packing), encoder, world)
    total_steps = resolved["total_steps"]

    # Train and save.
    logger = start_run(args, total_steps, resolved)
    train(args, engine, ref, stream, eval_items, logger, encoder.pad_id, total_steps)
    logger.close()
    save_hf(engine.module, tokenizer, partial_dir(args.output_dir), args_record(args, resolved), encoder)
    finish_run(args, resolved)


if __name__ == "__main__":
    main()
    ds.finish()  # every rank finished and saved: exit without gloo teardown (see ds.finish)
