"""One small cell of the alignment suite (bench/alignment) end to end on 2 ranks, with the defaults:
the two-slot task ("The <noun> is <adj> and <adj>.", both adjectives warm preferred) on the 0.5M
Llama-style model (sentencepiece tokenizer, pad token) whose SFT answers start mostly cold, exactly
as the suite runs that cell. SFT -> reward model -> PPO and SFT -> DPO get only model, data, output
and epochs; the suite's independent plain-transformers judge reads greedy answers to prompts about
nouns never seen in training. (The GPT-2 cell of the same size is the one the suite's table shows
below 95% for DPO, see bench/alignment/results.md; this test guards the cells that pass.)"""
from __future__ import annotations

import os
import sys

import pytest

from conftest import REPO, read_metrics

pytestmark = pytest.mark.e2e
sys.path.insert(0, os.path.join(REPO, "bench", "alignment"))
import run as suite  # noqa: E402
import tasks  # noqa: E402

FAMILY = "llama-sp"


def test_defaults_align_an_unseen_task_without_wrecking_the_answers(tmp_path):
    cell = suite.Cell(str(tmp_path), tasks.two_slot(), FAMILY, "0.5m")  # the suite's own step flags
    rows = suite.run_cell(cell, list(suite.METHODS), print)

    sft, probe, ppo, dpo = rows["sft"], rows["reward"], rows["ppo"], rows["dpo"]
    assert sft["well_formed"] >= 0.95 and sft["preferred"] <= 0.5, sft  # well-formed, mostly cold to start
    for name, r in (("ppo", ppo), ("dpo", dpo)):
        assert r["preferred"] >= 0.9 and r["well_formed"] >= 0.95, (name, r)
    # The reward model trained with synthetic negatives ranks broken answers below well-formed preferred ones.
    assert probe["malformed_wins"] <= 0.15, probe  # the suite measured 8-9% at 0.5M; 23% without the negatives

    # Guard rails: DPO logs the chosen answers' log-probability shift and, with its NLL term on by
    # default, never warns of displacement; PPO logs the answers' distinct-token ratio.
    m = read_metrics(cell.out("dpo"))
    assert all("logps/chosen_shift" in r for r in m if r["split"] in ("train", "eval"))
    assert not [r for r in m if r["split"] == "warning"], [r for r in m if r["split"] == "warning"]
    train = [r for r in read_metrics(cell.out("ppo")) if r["split"] == "train"]
    assert len(train) == 36 and all(0.5 < r["distinct_ratio"] <= 1.0 for r in train)
