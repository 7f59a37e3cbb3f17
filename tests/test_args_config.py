"""Argument parsing (--config files, flags win), DeepSpeed config arithmetic, inheritance of settings."""
from __future__ import annotations

import json

import pytest

from utils.args import SHARED_GROUPS, parse, resolve_data_settings
from utils.ds import ds_config, ds_eval_config
from utils.errors import UserError

BASE = ["--model_name_or_path", "m", "--data_path", "a.jsonl", "--output_dir", "o"]


def test_config_file_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.5\nzero_stage: 3\noffload: true\ndata_path: [x.jsonl, y.jsonl]\n")
    ns = parse(SHARED_GROUPS, "t", ["--config", str(cfg), "--model_name_or_path", "m", "--output_dir", "o",
                                    "--zero_stage", "1"])
    assert ns.learning_rate == 0.5 and ns.offload is True and ns.zero_stage == 1
    assert ns.data_path == ["x.jsonl", "y.jsonl"]
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"learning_rate": 0.25}))
    assert parse(SHARED_GROUPS, "t", BASE + ["--config", str(j)]).learning_rate == 0.25


def test_config_errors(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"learning_rat": 1}))
    with pytest.raises(UserError, match="unknown keys learning_rat"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", str(bad)])
    with pytest.raises(UserError, match="does not exist"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", str(tmp_path / "none.yaml")])


def test_defaults_and_booleans():
    ns = parse(SHARED_GROUPS, "t", BASE)
    assert ns.trust_remote_code is False and ns.compute_fp32_loss is True
    ns = parse(SHARED_GROUPS, "t", BASE + ["--no-compute_fp32_loss", "--trust_remote_code"])
    assert ns.compute_fp32_loss is False and ns.trust_remote_code is True


def test_missing_required_flag_exits():
    with pytest.raises(SystemExit):
        parse(SHARED_GROUPS, "t", ["--output_dir", "o"], required=("model_name_or_path", "output_dir"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_ds_config_arithmetic(stage, offload, dtype):
    cfg = ds_config(stage=stage, offload=offload, dtype=dtype, micro_batch=4, grad_accum=3, world=8)
    assert cfg["train_batch_size"] == 4 * 3 * 8
    assert cfg["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in cfg["zero_optimization"]) == (offload and stage > 0)
    assert cfg.get("bf16", {}).get("enabled", False) == (dtype == "bf16")
    assert cfg.get("fp16", {}).get("enabled", False) == (dtype == "fp16")


def test_param_offload_needs_zero3():
    with pytest.raises(UserError, match="ZeRO stage 3"):
        ds_eval_config(stage=2, dtype="fp32", micro_batch=1, world=1, offload_params=True)
    cfg = ds_eval_config(stage=3, dtype="fp32", micro_batch=1, world=1, offload_params=True)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_inherits_template_and_length(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"template": "alpaca", "max_seq_len": 77}))
    ns = parse(SHARED_GROUPS, "t", BASE)
    assert resolve_data_settings(ns, str(tmp_path)) == ("alpaca", 77)
    ns = parse(SHARED_GROUPS, "t", BASE + ["--template", "raw", "--max_seq_len", "5"])
    assert resolve_data_settings(ns, str(tmp_path)) == ("raw", 5)
    ns = parse(SHARED_GROUPS, "t", BASE)
    assert resolve_data_settings(ns, str(tmp_path / "none")) == ("auto", 512)
