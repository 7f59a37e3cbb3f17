"""The README's main command: the CPU demo runs the whole pipeline and alignment visibly works."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.e2e


def test_demo_runs_and_moves_behaviour(tmp_path):
    demo = tmp_path / "demo"
    env = dict(os.environ, DEMO_DIR=str(demo), MASTER_PORT=str(free_port()))
    p = subprocess.run(["bash", os.path.join(REPO, "launch/demo.sh")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = json.load(open(demo / "results.json"))["summary"]
    sft, ppo, dpo = summary["sft"], summary["ppo"], summary["dpo"]
    # PPO and DPO move the preferred behaviour up from the SFT model and keep answers ending with EOS.
    assert ppo["preferred_rate"] >= sft["preferred_rate"] + 0.2, summary
    assert dpo["preferred_rate"] >= sft["preferred_rate"] + 0.2, summary
    assert ppo["reward"] > sft["reward"] and dpo["reward"] > sft["reward"], summary
    assert min(m["eos_rate"] for m in summary.values()) >= 0.9, summary
    assert (demo / "report.png").stat().st_size > 10_000
    assert "held-out prompts" in p.stdout and "preferred_rate" in p.stdout
    # Every output is a Hugging Face directory that plain transformers loads.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for d in ("sft", "ppo/actor", "dpo"):
        AutoModelForCausalLM.from_pretrained(demo / d)
    for d in ("reward", "ppo/critic"):
        AutoModelForSequenceClassification.from_pretrained(demo / d)
