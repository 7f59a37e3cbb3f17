"""One small cell of the alignment suite (bench/alignment) end to end on 2 ranks, with the defaults:
the two-slot task ("The <noun> is <adj> and <adj>.", both adjectives warm preferred) on a GPT-2-style
model (no pad token) whose SFT answers start mostly cold. SFT -> reward model -> PPO and SFT -> DPO
get only model, data, output and epochs or steps; the suite's independent plain-transformers judge
reads greedy answers to prompts about nouns never seen in training."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from conftest import REPO, read_metrics

pytestmark = pytest.mark.e2e
sys.path.insert(0, os.path.join(REPO, "bench", "alignment"))
import run as suite  # noqa: E402
import tasks  # noqa: E402

# The starting point is a short SFT run from random init (an explicit rate, 5 epochs of 600 rows); then
# one epoch of reward and DPO training on 600 pairs and 24 PPO steps of 32 prompts, with the defaults.
FAMILY = "gpt2"
FLAGS = {"sft": ["--learning_rate", "3e-3", "--num_train_epochs", "5"], "reward": [], "ppo": ["--max_steps", "24"],
         "dpo": []}


def test_defaults_align_an_unseen_task_without_wrecking_the_answers(tmp_path):
    full = tasks.two_slot()
    task = dataclasses.replace(full, sft=full.sft[:600], pairs=full.pairs[:600])
    cell = suite.Cell(str(tmp_path), task, FAMILY, "0.5m", step_flags=FLAGS)
    rows = suite.run_cell(cell, list(suite.METHODS), print)

    sft, probe, ppo, dpo = rows["sft"], rows["reward"], rows["ppo"], rows["dpo"]
    assert sft["well_formed"] >= 0.95 and sft["preferred"] <= 0.5, sft  # well-formed, mostly cold to start
    for name, r in (("ppo", ppo), ("dpo", dpo)):
        assert r["preferred"] >= 0.9 and r["well_formed"] >= 0.95, (name, r)
    # The reward model trained with synthetic negatives ranks broken answers below well-formed preferred ones.
    assert probe["malformed_wins"] <= 0.1, probe

    # Guard rails: DPO logs the chosen answers' log-probability shift and, with its NLL term on by
    # default, never warns of displacement; PPO logs the answers' distinct-token ratio.
    m = read_metrics(cell.out("dpo"))
    assert all("logps/chosen_shift" in r for r in m if r["split"] in ("train", "eval"))
    assert not [r for r in m if r["split"] == "warning"], [r for r in m if r["split"] == "warning"]
    train = [r for r in read_metrics(cell.out("ppo")) if r["split"] == "train"]
    assert len(train) == 24 and all(0.5 < r["distinct_ratio"] <= 1.0 for r in train)
