"""Argument parsing (--config files, flags win), DeepSpeed config arithmetic, inheritance of settings."""
from __future__ import annotations

import json
import re

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
    with pytest.raises(UserError, match="unknown keys learning_rat; did you mean --learning_rate\\?"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", str(bad)])
    with pytest.raises(UserError, match="does not exist"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", str(tmp_path / "none.yaml")])


def test_defaults_and_booleans():
    ns = parse(SHARED_GROUPS, "t", BASE)
    assert ns.trust_remote_code is False and ns.compute_fp32_loss is True
    ns = parse(SHARED_GROUPS, "t", BASE + ["--no-compute_fp32_loss", "--trust_remote_code"])
    assert ns.compute_fp32_loss is False and ns.trust_remote_code is True


def test_missing_required_flag_is_a_user_error():
    with pytest.raises(UserError, match="^--model_name_or_path is required$"):
        parse(SHARED_GROUPS, "t", ["--output_dir", "o"], required=("model_name_or_path", "output_dir"))
    # argparse's own complaints are one line too (no usage block), naming the flag.
    with pytest.raises(UserError, match=r"^argument --zero_stage: invalid choice: 5 \(choose from 0, 1, 2, 3\)"):
        parse(SHARED_GROUPS, "t", BASE + ["--zero_stage", "5"])
    with pytest.raises(UserError, match="^argument --learning_rate: invalid float value: 'fast'"):
        parse(SHARED_GROUPS, "t", BASE + ["--learning_rate", "fast"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_ds_config_arithmetic(stage, offload, dtype):
    if offload and stage == 0:  # it was silently ignored
        with pytest.raises(UserError, match="--offload moves the optimizer states to the CPU, which needs "
                                            "--zero_stage >= 1"):
            ds_config(stage=stage, offload=offload, dtype=dtype, micro_batch=4, grad_accum=3, world=8)
        return
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


@pytest.mark.parametrize("text,message", [
    ("{not json", "'{d}/args.json' cannot be read (Expecting property name enclosed in double quotes: line 1 column 2 "
                  "(char 1)); this pipeline reads the template and max_seq_len"),
    ("[1, 2]", "'{d}/args.json' holds a list, not the mapping of flags this pipeline saves next to a model"),
    ('{"template": "qwen2_5", "max_seq_len": 1024}',
     "'{d}/args.json' names template 'qwen2_5', not one of this pipeline's (auto, chat, alpaca, hh, raw); give "
     "--template (the file may come from another tool)"),
    ('{"max_seq_len": "long"}', "'{d}/args.json' gives max_seq_len 'long', not a positive whole number; give "
                                "--max_seq_len"),
])
def test_an_args_json_another_tool_wrote_is_refused_in_one_line(tmp_path, text, message):
    """A model directory's args.json is read for the template and max_seq_len of the step that saved it;
    one another tool left there (ms-swift writes an args.json with a template of its own) was a traceback,
    or an error naming a flag the user never gave."""
    (tmp_path / "args.json").write_text(text)
    with pytest.raises(UserError) as e:
        resolve_data_settings(parse(SHARED_GROUPS, "t", BASE), str(tmp_path))
    assert str(e.value).startswith(message.format(d=tmp_path)), str(e.value)
    if "template" in text:  # given, the flag is not read from the file
        ns = parse(SHARED_GROUPS, "t", BASE + ["--template", "chat"])
        assert resolve_data_settings(ns, str(tmp_path)) == ("chat", 1024)
    ns = parse(SHARED_GROUPS, "t", BASE + ["--template", "chat", "--max_seq_len", "64"])
    assert resolve_data_settings(ns, str(tmp_path)) == ("chat", 64)  # both given: the file is not read


def test_a_config_file_that_is_not_utf8_and_a_negative_rate_in_exponent_notation_are_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("# r\xe9sum\xe9\nlearning_rate: 0.1\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"--config file '{cfg}' cannot be read: 'utf-8' codec can't decode byte 0xe9"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", str(cfg)])
    # argparse took "-1e-5" for a flag ("expected one argument"); the range check names it now.
    with pytest.raises(UserError, match=re.escape("--learning_rate must be >= 0, got -1e-05")):
        parse(SHARED_GROUPS, "t", BASE + ["--learning_rate", "-1e-5"])
    assert parse(SHARED_GROUPS, "t", BASE + ["--weight_decay", "1e-2"]).weight_decay == 0.01


# ----------------------------------------------------------------------------- one validation for flags and files

def write_config(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_values_get_the_flags_types(tmp_path):
    cfg = write_config(tmp_path, "data_path: data/sft.jsonl\nlearning_rate: 1e-5\nmax_steps: '7'\n"
                                 "offload: 'yes'\nnum_train_epochs: 2\neval_data_path: []\n")
    ns = parse(SHARED_GROUPS, "t", ["--config", cfg, "--model_name_or_path", "m", "--output_dir", "o"])
    assert ns.data_path == ["data/sft.jsonl"]  # a scalar where a list is expected: a one-element list
    assert ns.learning_rate == 1e-5 and isinstance(ns.learning_rate, float)  # YAML reads 1e-5 as a string
    assert ns.max_steps == 7 and ns.offload is True and ns.num_train_epochs == 2.0 and ns.eval_data_path == []


def test_a_comma_separated_flag_takes_a_yaml_list(tmp_path):
    cfg = write_config(tmp_path, "lora_dim: 8\nlora_module_name: [query_key_value, dense]\n")
    assert parse(SHARED_GROUPS, "t", BASE + ["--config", cfg]).lora_module_name == "query_key_value,dense"
    cfg = write_config(tmp_path, "lora_dim: 8\nlora_module_name: q_proj,v_proj\n", "d.yaml")
    assert parse(SHARED_GROUPS, "t", BASE + ["--config", cfg]).lora_module_name == "q_proj,v_proj"
    # step 3 copies the shared field (step3_ppo/config.py: only): the list form its help promises too
    from step3_ppo.main import parse_args

    cfg = write_config(tmp_path, "actor_lora_dim: 8\nlora_module_name: [q_proj, v_proj]\n", "p.yaml")
    ns = parse_args(["--config", cfg, "--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                     "--data_path", "p.jsonl", "--output_dir", "o"])
    assert ns.lora_module_name == "q_proj,v_proj"


@pytest.mark.parametrize("text,message", [
    ("zero_stage: 5", "key 'zero_stage': 5 is not one of 0, 1, 2, 3"),
    ("dtype: fp64", "key 'dtype': 'fp64' is not one of fp32, fp16, bf16"),
    ("learning_rate: -1", "key 'learning_rate': must be >= 0, got -1.0"),
    ("per_device_train_batch_size: 0", "key 'per_device_train_batch_size': must be >= 1, got 0"),
    ("eval_fraction: 1.5", "key 'eval_fraction': must be in (0, 1), got 1.5"),
    ("max_steps: 2.5", "key 'max_steps': expected an integer, got 2.5"),
    ("learning_rate: fast", "key 'learning_rate': expected a number, got 'fast'"),
    ("offload: maybe", "key 'offload': expected true/false, got 'maybe'"),
    ("zero_stage: true", "key 'zero_stage': expected an integer, got True"),
    ("data_path: [a.jsonl, true]", "key 'data_path': expected a string or a list of strings, got ['a.jsonl', True]"),
    ("template: [chat]", "key 'template': expected a string, got ['chat']"),
    ("lora_module_name: [q_proj, 3]", "key 'lora_module_name': expected a string, got ['q_proj', 3]"),
    ("seed: null", "key 'seed': expected an integer, got null"),
])
def test_bad_config_values_are_one_line_naming_the_key(tmp_path, text, message):
    cfg = write_config(tmp_path, text + "\n")
    with pytest.raises(UserError) as e:
        parse(SHARED_GROUPS, "t", BASE + ["--config", cfg])
    assert str(e.value) == f"--config file '{cfg}': {message}"


@pytest.mark.parametrize("flag,value,message", [
    ("--learning_rate", "-1", "--learning_rate must be >= 0, got -1.0"),  # 0 means scaled to the model size
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be >= 1, got 0"),
    ("--gradient_accumulation_steps", "-2", "--gradient_accumulation_steps must be >= 1, got -2"),
    ("--eval_fraction", "1", "--eval_fraction must be in (0, 1), got 1.0"),
    ("--adam_beta2", "1.0", "--adam_beta2 must be in [0, 1), got 1.0"),
    ("--max_grad_norm", "-0.5", "--max_grad_norm must be >= 0, got -0.5"),
    ("--num_train_epochs", "0", "--num_train_epochs must be > 0, got 0.0"),
    ("--log_interval", "0", "--log_interval must be >= 1, got 0"),
    ("--seed", "-1", "--seed must be in [0, 4294967295], got -1"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number >= 0, got nan"),
    ("--num_train_epochs", "inf", "--num_train_epochs must be a finite number > 0, got inf"),  # OverflowError
    ("--weight_decay", "inf", "--weight_decay must be a finite number >= 0, got inf"),  # a nan loss mid-run
    ("--data_path", "x.jsonl", "--data_path is given twice; give every value after one --data_path "
     "(--data_path A B)"),  # argparse kept only the last list
    # was read as --lr_scheduler_type; other trainers' names and typos are pointed at ours
    ("--lr", "3e-5", "unrecognized arguments: --lr 3e-5; this pipeline's flag: --learning_rate (see --help)"),
    ("--bf16", "--offload", "unrecognized arguments: --bf16; this pipeline's flag: --dtype bf16 (see --help)"),
    ("--warmup_ratio", "0.1", "unrecognized arguments: --warmup_ratio 0.1; this pipeline's flag: --num_warmup_steps, "
     "a step count (see --help)"),
    ("--deepspeed", "ds.json", "unrecognized arguments: --deepspeed ds.json; the DeepSpeed config is built from "
     "--zero_stage, --offload and --dtype (this pipeline takes no DeepSpeed JSON) (see --help)"),
    ("--num_train_epoch", "2", "unrecognized arguments: --num_train_epoch 2; did you mean --num_train_epochs? "
     "(see --help)"),
    ("--frobnicate", "2", "unrecognized arguments: --frobnicate 2 (see --help)"),
])
def test_flag_ranges_are_checked_up_front(flag, value, message):
    with pytest.raises(UserError) as e:
        parse(SHARED_GROUPS, "t", BASE + [flag, value])
    assert str(e.value) == message


def test_step_groups_carry_their_ranges(tmp_path):
    """DPO keeps --learning_rate 0 for "scaled to the model size"; step 3's copies of shared flags keep
    their ranges; step-specific fields have their own."""
    from dpo.main import DPOArgs
    from step2_reward.main import RewardArgs
    from step3_ppo.config import GROUPS, REQUIRED

    dpo = dict(defaults={"learning_rate": 0.0}, limits={"learning_rate": {"ge": 0}})
    assert parse((*SHARED_GROUPS, DPOArgs), "t", BASE, **dpo).learning_rate == 0.0
    for flags, message in ((["--learning_rate", "-1"], "--learning_rate must be >= 0, got -1.0"),
                           (["--beta", "0"], "--beta must be > 0, got 0.0"),
                           (["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5), got 0.5"),
                           (["--rpo_alpha", "-1"], "--rpo_alpha must be >= 0, got -1.0"),
                           (["--displacement_warn_nats", "-1"], "--displacement_warn_nats must be >= 0, got -1.0"),
                           (["--anchor_coef", "-1"], "--anchor_coef must be >= 0, got -1.0")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
            parse((*SHARED_GROUPS, DPOArgs), "t", BASE + flags, **dpo)
    with pytest.raises(UserError, match="^--center_rewards_coefficient must be >= 0"):
        parse((*SHARED_GROUPS, RewardArgs), "t", BASE + ["--center_rewards_coefficient", "-1"])
    with pytest.raises(UserError, match=r"^--synthetic_negatives must be >= 0, got -1\.0$"):
        parse((*SHARED_GROUPS, RewardArgs), "t", BASE + ["--synthetic_negatives", "-1"])
    # A list flag with choices checks every item, on the command line and in a --config file.
    with pytest.raises(UserError, match=r"^argument --synthetic_negative_kinds: invalid choice: 'typo'"):
        parse((*SHARED_GROUPS, RewardArgs), "t", BASE + ["--synthetic_negative_kinds", "drop", "typo"])
    assert parse((*SHARED_GROUPS, RewardArgs), "t", BASE + ["--synthetic_negative_kinds", "swap"]
                 ).synthetic_negative_kinds == ["swap"]
    cfg = write_config(tmp_path, "synthetic_negative_kinds: [drop, typo]\n")
    with pytest.raises(UserError) as e:
        parse((*SHARED_GROUPS, RewardArgs), "t", BASE + ["--config", cfg])
    assert str(e.value) == (f"--config file '{cfg}': key 'synthetic_negative_kinds': 'typo' is not one of drop, "
                            "drop_span, repeat, repeat_span, truncate, empty, replace, swap")
    ppo = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--data_path", "p.jsonl",
           "--output_dir", "o"]
    for flags, message in ((["--actor_learning_rate", "-1"], "--actor_learning_rate must be >= 0, got -1.0"),
                           (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
                           (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
                           (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            parse(GROUPS, "t", ppo + flags, required=REQUIRED)


def test_dpo_refuses_the_anchor_without_a_live_reference():
    """The anchor (on by default) reads the reference's next-token distributions at every step: a precomputed
    reference or packed rows are one line that names the flag to add; with --anchor_coef 0 both are fine."""
    from dpo.main import check_args, parse_args

    base = ["--model_name_or_path", "m", "--data_path", "d.jsonl", "--output_dir", "o"]
    for flag, message in (("--precompute_ref_logprobs", "--precompute_ref_logprobs frees the reference model, "
                           "whose next-token distributions the anchor (--anchor_coef 5) reads at every step: add "
                           "--anchor_coef 0 to precompute"),
                          ("--packing", "--packing: the anchor (--anchor_coef 5) is not computed on packed rows; "
                           "add --anchor_coef 0 to pack")):
        with pytest.raises(UserError) as e:
            check_args(parse_args(base + [flag]))
        assert str(e.value) == message
        check_args(parse_args(base + [flag, "--anchor_coef", "0"]))


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("keep me")
    with pytest.raises(UserError, match=f"^--output_dir '{tmp_path}/f' is a file, not a directory$"):
        parse(SHARED_GROUPS, "t", ["--model_name_or_path", "m", "--data_path", "a",
                                   "--output_dir", str(tmp_path / "f")])
    with pytest.raises(UserError, match="is inside .*, which is a file"):
        parse(SHARED_GROUPS, "t", ["--model_name_or_path", "m", "--data_path", "a",
                                   "--output_dir", str(tmp_path / "f" / "out")])
    assert (tmp_path / "f").read_text() == "keep me"
    assert parse(SHARED_GROUPS, "t", BASE[:4] + ["--output_dir", str(tmp_path / "new" / "out")])


def test_a_yaml_list_of_numbers_is_read_for_a_list_flag(tmp_path):
    from step3_ppo.main import parse_args

    cfg = write_config(tmp_path, "reward_weights: [0.5, 1]\nreward_funcs: [a.py:f, b.py:g]\n")
    ns = parse_args(["--config", cfg, "--actor_model_name_or_path", "a", "--data_path", "p.jsonl",
                     "--output_dir", "o", "--advantage_estimator", "grpo"])
    assert [float(w) for w in ns.reward_weights] == [0.5, 1.0]


def test_home_paths_are_expanded_and_the_output_is_not_an_input(tmp_path, monkeypatch):
    """`--data_path=~/x` and a --config file's `output_dir: ~/out` reach the program with a literal `~`
    (the shell expands it only at the start of a word); an output directory equal to the input model
    would be replaced by it under --overwrite_output_dir."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: ~/out\ndata_path: ~/d.jsonl\n")
    ns = parse(SHARED_GROUPS, "t", ["--model_name_or_path", "m", "--config", "~/c.yaml", "--eval_data_path=~/e.jsonl"])
    assert (ns.output_dir, ns.data_path, ns.eval_data_path) == (
        f"{tmp_path}/out", [f"{tmp_path}/d.jsonl"], [f"{tmp_path}/e.jsonl"])
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(UserError, match=r"--output_dir '.*/model/' is --model_name_or_path, an input of this run"):
        parse(SHARED_GROUPS, "t", ["--model_name_or_path", str(model), "--data_path", "d.jsonl", "--output_dir",
                                   f"{model}/"])


def test_schedules_warm_up_and_precision_and_batch_mistakes_are_refused():
    """From a new-user audit: `constant` ignored --num_warmup_steps (PPO's default schedule), a warm-up
    longer than the run never reached the announced rate, --dtype fp16 on a CPU was a DeepSpeed traceback
    after the model had loaded, and a global batch larger than the data repeated every sample in one step."""
    import torch

    from deepspeed.accelerator import get_accelerator

    from utils.ds import build_scheduler, check_dtype
    from utils.stream import StepStream

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "constant", warmup=4, total_steps=10)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(UserError, match="--num_warmup_steps 10 is not shorter than the run's 5 optimizer steps"):
        build_scheduler(opt, "cosine", warmup=10, total_steps=5)
    if not get_accelerator().is_fp16_supported():
        with pytest.raises(UserError, match=r"--dtype fp16 is not supported on this machine's accelerator \(cpu\)"):
            check_dtype("fp16")
    with pytest.raises(UserError, match=r"the global batch \(--per_device_train_batch_size 8 x "
                                        r"--gradient_accumulation_steps 4 x 1 rank\(s\) = 32\) is larger than the 20 "
                                        "training samples"):
        StepStream(list(range(20)), 8, 4, list, 0)


def test_the_output_dir_may_not_hold_an_input_or_be_another_runs_partial(tmp_path):
    """--overwrite_output_dir replaced an output directory together with the model and data inside it, and a
    run given another run's OUTPUT_DIR.partial replaced that run's working directory under it."""
    work = tmp_path / "wk"
    (work / "m").mkdir(parents=True)
    (work / "d.jsonl").write_text("{}")
    for flags, message in (
            (["--model_name_or_path", str(work / "m"), "--data_path", "x.jsonl"], "holds '.*/wk/m', given as --model_name_or_path"),
            (["--model_name_or_path", "m", "--data_path", str(work / "d.jsonl")], "holds '.*/wk/d.jsonl', given as --data_path")):
        with pytest.raises(UserError, match=f"--output_dir '{work}' {message}, an input of this run"):
            parse(SHARED_GROUPS, "t", flags + ["--output_dir", str(work)])
    # The run's own --config file (and a --reward_funcs file) in the directory it would replace.
    (work / "sft.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match=f"--output_dir '{work}' holds '.*/wk/sft.yaml', given as --config, an input"):
        parse(SHARED_GROUPS, "t", BASE[:4] + ["--config", str(work / "sft.yaml"), "--output_dir", str(work)])
    from step3_ppo.main import parse_args

    (work / "rw.py").write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UserError, match=f"--output_dir '{work}' holds '.*/wk/rw.py:f', given as --reward_funcs"):
        parse_args(["--actor_model_name_or_path", "m", "--data_path", "p.jsonl", "--advantage_estimator", "grpo",
                    "--n_samples_per_prompt", "2", "--reward_funcs", f"{work}/rw.py:f", "utils.reward_funcs:exact_match",
                    "--output_dir", str(work)])
    # A --tensorboard_path that is a file failed after the models had loaded, leaving OUTPUT_DIR.partial.
    with pytest.raises(UserError, match=f"--tensorboard_path '{work}/d.jsonl' is a file, not a directory"):
        parse(SHARED_GROUPS, "t", BASE + ["--enable_tensorboard", "--tensorboard_path", str(work / "d.jsonl")])
    with pytest.raises(UserError, match="is the working directory of a run of '.*/jobA'"):
        parse(SHARED_GROUPS, "t", ["--model_name_or_path", "m", "--data_path", "x.jsonl", "--output_dir",
                                   str(tmp_path / "jobA.partial")])


def test_other_trainers_names_point_at_flags_that_exist():
    """Every flag OTHER_NAMES points a user at is a flag of some step, and none of its names is one of ours
    (the hint is only given for a name argparse did not know)."""
    from dpo.main import DPOArgs
    from step2_reward.main import RewardArgs
    from step3_ppo.config import GROUPS
    from utils.args import OTHER_NAMES, SHARED_GROUPS, specs_of

    per_step = [set(specs_of(g)) for g in (SHARED_GROUPS, (*SHARED_GROUPS, RewardArgs), (*SHARED_GROUPS, DPOArgs),
                                            GROUPS)]
    ours = set().union(*per_step)
    for name, targets in OTHER_NAMES.items():
        if isinstance(targets, list):
            assert any(t.split()[0].rstrip(",")[2:] in ours for t in targets), name
            for flags in per_step:  # a name that is a flag of one step points at another step's flag only
                assert name not in flags or all(t.split()[0][2:] not in flags for t in targets), name


def test_config_files_never_drop_a_value_silently(tmp_path):
    """From a flag audit: a key given twice in a --config file kept the last value, `--config a --config b`
    read b alone, `--config ""` (an unset variable) ran on the defaults, a config.YAML was parsed as JSON
    ("Expecting value: line 1 column 1"), and `synthetic_negative_kinds: []` passed parsing and divided by
    zero once the data had loaded."""
    from step2_reward.main import RewardArgs

    for name, text, message in (
            ("d.yaml", "learning_rate: 1e-5\nmax_steps: 3\nlearning_rate: 2e-5\n",
             "key 'learning_rate' is given twice (line 3); give each key once"),
            ("d.json", '{"learning_rate": 1e-5, "learning_rate": 2e-5}',
             "key 'learning_rate' is given twice; give each key once")):
        cfg = write_config(tmp_path, text, name)
        with pytest.raises(UserError) as e:
            parse(SHARED_GROUPS, "t", BASE + ["--config", cfg])
        assert str(e.value) == f"--config file '{cfg}': {message}"
    a, b = write_config(tmp_path, "learning_rate: 0.5\n", "a.yaml"), write_config(tmp_path, "max_steps: 3\n", "b.yaml")
    with pytest.raises(UserError, match="^--config is given twice; give one --config file$"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", a, "--config", b])
    with pytest.raises(UserError, match="^--config is given an empty file name$"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", ""])
    assert parse(SHARED_GROUPS, "t", BASE + ["--config", write_config(tmp_path, "max_steps: 3\n", "c.YAML")]
                 ).max_steps == 3
    txt = write_config(tmp_path, "max_steps: 3\n", "c.txt")
    with pytest.raises(UserError, match=re.escape(f"--config file '{txt}' cannot be parsed as JSON (its name ends in "
                                                  "neither .yaml, .yml nor .json): Expecting value")):
        parse(SHARED_GROUPS, "t", BASE + ["--config", txt])
    cfg = write_config(tmp_path, "synthetic_negative_kinds: []\n", "k.yaml")
    with pytest.raises(UserError) as e:
        parse((*SHARED_GROUPS, RewardArgs), "t", BASE + ["--config", cfg])
    assert str(e.value) == f"--config file '{cfg}': key 'synthetic_negative_kinds': expected at least one value, got an empty list"
    # what still works: merge keys, one file, an empty optional list
    cfg = write_config(tmp_path, "base: &b {learning_rate: 0.5}\n", "m.yaml")
    with pytest.raises(UserError, match="unknown keys base"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", cfg])
    assert parse(SHARED_GROUPS, "t", BASE + ["--config", write_config(tmp_path, "eval_data_path: []\n", "e.yaml")]
                 ).eval_data_path == []


def test_a_flag_the_rest_of_the_command_turns_off_is_refused(tmp_path):
    """From a flag audit: these were accepted and then never read (the run trained as if they were absent)."""
    from dpo.main import parse_args as dpo_args
    from step2_reward.main import parse_args as reward_args
    from step3_ppo.main import parse_args as ppo_args
    from step3_ppo.models import check_args

    for flags, message in (
            (["--tensorboard_path", str(tmp_path / "tb")], "--tensorboard_path is used with --enable_tensorboard only"),
            (["--lora_alpha", "64"], "--lora_alpha applies to LoRA adapters, and LoRA is off (--lora_dim 0)"),
            (["--lora_module_name", "q_proj,v_proj"], "--lora_module_name applies to LoRA adapters"),
            (["--only_optimize_lora"], "--only_optimize_lora applies to LoRA adapters"),  # was refused after loading
            (["--eval_data_path", "e.jsonl", "--eval_fraction", "0.3"], "--eval_fraction holds out part of --data_path "
                                                                        "only when no --eval_data_path is given")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            parse(SHARED_GROUPS, "t", BASE + flags)
    with pytest.raises(UserError, match="^--synthetic_negative_kinds chooses the corruptions of --synthetic_negatives"):
        dpo_args(BASE + ["--synthetic_negative_kinds", "swap"])  # DPO's --synthetic_negatives is 0 by default
    with pytest.raises(UserError, match="^--synthetic_negative_kinds chooses"):
        reward_args(BASE + ["--synthetic_negatives", "0", "--synthetic_negative_kinds", "swap"])
    cfg = write_config(tmp_path, "lora_alpha: 64\n", "alpha.yaml")  # a config file's value is given too
    with pytest.raises(UserError, match="^--lora_alpha applies to LoRA adapters"):
        parse(SHARED_GROUPS, "t", BASE + ["--config", cfg])
    assert parse(SHARED_GROUPS, "t", BASE + ["--config", cfg, "--lora_dim", "8"]).lora_alpha == 64
    assert parse(SHARED_GROUPS, "t", BASE + ["--lora_dim", "8", "--lora_alpha", "64", "--enable_tensorboard",
                                             "--tensorboard_path", str(tmp_path / "tb")]).lora_alpha == 64
    assert dpo_args(BASE + ["--synthetic_negatives", "1", "--synthetic_negative_kinds", "swap"])

    ppo = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--data_path", "p.jsonl",
           "--output_dir", "o"]
    grpo = ["--actor_model_name_or_path", "a", "--advantage_estimator", "grpo", "--n_samples_per_prompt", "2",
            "--reward_funcs", "utils.reward_funcs:exact_match", "--data_path", "p.jsonl", "--output_dir", "o"]
    for base, flags, message in (
            (ppo, ["--ema_beta", "0.5"], "--ema_beta is not used: --enable_ema is off"),
            (ppo, ["--unsup_coef", "1"], "--unsup_coef is not used: no --unsup_data_path is given"),
            (ppo, ["--eval_interval", "5"], "--eval_interval is not used: no --eval_data_path is given"),
            (ppo, ["--no-do_sample", "--top_k", "5"], "--top_k is not used: --no-do_sample generates greedily"),
            (ppo, ["--anchor_confidence", "0.5"], "--anchor_confidence is not used: --anchor_coef is 0"),
            (ppo, ["--kl_coef", "0", "--offload_reference_model"], "--offload_reference_model is not used: no "
                                                                  "reference model is loaded"),
            (grpo, ["--offload_reward_model"], "--offload_reward_model is not used: no reward model is loaded"),
            (grpo, ["--critic_learning_rate", "1e-5"], "--critic_learning_rate is not used: --advantage_estimator "
                                                       "grpo trains no critic"),
            (grpo, ["--critic_zero_stage", "3"], "--critic_zero_stage is not used"),
            (grpo, ["--lam", "0.5"], "--lam is not used"),
            (grpo, ["--lora_alpha", "64"], "--lora_alpha applies to LoRA adapters, and LoRA is off (--actor_lora_dim 0)")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            check_args(ppo_args(base + flags))
    check_args(ppo_args(ppo + ["--enable_ema", "--ema_beta", "0.5", "--eval_data_path", "p.jsonl", "--eval_interval",
                               "5", "--anchor_coef", "1", "--anchor_confidence", "0.5", "--critic_lora_dim", "4",
                               "--lora_alpha", "8", "--offload_reference_model"]))


def test_the_evaluation_tools_never_write_over_their_input_or_fail_after_the_work(tmp_path, capsys):
    """rw_eval --output and compare --json naming the file they read replaced it with the scores, and one in a
    folder that does not exist was a FileNotFoundError traceback once every model had been run."""
    import launch.compare
    import step2_reward.rw_eval

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Hi.", "chosen": "Hello.", "rejected": "Go."}\n')
    model = tmp_path / "m"
    model.mkdir()
    for main, argv, message in (
            (step2_reward.rw_eval.main, ["--model", str(model), "--pairs", str(pairs), "--output", str(pairs)],
             f"--output '{pairs}' is a --pairs file, which the scores would replace; write them to another file"),
            (step2_reward.rw_eval.main, ["--model", str(model), "--pairs", str(pairs), "--output",
                                         str(tmp_path / "no" / "s.jsonl")],
             f"--output '{tmp_path}/no/s.jsonl': its folder does not exist"),
            (launch.compare.main, ["--models", f"a={model}", "--prompts", str(pairs), "--json", str(pairs)],
             f"--json '{pairs}' is the --prompts file, which the results would replace; write them to another file"),
            (launch.compare.main, ["--models", f"a={model}", "--prompts", str(pairs), "--json",
                                   str(tmp_path / "no" / "r.json")],
             f"--json '{tmp_path}/no/r.json': its folder does not exist")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert pairs.read_text() == '{"prompt": "Hi.", "chosen": "Hello.", "rejected": "Go."}\n'


@pytest.mark.parametrize("module,argv,message", [
    ("launch.chat", ["--model", "m", "--max_new_tokens", "abc"], "argument --max_new_tokens: invalid int value: 'abc'"),
    ("launch.chat", [], "the following arguments are required: --model"),
    ("launch.compare", ["--models", "a=m", "--prompts", "p.jsonl", "--samples", "x"],
     "argument --samples: invalid int value: 'x'"),
    ("launch.report", ["--runs", "a=r"], "the following arguments are required: --out")])
def test_the_launch_tools_refuse_a_bad_flag_in_one_line(capsys, module, argv, message):
    """They printed argparse's usage block and `chat.py: error: ...` (two to five lines), unlike the steps."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message} (see --help)"]
