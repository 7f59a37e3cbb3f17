"""Step 3 end to end on 2 CPU ranks: tiny SFT (step 1, 50/50 warm/cold answers) -> reward model (step 2,
warm preferred) -> PPO on the shipped prompts. Checked by numbers in metrics.jsonl and by loading the saved
actor in plain transformers."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import DATA, REPO, checkpoints_of, last_by_step, partial, read_metrics, run_deepspeed, run_stopped

sys.path.insert(0, os.path.join(REPO, "data"))
from make_data import COLD, WARM  # noqa: E402

pytestmark = pytest.mark.e2e
METRICS = ("reward", "return", "kl", "kl_coef", "entropy", "actor_loss", "critic_loss", "clipfrac", "value_clipfrac",
           "approx_kl", "response_length", "eos_rate", "generation_sec", "experience_sec", "train_sec",
           "samples_per_sec")
PPO_ARGS = ["--data_path", os.path.join(DATA, "prompts.jsonl"), "--max_answer_seq_len", "16",
            "--per_device_generation_batch_size", "16", "--per_device_training_batch_size", "8",
            "--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def sft_and_rm(tiny_dir, tmp_path_factory):
    """(sft_dir, rm_dir): the tiny llama after step 1 on data/sft.jsonl and step 2 on data/preference.jsonl."""
    root = tmp_path_factory.mktemp("ppo-inputs")
    sft, rm = str(root / "sft"), str(root / "rm")
    run_deepspeed("step1_sft/main.py", ["--model_name_or_path", tiny_dir("llama"), "--data_path",
                                        os.path.join(DATA, "sft.jsonl"), "--output_dir", sft, "--learning_rate", "3e-3",
                                        "--num_train_epochs", "15", "--per_device_train_batch_size", "8"])
    # The reward model keeps its default synthetic negatives. Without them it scores the fragment "is great."
    # about as high as a well-formed warm answer (4.47), and whether this lr-1e-3 PPO run lands on the
    # fragment depends on its trajectory: with cut answers at the lowest score (the default), seed 1234
    # did, 0 of 54 held-out answers keeping "The <noun>", seeds 1 and 2 not (53 and 54 of 54).
    run_deepspeed("step2_reward/main.py", ["--model_name_or_path", sft, "--data_path",
                                           os.path.join(DATA, "preference.jsonl"), "--output_dir", rm,
                                           "--learning_rate", "3e-3", "--num_train_epochs", "3",
                                           "--per_device_train_batch_size", "8"])
    return sft, rm


def ppo(sft: str, rm: str, out: str, *extra):
    run_deepspeed("step3_ppo/main.py", ["--actor_model_name_or_path", sft, "--critic_model_name_or_path", rm,
                                        "--output_dir", out, *PPO_ARGS, *extra])
    rows = read_metrics(out)
    return [r for r in rows if r["split"] == "train"], rows


def quarters(train: list[dict], key: str) -> tuple[float, float]:
    q = max(1, len(train) // 4)
    return (sum(r[key] for r in train[:q]) / q, sum(r[key] for r in train[-q:]) / q)


def greedy_answers(model_dir: str) -> list[str]:
    """Greedy answers to the held-out prompts with plain transformers (the rendered prompt text, tokenized by
    the tokenizer itself), decoded with special tokens so the EOS is visible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(DATA, "heldout_prompts.jsonl"))]
    out = []
    for p in prompts:
        ids = tok(f"Human: {p}\n\nAssistant:", return_tensors="pt")  # the hh template the SFT run resolved
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:]))
    return out


def share(answers: list[str], words: list[str]) -> float:
    return sum(any(f" {w}." in a for w in words) for a in answers) / len(answers)


def weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_ppo_raises_reward_and_the_saved_actor_answers_warmly(sft_and_rm, tmp_path):
    sft, rm = sft_and_rm
    out = str(tmp_path / "ppo")
    # No critic warm-up: this test pins PPO's trajectory at lr 1e-3 on the demo model. With the default
    # warm-up (3 of the 30 steps) one run kept the form in 47/54 held-out answers ("Thectopus is amazing."),
    # under this test's 0.9; the alignment suite measures the default (README, Alignment defaults).
    train, rows = ppo(sft, rm, out, "--max_steps", "30", "--print_answers_interval", "10", "--critic_warmup_steps", "0",
                      "--eval_data_path", os.path.join(DATA, "heldout_prompts.jsonl"))
    assert [r["step"] for r in train] == list(range(1, 31))
    for r in train:
        assert all(k in r for k in METRICS), sorted(set(METRICS) - set(r))
    first, last = quarters(train, "reward")
    assert last > first + 1.0 and last > 2.5, (first, last)  # the RM's scores are about -4.5 (cold) .. +4.3 (warm)
    # The actor starts as the reference; the KL reported is the penalised one. The actor's log-probs come
    # from generation's cached decode (fp32), within 1e-5 of a full forward, so the KL is 0 to ~1e-7.
    assert abs(train[0]["kl"]) < 1e-5
    # Bounded: at the size-scaled rates the per-answer KL peaks at 8-11 nats (10.7 on an AMD EPYC machine,
    # under 10 with the same code on the CPU of earlier CI runs); the runaway of issue 10 (answers
    # collapsing to "The movie is and.") climbed to 21.
    kls = [r["kl"] for r in train]
    assert max(kls) < 15.0, kls
    assert quarters(train, "eos_rate")[1] >= 0.9
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["reward"] > evals[0]["reward"] + 1.0 and evals[-1]["eos_rate"] >= 0.9
    samples = [r for r in rows if r["split"] == "samples"]
    assert [r["step"] for r in samples] == [10, 20, 30]
    assert set(samples[0]["samples"][0]) == {"prompt", "answer", "reward"}

    # The saved actor, in plain transformers, answers held-out prompts warmly and still stops.
    before, after = greedy_answers(sft), greedy_answers(os.path.join(out, "actor"))
    assert share(after, WARM) >= 0.8 and share(after, WARM) > share(before, WARM) + 0.15, (before, after)
    assert sum(a.startswith(" The ") and "</s>" in a for a in after) >= 0.9 * len(after), \
        [a for a in after if not (a.startswith(" The ") and "</s>" in a)]
    assert share(after, COLD) < share(before, COLD)

    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "critic"))
    assert critic.config.num_labels == 1
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["step"] == "ppo" and args["template"] == "hh" and args["reward_model_name_or_path"] == rm


@pytest.mark.slow  # the unit test in test_ppo_units.py checks the scores themselves in every CI run
def test_ppo_with_a_reward_model_of_another_family_raises_reward_and_answers_warmly(sft_and_rm, tiny_dir, tmp_path):
    """A Qwen2 reward model (its own tokenizer, ChatML template), trained by step 2 from its random tiny base,
    scores the Llama actor's answers as text; the critic is the SFT model with a new value head. About 65 s."""
    sft, _ = sft_and_rm
    rm, out = str(tmp_path / "rm-qwen2"), str(tmp_path / "ppo-qwen2-rm")
    run_deepspeed("step2_reward/main.py", ["--model_name_or_path", tiny_dir("qwen2"), "--data_path",
                                           os.path.join(DATA, "preference.jsonl"), "--output_dir", rm,
                                           "--learning_rate", "3e-3", "--num_train_epochs", "5",
                                           "--per_device_train_batch_size", "8", "--log_interval", "1000"])
    p = run_deepspeed("step3_ppo/main.py", ["--actor_model_name_or_path", sft, "--critic_model_name_or_path", sft,
                                            "--reward_model_name_or_path", rm, "--output_dir", out, *PPO_ARGS,
                                            "--max_steps", "20", "--print_answers_interval", "0",
                                            "--critic_warmup_steps", "0"])
    assert "has a tokenizer of its own: it scores every answer as text" in p.stdout + p.stderr
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    first, last = quarters(train, "reward")
    assert last > first + 2.0, (first, last)  # measured -0.55 -> 3.29 (the RM: about -11 cold .. +8 warm)
    before, after = greedy_answers(sft), greedy_answers(os.path.join(out, "actor"))
    assert share(after, WARM) >= 0.8 and share(after, WARM) > share(before, WARM) + 0.15, (before, after)
    assert share(after, COLD) < share(before, COLD)


def with_dropout(model_dir: str, out: str) -> str:
    """A copy of a llama directory whose config asks for attention dropout 0.1."""
    import shutil

    shutil.copytree(model_dir, out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["attention_dropout"] = 0.1
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    return out


def test_ppo_zero3_offload_ema_adaptive_kl_and_resume(sft_and_rm, tmp_path):
    # Actor and critic configs ask for dropout 0.1; PPO turns it off (the default --disable_dropout), which
    # must still hold after a resume for the resumed steps to match.
    sft, rm = (with_dropout(d, str(tmp_path / name)) for d, name in zip(sft_and_rm, ("sft", "rm")))
    out = str(tmp_path / "ppo3")
    # No critic warm-up (as in the test above): with the default's 2 warm-up steps at lr 1e-3 the KL peaked at
    # 16.3 nats, over this test's bound; what is checked here is ZeRO-3, offload, EMA, the KL rule and resume.
    flags = ["--max_steps", "16", "--critic_warmup_steps", "0", "--actor_zero_stage", "3", "--critic_zero_stage", "3",
             "--offload_reference_model",
             "--enable_ema", "--ema_beta", "0", "--target_kl", "1.0", "--kl_horizon", "100", "--save_interval", "8",
             "--print_answers_interval", "0"]
    train, _ = ppo(sft, rm, out, *flags)
    first, last = quarters(train, "reward")
    assert last > first + 1.0, (first, last)
    assert max(r["kl"] for r in train) < 10.0
    # The adaptive controller (Ziegler et al. eq. 2) moved the coefficient by exactly its rule, 32 samples a step.
    for a, b in zip(train, train[1:]):
        err = min(max(a["kl"] / 1.0 - 1.0, -0.2), 0.2)
        assert b["kl_coef"] == pytest.approx(a["kl_coef"] * (1 + err * 32 / 100), rel=1e-4)
    assert train[-1]["kl_coef"] != train[0]["kl_coef"]

    actor = weights(os.path.join(out, "actor"))
    ema = weights(os.path.join(out, "actor_ema"))
    start = weights(sft)
    assert all(torch.equal(actor[k], ema[k]) for k in actor)  # beta 0: the EMA is the actor, shard by shard
    assert max((actor[k] - start[k]).abs().max().item() for k in actor) > 1e-3

    # The same run, stopped by SIGTERM to `deepspeed` after a few steps (both ranks checkpoint at the step
    # they agree on and exit 143, nothing is left running), then --resume: the later steps (actor, critic,
    # EMA, KL controller, rollout RNG) and the final weights are those of the first run.
    broken = str(tmp_path / "broken")
    args = ["--actor_model_name_or_path", sft, "--critic_model_name_or_path", rm, *PPO_ARGS, *flags]
    stop = run_stopped("step3_ppo/main.py", args + ["--output_dir", broken], broken, after=3)
    assert "exits with return code = 143" in stop["output"] and stop["step"] in checkpoints_of(broken), stop["output"]
    assert not os.path.exists(os.path.join(broken, "actor")) and os.path.isdir(partial(broken))
    resumed, _ = ppo(sft, rm, broken, *flags, "--resume")
    assert [r["step"] for r in resumed].count(stop["step"]) == 1  # steps before the stop were not run again
    for k in ("reward", "kl", "kl_coef", "actor_loss", "critic_loss", "response_length"):
        a, b = last_by_step(train, key=k), last_by_step(read_metrics(broken), key=k)
        assert sorted(b) == list(range(1, 17)), sorted(b)
        for s in range(stop["step"] + 1, 17):
            assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-5), (s, k, a[s], b[s])
    for name in ("actor", "actor_ema", "critic"):
        first, again = weights(os.path.join(out, name)), weights(os.path.join(broken, name))
        assert max((again[k] - first[k]).abs().max().item() for k in first) < 1e-5, name


def test_ppo_lora_ptx_and_the_other_options(sft_and_rm, tmp_path):
    """LoRA actor and critic, gradient checkpointing, PPO-ptx, gradient accumulation, two generation batches,
    early stop, reward normalisation, the missing-EOS penalty, k3, entropy bonus, bf16 with eager attention,
    top-k/top-p sampling, a rule-based reward added to the reward model's score, the anchor."""
    sft, rm = sft_and_rm
    out = str(tmp_path / "ppo-opts")
    train, rows = ppo(sft, rm, out, "--max_steps", "3", "--actor_lora_dim", "4", "--critic_lora_dim", "4",
                      "--actor_gradient_checkpointing", "--critic_gradient_checkpointing",
                      "--unsup_data_path", os.path.join(DATA, "sft.jsonl"), "--unsup_coef", "0.5",
                      "--per_device_generation_batch_size", "4", "--generation_batches", "2",
                      "--per_device_training_batch_size", "2", "--gradient_accumulation_steps", "2",
                      "--ppo_epochs", "3", "--early_stop_kl", "1e-12", "--normalize_reward",
                      "--missing_eos_penalty", "1.0", "--max_answer_seq_len", "4", "--kl_estimator", "k3",
                      "--entropy_coef", "0.01", "--dtype", "bf16", "--attn_implementation", "eager",
                      "--temperature", "0.8", "--top_k", "20", "--top_p", "0.9", "--print_answers_interval", "1",
                      "--reward_model_name_or_path", rm, "--reward_funcs", os.path.join(DATA, "rewards.py:warm_word"),
                      "--anchor_coef", "1")
    assert len(train) == 3
    for r in train:
        assert all(k in r for k in (*METRICS, "ptx_loss", "reward/warm_word", "kl/anchor")) and all(
            isinstance(v, str) or abs(v) < 1e6 for v in r.values())
        assert r["eos_rate"] == 0.0 and r["response_length"] == 4.0  # every answer cut at 4 tokens
        assert r["ppo_epochs_done"] == 1  # the approximate KL passed 1e-12 in the first epoch
    # Step 1: the scores normalised over the first batch have mean 0, every answer lost 1.0 for its missing
    # EOS, and the KL is 0 (LoRA starts as the identity): the mean return is exactly -1.
    assert train[0]["kl"] == 0.0 and train[0]["return"] == pytest.approx(-1.0, abs=1e-4)
    assert [r["step"] for r in rows if r["split"] == "samples"] == [1, 2, 3]

    actor = weights(os.path.join(out, "actor"))
    assert not any("lora" in k for k in actor)  # merged on save
    start = weights(sft)
    assert max((actor[k].float() - start[k].float()).abs().max().item() for k in actor) > 0
    assert greedy_answers(os.path.join(out, "actor"))  # loads and generates in plain transformers


def test_fused_critic_forward_gives_the_same_step_as_a_separate_one(sft_and_rm, tmp_path):
    """One PPO epoch over one mini-batch per rank (the defaults' shape): the rollout values come from the
    critic's training forward instead of an experience forward. Same losses, rewards and weights as with
    --no-fuse_critic_forward, in fp32 on 2 ranks (where the actor's log-probabilities are generation's,
    so the fused actor forward is not used)."""
    sft, rm = sft_and_rm
    flags = ["--max_steps", "4", "--per_device_training_batch_size", "16", "--print_answers_interval", "0"]
    fused, separate = str(tmp_path / "fused"), str(tmp_path / "separate")
    models = ["--actor_model_name_or_path", sft, "--critic_model_name_or_path", rm]
    run_f = run_deepspeed("step3_ppo/main.py", [*models, "--output_dir", fused, *PPO_ARGS, *flags])
    run_s = run_deepspeed("step3_ppo/main.py", [*models, "--output_dir", separate, *PPO_ARGS, *flags,
                                                "--no-fuse_critic_forward"])
    assert "critic's training forward (no experience forward for it" in run_f.stdout + run_f.stderr
    assert "critic's training forward" not in run_s.stdout + run_s.stderr
    assert "actor's training forward" not in run_f.stdout + run_f.stderr  # fp32: generation's logits
    a, b = ([r for r in read_metrics(d) if r["split"] == "train"] for d in (fused, separate))
    assert len(a) == len(b) == 4
    for k in ("reward", "kl", "actor_loss", "critic_loss", "clipfrac", "response_length"):
        for ra, rb in zip(a, b):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (k, ra["step"], ra[k], rb[k])
    assert a[-1]["critic_loss"] != a[0]["critic_loss"]  # the critic did train
    # Weights after 4 Adam steps at lr 1e-3 (about 4e-3 of movement): Adam scales a near-zero gradient up
    # to a step of lr, so float-order differences of 1e-7 in such a gradient show here: 1.5e-5 on an Intel
    # Xeon, under 1e-5 on the CPU of earlier CI runs. A real difference (the rows' order dropped) moves the
    # losses above.
    for name in ("actor", "critic"):
        x, y = weights(os.path.join(fused, name)), weights(os.path.join(separate, name))
        assert max((x[k] - y[k]).abs().max().item() for k in x) < 5e-5, name


def test_fused_actor_forward_gives_the_same_step_as_a_separate_one_in_bf16(sft_and_rm, tmp_path):
    """bf16, where generation's logits are not reused: the rollout log-probabilities come from the actor's
    training forward instead of an experience forward. The first step (one rollout, the same weights)
    gives the same numbers as --no-fuse_actor_forward; after one update the weights differ by bf16
    rounding of gradients summed in another row order, which can part a few of the second step's sampled
    answers: measured KL 0.2991 vs 0.3010 with the same answers (reward model of 5 negative kinds), and
    with the 6-kind default KL 0.342 vs 0.337, entropy 0.980 vs 0.984, but 9.44 vs 9.63 tokens per answer
    and reward -0.22 vs -0.55. So the second step compares the per-token averages that a few answers
    cannot move far, not the reward. The ratio is exactly 1 (approx_kl 0): rows taken in another order
    than the rollout's break that."""
    sft, rm = sft_and_rm
    flags = ["--max_steps", "2", "--per_device_training_batch_size", "16", "--print_answers_interval", "0",
             "--dtype", "bf16"]
    models = ["--actor_model_name_or_path", sft, "--critic_model_name_or_path", rm]
    outs, logs = [], []
    for name, extra in (("fused", []), ("separate", ["--no-fuse_actor_forward"])):
        outs.append(str(tmp_path / name))
        p = run_deepspeed("step3_ppo/main.py", [*models, "--output_dir", outs[-1], *PPO_ARGS, *flags, *extra])
        logs.append(p.stdout + p.stderr)
    assert "actor's training forward (no experience forward for it" in logs[0]
    assert "actor's training forward" not in logs[1]
    a, b = ([r for r in read_metrics(d) if r["split"] == "train"] for d in outs)
    assert len(a) == len(b) == 2
    assert all(r["approx_kl"] == 0.0 and r["clipfrac"] == 0.0 for r in a)
    for k in ("reward", "kl", "actor_loss", "critic_loss", "response_length", "entropy", "approx_kl"):
        assert a[0][k] == pytest.approx(b[0][k], rel=1e-5, abs=1e-7), (k, a[0][k], b[0][k])
    for k, rel in (("kl", 0.1), ("entropy", 0.03), ("approx_kl", 0.0)):
        assert a[1][k] == pytest.approx(b[1][k], rel=rel, abs=1e-3), (k, a[1][k], b[1][k])
    assert a[1]["kl"] > 0  # the actor did move between the rollouts


def test_critic_warmup_steps_train_the_critic_alone(sft_and_rm, tmp_path):
    """--critic_warmup_steps 2 of 2 steps: the saved actor is the SFT model bit for bit (so the second
    rollout's KL to the reference is 0; PPO-ptx is not applied either), while the critic trained."""
    sft, rm = sft_and_rm
    train, _ = ppo(sft, rm, str(tmp_path / "warm"), "--max_steps", "2", "--critic_warmup_steps", "2",
                   "--print_answers_interval", "0", "--unsup_data_path", os.path.join(DATA, "sft.jsonl"))
    assert len(train) == 2 and all(r["actor_loss"] == r["ptx_loss"] == r["approx_kl"] == 0.0 for r in train)
    assert train[1]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert train[1]["critic_loss"] != train[0]["critic_loss"]
    actor, ref = weights(os.path.join(tmp_path, "warm", "actor")), weights(sft)
    assert all(torch.equal(actor[k], ref[k]) for k in ref)
    critic, rm_w = weights(os.path.join(tmp_path, "warm", "critic")), weights(rm)
    assert any(not torch.equal(critic[k], rm_w[k]) for k in rm_w if k in critic)
