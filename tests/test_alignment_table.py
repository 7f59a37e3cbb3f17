"""bench/alignment/run.py's tables of PPO and DPO seeds: which runs they read and what they count as passing."""
from __future__ import annotations

import json
import os
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench", "alignment"))
import run as suite  # noqa: E402


def _judge(path, preferred, well_formed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"preferred": preferred, "well_formed": well_formed, "eos": 1.0, "length": 9.0, "distinct": 1.0,
                   "answers": ["x"] * 8}, f)


def test_seed_section_lists_every_seed_and_passes_a_cell_only_when_all_do(tmp_path):
    work = str(tmp_path)
    a = os.path.join(work, "short", "gpt2-0.5m")
    _judge(os.path.join(a, "ppo", "judge.json"), 1.0, 1.0)          # the default seed, 1234
    _judge(os.path.join(a, "seed1", "ppo", "judge.json"), 0.96, 0.97)
    _judge(os.path.join(a, "seed2", "ppo", "judge.json"), 0.5, 0.99)
    _judge(os.path.join(a, "W_s1", "ppo", "judge.json"), 0.0, 0.0)   # a lever variant: not a seed run
    b = os.path.join(work, "chat", "llama-sp-5m")
    _judge(os.path.join(b, "ppo", "judge.json"), 0.97, 0.97)
    _judge(os.path.join(b, "seed7", "ppo", "judge.json"), 0.95, 0.95)
    _judge(os.path.join(work, "two_slot", "gpt2-5m", "ppo", "judge.json"), 1.0, 1.0)  # one seed: not listed

    by = suite.seed_rows(work)
    assert set(by) == {("short", "gpt2", "0.5m"), ("chat", "llama-sp", "5m")}
    assert sorted(by[("short", "gpt2", "0.5m")]) == [1, 2, 1234]
    md = suite.seeds_markdown(by)
    assert "| short | gpt2 | 0.5m | 1234: 100%/100%, 1: 96%/97%, 2: 50%/99% | 50% | 82% | no |" in md
    assert "| chat | llama-sp | 5m | 1234: 97%/97%, 7: 95%/95% | 95% | 96% | yes |" in md
    assert md.endswith("1 of 2 cells at >= 95% / 95% with every PPO seed.")
    assert suite.seeds_markdown({}) == ""


def test_a_ppo_seed_of_a_variant_reuses_the_variants_sft_and_reward_models(tmp_path):
    """--variant V --extra 'reward=...' --ppo_seeds 1234 1: seed 1's PPO trains from V's reward model (not
    a missing V_seed1/reward) and writes into V_seed1/ppo; without a variant, from the defaults' models."""
    task = suite.task_defs.TASKS["short"]()
    work = str(tmp_path)
    v = suite.Cell(work, task, "gpt2", "0.5m", "rm2", {"reward": "--num_train_epochs 2"})
    seed = suite.Cell(work, task, "gpt2", "0.5m", "rm2_seed1", {"reward": "--num_train_epochs 2", "ppo": "--seed 1"},
                      inputs=v, seeded="ppo")
    root = os.path.join(work, "short", "gpt2-0.5m")
    assert seed.out("sft") == v.out("sft") == os.path.join(root, "sft")
    assert seed.out("reward") == v.out("reward") == os.path.join(root, "rm2", "reward")
    assert seed.out("ppo") == os.path.join(root, "rm2_seed1", "ppo")
    cmd = suite.command(seed, "ppo", "base")
    assert cmd[cmd.index("--critic_model_name_or_path") + 1] == os.path.join(root, "rm2", "reward")
    assert cmd[-2:] == ["--seed", "1"]
    plain = suite.Cell(work, task, "gpt2", "0.5m")
    seed = suite.Cell(work, task, "gpt2", "0.5m", "seed2", {"ppo": "--seed 2"}, inputs=plain, seeded="ppo")
    assert seed.out("reward") == os.path.join(root, "reward") and seed.out("ppo") == os.path.join(root, "seed2", "ppo")


def test_a_dpo_seed_trains_from_the_cells_sft_model_and_gets_its_own_table(tmp_path):
    """--dpo_seeds 1234 1: seed 1's DPO starts from the cell's (or variant's) SFT model and writes into
    seed1/dpo, beside a PPO seed's seed1/ppo; each method's seeds are read and counted on their own."""
    task = suite.task_defs.TASKS["cold_start"]()
    work = str(tmp_path)
    root = os.path.join(work, "cold_start", "gpt2-0.5m")
    v = suite.Cell(work, task, "gpt2", "0.5m", "sft12", {"sft": "--num_train_epochs 12"})
    seed = suite.Cell(work, task, "gpt2", "0.5m", "sft12_seed1", {"sft": "--num_train_epochs 12", "dpo": "--seed 1"},
                      inputs=v, seeded="dpo")
    assert seed.out("sft") == os.path.join(root, "sft12", "sft")
    assert seed.out("dpo") == os.path.join(root, "sft12_seed1", "dpo")
    cmd = suite.command(seed, "dpo", "base")
    assert cmd[cmd.index("--model_name_or_path") + 1] == os.path.join(root, "sft12", "sft")
    assert cmd[-2:] == ["--seed", "1"]

    _judge(os.path.join(root, "dpo", "judge.json"), 0.56, 0.87)
    _judge(os.path.join(root, "seed1", "dpo", "judge.json"), 0.77, 0.87)
    _judge(os.path.join(root, "seed1", "ppo", "judge.json"), 1.0, 1.0)  # one PPO seed alone: no PPO row
    assert suite.seed_rows(work, "ppo") == {}
    by = suite.seed_rows(work, "dpo")
    assert sorted(by[("cold_start", "gpt2", "0.5m")]) == [1, 1234]
    md = suite.seeds_markdown(by, "dpo")
    assert "| cold_start | gpt2 | 0.5m | 1234: 56%/87%, 1: 77%/87% | 56% | 66% | no |" in md
    assert md.endswith("0 of 1 cells at >= 95% / 95% with every DPO seed.")


def test_families_get_columns_when_they_ran_and_extra_ones_are_collected_like_the_tables(tmp_path):
    """--families opt qwen2: their cells are read back like the table's two families, and the summary has
    columns (both sizes) for the families that have rows, in a fixed order."""
    work = str(tmp_path)
    assert suite.summary([]).splitlines()[0] == "| task | method | llama-sp 0.5m | llama-sp 5m | gpt2 0.5m | gpt2 5m |"
    _judge(os.path.join(work, "two_slot", "qwen2-0.5m", "dpo", "judge.json"), 1.0, 0.96)
    rows = suite.collect(work)
    assert suite.summary(rows).splitlines()[0] == "| task | method | qwen2 0.5m | qwen2 5m |"
    _judge(os.path.join(work, "two_slot", "gpt2-0.5m", "dpo", "judge.json"), 0.93, 0.93)
    rows = suite.collect(work)
    assert {(r["family"], r["size"]) for r in rows} == {("gpt2", "0.5m"), ("qwen2", "0.5m")}
    table = suite.summary(rows).splitlines()
    assert table[0] == "| task | method | gpt2 0.5m | gpt2 5m | qwen2 0.5m | qwen2 5m |"
    assert table[2] == "| two_slot | DPO | 93% / 93% |  | 100% / 96% |  |"
    assert set(suite.SIZES["0.5m"]) == set(suite.SIZES["5m"]) == set(suite.ALL_FAMILIES)


def test_the_judge_renders_prompts_as_training_does(tokenizer_of):
    """The judge (no project code) must see the prompt the policy was trained on: a system message, an
    earlier assistant turn and the generation prompt, under hh (GPT-2 style, no chat template; a sentencepiece
    tokenizer, whose word-start piece after the EOS the whole text does not have) and chat."""
    import judge

    from utils.encoding import Encoder

    convo = [{"role": "system", "content": "You pick gifts."}, {"role": "user", "content": "A gift for Ann?"},
             {"role": "assistant", "content": "A lamp is a fine gift."}, {"role": "user", "content": "And Bob?"}]
    for family, template in (("gpt2", "hh"), ("llama", "hh"), ("llama-sp", "hh"), ("qwen2", "chat")):
        tok = tokenizer_of(family)
        enc = Encoder(tok, template, max_seq_len=256)
        assert judge.prompt_ids(convo, template, tok) == enc.encode_prompt(convo), (family, template)


def test_a_rerun_of_some_cells_keeps_the_other_rows_of_an_earlier_results_file(tmp_path):
    """--table_only --keep results.json: a cell and method rerun in this work directory replaces its row
    and all its seeds; every other row and seed run comes from the earlier file, naming its commit."""
    work = str(tmp_path / "work")
    _judge(os.path.join(work, "chat", "gpt2-0.5m", "dpo", "judge.json"), 0.94, 0.94)
    _judge(os.path.join(work, "chat", "gpt2-0.5m", "seed1", "dpo", "judge.json"), 0.92, 0.92)
    old = {"preferred": 0.88, "well_formed": 0.88, "eos": 1.0, "length": 9.0, "distinct": 1.0, "samples": ["old"]}
    prev = {"commit": "abc1234", "rows": [
        {"task": "chat", "family": "gpt2", "size": "0.5m", "method": "dpo", **old},
        {"task": "chat", "family": "gpt2", "size": "0.5m", "method": "sft", **old},
        {"task": "two_slot", "family": "gpt2", "size": "0.5m", "method": "dpo", **old, "commit": "def5678"}],
        "dpo_seeds": [{"task": t, "family": "gpt2", "size": "0.5m", "seed": s, **old}
                      for t in ("chat", "two_slot") for s in (1234, 1, 2)]}
    with open(tmp_path / "prev.json", "w") as f:
        json.dump(prev, f)
    out = str(tmp_path / "results")
    suite.write_results(work, out, str(tmp_path / "prev.json"))
    with open(out + ".json") as f:
        got = json.load(f)
    rows = {(r["task"], r["method"]): r for r in got["rows"]}
    assert [(r["task"], r["method"]) for r in got["rows"]] == [("two_slot", "dpo"), ("chat", "sft"), ("chat", "dpo")]
    assert rows[("chat", "dpo")]["preferred"] == 0.94 and rows[("chat", "dpo")]["commit"] != "abc1234"
    assert rows[("chat", "sft")]["commit"] == "abc1234" and rows[("two_slot", "dpo")]["commit"] == "def5678"
    assert rows[("two_slot", "dpo")]["samples"] == ["old"]
    seeds = {(r["task"], r["seed"]): r["preferred"] for r in got["dpo_seeds"]}
    assert seeds == {("two_slot", 1234): 0.88, ("two_slot", 1): 0.88, ("two_slot", 2): 0.88,
                     ("chat", 1234): 0.94, ("chat", 1): 0.92}  # the chat cell's old seeds are not mixed in
    with open(out + ".md") as f:
        md = f.read()
    assert "kept from an earlier results file generated at commit abc1234, def5678 (each row" in md
    # Without --keep, only the work directory's rows.
    suite.write_results(work, out)
    with open(out + ".json") as f:
        assert {(r["task"], r["method"]) for r in json.load(f)["rows"]} == {("chat", "dpo")}


def test_grpo_trains_from_the_sft_model_with_the_tasks_rule_rewards_and_gets_its_own_count(tmp_path):
    """--methods grpo: step 3 without a critic or reward model, from the cell's SFT model, rewarded by the
    task's rule functions; its cells are counted apart from the PPO/DPO ones."""
    task = suite.task_defs.TASKS["detail"]()
    cell = suite.Cell(str(tmp_path), task, "llama-sp", "0.5m")
    cmd = suite.command(cell, "grpo", "base")
    root = os.path.join(str(tmp_path), "detail", "llama-sp-0.5m")
    assert cmd[cmd.index("--actor_model_name_or_path") + 1] == os.path.join(root, "sft")
    assert "--critic_model_name_or_path" not in cmd and "--reward_model_name_or_path" not in cmd
    assert cmd[cmd.index("--advantage_estimator") + 1] == "grpo"
    funcs = cmd[cmd.index("--reward_funcs") + 1:cmd.index("--reward_funcs") + 3]
    assert [f.rsplit(":", 1)[1] for f in funcs] == ["detail_form", "detail_preferred"]
    assert all(os.path.isfile(f.rsplit(":", 1)[0]) for f in funcs)
    assert suite.upstream("grpo") == ["sft"] and cell.model_dir("grpo") == os.path.join(root, "grpo", "actor")
    rows = [{"task": "detail", "family": "llama-sp", "size": "0.5m", "method": m, "preferred": p, "well_formed": 1.0,
             "eos": 1.0, "length": 8.0, "distinct": 1.0} for m, p in (("ppo", 0.9), ("dpo", 1.0), ("grpo", 1.0))]
    md = suite.markdown(rows)
    assert "1 of 2 PPO/DPO cells" in md and "1 of 1 GRPO cells" in md
    assert "| detail | GRPO | 100% / 100% |" in suite.summary(rows)
