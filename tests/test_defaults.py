"""The size-scaled learning-rate rule (utils/lr.py) and the default values each step parses."""
from __future__ import annotations

import math

import pytest
import torch

from utils.errors import UserError
from utils.lr import LR_AT_7B, scaled_lr


class _Sized(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def test_scaled_lr_follows_the_square_root_rule_and_the_cap():
    # 7e9 / 7e7 = 100 -> sqrt = 10: ten times the 7B rate; 700 parameters would be 1e-5 x 3162, capped.
    assert scaled_lr("sft", _Sized(70_000_000)) == pytest.approx(1e-4)
    assert scaled_lr("dpo", _Sized(70_000_000)) == pytest.approx(1e-5)
    assert scaled_lr("sft", _Sized(700)) == 1e-3
    assert scaled_lr("actor", _Sized(5_000_000)) == pytest.approx(1e-6 * math.sqrt(1400))
    assert scaled_lr("critic", _Sized(5), 3e-4) == 3e-4  # an explicit rate is used as given
    with pytest.raises(UserError, match="must be >= 0"):
        scaled_lr("reward", _Sized(5), -1.0)
    assert set(LR_AT_7B) == {"sft", "reward", "dpo", "actor", "critic"}


def test_alignment_defaults_are_what_the_suite_measured():
    """bench/alignment/results.md was produced with these values; changing one means rerunning it."""
    from dpo.main import DPOArgs
    from step2_reward.main import RewardArgs
    from step3_ppo.config import PPOArgs

    from dpo.main import parse_args as dpo_args
    from step1_sft.main import parse_args as sft_args

    flags = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "/tmp/_unused_out"]
    assert dpo_args(flags).freeze_embeddings == "both" and sft_args(flags).freeze_embeddings == "none"
    assert not sft_args(flags).disable_dropout and dpo_args(flags).disable_dropout  # SFT keeps the model's own
    assert sft_args(flags + ["--disable_dropout"]).disable_dropout
    assert DPOArgs().rpo_alpha == 1.0 and DPOArgs().beta == 0.1 and DPOArgs().displacement_warn_nats == 2.0
    assert RewardArgs().synthetic_negatives == 1.0
    # One definition of the negatives' flags (utils/negatives.NegativeArgs); DPO's are off by default.
    from step2_reward.main import parse_args as reward_args
    assert reward_args(flags).synthetic_negatives == 1.0 and dpo_args(flags).synthetic_negatives == 0.0
    assert dpo_args(flags).synthetic_negative_kinds == reward_args(flags).synthetic_negative_kinds
    assert tuple(RewardArgs().synthetic_negative_kinds) == ("drop", "drop_span", "repeat", "repeat_span", "truncate",
                                                               "empty")
    assert PPOArgs().actor_learning_rate == 0.0 and PPOArgs().critic_learning_rate == 0.0
    assert PPOArgs().kl_coef == 0.1 and PPOArgs().kl_estimator == "k1"
    assert LR_AT_7B == {"sft": 1e-5, "reward": 1e-5, "dpo": 1e-6, "actor": 1e-6, "critic": 1e-6}


def test_every_step_has_the_one_dropout_flag():
    """--disable_dropout is the shared ModelArgs flag in all four steps (one definition); SFT keeps the
    model's own dropout unless asked, the other steps turn it off unless asked."""
    from dpo.main import parse_args as dpo_args
    from step1_sft.main import parse_args as sft_args
    from step2_reward.main import parse_args as reward_args
    from step3_ppo.main import parse_args as ppo_args

    flags = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "/tmp/_unused_out"]
    ppo = ["--actor_model_name_or_path", "m", "--critic_model_name_or_path", "c", "--data_path", "d",
           "--output_dir", "/tmp/_unused_out"]
    for parse, argv in ((sft_args, flags), (reward_args, flags), (dpo_args, flags), (ppo_args, ppo)):
        assert parse(argv).disable_dropout is (parse is not sft_args), parse
        assert parse(argv + ["--no-disable_dropout"]).disable_dropout is False, parse
        assert parse(argv + ["--disable_dropout"]).disable_dropout is True, parse


def test_default_lengths_fit_a_model_with_fewer_positions(tmp_path):
    """A model of 96 positions (a tiny config's n_positions) was refused with the default max_seq_len 512
    and step 3's 256 + 256: the defaults now shrink to the model; lengths the user gave are not changed."""
    import types

    from transformers import GPT2Config

    from step3_ppo.config import resolve_lengths
    from step3_ppo.main import with_lengths
    from utils.args import resolve_data_settings

    model = str(tmp_path / "m")
    GPT2Config(n_positions=96, n_embd=8, n_layer=1, n_head=1).save_pretrained(model)
    flags = types.SimpleNamespace(template="hh", max_seq_len=0)
    assert resolve_data_settings(flags, model, 96) == ("hh", 96)
    assert resolve_data_settings(flags, model, 4096) == ("hh", 512)
    assert resolve_data_settings(types.SimpleNamespace(template="hh", max_seq_len=300), model, 96) == ("hh", 300)

    assert resolve_lengths(0, 0, None) == resolve_lengths(0, 0, 4096) == (256, 256)
    assert resolve_lengths(0, 0, 96) == (48, 48)
    assert resolve_lengths(0, 16, 96) == (80, 16) and resolve_lengths(64, 0, 96) == (64, 32)
    assert resolve_lengths(64, 64, 96) == (64, 64)  # given: kept, and check_positions refuses them
    args = types.SimpleNamespace(actor_model_name_or_path=model, trust_remote_code=False, max_prompt_seq_len=0,
                                 max_answer_seq_len=40)
    run = with_lengths(args)
    assert (run.max_prompt_seq_len, run.max_answer_seq_len) == (56, 40)
    assert (args.max_prompt_seq_len, args.max_answer_seq_len) == (0, 40)  # the parsed flags are not changed
