"""Fast checks of rules in docs' pitfalls list (shared/design/pitfalls.md) that a mutation audit could
break without any other fast test failing. Single process, CPU, no DeepSpeed launch; each test names its
rule. Models are the session's tiny ones (conftest.tiny_dir)."""
from __future__ import annotations

import functools
import math
import os
import random
import types

import numpy as np
import pytest
import torch

from conftest import PlainEngine
from step3_ppo.config import GROUPS, REQUIRED, resolve_algorithm
from utils import ds
from utils.args import parse
from utils.encoding import IGNORE, Encoder

PPO_BASE = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--data_path", "p.jsonl",
            "--output_dir", "o"]


def modes(model) -> set:
    """The `training` flags of a model and every submodule."""
    return {m.training for m in model.modules()}


def seeded_ids(n: int, seed: int, low: int, high: int, avoid=()) -> list[int]:
    g = random.Random(seed)
    out = []
    while len(out) < n:
        t = g.randrange(low, high)
        if t not in avoid:
            out.append(t)
    return out


# ----------------------------------------------------------------------------- GPT-2 models (absolute positions)


@pytest.fixture(scope="module")
def gpt2(tiny_dir):
    """Tokenizer, actor, a different reference, critic and reward model of the tiny GPT-2 family: absolute
    position embeddings, so a forward of a left-padded row without position ids reads other positions
    (RoPE families and OPT hide that). GPT-2's config has dropout 0.1."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = tiny_dir("gpt2")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        actor = AutoModelForCausalLM.from_pretrained(path).eval()
        ref = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
        critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
        reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    tok = AutoTokenizer.from_pretrained(path)
    for m in (critic, reward):  # as utils.reward.load_reward_model does (HF refuses batches > 1 without one)
        m.config.pad_token_id = tok.eos_token_id
    return types.SimpleNamespace(path=path, tok=tok, actor=actor, ref=ref, critic=critic, reward=reward)


def _left_padded_rollout(tok, seed: int = 0):
    """A rollout batch in the rollout layout (prompts of lengths 3, 9, 6 left-padded; answers of lengths 5, 2, 7
    right-padded), pad == EOS as GPT-2 has it; the first answer ends with that EOS."""
    from step3_ppo.rollout import collate_samples

    eos = tok.eos_token_id
    rows = []
    for i, (p, a) in enumerate(((3, 5), (9, 2), (6, 7))):
        prompt = seeded_ids(p, seed + 2 * i, 1, len(tok), avoid=(eos,))
        answer = seeded_ids(a, seed + 2 * i + 1, 1, len(tok), avoid=(eos,))
        if i == 0:
            answer[-1] = eos
        rows.append({"prompt": torch.tensor(prompt), "answer": torch.tensor(answer)})
    return rows, collate_samples(rows, eos)


def _head_scores(model, ids):
    """A one-label classifier's per-token head outputs of an unpadded row [T] (no pooling, default positions)."""
    hidden = model.base_model(input_ids=ids).last_hidden_state
    return model.score(hidden)[0, :, 0]


def test_rule4_rollout_forwards_of_left_padded_gpt2_batches_match_unpadded_forwards(gpt2):
    """Rule 4: left-padded prompts need position ids in every forward (actor, reference, critic, reward); a
    GPT-2 forward without them reads each token at a shifted position (DeepSpeed-Chat step 3)."""
    from step3_ppo.rollout import experience
    from utils.encoding import position_ids_from_mask

    T = 0.7
    rows, b = _left_padded_rollout(gpt2.tok)
    assert len(set(b["attention_mask"][:, 0].tolist())) > 1  # some rows are padded on the left
    models = types.SimpleNamespace(actor=PlainEngine(gpt2.actor), ref=PlainEngine(gpt2.ref),
                                   critic=PlainEngine(gpt2.critic), reward=PlainEngine(gpt2.reward),
                                   reward_encoder=None)
    out = experience(models, dict(b), T)
    with torch.no_grad():
        # The test can see the rule: without position ids this family's padded forward differs.
        no_pos = gpt2.actor(input_ids=b["seq"], attention_mask=b["attention_mask"]).logits
        with_pos = gpt2.actor(input_ids=b["seq"], attention_mask=b["attention_mask"],
                              position_ids=position_ids_from_mask(b["attention_mask"])).logits
        assert float((no_pos - with_pos)[b["attention_mask"].bool()].abs().max()) > 1e-2
        for i, r in enumerate(rows):
            p, n = len(r["prompt"]), len(r["answer"])
            ids = torch.cat([r["prompt"], r["answer"]])[None]
            for key, model in (("logp", gpt2.actor), ("ref_logp", gpt2.ref)):
                logits = model(input_ids=ids).logits[0, p - 1:p - 1 + n].double() / T
                want = torch.log_softmax(logits, -1).gather(-1, r["answer"][:, None]).squeeze(-1)
                assert torch.allclose(out[key][i, :n].double(), want, atol=1e-5), (key, i)
            values = _head_scores(gpt2.critic, ids)
            assert torch.allclose(out["values"][i, :n], values[p - 1:p - 1 + n], atol=1e-5), i
            assert out["score"][i].item() == pytest.approx(_head_scores(gpt2.reward, ids)[-1].item(), abs=1e-5)


def test_experience_forwards_by_length_give_the_whole_rollouts_numbers(gpt2, monkeypatch):
    """The experience forwards run over sub-batches of rows of similar length, each cut to its own longest
    answer (a group estimator's rollout of 128 rows padded to one long answer cost that length in every
    row): under the action mask every output equals the one forward over the whole rollout."""
    from step3_ppo import rollout

    rows, b = _left_padded_rollout(gpt2.tok)
    lengths = b["action_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # answers of several lengths: the chunks are cut differently
    models = types.SimpleNamespace(actor=PlainEngine(gpt2.actor), ref=PlainEngine(gpt2.ref),
                                   critic=PlainEngine(gpt2.critic), reward=PlainEngine(gpt2.reward),
                                   reward_encoder=None)
    whole = rollout.experience(models, dict(b), 0.7)
    calls = []  # sub-batches of 2 rows instead of EXPERIENCE_ROWS
    real = rollout.length_chunks

    def chunks(batch, rows=rollout.EXPERIENCE_ROWS):
        for idx, sub in real(batch, 2):
            calls.append(sub["answers"].shape[1])
            yield idx, sub
    monkeypatch.setattr(rollout, "length_chunks", chunks)
    parts = rollout.experience(models, dict(b), 0.7)
    assert len(calls) > 1 and min(calls) < b["answers"].shape[1]  # several forwards, some cut shorter
    mask = b["action_mask"].bool()
    for key in ("logp", "ref_logp", "values", "entropy"):
        assert torch.allclose(parts[key][mask], whole[key][mask], atol=1e-5), key
    assert torch.allclose(parts["score"], whole["score"], atol=1e-5)


def test_rule4_actor_loss_forward_of_a_left_padded_gpt2_minibatch_uses_position_ids(gpt2):
    """Rule 4: the PPO update's own actor forward (actor_loss) gets position ids too, or the first PPO ratio
    of a left-padded row is not 1 (pipelines that add them in generate() only)."""
    from step3_ppo.rollout import answer_logits
    from step3_ppo.trainer import actor_loss
    from utils.rl import token_logprobs

    args = parse(GROUPS, "test", PPO_BASE, required=REQUIRED)
    algo = resolve_algorithm(args)
    rows, b = _left_padded_rollout(gpt2.tok, seed=5)
    with torch.no_grad():
        old = []
        for r in rows:
            p, n = len(r["prompt"]), len(r["answer"])
            ids = torch.cat([r["prompt"], r["answer"]])[None]
            logits = gpt2.actor(input_ids=ids).logits[0, p - 1:p - 1 + n] / algo.temperature
            old.append(torch.log_softmax(logits, -1).gather(-1, r["answer"][:, None]).squeeze(-1))
    mask = b["action_mask"]
    b["logp"] = torch.zeros(mask.shape)
    for i, lp in enumerate(old):
        b["logp"][i, :len(lp)] = lp
    b["advantages"] = torch.ones(mask.shape) * mask
    _, _, stats = actor_loss(args, algo, PlainEngine(gpt2.actor), b, None, 0.0, float(mask.sum()), 3.0)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-9) and stats["clipfrac"] == 0.0
    with torch.no_grad():
        logp = token_logprobs(answer_logits(PlainEngine(gpt2.actor), b, algo.temperature), b["answers"])
    assert float(((logp - b["logp"]) * mask).abs().max()) < 1e-5


# ----------------------------------------------------------------------------- rule 2: pad == EOS in rollouts


def test_rule2_rollout_action_mask_keeps_the_eos_when_pad_equals_eos(tiny_dir):
    """Rule 2: where pad == EOS (GPT-2, OPT), a mask built as `answers != pad_id` drops every EOS, so the model
    never learns to stop (DeepSpeed-Chat step 3; TRL #1623). The action mask must come from the lengths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from step3_ppo.rollout import generate, generation_config

    path = tiny_dir("llama")  # no pad token: padding falls back to EOS; greedy answers of varied tokens
    enc = Encoder(AutoTokenizer.from_pretrained(path), "hh", 64)
    assert enc.pad_id == enc.eos_id
    prompts = [enc.encode_prompt(({"role": "user", "content": t},)) for t in
               ("Tell me about the apple.", "Describe the very old castle on the hill by the river.", "Hi.",
                "What do you think of it?")]
    args = types.SimpleNamespace(max_answer_seq_len=8, do_sample=False, temperature=1.0, top_p=1.0, top_k=0)
    torch.manual_seed(0)
    actor = PlainEngine(AutoModelForCausalLM.from_pretrained(path).eval())
    first = generate(actor, prompts, enc, generation_config(args, enc, greedy=True))
    assert not bool(first["has_eos"].any())  # the random model does not emit its real EOS here
    # Re-point EOS, and pad with it, at a token greedy decoding emits in the first answer.
    stop = int(first["answers"][0, 2])
    enc.eos_id = enc.pad_id = stop
    b = generate(actor, prompts, enc, generation_config(args, enc, greedy=True))
    W = b["answers"].shape[1]
    want = []
    for row in first["answers"].tolist():  # greedy: the same tokens up to the first `stop`, which ends the answer
        want.append(row.index(stop) + 1 if stop in row else len(row))
    assert min(want) < W and len(set(want)) > 1  # answers end at the EOS, at different lengths
    assert b["action_mask"].sum(-1).tolist() == want
    for i, n in enumerate(want):
        assert b["action_mask"][i].tolist() == [1] * n + [0] * (W - n)
        assert bool(b["has_eos"][i]) == (stop in first["answers"][i].tolist())
        if b["has_eos"][i]:
            assert int(b["answers"][i, n - 1]) == stop  # the EOS is an action
    P = b["prompt_width"]
    assert torch.equal(b["attention_mask"][:, P:], b["action_mask"])


# ----------------------------------------------------------------------------- rule 21: train mode after evaluation


def _dropout_model(gpt2, classifier: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if classifier:
            m = AutoModelForSequenceClassification.from_pretrained(gpt2.path, num_labels=1)
            m.config.pad_token_id = gpt2.tok.eos_token_id
        else:
            m = AutoModelForCausalLM.from_pretrained(gpt2.path)
    finally:
        hf_logging.set_verbosity(verbosity)
    assert m.config.resid_pdrop > 0  # dropout on: train and eval mode differ
    return m.train()


class RecordingEngine(PlainEngine):
    """A PlainEngine that records the train/eval state of its model at every forward."""

    def __init__(self, module):
        super().__init__(module)
        self.seen = []

    def __call__(self, *a, **k):
        self.seen.append(modes(self.module))
        return self.module(*a, **k)


def _pairs(tok, n: int = 3):
    from utils.pairs import Pair

    eos = tok.eos_token_id
    out = []
    for i in range(n):
        prompt = seeded_ids(4 + i, 10 + i, 1, len(tok), avoid=(eos,))
        c = prompt + seeded_ids(3 + i, 20 + i, 1, len(tok), avoid=(eos,)) + [eos]
        r = prompt + seeded_ids(5 - i, 30 + i, 1, len(tok), avoid=(eos,)) + [eos]
        p = len(prompt)
        out.append(Pair(c, [IGNORE] * p + c[p:], r, [IGNORE] * p + r[p:], p, 0.0, f"f:{i}"))
    return out


def test_rule21_step1_evaluate_leaves_the_model_in_train_mode(gpt2):
    """Rule 21: a model left in eval mode after evaluation trains without dropout (tests with dropout 0 hide
    it); step 1's evaluate() runs in eval mode and hands the model back in train mode."""
    from step1_sft.trainer import evaluate

    engine = RecordingEngine(_dropout_model(gpt2))
    pad = gpt2.tok.eos_token_id
    items = [((p.chosen, p.chosen_labels),) for p in _pairs(gpt2.tok)]
    out = evaluate(engine, items, 2, pad, True)
    assert math.isfinite(out["loss"])
    assert engine.seen and all(s == {False} for s in engine.seen)  # evaluated without dropout
    assert modes(engine.module) == {True}


def test_rule21_step2_evaluate_leaves_the_model_in_train_mode(gpt2):
    """Rule 21: step 2's evaluate() runs the reward model in eval mode and hands it back in train mode."""
    from step2_reward.trainer import evaluate
    from utils.pairs import collate_pairs

    engine = RecordingEngine(_dropout_model(gpt2, classifier=True))
    out = evaluate(engine, _pairs(gpt2.tok), 2, functools.partial(collate_pairs, pad_id=gpt2.tok.eos_token_id), 0.0,
                   True)
    assert math.isfinite(out["loss"])
    assert engine.seen and all(s == {False} for s in engine.seen)
    assert modes(engine.module) == {True}


def test_rule21_dpo_evaluate_leaves_the_policy_in_train_mode(gpt2):
    """Rule 21: DPO's evaluate() runs the policy in eval mode and hands it back in train mode."""
    from dpo.trainer import evaluate

    engine = RecordingEngine(_dropout_model(gpt2))
    args = types.SimpleNamespace(per_device_eval_batch_size=2, compute_fp32_loss=True, beta=0.1, loss_type="sigmoid",
                                 label_smoothing=0.0, rpo_alpha=0.0, anchor_coef=5.0)
    out = evaluate(engine, PlainEngine(gpt2.ref), _pairs(gpt2.tok), args, gpt2.tok.eos_token_id)
    assert math.isfinite(out["loss"])
    assert engine.seen and all(s == {False} for s in engine.seen)
    assert modes(engine.module) == {True}


def test_rule21_generation_mode_puts_the_actor_back_in_train_mode(gpt2):
    """Rule 21: step 3 generates in eval mode; the actor must train with dropout again afterwards, also
    when generation raises."""
    from step3_ppo.models import generation_mode

    engine = PlainEngine(_dropout_model(gpt2))
    with generation_mode(engine) as model:
        assert modes(model) == {False}
    assert modes(engine.module) == {True}
    with pytest.raises(RuntimeError, match="boom"):
        with generation_mode(engine):
            raise RuntimeError("boom")
    assert modes(engine.module) == {True}


def test_rule21_resume_puts_every_engine_in_train_mode(gpt2, tmp_path, monkeypatch):
    """Rule 21: a model comes out of from_pretrained in eval mode and a resumed run skips the first
    evaluation; Checkpointer.resume() switches every trained engine to train mode itself."""
    from utils import checkpoint, signals

    monkeypatch.setattr(signals, "defer", lambda: None)
    monkeypatch.setattr(signals, "request", lambda: None)
    engines = {"actor": PlainEngine(_dropout_model(gpt2).eval()),
               "critic": PlainEngine(_dropout_model(gpt2, classifier=True).eval())}
    logger = types.SimpleNamespace(write_args=lambda: None, write=lambda *a: None, advance=lambda *a: None)
    args = types.SimpleNamespace(output_dir=str(tmp_path / "out"), resume=False)
    ckpt = checkpoint.Checkpointer(args, engines, logger, lambda: {}, lambda st: None)
    assert ckpt.resume() == 0
    assert all(modes(e.module) == {True} for e in engines.values())


# ----------------------------------------------------------------------------- rule 15: frozen references


def test_rule15_eval_engine_puts_the_model_and_every_submodule_in_eval_mode(gpt2, monkeypatch):
    """Rule 15: a frozen model (DPO and PPO reference, reward model) runs in eval mode: dropout in a reference
    makes its log-probabilities noise. init_eval_engine must switch it to eval after DeepSpeed wraps it."""
    import deepspeed

    model = _dropout_model(gpt2)
    monkeypatch.setattr(deepspeed, "initialize", lambda model, config, **k: (model, None, None, None))
    engine = ds.init_eval_engine(model, ds.ds_eval_config(stage=0, dtype="fp32", micro_batch=1, world=1))
    assert modes(engine) == {False}


def test_rule15_dpo_reference_is_frozen(gpt2, monkeypatch):
    """Rule 15: the DPO reference has no trainable parameter (TRL #800 traced falling log-probs to references
    that were updated or in train mode)."""
    from dpo import main as dpo_main

    monkeypatch.setattr(dpo_main.ds, "init_eval_engine", lambda model, cfg: model)
    args = types.SimpleNamespace(ref_model_name_or_path=None, model_name_or_path=gpt2.path, zero_stage=0, dtype="fp32",
                                 per_device_train_batch_size=1, trust_remote_code=False, disable_dropout=False)
    ref = dpo_main.load_reference(args, gpt2.tok, 1)
    params = list(ref.parameters())
    assert params and not any(p.requires_grad for p in params)


def test_rule15_reference_logps_carry_no_graph(gpt2):
    """Rule 15: the reference's log-probabilities are constants of the DPO loss; a graph through them (a
    reference whose parameters still require grad) would train it or hold its activations."""
    from dpo.trainer import reference_logps
    from utils.pairs import collate_pairs

    model = _dropout_model(gpt2).eval()
    assert all(p.requires_grad for p in model.parameters())
    out = reference_logps(PlainEngine(model), collate_pairs(_pairs(gpt2.tok, 2), gpt2.tok.eos_token_id))
    assert out.grad_fn is None and not out.requires_grad


# ----------------------------------------------------------------------------- rules 11 and 12: PPO coefficients, KL


def _kl(lr: float, estimator: str) -> float:
    return {"k1": lr, "k2": 0.5 * lr * lr, "k3": math.exp(-lr) - 1 + lr}[estimator]


def _gae_rollout(B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    garbage = lambda x, v: torch.where(mask.bool(), x, torch.full_like(x, v))  # noqa: E731 - under the mask
    P = 2
    return {"action_mask": mask, "logp": garbage(-torch.rand(B, T, generator=g) * 2, 3.0),
            "ref_logp": garbage(-torch.rand(B, T, generator=g) * 2, -4.0),
            "values": garbage(torch.randn(B, T, generator=g), 50.0),
            "entropy": garbage(torch.rand(B, T, generator=g), 9.0), "score": torch.randn(B, generator=g) * 2,
            "has_eos": lengths < T, "seq": torch.zeros(B, P + T, dtype=torch.long),
            "answers": torch.zeros(B, T, dtype=torch.long), "prompt_width": P,
            "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_rule11_12_gae_buffer_uses_the_flags_and_reports_the_kl_it_penalises(estimator):
    """Rules 11 and 12: gamma, lambda and the KL estimator are flags that reach the buffer (DeepSpeed-Chat
    hard-coded them), and the logged `kl` is the estimator that the reward was penalised with (TRL #1857)."""
    from step3_ppo.trainer import build_buffer
    from utils.rl import RunningMoments

    gamma, lam, coef, penalty, clip = 0.8, 0.6, 0.3, 0.5, 1.5
    args = parse(GROUPS, "test", PPO_BASE + ["--gamma", str(gamma), "--lam", str(lam), "--kl_coef", str(coef),
                                             "--kl_estimator", estimator, "--missing_eos_penalty", str(penalty),
                                             "--clip_reward_value", str(clip)], required=REQUIRED)
    args.whiten_advantages = False
    algo = resolve_algorithm(args)
    rollouts = [_gae_rollout(5, 6, seed) for seed in (1, 2)]
    want_adv, want_ret, kl_total, n = [], [], 0.0, 0
    for b in rollouts:
        for i in range(b["score"].numel()):
            L = int(b["action_mask"][i].sum())
            s = b["score"][i].item() - (0.0 if b["has_eos"][i] else penalty)
            s = max(-clip, min(clip, s))
            kl = [_kl(b["logp"][i, t].item() - b["ref_logp"][i, t].item(), estimator) for t in range(L)]
            r = [-coef * k for k in kl]
            r[-1] += s
            v = b["values"][i, :L].tolist()
            adv, running = [0.0] * L, 0.0
            for t in reversed(range(L)):
                delta = r[t] + gamma * (v[t + 1] if t + 1 < L else 0.0) - v[t]
                running = delta + gamma * lam * running
                adv[t] = running
            want_adv.append(adv)
            want_ret.append([a + x for a, x in zip(adv, v)])
            kl_total += sum(kl)
            n += 1
    rows, stats, count = build_buffer(args, algo, rollouts, coef, RunningMoments())
    assert count == n == len(rows)
    for row, adv, ret in zip(rows, want_adv, want_ret):
        assert row["advantages"].tolist() == pytest.approx(adv, abs=1e-5)
        assert row["returns"].tolist() == pytest.approx(ret, abs=1e-5)
    assert stats["kl"] == pytest.approx(kl_total / n, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_rule11_12_actor_loss_uses_the_cliprange_and_reports_the_kl_it_trains_with(estimator):
    """Rules 11 and 12: the policy loss clips at --cliprange (not a hard-coded 0.2), and with --kl_in loss the
    logged `kl_loss` is the same estimator, masked and aggregated as in the loss (TRL #1857)."""
    from step3_ppo.trainer import actor_loss

    cliprange, coef = 0.1, 0.4
    args = parse(GROUPS, "test", PPO_BASE + ["--cliprange", str(cliprange), "--kl_in", "loss", "--kl_estimator",
                                             estimator, "--kl_coef", str(coef)], required=REQUIRED)
    algo = resolve_algorithm(args)
    assert algo.loss_agg == "token_mean"
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 11
    lengths = [5, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    answers = torch.randint(0, V, (B, T), generator=g)
    new = torch.log_softmax(logits.detach(), -1).gather(-1, answers[..., None]).squeeze(-1)
    # Old log-probs within +-0.3 of the new ones: ratios between exp(-0.3) and exp(0.3), on both sides of
    # 1 +- 0.1 and of 1 +- 0.2.
    old = (new + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.6) * mask
    ref = (new + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.0) * mask
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    b = {"answers": answers, "action_mask": mask, "logp": old, "ref_logp": ref, "advantages": adv}
    n_tok = float(mask.sum())
    loss, _, stats = actor_loss(args, algo, None, b, None, coef, n_tok, float(B), logits=logits)
    total, kl_sum, clipped = 0.0, 0.0, 0
    for i, n in enumerate(lengths):
        for t in range(n):
            lr_old = new[i, t].item() - old[i, t].item()
            ratio, a = math.exp(lr_old), adv[i, t].item()
            kl = _kl(new[i, t].item() - ref[i, t].item(), estimator)
            c = -a * min(max(ratio, 1 - cliprange), 1 + cliprange)
            clipped += c > -a * ratio
            total += max(-a * ratio, c) + coef * kl
            kl_sum += kl
    assert 0 < clipped < n_tok
    assert loss.item() == pytest.approx(total / n_tok, abs=1e-9)
    assert stats["kl_loss"] == pytest.approx(kl_sum / n_tok, abs=1e-9)
    assert stats["clipfrac"] == pytest.approx(clipped / n_tok, abs=1e-9)


# ----------------------------------------------------------------------------- rule 5: tokenizer files travel


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_rule5_save_hf_writes_the_same_tokenizer(tiny_dir, tmp_path, family):
    """Rule 5: a saved model carries the tokenizer it was trained with: special tokens, pad token (or none)
    and chat template; pad_token_id is never changed silently (DeepSpeedExamples #719)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from utils.model import save_hf

    src = tiny_dir(family)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    enc = Encoder(tok, "auto", 64)  # as every step builds one before training
    out = str(tmp_path / "saved")
    save_hf(model, tok, out, {"template": enc.template}, enc)
    again = AutoTokenizer.from_pretrained(out)
    before = AutoTokenizer.from_pretrained(src)
    assert again.get_vocab() == before.get_vocab()
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "pad_token_id", "eos_token_id", "bos_token_id"):
        assert getattr(again, attr) == getattr(before, attr), attr
    # The chat template: the tokenizer's own where training used it, else one of the trained format.
    assert again.chat_template == (before.chat_template if enc.template == "chat" else enc.chat_template())
    assert sorted(again.all_special_tokens) == sorted(before.all_special_tokens)
    assert (again.pad_token_id is None) == (family == "gpt2")
    if family == "qwen2":
        assert again.chat_template
    assert AutoConfig.from_pretrained(out).pad_token_id == AutoConfig.from_pretrained(src).pad_token_id


# ----------------------------------------------------------------------------- rule 23: one rank's stop stops all


def test_rule23_a_stop_request_on_another_rank_stops_this_rank(tmp_path, monkeypatch):
    """Rule 23: a signal that reached one rank only (DeepSpeed's launcher does not forward it) must stop every
    rank at the same step, with a checkpoint; a rank that stops alone leaves its peers hanging."""
    from utils import checkpoint, signals

    seen = []
    monkeypatch.setattr(signals, "request", lambda: None)  # nothing reached this rank
    monkeypatch.setattr(ds, "any_rank", lambda flag: (seen.append(flag), True)[1])  # rank 1 was asked to stop
    args = types.SimpleNamespace(output_dir=str(tmp_path / "out"), resume=False, save_interval=0)
    ckpt = checkpoint.Checkpointer(args, {}, None, lambda: {}, lambda st: None)
    calls = []
    ckpt.save = lambda step: (calls.append(("save", step)), "ckpt")[1]
    ckpt._exit = lambda step, path: calls.append(("exit", step, path))
    ckpt.after_step(7)
    assert seen == [False]
    assert calls == [("save", 7), ("exit", 7, "ckpt")]

    calls.clear()
    monkeypatch.setattr(ds, "any_rank", lambda flag: flag)  # no rank was asked
    ckpt.after_step(8)
    assert calls == []


# ----------------------------------------------------------------------------- rule 10: same collectives on every rank


@pytest.mark.parametrize("n_items, world, batch", [(7, 3, 2), (5, 2, 4), (2, 3, 1), (9, 2, 2)])
def test_rule10_eval_batches_give_every_rank_the_same_batches_and_count_each_item_once(monkeypatch, n_items, world,
                                                                                       batch):
    """Rule 10: every rank runs the same number of evaluation forwards (ZeRO-3 forwards are collective; a rank
    with one batch fewer hangs the others), and each item counts exactly once over the ranks."""
    from utils.stream import eval_batches

    items = list(range(n_items))
    counts, valid_items = [], []
    for r in range(world):
        monkeypatch.setattr(ds, "rank", lambda r=r: r)
        monkeypatch.setattr(ds, "world_size", lambda: world)
        got = list(eval_batches(items, batch, lambda chunk: list(chunk)))
        counts.append(len(got))
        for chunk, valid in got:
            assert len(chunk) == batch == len(valid)
            valid_items += [i for i, v in zip(chunk, valid.tolist()) if v]
    assert len(set(counts)) == 1, counts
    assert sorted(valid_items) == items


def test_rule10_generation_logit_reuse_is_one_decision_for_every_rank(gpt2, monkeypatch):
    """Rule 10: whether generation's logits replace the actor's experience forward is decided once for every
    rank; a rank that alone skips the (ZeRO-3, collective) forward leaves its peers waiting."""
    from step3_ppo import rollout

    rows, b = _left_padded_rollout(gpt2.tok, seed=9)
    actor = PlainEngine(gpt2.actor)
    with torch.no_grad():
        b["gen_logits"] = rollout.answer_logits(actor, b, 1.0)  # this rank's generation logits are exact
    gathered = []
    monkeypatch.setattr(ds, "all_gather_objects", lambda obj: (gathered.append(obj), [obj, 1.0])[1])  # rank 1 not
    models = types.SimpleNamespace(actor=actor, ref=None, critic=None, reward=None, reward_encoder=None)
    rollout.experience(models, b, 1.0)
    assert gathered and gathered[0] < rollout.REUSE_TOLERANCE
    assert actor._gen_logits_off is True


def test_rule10_zero3_generation_runs_with_synced_gpus_on_several_ranks(gpt2, monkeypatch):
    """Rule 10: under ZeRO-3 a rank whose answers are finished must keep stepping with the others
    (synced_gpus), or the ranks' parameter gathers go out of step and hang (DeepSpeed-Chat)."""
    from step3_ppo import rollout

    calls = []

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = gpt2.actor.generation_config

        def generate(self, input_ids, **kw):
            calls.append(kw)
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 2), 5)], 1)

    enc = Encoder(gpt2.tok, "hh", 64)
    args = types.SimpleNamespace(max_answer_seq_len=2, do_sample=False, temperature=1.0, top_p=1.0, top_k=0)
    cfg = rollout.generation_config(args, enc, greedy=True)
    for stage, world, synced in ((3, 2, True), (3, 1, False), (2, 2, False)):
        monkeypatch.setattr(ds, "world_size", lambda world=world: world)
        rollout.generate(PlainEngine(Module(), stage=stage), [[1, 2], [3]], enc, cfg, keep_logits=False)
        assert calls[-1]["synced_gpus"] is synced, (stage, world)


def test_rule10_zero3_generation_gathers_the_parameters_once_per_rollout(monkeypatch):
    """Rule 10: under ZeRO-3, generation gathers the actor's parameters once for the whole rollout and
    lifts the per-module gather hooks (TRL PR #1483: ~10x faster than gathering every layer at every token);
    the hooks come back afterwards for training."""
    import deepspeed

    from step3_ppo.models import generation_mode

    events = []

    class Gathered:
        def __init__(self, params):
            self.params = list(params)

        def __enter__(self):
            events.append(("gather", len(self.params)))

        def __exit__(self, *exc):
            events.append(("release",))

    class Hook:
        def __init__(self, name):
            self.name = name

        def remove(self):
            events.append(("remove", self.name))

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    for p in module.parameters():
        p.ds_active_sub_modules = {1}
    offload = types.SimpleNamespace(forward_hooks=[Hook("f")], backward_hooks=[Hook("b")], module=module,
                                    _register_deepspeed_module=lambda m: events.append(("register", m is module)))
    engine = PlainEngine(module, stage=3)
    engine.optimizer = types.SimpleNamespace(parameter_offload=offload)
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Gathered)
    with generation_mode(engine) as model:
        assert model is module and modes(model) == {False}
        assert events == [("gather", 2), ("remove", "f"), ("remove", "b")]
        assert offload.forward_hooks == offload.backward_hooks == []
        assert all(not p.ds_active_sub_modules for p in module.parameters())
    assert events[3:] == [("register", True), ("release",)]
    assert modes(module) == {True}


# ----------------------------------------------------------------------------- rule 25: batch statistics over ranks


def test_rule25_batch_scaled_group_advantages_use_the_std_of_every_rank(monkeypatch):
    """Rule 25: --scale_rewards batch divides by the std of every answer of the step on all ranks (from
    all-reduced sums), not of this rank's answers; two simulated ranks must give the single-process numbers."""
    from step3_ppo.trainer import build_buffer
    from test_rl_critic_free import _algo_args, _fake_rollout, _reference
    from utils.rl import RunningMoments

    args, algo = _algo_args("grpo", "--scale_rewards", "batch")
    sent = []

    def record(values):  # rank 1: remember what it contributes to each all-reduce
        sent.append([float(v) for v in values])
        return torch.tensor(sent[-1], dtype=torch.float64)

    monkeypatch.setattr(ds, "all_reduce_sum", record)
    build_buffer(args, algo, [_fake_rollout(8, 5, 4, 2)], args.kl_coef, RunningMoments())
    theirs = iter(list(sent))
    monkeypatch.setattr(ds, "all_reduce_sum", lambda values: torch.tensor(
        [float(v) for v in values], dtype=torch.float64) + torch.tensor(next(theirs), dtype=torch.float64))
    rows, _, n = build_buffer(args, algo, [_fake_rollout(8, 5, 4, 1)], args.kl_coef, RunningMoments())
    assert n == 16
    want = _reference(args, algo, [_fake_rollout(8, 5, 4, 1), _fake_rollout(8, 5, 4, 2)])[:8]
    assert len(rows) == 8
    for row, ref in zip(rows, want):
        assert row["advantages"].tolist() == pytest.approx(ref, abs=2e-5)


# ----------------------------------------------------------------------------- rules 18 and 19: checkpoints


class StubEngine:
    """The part of a DeepSpeed engine that save_checkpoint / load_checkpoint use; it writes its client state."""

    def __init__(self):
        self.checkpoint_engine = types.SimpleNamespace()
        self._config = types.SimpleNamespace(load_universal_checkpoint=False)
        self.optimizer = None
        self.saved_into, self.load_kwargs = [], []

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, path, tag, client_state, save_latest):
        self.saved_into.append(path)
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        torch.save(client_state, os.path.join(path, tag, "client.pt"))

    def load_checkpoint(self, path, tag, **kwargs):
        self.load_kwargs.append(kwargs)
        return path, self.checkpoint_engine.load(os.path.join(path, tag, "client.pt"))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rule19_checkpoints_are_written_under_a_temporary_name_and_restore_the_rng(tmp_path):
    """Rule 19: a checkpoint is written to a temporary name and renamed (a kill never leaves a half
    checkpoint that --resume would pick), and loading it restores every RNG, so a resumed run draws the same
    dropout masks and samples (DeepSpeedExamples #850; TRL #1643)."""
    from utils.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    engine = StubEngine()
    root = str(tmp_path / "checkpoints")
    np.random.randn()  # a cached Gaussian is part of numpy's state
    path = save_checkpoint(root, 3, {"model": engine}, {"stream": 1}, keep=2, meta={})
    expected = _draws()
    assert path == os.path.join(root, "step-3") and latest_checkpoint(root) == path
    assert engine.saved_into and all(os.path.basename(p) != "step-3" for p in engine.saved_into)
    assert sorted(os.listdir(root)) == ["step-3"]

    _draws(), _draws()  # move every generator on, then resume
    loaded = load_checkpoint(path, {"model": engine})
    assert loaded["step"] == 3 and loaded["stream"] == 1
    assert _draws() == expected


def test_rule18_checkpoint_loading_is_strict_about_module_keys(tmp_path):
    """Rule 18: loading fails loudly on missing or unexpected keys (DeepSpeed-Chat ignored them); resume must not
    pass DeepSpeed's load_module_strict=False."""
    from utils.checkpoint import load_checkpoint, save_checkpoint

    engine = StubEngine()
    path = save_checkpoint(str(tmp_path), 1, {"model": engine}, {}, keep=1, meta={})
    load_checkpoint(path, {"model": engine})
    assert engine.load_kwargs and all(kw.get("load_module_strict", True) is True for kw in engine.load_kwargs)
