"""Step 2 end to end: a short step-1 run, then `deepspeed --num_gpus 2` reward training on the shipped
preference set (warm adjectives preferred to cold ones) in the UltraFeedback layout (chosen/rejected as
whole conversations, plus a `messages` column), checked by numbers and by reloading the saved directory
in plain transformers. The layout gives the same samples, so the same numbers, as the plain file."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import (DATA, assert_user_error, read_jsonl, read_metrics, run_deepspeed, run_python, ultrafeedback,
                      write_jsonl)

pytestmark = pytest.mark.e2e
RM_ARGS = ["--learning_rate", "1e-3", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
           "--log_interval", "6", "--eval_interval", "12", "--save_interval", "12", "--zero_stage", "3",
           # The pairs as given (36 steps); the default synthetic negatives are tested in test_alignment_e2e.py.
           "--synthetic_negatives", "0"]


@pytest.fixture(scope="module")
def reward_run(tiny_dir, tmp_path_factory):
    """(sft_dir, reward_dir, data flags): a brief SFT of the tiny llama, then a ZeRO-3 reward run from it
    on data/preference.jsonl in the UltraFeedback layout with a `messages` column, evaluated on the held-out
    pairs in that layout without one."""
    root = tmp_path_factory.mktemp("step2")
    sft, rm = str(root / "sft"), str(root / "rm")
    pairs = write_jsonl(root / "ultrafeedback.jsonl",
                        [ultrafeedback(r) for r in read_jsonl(os.path.join(DATA, "preference.jsonl"))])
    heldout_rows = read_jsonl(os.path.join(DATA, "heldout_preference.jsonl"))
    heldout = write_jsonl(root / "heldout_ultrafeedback.jsonl",
                          [ultrafeedback(r, messages=False) for r in heldout_rows])
    data_args = ["--data_path", pairs, "--eval_data_path", heldout, *RM_ARGS]
    run_deepspeed("step1_sft/main.py", [
        "--model_name_or_path", tiny_dir("llama"), "--data_path", os.path.join(DATA, "sft.jsonl"),
        "--output_dir", sft, "--learning_rate", "3e-3", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8"])
    run_deepspeed("step2_reward/main.py", ["--model_name_or_path", sft, "--output_dir", rm, *data_args])
    return sft, rm, data_args


def plain_scores(out_dir: str, rows: list[dict], pairs_file: str) -> list[tuple[float, float]]:
    """(chosen, rejected) rewards from plain transformers: each rendered text tokenized by the tokenizer
    alone and scored as a batch of one, no padding, no project code in the forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from utils.data import load_samples
    from utils.encoding import Encoder

    model = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    tok = AutoTokenizer.from_pretrained(out_dir)
    render = Encoder(tok, json.load(open(os.path.join(out_dir, "args.json")))["template"], 512).render_prompt
    samples = {s.where: s for s in load_samples([pairs_file], "pairs")}
    out = []
    for row in rows:
        s = samples[row["where"]]
        pair = []
        for reply in (s.chosen, s.rejected):
            text = render(s.prompt) + " " + reply[0]["content"] + tok.eos_token
            with torch.no_grad():
                pair.append(model(**tok(text, return_tensors="pt")).logits[0, 0].item())
        out.append(tuple(pair))
    return out


def test_reward_model_learns_and_reloads_in_plain_transformers(reward_run, tmp_path):
    _, rm, data_args = reward_run
    heldout = data_args[data_args.index("--eval_data_path") + 1]
    metrics = read_metrics(rm)
    evals = [m for m in metrics if m["split"] == "eval"]
    train = [m for m in metrics if m["split"] == "train"]
    assert [e["step"] for e in evals] == [0, 12, 24, 36]
    assert evals[-1]["accuracy"] >= 0.95 and evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.3, evals
    assert evals[-1]["loss"] < 0.2 * evals[0]["loss"], evals
    assert evals[-1]["margin"] > 1.0 and evals[-1]["chosen_reward"] > evals[-1]["rejected_reward"]
    assert train[-1]["loss"] < train[0]["loss"]
    for m in evals + train:
        assert {"loss", "accuracy", "chosen_reward", "rejected_reward", "margin"} <= set(m)
    assert {"lr", "pairs_per_sec", "tokens_per_sec"} <= set(train[-1])

    # A standard sequence classifier whose config lets plain transformers pool at the EOS.
    config = json.load(open(os.path.join(rm, "config.json")))
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config.get("pad_token_id") is None  # the tiny llama has no pad token
    args = json.load(open(os.path.join(rm, "args.json")))
    assert args["template"] == "hh" and args["step"] == "reward"

    # The saved model reproduces the rewards training evaluated, and so the ranking of every pair.
    rows = [json.loads(line) for line in open(os.path.join(rm, "eval_rewards.jsonl"))]
    assert len(rows) == 54
    plain = plain_scores(rm, rows, heldout)
    for row, (c, r) in zip(rows, plain):
        assert c == pytest.approx(row["chosen_reward"], abs=1e-4)
        assert r == pytest.approx(row["rejected_reward"], abs=1e-4)
        assert (c > r) == (row["chosen_reward"] > row["rejected_reward"])
    assert sum(c > r for c, r in plain) / len(plain) == pytest.approx(evals[-1]["accuracy"])

    # The evaluation tool gives the same numbers.
    out_file = str(tmp_path / "scores.jsonl")
    p = run_python("step2_reward/rw_eval.py", ["--model", rm, "--pairs", heldout, "--output", out_file])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"accuracy={evals[-1]['accuracy']:.4f}" in p.stdout, p.stdout
    for row, mine in zip(rows, (json.loads(line) for line in open(out_file))):
        assert mine["where"] == row["where"]
        assert mine["chosen_reward"] == pytest.approx(row["chosen_reward"], abs=1e-4)
    p = run_python("step2_reward/rw_eval.py", ["--model", rm, "--prompt", "Tell me about the turtle.",
                                               "--responses", "The turtle is wonderful.", "The turtle is bland."])
    assert p.returncode == 0, p.stderr[-3000:]
    scores = [float(line.split("\t")[0]) for line in p.stdout.splitlines() if "\t" in line]
    assert len(scores) == 2 and scores[0] > scores[1], p.stdout


def test_resume_with_shared_prompt_forward_continues_the_same_run(reward_run, tmp_path):
    """Restart from the step-24 checkpoint with --shared_prompt_forward: the resumed run ends where the
    uninterrupted concatenated-forward run did, which checks resuming and that both forwards train the
    same model (ZeRO-3, 2 ranks)."""
    sft, rm, data_args = reward_run
    resumed = tmp_path / "resumed"
    shutil.copytree(os.path.join(rm, "checkpoints", "step-24"), tmp_path / "resumed.partial" / "checkpoints" / "step-24")
    p = run_deepspeed("step2_reward/main.py", ["--model_name_or_path", sft, "--output_dir", str(resumed),
                                               "--resume", "--shared_prompt_forward", *data_args])
    assert "resumed from" in p.stdout and "at step 24" in p.stdout
    final, ref = read_metrics(str(resumed))[-1], read_metrics(rm)[-1]
    assert final["step"] == ref["step"] == 36 and final["split"] == "eval"
    for k in ("loss", "accuracy", "chosen_reward", "rejected_reward"):
        assert final[k] == pytest.approx(ref[k], abs=1e-4), (k, final, ref)
    mine = [json.loads(line) for line in open(resumed / "eval_rewards.jsonl")]
    theirs = [json.loads(line) for line in open(os.path.join(rm, "eval_rewards.jsonl"))]
    assert [m["chosen_reward"] for m in mine] == pytest.approx([t["chosen_reward"] for t in theirs], abs=1e-4)


BAD = {
    "malformed.jsonl": (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n',
                        r"malformed.jsonl:2: malformed JSON"),
    "no_rejected.jsonl": (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
                          r"no_rejected.jsonl:2: field 'rejected': missing field"),
    "bad_margin.jsonl": (b'{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}\n',
                         r"bad_margin.jsonl:1: field 'margin': expected a number"),
    "all_equal.jsonl": (b'{"prompt": "a", "chosen": "b", "rejected": "b"}\n',
                        r"all_equal.jsonl: every row has chosen == rejected"),
}


@pytest.mark.slow
def test_bad_inputs_clear_errors(tiny_dir, tmp_path):
    """The shared reader's errors (tested in full in test_data.py) reach the user from step 2 and
    rw_eval as one line naming file, line and field, exit status 2; plus the pair-specific ones. Slow:
    test_bad_input_corpus.py checks each of these messages (the pair-specific ones included) in the reader,
    one bad file through each program end to end, and rw_eval's bad pairs file in process."""
    model = tiny_dir("llama")
    for name, (content, expected) in BAD.items():
        path = tmp_path / name
        path.write_bytes(content)
        p = run_python("step2_reward/main.py", ["--model_name_or_path", model, "--data_path", str(path),
                                                "--output_dir", str(tmp_path / "o")])
        assert_user_error(p, expected, name)
    # The evaluation tool reads files the same way.
    p = run_python("step2_reward/rw_eval.py", ["--model", model, "--pairs", str(tmp_path / "no_rejected.jsonl")])
    assert_user_error(p, "no_rejected.jsonl:2: field 'rejected'")
