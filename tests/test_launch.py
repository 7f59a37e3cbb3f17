"""Launchers: syntax, dry-run commands, a valid DeepSpeed config for every preset x GPU count, and the
pipeline's stop / continue / skip behaviour."""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO
from utils.ds import ds_config

SIZES = ["125m", "350m", "1.3b", "7b", "13b", "70b", "tiny"]
STEPS = {"sft": "step1_sft/main.py", "reward": "step2_reward/main.py", "dpo": "dpo/main.py", "ppo": "step3_ppo/main.py"}


def dry_run(step: str, **env) -> tuple[str, list[str]]:
    e = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "NGPUS", "ZERO_STAGE", "OFFLOAD", "NUM_NODES")}
    e.update(DRY_RUN="1", **env)
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), step], env=e, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    header, cmd = p.stdout.strip().splitlines()
    return header, shlex.split(cmd)


def flag(cmd: list[str], name: str):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_every_script_parses():
    scripts = glob.glob(os.path.join(REPO, "**", "*.sh"), recursive=True) + [os.path.join(REPO, ".ci", "run")]
    assert len(scripts) >= 5
    for s in scripts:
        p = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert p.returncode == 0, (s, p.stderr)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ngpus", ["1", "8"])
@pytest.mark.parametrize("step", list(STEPS))
def test_presets_give_valid_configs(size, ngpus, step):
    header, cmd = dry_run(step, MODEL_SIZE=size, NGPUS=ngpus)
    assert cmd[:3] == ["deepspeed", "--num_gpus", ngpus] and cmd[3] == STEPS[step]
    stage = int(flag(cmd, "--zero_stage") or flag(cmd, "--actor_zero_stage"))
    assert f"ZeRO-{stage}" in header
    micro = int(flag(cmd, "--per_device_train_batch_size") or 1)
    cfg = ds_config(stage=stage, offload="--offload" in cmd, dtype="bf16", micro_batch=micro, grad_accum=2,
                    world=int(ngpus))
    assert cfg["train_batch_size"] == micro * 2 * int(ngpus)


def test_large_preset_changes_with_gpu_count():
    one, _ = dry_run("sft", MODEL_SIZE="7b", NGPUS="1")
    eight, _ = dry_run("sft", MODEL_SIZE="7b", NGPUS="8")
    assert "ZeRO-3 offload=1" in one and "ZeRO-2 offload=0" in eight
    one, _ = dry_run("sft", MODEL_SIZE="70b", NGPUS="1")
    eight, _ = dry_run("sft", MODEL_SIZE="70b", NGPUS="8")
    assert one != eight


def test_overrides_and_passthrough(tmp_path):
    header, cmd = dry_run("sft", MODEL_SIZE="125m", NGPUS="2", ZERO_STAGE="3", OFFLOAD="1", MODEL="m",
                          DATA="a.jsonl b.jsonl", OUTPUT_DIR="o")
    assert "ZeRO-3 offload=1" in header and "--offload" in cmd
    assert cmd[cmd.index("--data_path") + 1:cmd.index("--data_path") + 3] == ["a.jsonl", "b.jsonl"]
    assert flag(cmd, "--model_name_or_path") == "m" and flag(cmd, "--output_dir") == "o"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    header, cmd = dry_run("ppo", MODEL_SIZE="7b", NGPUS="8", HOSTFILE=str(hostfile), ACTOR="a", CRITIC="c")
    assert cmd[:7] == ["deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8"]
    assert "16 GPUs" not in header and "2 node(s) x 8" in header
    assert flag(cmd, "--actor_model_name_or_path") == "a" and flag(cmd, "--critic_model_name_or_path") == "c"


def test_bad_size_is_refused():
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), "sft"], capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1", MODEL_SIZE="3b"))
    assert p.returncode != 0 and "unknown MODEL_SIZE '3b'" in p.stderr


@pytest.mark.parametrize("env,message", [
    ({"NGPUS": "abc"}, "NGPUS must be a whole number >= 1, got 'abc'"),  # was "line 74: abc: unbound variable"
    ({"NGPUS": "0"}, "NGPUS must be a whole number >= 1, got '0'"),  # was `deepspeed --num_gpus 0`, ZeRO-3 offload
    ({"NUM_NODES": "two"}, "NUM_NODES must be a whole number >= 1, got 'two'"),  # ran on one node, exit 0
    ({"GPU_MEM_GB": "80GB"}, "GPU_MEM_GB must be a number > 0 (GB per GPU), got '80GB'"),  # chose ZeRO-3 + offload
    ({"OFFLOAD": "yes"}, "OFFLOAD must be 0 or 1, got 'yes'")])  # was offload off, said "offload=yes"
def test_bad_launcher_numbers_are_refused_in_one_line(env, message):
    e = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "NGPUS", "ZERO_STAGE", "OFFLOAD", "NUM_NODES")}
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), "sft"], capture_output=True, text=True,
                       env=dict(e, DRY_RUN="1", MODEL="m", DATA="d.jsonl", **{"NGPUS": "2", **env}))
    assert (p.returncode, p.stderr.strip().splitlines()) == (2, [f"error: {message}"])
    assert dry_run("sft", NGPUS="2", GPU_MEM_GB="40.5", OFFLOAD="1")[0].endswith("offload=1")


def test_multi_node_without_ssh(tmp_path):
    """NUM_NODES / NODE_RANK / MASTER_ADDR: one `deepspeed --no_ssh` per node, over a generated hostfile."""
    header, cmd = dry_run("sft", MODEL_SIZE="7b", NGPUS="8", NUM_NODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1",
                          MASTER_PORT="29555", TMPDIR=str(tmp_path))
    assert "2 node(s) x 8" in header and "ZeRO-2" in header
    assert flag(cmd, "--num_nodes") == "2" and flag(cmd, "--node_rank") == "1" and "--no_ssh" in cmd
    assert flag(cmd, "--master_addr") == "10.0.0.1" and flag(cmd, "--master_port") == "29555"
    assert open(flag(cmd, "--hostfile")).read() == "node0 slots=8\nnode1 slots=8\n"
    e = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR", "HOSTFILE")}
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), "sft"], capture_output=True, text=True,
                       env=dict(e, DRY_RUN="1", NUM_NODES="2"))
    assert p.returncode != 0 and "set NODE_RANK" in p.stderr


@pytest.mark.e2e
def test_pipeline_stops_on_sigterm_then_continues_skips_and_names_changed_inputs(tiny_dir, tmp_path):
    """SIGTERM to launch/pipeline.sh reaches the ranks through launch/run.sh (checkpoint, exit, nothing
    left running); the same command continues the step from its checkpoint; once it is finished a rerun
    skips it (done.json), and changed data is refused with a line naming the file."""
    from conftest import DATA, checkpoints_of, last_by_step, read_metrics, run_stopped

    data = tmp_path / "sft.jsonl"
    shutil.copy(os.path.join(DATA, "sft.jsonl"), data)
    work = tmp_path / "work"
    env = dict(MODEL=tiny_dir("llama"), SFT_DATA=str(data), PREF_DATA=os.path.join(DATA, "preference.jsonl"),
               WORK_DIR=str(work), STEPS="sft", MODEL_SIZE="tiny", NGPUS="2",
               SFT_ARGS="--max_steps 30 --log_interval 1 --per_device_train_batch_size 4")
    stop = run_stopped("launch/pipeline.sh", [], str(work / "sft"), after=6, env=env)
    assert stop["rc"] == 143, stop["output"][-3000:]
    assert "stopped by SIGTERM during step 'sft'" in stop["output"], stop["output"][-3000:]
    assert stop["step"] is not None and stop["step"] >= 6 and stop["step"] in checkpoints_of(str(work / "sft"))
    log = open(work / "logs" / "sft.log").read()
    assert "--resume: no checkpoint in" in log and "starting from step 0" in log  # the pipeline always resumes
    assert re.search(rf"stopped after step {stop['step']}: rank \d saw its launcher", log), log[-3000:]

    def pipeline(**extra):
        e = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "NUM_NODES", "ZERO_STAGE", "OFFLOAD")}
        e.update(env, MASTER_PORT=str(__import__("conftest").free_port()), **extra)
        return subprocess.run(["bash", os.path.join(REPO, "launch/pipeline.sh")], env=e, capture_output=True,
                              text=True, timeout=900)

    p = pipeline()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"unfinished run at step {stop['step']}" in p.stdout
    rerun_log = open(work / "logs" / "sft.log").read()
    assert rerun_log.startswith(log) and f"at step {stop['step']}" in rerun_log[len(log):]  # appended, not replaced
    assert sorted(last_by_step(read_metrics(str(work / "sft")))) == list(range(1, 31))
    p = pipeline()
    assert p.returncode == 0 and "complete for these inputs; skipping" in p.stdout, p.stdout + p.stderr
    with open(data, "a") as f:
        f.write('{"prompt": "Tell me about the owl.", "response": "The owl is great."}\n')
    p = pipeline()
    assert p.returncode == 2 and f"data file {data} changed" in p.stderr and "FORCE=1" in p.stderr, p.stderr


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_algo_takes_k_and_answer_length_from_the_preset(algo):
    _, cmd = dry_run("ppo", MODEL_SIZE="1.3b", NGPUS="8", ALGO=algo, ACTOR="a", REWARD="r",
                     REWARD_FUNCS="utils.reward_funcs:exact_match data/rewards.py:warm_word", REWARD_WEIGHTS="1 0.5")
    assert flag(cmd, "--advantage_estimator") == algo and flag(cmd, "--n_samples_per_prompt") == "8"
    assert flag(cmd, "--max_answer_seq_len") == "512" and flag(cmd, "--reward_model_name_or_path") == "r"
    i = cmd.index("--reward_funcs")
    assert cmd[i + 1:i + 3] == ["utils.reward_funcs:exact_match", "data/rewards.py:warm_word"]
    assert cmd[cmd.index("--reward_weights") + 1:][:2] == ["1", "0.5"]
    assert not any(c.startswith("--critic") for c in cmd)  # no critic is configured
    _, ppo = dry_run("ppo", MODEL_SIZE="1.3b", NGPUS="8", ACTOR="a", CRITIC="c")
    assert "--advantage_estimator" not in ppo and flag(ppo, "--critic_model_name_or_path") == "c"
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), "ppo"], capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1", ALGO="ppo2"))
    assert p.returncode == 2 and "unknown ALGO 'ppo2'" in p.stderr


def test_pipeline_skips_the_reward_model_when_reward_functions_score_alone(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "NGPUS", "ZERO_STAGE", "OFFLOAD")}
    env.update(DRY_RUN="1", MODEL="m", SFT_DATA="s.jsonl", PROMPT_DATA="data/count_prompts.jsonl", NGPUS="2",
               STEPS="sft reward ppo", ALGO="grpo", REWARD_FUNCS="utils.reward_funcs:exact_match", MODEL_SIZE="tiny",
               WORK_DIR=str(tmp_path))
    p = subprocess.run(["bash", os.path.join(REPO, "launch/pipeline.sh")], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr  # no PREF_DATA needed: nothing reads preference pairs
    assert "reward: skipped" in p.stdout and "step2_reward" not in p.stdout
    cmd = shlex.split(next(line for line in p.stdout.splitlines() if "step3_ppo/main.py" in line))
    assert flag(cmd, "--output_dir") == str(tmp_path / "grpo") and "--reward_model_name_or_path" not in cmd
    env.update(USE_REWARD_MODEL="1")
    p = subprocess.run(["bash", os.path.join(REPO, "launch/pipeline.sh")], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "PREF_DATA" in p.stderr  # now step 2 runs and needs its pairs


def test_relative_paths_are_the_callers_not_the_checkouts(tiny_dir, tmp_path):
    """launch/run.sh starts the programs from the checkout; a relative MODEL, DATA and OUTPUT_DIR still mean
    the user's own directory (a run used to write its model into the checkout and refuse ./base)."""
    proj = tmp_path / "proj"
    shutil.copytree(tiny_dir("llama"), proj / "base")
    (proj / "mydata").mkdir()
    shutil.copy(os.path.join(REPO, "data", "sft.jsonl"), proj / "mydata" / "sft.jsonl")
    env = dict(os.environ, STATUS="1", MODEL="./base", DATA="mydata/sft.jsonl", OUTPUT_DIR="out/sft",
               MODEL_SIZE="tiny", NGPUS="2")
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), "sft"], cwd=proj, env=env, capture_output=True,
                       text=True)
    assert (p.returncode, p.stdout.strip()) == (1, "out/sft has no finished run"), p.stderr
    (proj / "out" / "sft").mkdir(parents=True)
    (proj / "out" / "sft" / "done.json").write_text("{}")  # a finished run of other inputs, in the caller's out/
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), "sft"], cwd=proj, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 3 and p.stdout.startswith("out/sft"), (p.stdout, p.stderr)
    assert not os.path.exists(os.path.join(REPO, "out", "sft"))


def test_chat_and_compare_fit_long_prompts_to_the_models_positions(tiny_dir, tmp_path, capsys, monkeypatch):
    """A prompt (or a chat's history) longer than the model's positions less --max_new_tokens failed with an
    IndexError traceback in GPT-2's position table; now it loses its start, counted, and a --max_new_tokens
    that leaves no room is one error line."""
    import builtins
    import json

    import launch.chat
    import launch.compare

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.tiny import build_config

    model = tmp_path / "gpt2-64"  # the tiny GPT-2 with a 64-row position table
    tok = AutoTokenizer.from_pretrained(tiny_dir("gpt2"))
    AutoModelForCausalLM.from_config(build_config("gpt2", tok, max_pos=64)).save_pretrained(model)
    tok.save_pretrained(model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me about the apple."}) + "\n" +
                       json.dumps({"prompt": "Tell me about the apple and the pear. " * 20}) + "\n")
    results = launch.compare.main(["--models", f"a={model}", "--prompts", str(prompts), "--max_new_tokens", "8"])
    assert results["a"]["n"] == 2
    assert (f"{model}: cut 1 of 2 prompts to their last 56 tokens (the model's 64 positions less --max_new_tokens; "
            "first: prompt 2)") in capsys.readouterr().out
    lines = iter(["Tell me about the apple and the pear. " * 3] * 2 + ["/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    launch.chat.main(["--model", str(model), "--max_new_tokens", "20"])
    assert "were left out to fit the model's 64 positions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        launch.chat.main(["--model", str(model), "--max_new_tokens", "64"])
    assert e.value.code == 2
    assert "--max_new_tokens 64 leaves no room for a prompt in the model's 64 positions" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("localhost slots=1\nlocalhost slots=1\n", "names host 'localhost' twice: .*NUM_NODES and NODE_RANK"),
    ("node1 slots=8\nnode2\n", "line 'node2' is not 'HOST slots=N'"),
])
def test_a_hostfile_deepspeed_would_refuse_is_one_line(tmp_path, text, message):
    """DeepSpeed's runner refused these in a ValueError traceback, exit 1, after it had started."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    p = subprocess.run(["bash", os.path.join(REPO, "launch/run.sh"), "sft"], capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1", HOSTFILE=str(hostfile), NGPUS="1", MODEL_SIZE="tiny"))
    assert p.returncode == 2 and re.fullmatch(f"error: HOSTFILE .*{message}.*\n", p.stderr), p.stderr


@pytest.mark.parametrize("script,env,message", [
    ("launch/pipeline.sh", {}, "set MODEL to the base model"),
    ("launch/pipeline.sh", {"MODEL": "m", "SFT_DATA": "d"}, r"set PREF_DATA \(step reward reads preference pairs\)"),
    ("launch/run.sh", {}, r"usage: launch/run.sh sft\|reward\|ppo\|dpo"),
    ("launch/run.sh sft", {"NUM_NODES": "2", "NGPUS": "1"}, r"set NODE_RANK \(0..NUM_NODES-1\) on each node"),
])
def test_a_missing_setting_is_one_error_line_and_exit_2(script, env, message):
    """bash's ${VAR:?} ended the launchers with exit 1 and its own `line 28: MODEL: ...` wording; a scheduler
    could not tell a wrong setup from a failed run."""
    e = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "DRY_RUN": "1", **env}
    p = subprocess.run(["bash", *[os.path.join(REPO, script.split()[0])], *script.split()[1:]], capture_output=True,
                       text=True, env=e)
    assert p.returncode == 2 and re.fullmatch(f"error: {message}.*\n", p.stderr), (p.returncode, p.stderr)
