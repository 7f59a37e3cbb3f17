"""PPO (step 3) throughput: samples/s, the split per phase, and the ratio to SFT on the same model and lengths.

    python bench/bench_ppo.py                              # bf16, ZeRO-2 + optimizer offload (DeepSpeed-Chat's setting)
    python bench/bench_ppo.py --dtype fp32 --no-offload
    python bench/bench_ppo.py --no_sft --dschat ~/DeepSpeedExamples/applications/DeepSpeed-Chat   # beside it

Setting: 16 prompts of exactly 32 tokens per PPO step over 2 ranks (8 per rank), answers of up to 16
tokens (the random-init actor rarely emits EOS, so nearly all are 16), one PPO epoch over one
mini-batch per rank, actor and critic on ZeRO-2 with optimizer offload, bf16, a 2.6M-parameter llama
(--size small: hidden 256, 4 layers; --size tiny: the test model) for all four models, eager attention
(see --attn_implementation). With --dschat DIR (a DeepSpeed-Chat checkout, its own environment's
interpreter in --dschat_python; bench/DEEPSPEED_CHAT.md) DeepSpeed-Chat's step 3 runs the same setting
interleaved with ours, run for run, and the ratio printed is measured beside; without it, the ratio is
to the 11.1 samples/s of issue 14 (another machine, a 3.3M-parameter Llama), which says little.

samples/s = prompts answered and trained on per second of PPO step (generation + experience +
training), the median over the steps after --warmup of each run; start-up (loading four models) is
not counted. The SFT reference trains the same model on 48-token samples (the PPO sequence length)
with the same global batch, ranks, ZeRO stage, offload and dtype: a PPO step does the reference's and
the reward model's forwards, the actor's and critic's forward + backward (their rollout values come from
those forwards, --fuse_actor_forward / --fuse_critic_forward), and generation, so its FLOPs alone allow
about 3/8 of the SFT rate before generation. Each figure is the median over --reps fresh runs with the spread,
with the peak RSS of the largest rank and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

DEEPSPEED_CHAT_SAMPLES_PER_SEC = 11.1  # measured beside this project, ZeRO-2 + offload + bf16 (issue 14)
PROMPT_TOKENS, ANSWER_TOKENS = 32, 16


def make_models(root: str, size: str = "small") -> tuple[str, str]:
    """A random-init llama of `size` (bench/common.py SIZES; actor) and a one-label classifier on the same
    weights (critic, reward)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from utils.tiny import make_tiny_model

    actor = make_tiny_model("llama", os.path.join(root, "actor"), seed=0, **common.SIZES[size])
    critic = os.path.join(root, "critic")
    model = AutoModelForSequenceClassification.from_pretrained(actor, num_labels=1)
    model.save_pretrained(critic)
    AutoTokenizer.from_pretrained(actor).save_pretrained(critic)
    return actor, critic


def prompt_texts(n: int) -> list[str]:
    """n prompts of four shipped prompts each: longer than 32 tokens."""
    nouns = [json.loads(line)["prompt"] for line in open(os.path.join(REPO, "data", "prompts.jsonl"))]
    return [" ".join(nouns[(i + k) % len(nouns)] for k in range(4)) for i in range(n)]


def make_prompts(path: str, n: int = 256) -> None:
    """Prompts longer than 32 tokens; --overlong truncate cuts every one to exactly 32."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": text}) + "\n" for text in prompt_texts(n))


def make_sft_texts(path: str, tokenizer, n: int = 256, seed: int = 0) -> None:
    """{"text"} records of exactly PROMPT_TOKENS + ANSWER_TOKENS tokens once BOS and EOS are added."""
    import random

    rng = random.Random(seed)
    words = [w.strip() for w in open(os.path.join(REPO, "data", "vocab_words.txt")) if w.strip()]
    target = PROMPT_TOKENS + ANSWER_TOKENS - 2  # BOS and EOS
    with open(path, "w") as f:
        while n:
            ws = []
            while len(tokenizer(" ".join(ws), add_special_tokens=False)["input_ids"]) < target:
                ws.append(rng.choice(words))
            text = " ".join(ws)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == target:
                f.write(json.dumps({"text": text}) + "\n")
                n -= 1


DSCHAT_WARMUP = 5  # DeepSpeed-Chat steps left out of its median, as --warmup for ours


def prepare_dschat(a, root: str, actor: str) -> dict:
    """Inputs for DeepSpeed-Chat's step 3 at this bench's setting (bench/DEEPSPEED_CHAT.md): copies of the actor
    whose tokenizer config transformers 4.x reads, a critic in DeepSpeed-Chat's own format (its RewardModel
    around the same weights, built by its own code in its own interpreter; speed does not depend on the
    head's weights), and prompts of at most PROMPT_TOKENS tokens in its " Human: ... Assistant:" form,
    written where its local/jsonfile dataset reads them (refused if files are already there; main removes
    them after the runs)."""
    import shutil
    import subprocess

    if not os.path.isfile(os.path.join(a.dschat, "training", "step3_rlhf_finetuning", "main.py")):
        raise SystemExit(f"error: --dschat {a.dschat}: no training/step3_rlhf_finetuning/main.py there (give the "
                         "applications/DeepSpeed-Chat directory of DeepSpeedExamples)")
    if not os.path.isfile(os.path.join(os.path.dirname(a.dschat_python), "deepspeed")):
        raise SystemExit(f"error: --dschat_python {a.dschat_python}: no `deepspeed` beside it (give the python of "
                         "DeepSpeed-Chat's own environment, bench/DEEPSPEED_CHAT.md)")
    data = os.path.join(a.dschat, "data")
    for name in ("train.json", "eval.json"):
        if os.path.exists(os.path.join(data, name)):
            raise SystemExit(f"error: {os.path.join(data, name)} exists; DeepSpeed-Chat's local/jsonfile data is "
                             "written there: move it away first")
    from transformers import AutoTokenizer

    models = os.path.join(root, "dschat-models")  # no "llama" in the path: its tokenizer branch for llama differs
    dactor, dcritic = os.path.join(models, "actor"), os.path.join(models, "critic")
    shutil.copytree(actor, dactor)
    cfg_path = os.path.join(dactor, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    json.dump(cfg, open(cfg_path, "w"), indent=1)
    shutil.copytree(dactor, dcritic)
    make = ("import sys, torch; from transformers import AutoModel, AutoTokenizer; "
            "from dschat.utils.model.reward_model import RewardModel; d = sys.argv[1]; "
            "t = AutoTokenizer.from_pretrained(d); t.pad_token = t.eos_token; "
            "torch.save(RewardModel(AutoModel.from_pretrained(d), t).state_dict(), d + '/pytorch_model.bin')")
    env = dict(os.environ, PYTHONPATH=a.dschat)
    p = subprocess.run([a.dschat_python, "-c", make, dcritic], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: building DeepSpeed-Chat's critic with {a.dschat_python} failed:\n{p.stderr[-2000:]}")
    tok = AutoTokenizer.from_pretrained(actor)
    rows = []
    # Twice what --steps needs: its step 3 trains on about 2/3 of these (seen: 40 steps from 1,000 prompts);
    # run_dschat stops it once --steps steps are timed.
    for text in prompt_texts(2 * (a.steps + 1) * a.prompts_per_step):
        words = text.split()
        while len(tok(f" Human: {' '.join(words)} Assistant:")["input_ids"]) > PROMPT_TOKENS:
            words.pop()
        rows.append({"prompt": f" Human: {' '.join(words)} Assistant:", "chosen": " Yes.", "rejected": " No."})
    os.makedirs(data, exist_ok=True)
    files = []
    for name, part in (("train.json", rows), ("eval.json", rows[:a.prompts_per_step])):
        files.append(os.path.join(data, name))
        with open(files[-1], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return {"actor": dactor, "critic": dcritic, "files": files}


def run_dschat(a, inp: dict, out: str) -> dict:
    """One DeepSpeed-Chat step-3 run; samples/s from the wall time between its step lines (generation, the four
    models' experience forwards and training: its own printed estimate leaves the experience out)."""
    import signal
    import subprocess
    import time

    from utils.ds import remove_shm_buffers

    per_rank = a.prompts_per_step // a.ranks
    port = common.free_port()
    cmd = [os.path.join(os.path.dirname(a.dschat_python), "deepspeed"), "--num_gpus", str(a.ranks), "--master_port",
           str(port), "main.py", "--data_path", "local/jsonfile", "--data_split", "0,0,1",
           "--data_output_path", os.path.join(out, "data_files"), "--actor_model_name_or_path", inp["actor"],
           "--critic_model_name_or_path", inp["critic"], "--num_padding_at_beginning", "0",
           "--per_device_generation_batch_size", str(per_rank), "--per_device_training_batch_size", str(per_rank),
           "--generation_batches", "1", "--ppo_epochs", "1", "--max_prompt_seq_len", str(PROMPT_TOKENS),
           "--max_answer_seq_len", str(ANSWER_TOKENS), "--num_train_epochs", "1", "--actor_zero_stage",
           str(a.zero_stage), "--critic_zero_stage", str(a.zero_stage), "--dtype", a.dtype, "--actor_dropout", "0.0",
           "--output_dir", out] + (["--offload"] if a.offload else [])
    venv = os.path.dirname(os.path.dirname(a.dschat_python))
    env = dict(os.environ, PYTHONPATH=a.dschat, PATH=os.path.dirname(a.dschat_python) + os.pathsep + os.environ["PATH"],
               TORCH_EXTENSIONS_DIR=os.path.join(venv, "torch_extensions"))
    steps, tail = [], []
    p = subprocess.Popen(cmd, cwd=os.path.join(a.dschat, "training", "step3_rlhf_finetuning"), env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for line in p.stdout:
            if "| Step:" in line:
                steps.append(time.time())
            tail = (tail + [line])[-40:]
            if len(steps) > a.steps:  # enough timed steps: the rest of its epoch is not needed
                os.killpg(p.pid, signal.SIGTERM)
                break
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        remove_shm_buffers(port)  # stopped, its ranks leave their buffers
    gaps = [b - t for t, b in zip(steps, steps[1:])][DSCHAT_WARMUP:]
    if len(gaps) < 5:
        raise SystemExit("DeepSpeed-Chat's step 3 did not run:\n" + "".join(tail))
    return {"samples_per_sec": a.prompts_per_step / statistics.median(gaps)}


def ds_flags(a) -> list[str]:
    return ["--dtype", a.dtype] + (["--offload"] if a.offload else [])


def run_ppo(a, actor: str, critic: str, prompts: str, out: str, extra: str = "") -> dict:
    per_rank = a.prompts_per_step // a.ranks
    args = ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic, "--data_path", prompts,
            "--max_steps", str(a.steps), "--max_prompt_seq_len", str(PROMPT_TOKENS), "--overlong", "truncate",
            "--max_answer_seq_len", str(ANSWER_TOKENS), "--per_device_generation_batch_size", str(per_rank),
            "--per_device_training_batch_size", str(per_rank), "--actor_zero_stage", str(a.zero_stage),
            "--critic_zero_stage", str(a.zero_stage), "--actor_learning_rate", "1e-4", "--critic_learning_rate",
            "1e-4", "--print_answers_interval", "0", "--attn_implementation", a.attn_implementation,
            "--log_interval", "1", "--critic_warmup_steps", "0", "--temperature", "1.0", "--cut_answer_score",
            "scored", *ds_flags(a), *a.extra.split(), *extra.split()]
    # Temperature 1.0 and cut answers scored by the reward model keep every answer ANSWER_TOKENS long, like
    # DeepSpeed-Chat's and the SFT samples compared with: under PPO's defaults (a cut answer scores the
    # lowest; sampling at 0.7) the random actor learns to stop after 4-8 tokens and a step does less work.
    env = dict(os.environ, PYTHONPATH=REPO)
    port = str(common.free_port())
    cmd = ["deepspeed", "--num_gpus", str(a.ranks), "--master_port", port, os.path.join(REPO, "step3_ppo/main.py"),
           *args, "--output_dir", out]
    p, rss = common.run_measured(cmd, env=env)
    if p.returncode != 0:
        raise SystemExit(f"step 3 failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > a.warmup]
    res = {k: statistics.median(r[k] for r in timed)
           for k in ("samples_per_sec", "generation_sec", "experience_sec", "train_sec", "response_length")}
    res["rss_mb"] = rss
    return res


def run_sft(a, actor: str, data: str, out: str) -> dict:
    window = 5
    args = ["--model_name_or_path", actor, "--data_path", data, "--per_device_train_batch_size",
            str(a.prompts_per_step // a.ranks), "--max_steps", str(window * 5), "--log_interval", str(window),
            "--zero_stage", str(a.zero_stage), "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
            "--eval_fraction", "0.02", *ds_flags(a)]
    r = common.run_program("step1_sft/main.py", args, out, a.ranks, "samples_per_sec")
    return {"samples_per_sec": r["rate"], "rss_mb": r["rss_mb"]}


def ppo_summary(runs: list[dict], label: str) -> dict:
    """Median and spread of each timed quantity over the runs of one configuration, printed."""
    ppo = {k: common.summary([r[k] for r in runs])
           for k in ("samples_per_sec", "generation_sec", "experience_sec", "train_sec", "response_length")}
    step = sum(ppo[k]["median"] for k in ("generation_sec", "experience_sec", "train_sec"))
    print(f"{label} samples/s: {common.fmt(ppo['samples_per_sec'])}; answer length "
          f"{ppo['response_length']['median']:.1f}; peak RSS per rank {max(r['rss_mb'] or 0 for r in runs):.0f} MB")
    print(f"  step {1000 * step:.0f} ms = generation {1000 * ppo['generation_sec']['median']:.0f} ms "
          f"({100 * ppo['generation_sec']['median'] / step:.0f}%) + experience "
          f"{1000 * ppo['experience_sec']['median']:.0f} ms ({100 * ppo['experience_sec']['median'] / step:.0f}%) + "
          f"training {1000 * ppo['train_sec']['median']:.0f} ms ({100 * ppo['train_sec']['median'] / step:.0f}%)")
    return ppo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"],
                    help="model size of all four models (bench/common.py): small (2.6M parameters) is the closest "
                         "to the 3.3M-parameter model of the DeepSpeed-Chat figure; tiny is the test model")
    ap.add_argument("--steps", type=int, default=30, help="PPO steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of each run's median")
    ap.add_argument("--reps", type=int, default=3, help="fresh runs of PPO and of SFT, interleaved")
    ap.add_argument("--prompts_per_step", type=int, default=16, help="prompts per PPO step over all ranks")
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks")
    ap.add_argument("--zero_stage", type=int, default=2, help="ZeRO stage of actor and critic (and of the SFT run)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="training precision")
    ap.add_argument("--attn_implementation", default="eager", choices=["auto", "eager", "sdpa"],
                    help="attention kernel (eager: torch's bf16 CPU flash-attention backward is slow for short "
                         "sequences; DeepSpeed-Chat's OPT models ran eager attention)")
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                    help="optimizer states on the CPU (DeepSpeedCPUAdam)")
    ap.add_argument("--no_sft", action="store_true", help="skip the SFT reference runs")
    ap.add_argument("--extra", default="", help="more step-3 flags, space-separated")
    ap.add_argument("--versus", default=None, help="step-3 flags of a second configuration of ours, run interleaved "
                                                   "with the first; prints both and the ratio (e.g. "
                                                   "'--no-fuse_actor_forward')")
    ap.add_argument("--dschat", default=None, help="DeepSpeed-Chat directory (applications/DeepSpeed-Chat of "
                                                   "DeepSpeedExamples): run its step 3 beside ours, interleaved")
    ap.add_argument("--dschat_python", default="/tmp/venv-dschat/bin/python",
                    help="the interpreter of DeepSpeed-Chat's own environment (bench/DEEPSPEED_CHAT.md)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    load0 = common.load_average()
    root = tempfile.mkdtemp(prefix="bench_ppo_")
    actor, critic = make_models(root, a.size)
    prompts, texts = os.path.join(root, "prompts.jsonl"), os.path.join(root, "sft.jsonl")
    make_prompts(prompts)
    from utils.model import load_tokenizer

    make_sft_texts(texts, load_tokenizer(actor))
    runners = {"ppo": lambda rep: run_ppo(a, actor, critic, prompts, os.path.join(root, f"ppo-{rep}"))}
    if a.versus is not None:
        runners["versus"] = lambda rep: run_ppo(a, actor, critic, prompts, os.path.join(root, f"versus-{rep}"), a.versus)
    if not a.no_sft:
        runners["sft"] = lambda rep: run_sft(a, actor, texts, os.path.join(root, f"sft-{rep}"))
    if a.dschat:
        a.dschat = os.path.abspath(a.dschat)
        inp = prepare_dschat(a, root, actor)
        runners["dschat"] = lambda rep: run_dschat(a, inp, os.path.join(root, f"dschat-{rep}"))
    try:
        res = common.interleave(runners, a.reps)
    finally:
        for path in inp["files"] if a.dschat else []:
            os.remove(path)  # the data this bench wrote into the DeepSpeed-Chat checkout
    load1 = common.load_average()

    print(f"== PPO | {a.prompts_per_step} prompts x ({PROMPT_TOKENS} + up to {ANSWER_TOKENS}) tokens per step, "
          f"{a.ranks} ranks, ZeRO-{a.zero_stage}{' + offload' if a.offload else ''}, {a.dtype}, llama-{a.size} x 4 | "
          f"{a.reps} runs x {a.steps - a.warmup} timed steps")
    ppo = ppo_summary(res["ppo"], f"PPO{' ' + a.extra if a.extra else ''}")
    out = {"setting": vars(a), "ppo": ppo, "load_average": [load0, load1]}
    if "versus" in res:
        out["versus"] = ppo_summary(res["versus"], f"PPO {a.versus}")
        pairs = [o["samples_per_sec"] / v["samples_per_sec"] for o, v in zip(res["ppo"], res["versus"])]
        print(f"first / second = {ppo['samples_per_sec']['median'] / out['versus']['samples_per_sec']['median']:.2f}x "
              f"(per interleaved pair: {', '.join(f'{x:.2f}x' for x in pairs)})")
    if "dschat" in res:
        dsc = common.summary([r["samples_per_sec"] for r in res["dschat"]])
        out["dschat"] = dsc
        pairs = [o["samples_per_sec"] / d["samples_per_sec"] for o, d in zip(res["ppo"], res["dschat"])]
        ratio = ppo["samples_per_sec"]["median"] / dsc["median"]
        print(f"DeepSpeed-Chat step 3, run beside (interleaved, same model, lengths, batch, ranks, ZeRO, dtype): "
              f"{common.fmt(dsc)} samples/s; ours / DeepSpeed-Chat = {ratio:.2f}x "
              f"(per pair: {', '.join(f'{x:.2f}x' for x in pairs)})")
    else:
        ratio = ppo["samples_per_sec"]["median"] / DEEPSPEED_CHAT_SAMPLES_PER_SEC
        print(f"vs DeepSpeed-Chat's {DEEPSPEED_CHAT_SAMPLES_PER_SEC} samples/s (quoted from issue 14, another machine, "
              f"a 3.3M model; run it beside with --dschat, as the README's figure was): {ratio:.2f}x")
    if "sft" in res:
        sft = common.summary([r["samples_per_sec"] for r in res["sft"]])
        out["sft"] = sft
        print(f"SFT samples/s, same model, {PROMPT_TOKENS + ANSWER_TOKENS}-token samples, same batch/ranks/ZeRO/dtype: "
              f"{common.fmt(sft)}; PPO / SFT = {ppo['samples_per_sec']['median'] / sft['median']:.2f}x")
    print(f"load average: {load0:.2f} at start, {load1:.2f} at end ({os.cpu_count()} cores)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
