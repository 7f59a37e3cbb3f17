"""Alignment validation suite: SFT -> reward model -> PPO and SFT -> DPO with the documented defaults on
synthetic tasks the defaults were not tuned on, two model families and two sizes, 2 DeepSpeed ranks;
judged by an independent plain-transformers judge. Not a timed test: the full matrix is CPU-hours.

    python bench/alignment/run.py                              # everything (reuses finished outputs)
    python bench/alignment/run.py --tasks two_slot --families llama-sp --sizes 5m --methods dpo
    python bench/alignment/run.py --table_only                 # rebuild the table from finished cells

Each step gets only model, data, output (and the held-out data for its evaluation) plus the epochs or
steps below; every other setting is the step's default. Outputs go to WORK/<task>/<family>-<size>/
{base,sft,reward,ppo,dpo}; a step whose output is complete (and newer than its input) is reused. The
table (one row per task, family, size, method, SFT as the baseline) goes to bench/alignment/results.md
and results.json; the reward-model probe (malformed answers vs well-formed preferred ones) goes with it.

--variant NAME --extra 'dpo=--beta 0.5' runs a lever experiment into WORK/.../NAME/ (never the table's
defaults rows; they are listed separately).

--ppo_seeds 1234 1 2 also runs PPO with the other sampling seeds (from the same SFT and reward models)
into WORK/.../seedN/ppo; --dpo_seeds 1234 1 2 runs DPO with other data orders (from the same SFT model)
into WORK/.../seedN/dpo. The table then adds a section per method with every seed of every cell that has
more than one.

--keep bench/alignment/results.json keeps the rows of an earlier results file for every cell and method
the work directory has no run of (work directories stay on the machine that ran them).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)

import judge  # noqa: E402
from bench.common import free_port  # noqa: E402
from utils.ds import remove_shm_buffers  # noqa: E402
import tasks as task_defs  # noqa: E402

FAMILIES = ("llama-sp", "gpt2")  # the table's (issue 10): with a pad token, and without one (pad = EOS)
# More families a run can ask for (--families): OPT (BOS prepended, a pad token, dropout 0.1 in its
# config) and Qwen2 (no BOS, ChatML template, pad <|endoftext|> apart from EOS <|im_end|>), and GPT-NeoX
# (Pythia's architecture: parallel attention and MLP, an untied `embed_out` head, dropout 0.1 in its
# config; the llama-sp tokenizer, utils/tiny.py ARCHITECTURES).
EXTRA_FAMILIES = ("opt", "qwen2", "gpt_neox")
ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES
# (hidden, layers, heads) per family and size; parameter counts in the comment.
SIZES = {"0.5m": {"llama-sp": (128, 3, 4), "gpt2": (128, 2, 4),      # 0.57M, 0.53M
                  "opt": (128, 3, 4), "qwen2": (128, 3, 4),          # 0.53M, 0.51M
                  "gpt_neox": (128, 3, 4)},                          # 0.53M
         "5m": {"llama-sp": (320, 5, 4), "gpt2": (320, 4, 5),        # 4.7M, 5.3M
                "opt": (320, 5, 5), "qwen2": (320, 5, 4),            # 4.4M, 4.8M
                "gpt_neox": (320, 5, 4)}}                            # 4.3M
VOCAB = 512
DEFAULT_SEED = 1234  # every step's --seed default: the table's PPO and DPO rows
SEEDED = ("ppo", "dpo", "grpo")  # the methods the suite reruns with other seeds (--ppo_seeds, ...)
METHODS = ("sft", "reward", "ppo", "dpo", "grpo")
# The table's methods (issue 10); `grpo` (step 3 without a critic or reward model, rewarded by the task's
# own rules, rule_rewards.py) runs when asked for (--methods ... grpo) and gets a section of its own.
TABLE_METHODS = ("sft", "reward", "ppo", "dpo")
# What a GRPO user must give besides model, data and output: the estimator, K answers per prompt (the
# default of 1 is refused by the group estimators) and the reward functions.
GRPO_K = 8
# What the suite gives besides model, data and output: SFT trains a random-init model, so it needs
# epochs; PPO's default of one pass over the prompts is a few dozen steps here, so it gets epochs too.
STEP_FLAGS = {"sft": ["--num_train_epochs", "6"], "reward": [], "ppo": ["--num_train_epochs", "4"], "dpo": [],
              "grpo": ["--num_train_epochs", "4"]}
SCRIPTS = {"sft": "step1_sft/main.py", "reward": "step2_reward/main.py", "ppo": "step3_ppo/main.py",
           "grpo": "step3_ppo/main.py",
           "dpo": "dpo/main.py"}


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def complete(d: str) -> bool:
    """A finished run's model directory (PPO: OUTPUT_DIR/actor, whose parent holds done.json)."""
    run = os.path.dirname(d) if os.path.basename(d) == "actor" else d
    return (os.path.isfile(os.path.join(run, "done.json")) and os.path.isfile(os.path.join(d, "config.json"))
            and any(n.endswith(".safetensors") for n in os.listdir(d)))


def stamp(d: str) -> float:
    return os.path.getmtime(os.path.join(d, "args.json")) if os.path.isfile(os.path.join(d, "args.json")) else \
        os.path.getmtime(os.path.join(d, "config.json"))


class Cell:
    def __init__(self, work: str, task, family: str, size: str, variant: str = "", extra: dict | None = None,
                 step_flags: dict | None = None, inputs: "Cell | None" = None, seeded: str = ""):
        """inputs: a seed's cell takes every model but its `seeded` method's from this cell (the one it
        reseeds): a PPO seed its SFT and reward models, a DPO seed its SFT model."""
        self.task, self.family, self.size, self.variant, self.extra = task, family, size, variant, extra or {}
        self.step_flags = step_flags or STEP_FLAGS
        self.root = os.path.join(work, task.name, f"{family}-{size}")
        self.data = os.path.join(work, task.name, "data")
        assert inputs is None or seeded in SEEDED, "a seed's cell names the method it reseeds"
        self.inputs, self.seeded = inputs, seeded

    def out(self, method: str) -> str:
        """Output dir; a variant's own dir for a method it changes or one downstream of a changed one."""
        if self.inputs is not None and method != self.seeded:
            return self.inputs.out(method)
        if self.variant and self._changed(method):
            return os.path.join(self.root, self.variant, method)
        return os.path.join(self.root, method)

    def _changed(self, method: str) -> bool:
        ups = {"sft": ["sft"], "reward": ["sft", "reward"], "ppo": ["sft", "reward", "ppo"], "dpo": ["sft", "dpo"],
               "grpo": ["sft", "grpo"]}
        return any(m in self.extra for m in ups[method])

    def model_dir(self, method: str) -> str:
        return os.path.join(self.out(method), "actor") if method in ("ppo", "grpo") else self.out(method)


def prepare_data(work: str, task) -> str:
    d = os.path.join(work, task.name, "data")
    os.makedirs(d, exist_ok=True)
    for name, rows in (("sft", task.sft), ("pairs", task.pairs), ("prompts", task.prompts),
                       ("heldout_prompts", task.heldout_prompts), ("heldout_pairs", task.heldout_pairs)):
        path = os.path.join(d, f"{name}.jsonl")
        if not os.path.exists(path):
            write_jsonl(path, rows)
    return d


def build_base(cell: Cell) -> str:
    base = os.path.join(cell.root, "base")
    if not complete_base(base):
        from utils.tiny import make_tiny_model

        hidden, layers, heads = SIZES[cell.size][cell.family]
        make_tiny_model(cell.family, base, seed=0, hidden=hidden, layers=layers, heads=heads, vocab_size=VOCAB,
                        extra_lines=cell.task.text_lines())
    return base


def complete_base(d: str) -> bool:
    return os.path.isdir(d) and os.path.isfile(os.path.join(d, "config.json"))


def command(cell: Cell, method: str, base: str) -> list[str]:
    d = cell.data
    j = lambda n: os.path.join(d, n)  # noqa: E731
    if method == "sft":
        args = ["--model_name_or_path", base, "--data_path", j("sft.jsonl")]
    elif method == "reward":
        args = ["--model_name_or_path", cell.out("sft"), "--data_path", j("pairs.jsonl"),
                "--eval_data_path", j("heldout_pairs.jsonl")]
    elif method == "dpo":
        args = ["--model_name_or_path", cell.out("sft"), "--data_path", j("pairs.jsonl"),
                "--eval_data_path", j("heldout_pairs.jsonl")]
    elif method == "grpo":
        rules = os.path.join(HERE, "rule_rewards.py")
        args = ["--actor_model_name_or_path", cell.out("sft"), "--advantage_estimator", "grpo",
                "--n_samples_per_prompt", str(GRPO_K),
                "--reward_funcs", f"{rules}:{cell.task.name}_form", f"{rules}:{cell.task.name}_preferred",
                "--data_path", j("prompts.jsonl"), "--eval_data_path", j("heldout_prompts.jsonl")]
    else:
        args = ["--actor_model_name_or_path", cell.out("sft"), "--critic_model_name_or_path", cell.out("reward"),
                "--data_path", j("prompts.jsonl"), "--eval_data_path", j("heldout_prompts.jsonl")]
    return args + ["--output_dir", cell.out(method)] + cell.step_flags[method] + shlex.split(cell.extra.get(method, ""))


def upstream(method: str) -> list[str]:
    return {"sft": [], "reward": ["sft"], "ppo": ["sft", "reward"], "dpo": ["sft"], "grpo": ["sft"]}[method]


def run_step(cell: Cell, method: str, base: str, log, redo: bool = False) -> float:
    out = cell.out(method)
    check = cell.model_dir(method)
    fresh = not redo and complete(check) and all(stamp(cell.model_dir(u)) <= stamp(check) for u in upstream(method))
    if fresh:
        return 0.0
    for u in upstream(method):
        if not complete(cell.model_dir(u)):
            raise RuntimeError(f"{cell.root}: {u} is missing; run it first (--methods {u})")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.join(REPO, SCRIPTS[method]),
           *command(cell, method, base)]
    if os.path.exists(out) or os.path.exists(out + ".partial"):
        cmd.append("--overwrite_output_dir")  # a stale or unfinished output: this run replaces it
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    log(f"{cell.root}: {method} ...")
    t0 = time.time()
    with open(out + ".log", "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    remove_shm_buffers(port)  # a step that failed leaves its ranks' buffers
    if p.returncode != 0 or not complete(check):
        raise RuntimeError(f"{method} failed ({p.returncode}); see {out}.log")
    dt = time.time() - t0
    log(f"{cell.root}: {method} done in {dt:.0f}s")
    return dt


def judged(cell: Cell, method: str) -> dict:
    """The judge's row for a finished output (cached next to it, redone when the model is newer)."""
    d = cell.model_dir(method)
    path = os.path.join(cell.out(method), "judge.json")
    if os.path.isfile(path) and os.path.getmtime(path) >= stamp(d):
        with open(path) as f:
            return json.load(f)
    if method == "reward":
        row = judge.reward_probe(cell.task, d)
    else:
        row = judge.judge(cell.task, d)
    row["settings"] = resolved_settings(cell, method)
    with open(path, "w") as f:
        json.dump(row, f, indent=1)
    return row


def resolved_settings(cell: Cell, method: str) -> dict:
    """The flags that decided the run (from its args.json), for the results file."""
    with open(os.path.join(cell.out(method), "args.json")) as f:
        a = json.load(f)
    keys = {"sft": ["learning_rate", "num_train_epochs", "total_steps"],
            "reward": ["learning_rate", "num_train_epochs", "total_steps", "synthetic_negatives"],
            "dpo": ["learning_rate", "beta", "rpo_alpha", "anchor_coef", "loss_type", "freeze_embeddings",
                    "synthetic_negatives", "num_train_epochs", "total_steps"],
            "ppo": ["actor_learning_rate", "critic_learning_rate", "kl_coef", "kl_estimator", "target_kl",
                    "anchor_coef", "anchor_confidence", "normalize_reward", "resolved_cut_answer_score",
                    "num_train_epochs", "total_steps", "max_answer_seq_len",
                    "per_device_generation_batch_size"],
            "grpo": ["actor_learning_rate", "kl_coef", "kl_estimator", "kl_in", "n_samples_per_prompt",
                     "scale_rewards", "loss_agg", "resolved_cut_answer_score", "num_train_epochs", "total_steps",
                     "max_answer_seq_len", "per_device_generation_batch_size"]}[method]
    return {k: a.get(k) for k in keys if k in a}


def run_cell(cell: Cell, methods: list[str], log, redo: tuple = ()) -> dict:
    prepare_data(os.path.dirname(os.path.dirname(cell.root)), cell.task)
    base = build_base(cell)
    rows = {}
    for m in METHODS:
        if m not in methods:
            continue
        run_step(cell, m, base, log, redo=m in redo)
        rows[m] = judged(cell, m)
        if m == "reward":
            p = rows[m]
            log(f"{cell.root}: reward probe: malformed beats preferred {p['malformed_wins']:.0%} "
                f"{ {k: round(v, 2) for k, v in p['by_kind'].items()} }")
        else:
            r = rows[m]
            log(f"{cell.root}: {m}: preferred {r['preferred']:.0%} well-formed {r['well_formed']:.0%} "
                f"eos {r['eos']:.0%}  e.g. {r['answers'][:3]}")
    return rows


# ----------------------------------------------------------------------------- table

def collect(work: str, variant: str = "") -> list[dict]:
    rows = []
    for tname in task_defs.TASKS:
        for fam in ALL_FAMILIES:
            for size in SIZES:
                root = os.path.join(work, tname, f"{fam}-{size}", variant) if variant else \
                    os.path.join(work, tname, f"{fam}-{size}")
                for m in METHODS:
                    path = os.path.join(root, m, "judge.json")
                    if os.path.isfile(path):
                        with open(path) as f:
                            rows.append({"task": tname, "family": fam, "size": size, "method": m, **json.load(f)})
    return rows


def markdown(rows: list[dict]) -> str:
    gen = [r for r in rows if r["method"] != "reward"]
    probes = {(r["task"], r["family"], r["size"]): r for r in rows if r["method"] == "reward"}
    lines = ["| task | family | size | method | preferred | well-formed | EOS | length | distinct | RM: malformed wins |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in gen:
        probe = probes.get((r["task"], r["family"], r["size"])) if r["method"] == "ppo" else None
        lines.append(f"| {r['task']} | {r['family']} | {r['size']} | {r['method']} | {r['preferred']:.0%} | "
                     f"{r['well_formed']:.0%} | {r['eos']:.0%} | {r['length']:.1f} | {r['distinct']:.2f} | "
                     f"{'' if probe is None else format(probe['malformed_wins'], '.0%')} |")
    lines.append("")
    for methods in (("ppo", "dpo"), ("grpo",)):
        aligned = [r for r in gen if r["method"] in methods]
        ok = [r for r in aligned if r["preferred"] >= 0.95 and r["well_formed"] >= 0.95]
        if aligned:
            lines.append(f"{len(ok)} of {len(aligned)} {'/'.join(m.upper() for m in methods)} cells at >= 95% "
                         f"preferred and >= 95% well-formed.")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Compact view: one row per (task, method), one column per (family, size): preferred / well-formed,
    and the reward model's malformed-wins rate under the PPO rows."""
    present = {r["family"] for r in rows} or set(FAMILIES)
    cells = [(f, z) for f in ALL_FAMILIES for z in SIZES if f in present]
    by = {(r["task"], r["family"], r["size"], r["method"]): r for r in rows}
    head = "| task | method | " + " | ".join(f"{f} {z}" for f, z in cells) + " |"
    lines = [head, "|---|---|" + "---|" * len(cells)]
    for t in task_defs.TASKS:
        for m in ("sft", "ppo", "dpo", "grpo", "reward"):
            vals = []
            for f, z in cells:
                r = by.get((t, f, z, m))
                if r is None:
                    vals.append("")
                elif m == "reward":
                    vals.append(f"{r['malformed_wins']:.0%}")
                else:
                    vals.append(f"{r['preferred']:.0%} / {r['well_formed']:.0%}")
            if any(vals):
                label = "RM: malformed beats preferred" if m == "reward" else m.upper() if m != "sft" else "SFT (start)"
                lines.append(f"| {t} | {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def seed_rows(work: str, method: str = "ppo") -> dict:
    """{(task, family, size): {seed: judge row}} of `method`: the default seed's run and every seedN/ run."""
    out = {}
    for tname in task_defs.TASKS:
        for fam in ALL_FAMILIES:
            for size in SIZES:
                root = os.path.join(work, tname, f"{fam}-{size}")
                found = {DEFAULT_SEED: os.path.join(root, method, "judge.json")}
                for d in glob.glob(os.path.join(root, "seed*", method, "judge.json")):
                    name = d.split(os.sep)[-3]
                    if name[4:].isdigit():
                        found[int(name[4:])] = d
                rows = {}
                for seed, path in found.items():
                    if os.path.isfile(path):
                        with open(path) as f:
                            rows[seed] = json.load(f)
                if len(rows) > 1:
                    out[(tname, fam, size)] = rows
    return out


def seeds_markdown(by_cell: dict, method: str = "ppo") -> str:
    """One line per cell run with several seeds: preferred/well-formed per seed, min and mean preferred."""
    if not by_cell:
        return ""
    name = method.upper()
    lines = [f"| task | family | size | {name} per seed (preferred/well-formed) | min | mean | every seed >= 95/95 |",
             "|---|---|---|---|---|---|---|"]
    passing = 0
    for (t, fam, size), rows in by_cell.items():
        seeds = sorted(rows, key=lambda s: (s != DEFAULT_SEED, s))
        per = ", ".join(f"{s}: {rows[s]['preferred']:.0%}/{rows[s]['well_formed']:.0%}" for s in seeds)
        pref = [rows[s]["preferred"] for s in seeds]
        ok = all(rows[s]["preferred"] >= 0.95 and rows[s]["well_formed"] >= 0.95 for s in seeds)
        passing += ok
        lines.append(f"| {t} | {fam} | {size} | {per} | {min(pref):.0%} | {sum(pref) / len(pref):.0%} | "
                     f"{'yes' if ok else 'no'} |")
    lines += ["", f"{passing} of {len(by_cell)} cells at >= 95% / 95% with every {name} seed."]
    return "\n".join(lines)


def _order(key: tuple) -> tuple:
    t, f, z, *rest = key
    return (list(task_defs.TASKS).index(t), list(ALL_FAMILIES).index(f), list(SIZES).index(z), *rest)


def keep_earlier(rows: list[dict], seeds: dict, path: str) -> tuple[list[dict], dict, list[str]]:
    """Add the rows of an earlier results file (`path`, .json) for the (cell, method)s this work directory
    has no run of, with their seed runs; a kept row names its commit. Work directories stay on the machine
    that ran them, so a rerun of a few cells would otherwise drop every other row from the table."""
    with open(path) as f:
        prev = json.load(f)
    have = {(r["task"], r["family"], r["size"], r["method"]) for r in rows}
    kept = [r | {"answers": r.get("samples", []), "commit": r.get("commit", prev["commit"])}
            for r in prev["rows"] if (r["task"], r["family"], r["size"], r["method"]) not in have]
    seeds = {m: dict(by) for m, by in seeds.items()}
    commits = {r["commit"] for r in kept}
    for m in SEEDED:
        for r in prev.get(f"{m}_seeds", []):
            cell = (r["task"], r["family"], r["size"])
            if (*cell, m) not in have:  # never mix a cell's seeds from two runs of the suite
                c = r.get("commit", prev["commit"])
                seeds[m].setdefault(cell, {})[r["seed"]] = r | {"answers": r.get("samples", []), "commit": c}
                commits.add(c)
    rows = sorted(rows + kept, key=lambda r: _order((r["task"], r["family"], r["size"],
                                                     METHODS.index(r["method"]))))
    seeds = {m: dict(sorted(by.items(), key=lambda kv: _order(kv[0]))) for m, by in seeds.items()}
    return rows, seeds, sorted(commits)


def write_results(work: str, out_prefix: str, keep: str | None = None) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    rows = [r | {"commit": commit} for r in collect(work)]
    seeds = {m: {c: {s: r | {"commit": commit} for s, r in by.items()} for c, by in seed_rows(work, m).items()}
             for m in SEEDED}
    earlier = []
    if keep:
        rows, seeds, earlier = keep_earlier(rows, seeds, keep)
    md = "Preferred / well-formed on held-out prompts:\n\n" + summary(rows) + "\n\nEvery row:\n\n" + markdown(rows)
    what = {"ppo": "sampling seeds", "dpo": "seeds (data order)", "grpo": "sampling seeds"}
    for m in SEEDED:
        if seeds[m]:
            md += (f"\n\n{m.upper()} with other {what[m]} (`--{m}_seeds`; the rows above are seed {DEFAULT_SEED}):\n\n"
                   + seeds_markdown(seeds[m], m))
    kept = (f" The rows of the cells and methods not rerun in this work directory are kept from an earlier "
            f"results file generated at commit {', '.join(earlier)} (each row of the .json names the commit it "
            f"came with; the README says which code ran them)." if earlier else "")
    with open(out_prefix + ".md", "w") as f:
        f.write(f"# Alignment suite results\n\nGenerated by `python bench/alignment/run.py` (commit {commit}); "
                f"held-out prompts, greedy answers, plain-transformers judge.{kept}\n\n" + md + "\n")
    with open(out_prefix + ".json", "w") as f:
        json.dump({"commit": commit, "step_flags": STEP_FLAGS, "sizes": SIZES,
                   "rows": [{k: v for k, v in r.items() if k != "answers"} | {"samples": r.get("answers", [])[:6]}
                            for r in rows],
                   **{f"{m}_seeds": [{"task": t, "family": f, "size": z, "seed": s,
                                      **{k: v for k, v in r.items() if k != "answers"},
                                      "samples": r.get("answers", [])[:6]}
                                     for (t, f, z), by in seeds[m].items() for s, r in sorted(by.items())]
                      for m in SEEDED}},
                  f, indent=1)
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(task_defs.TASKS), choices=list(task_defs.TASKS))
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(ALL_FAMILIES),
                    help=f"model families (default: the table's {' '.join(FAMILIES)}; also {' '.join(EXTRA_FAMILIES)})")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=list(TABLE_METHODS), choices=list(METHODS),
                    help="steps to run and judge (a step's inputs must exist or be listed too; default: the "
                         "table's, grpo when named)")
    ap.add_argument("--work_dir", default=os.path.join(HERE, "work"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="prefix of the .md and .json table")
    ap.add_argument("--variant", default="", help="name of a lever experiment (outputs in their own dirs)")
    ap.add_argument("--extra", nargs="*", default=[], help="METHOD='flags' for a --variant")
    ap.add_argument("--redo", nargs="*", default=[], choices=list(METHODS),
                    help="rerun these steps even when their outputs are complete (e.g. after a default changed)")
    ap.add_argument("--ppo_seeds", nargs="+", type=int, default=[DEFAULT_SEED],
                    help="PPO sampling seeds; each one other than the default runs into WORK/.../seedN/ppo "
                         "(or VARIANT_seedN/) from the same SFT and reward models")
    ap.add_argument("--dpo_seeds", nargs="+", type=int, default=[DEFAULT_SEED],
                    help="DPO seeds (data order); each one other than the default runs into WORK/.../seedN/dpo "
                         "(or VARIANT_seedN/) from the same SFT model")
    ap.add_argument("--grpo_seeds", nargs="+", type=int, default=[DEFAULT_SEED],
                    help="GRPO sampling seeds; each one other than the default runs into WORK/.../seedN/grpo "
                         "(or VARIANT_seedN/) from the same SFT model")
    ap.add_argument("--table_only", action="store_true")
    ap.add_argument("--keep", metavar="RESULTS.json",
                    help="keep the rows (and seed runs) of this earlier results file for the cells and methods the "
                         "work directory has no run of, each naming its commit")
    a = ap.parse_args(argv)
    extra = dict(e.split("=", 1) for e in a.extra)
    if extra and not a.variant:
        ap.error("--extra needs --variant (the defaults' rows are never run with extra flags)")
    if a.keep and not os.path.isfile(a.keep):
        ap.error(f"--keep {a.keep}: no such results file (bench/alignment/results.json is the committed one)")
    import torch

    torch.set_num_threads(1)  # judging tiny models: threads cost more than they bring on a shared CPU

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # (method, seed) of every extra seed run of a cell: the same list for every cell.
    reseeds = [(m, seed) for m, seeds in (("ppo", a.ppo_seeds), ("dpo", a.dpo_seeds), ("grpo", a.grpo_seeds))
               if m in a.methods
               for seed in seeds if seed != DEFAULT_SEED]
    failed = []
    if not a.table_only:
        for tname in a.tasks:
            task = task_defs.TASKS[tname]()
            for fam in a.families:
                for size in a.sizes:
                    cell = Cell(a.work_dir, task, fam, size, a.variant, extra)
                    try:
                        run_cell(cell, a.methods, log, tuple(a.redo))
                        for m, seed in reseeds:
                            name = f"{a.variant}_seed{seed}" if a.variant else f"seed{seed}"
                            flags = {**extra, m: f"{extra.get(m, '')} --seed {seed}".strip()}
                            run_cell(Cell(a.work_dir, task, fam, size, name, flags, inputs=cell, seeded=m), [m], log,
                                     tuple(a.redo))
                    except RuntimeError as e:
                        log(f"FAILED: {e}")
                        failed.append(str(e))
    if not a.variant:
        print(write_results(a.work_dir, a.results, a.keep))
    else:
        print(markdown(collect(a.work_dir, a.variant)))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
