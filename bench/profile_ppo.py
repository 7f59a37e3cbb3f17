"""Where a PPO step's time goes: step3_ppo/main.py in one process, its parts timed in CPU seconds.

    OMP_NUM_THREADS=1 python bench/profile_ppo.py [--steps 12] [--dtype bf16] [--offload]

The setting is one rank of bench/bench_ppo.py (8 prompts of 32 tokens per step, answers of up to 16,
tiny llama for all four models, ZeRO-2, eager attention). The functions that make up a step are
wrapped with a timer on the process's CPU time (`time.process_time`), so other processes on a shared
machine hardly change the split; with one thread, CPU time is the time the step needs. (cProfile's
per-call hook would double the Python-heavy generation loop; a dozen wrappers cost nothing.) Printed:
CPU milliseconds per PPO step of each part (a part includes what it calls). --cprofile N also prints
cProfile's top N functions by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (file suffix, function name, what it is) in the order of a step.
PARTS = [
    ("step3_ppo/trainer.py", "train", "whole loop (eval and start-up excluded below)"),
    ("step3_ppo/rollout.py", "generate", "generation (actor.generate, ZeRO-3 gather if any)"),
    ("step3_ppo/rollout.py", "experience", "experience: 3-4 forwards (the critic's fused)"),
    ("step3_ppo/rollout.py", "answer_logits", "  actor/reference answer logits (experience and training)"),
    ("utils/rl.py", "entropy_from_logits", "  entropy over the full vocabulary"),
    ("step3_ppo/rollout.py", "answer_values", "  critic values (experience and training)"),
    ("step3_ppo/rollout.py", "final_scores", "  reward-model scores (experience and eval)"),
    ("step3_ppo/trainer.py", "build_buffer", "buffer: rewards, GAE, whitening, split into rows"),
    ("step3_ppo/rollout.py", "split_samples", "  rows to the CPU (device round-trip)"),
    ("step3_ppo/trainer.py", "ppo_update", "training: PPO epochs"),
    ("step3_ppo/rollout.py", "collate_samples", "  mini-batch collation (back to the device)"),
    ("step3_ppo/trainer.py", "actor_loss", "  actor forward + loss"),
    ("deepspeed/runtime/engine.py", "backward", "  backward (actor + critic)"),
    ("step3_ppo/models.py", "step_together", "  optimizer steps (actor + critic)"),
    ("step3_ppo/trainer.py", "evaluate", "evaluation (not part of a step)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (one rank's share of 16)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--zero_stage", type=int, default=2)
    ap.add_argument("--extra", default="", help="more step-3 flags, space-separated")
    ap.add_argument("--cprofile", type=int, default=0, help="also print cProfile's top N functions by own CPU time")
    a = ap.parse_args()
    from bench_ppo import make_models, make_prompts


    root = tempfile.mkdtemp(prefix="profile_ppo_")
    actor, critic = make_models(root)
    prompts = os.path.join(root, "prompts.jsonl")
    make_prompts(prompts)
    argv = ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", critic, "--data_path", prompts,
            "--output_dir", os.path.join(root, "out"), "--max_steps", str(a.steps), "--max_prompt_seq_len", "32",
            "--overlong", "truncate", "--max_answer_seq_len", "16", "--per_device_generation_batch_size",
            str(a.prompts), "--per_device_training_batch_size", str(a.prompts), "--actor_zero_stage",
            str(a.zero_stage), "--critic_zero_stage", str(a.zero_stage), "--dtype", a.dtype,
            "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-4", "--print_answers_interval", "0",
            "--attn_implementation", "eager", "--log_interval", "1", "--critic_warmup_steps", "0",
            *(["--offload"] if a.offload else []),
            *a.extra.split()]
    import deepspeed

    import step3_ppo.main
    import step3_ppo.models
    import step3_ppo.rollout
    import step3_ppo.trainer
    import utils.rl

    spent = {}
    modules = {"step3_ppo/trainer.py": step3_ppo.trainer, "step3_ppo/rollout.py": step3_ppo.rollout,
               "utils/rl.py": utils.rl, "step3_ppo/models.py": step3_ppo.models}

    def timed(key, fn):
        def wrapper(*args, **kw):
            t0 = time.process_time()
            try:
                return fn(*args, **kw)
            finally:
                spent[key] = spent.get(key, 0.0) + time.process_time() - t0
        return wrapper

    for suffix, name, _ in PARTS:
        key = (suffix, name)
        if suffix.startswith("deepspeed"):
            cls = deepspeed.runtime.engine.DeepSpeedEngine
            setattr(cls, name, timed(key, getattr(cls, name)))
            continue
        fn = timed(key, getattr(modules[suffix], name))
        for mod in (step3_ppo.trainer, step3_ppo.rollout, step3_ppo.main):  # every module that imported it
            if getattr(mod, name, None) is not None and getattr(getattr(mod, name), "__module__", "") == \
                    modules[suffix].__name__:
                setattr(mod, name, fn)
        setattr(modules[suffix], name, fn)
    load0 = os.getloadavg()[0]
    prof = cProfile.Profile(time.process_time) if a.cprofile else None
    if prof:
        prof.runcall(step3_ppo.main.main, argv)
    else:
        step3_ppo.main.main(argv)
    import torch

    print(f"PPO profile: {a.steps} steps, {a.prompts} prompts x (32 + up to 16) tokens, {a.dtype}, ZeRO-{a.zero_stage}"
          f"{' + offload' if a.offload else ''}, {torch.get_num_threads()} thread(s); CPU ms per step "
          f"(load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")
    evaluation = spent.get(("step3_ppo/trainer.py", "evaluate"), 0.0)
    for suffix, name, what in PARTS:
        t = spent.get((suffix, name), 0.0)
        if name == "train":
            t -= evaluation
        print(f"  {what:58s} {1000 * t / a.steps:8.1f}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.cprofile)


if __name__ == "__main__":
    main()
