"""Pitfall rule 16 (shared/design/pitfalls.md) at the trainers' wiring: loss normalisation is invariant to how
the optimizer step is split into micro-batches. The pure loss functions are tested for that elsewhere; these
tests run the trainers' own loops (step 2's and DPO's `train`, step 3's `ppo_update`) in-process on a tiny model,
once with the step as one micro-batch and once split into two micro-batches of clearly different sizes
(gradient accumulation 2), and compare the accumulated gradients and the reported loss.

Single process, CPU, no DeepSpeed launch. The engine is a fake with DeepSpeed's gradient-accumulation
semantics (backward divides the loss by the accumulation steps and accumulates; step is a no-op), so the
gradients after one optimizer step are exactly what the trainer asked for."""
from __future__ import annotations

import random
import types

import pytest
import torch

from utils.encoding import IGNORE


class AccumulatingEngine:
    """What the trainers need of a DeepSpeed engine around a plain model: `backward` divides by the gradient
    accumulation steps (as DeepSpeed does) and accumulates into .grad; `step` is a no-op, so the gradients
    of the whole step stay to be compared."""

    def __init__(self, module, ga: int):
        self.module, self.ga, self.optimizer, self.backwards = module, ga, None, 0

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def __getattr__(self, name):  # DeepSpeedEngine forwards unknown attributes to its module too
        return getattr(self.module, name)

    def backward(self, loss):
        (loss / self.ga).backward()
        self.backwards += 1

    def step(self):
        pass

    def is_gradient_accumulation_boundary(self):
        return self.backwards % self.ga == 0

    def fp16_enabled(self):
        return False

    def zero_optimization_stage(self):
        return 0

    def get_lr(self):
        return [0.0]

    def eval(self):
        self.module.eval()

    def train(self, mode: bool = True):
        self.module.train(mode)

    def grads(self) -> dict:
        return {n: p.grad.detach().clone() for n, p in self.module.named_parameters() if p.grad is not None}


class FakeLogger:
    def __init__(self):
        self.lines, self.advanced = [], []

    def log(self, line):
        self.lines.append(dict(line))

    def advance(self, n, **kw):
        self.advanced.append(kw)

    def write(self, *_a, **_k):
        pass

    def write_args(self):
        pass


class FakeStream:
    """One optimizer step's micro-batches, then nothing."""

    def __init__(self, batches):
        self.batches = batches

    def next_step(self):
        return self.batches

    def state_dict(self):
        return {}

    def load_state_dict(self, _st):
        pass


class NoCheckpointer:
    def __init__(self, *_a, **_k):
        pass

    def resume(self):
        return 0

    def after_step(self, _step):
        pass


def _ids(g: random.Random, n: int, vocab: int, avoid: int) -> list[int]:
    out = []
    while len(out) < n:
        t = g.randrange(3, vocab)
        if t != avoid:
            out.append(t)
    return out


def _pairs(tok, lengths, ref: bool = False, seed: int = 0):
    """Pairs (prompt, chosen reply, rejected reply lengths) with nonzero margins and (optionally) precomputed
    reference log-probs."""
    from utils.pairs import Pair

    g, eos, vocab = random.Random(seed), tok.eos_token_id, min(len(tok), 200)
    out = []
    for i, (p, c, r) in enumerate(lengths):
        prompt = _ids(g, p, vocab, eos)
        ch = prompt + _ids(g, c, vocab, eos) + [eos]
        rj = prompt + _ids(g, r, vocab, eos) + [eos]
        out.append(Pair(ch, [IGNORE] * p + ch[p:], rj, [IGNORE] * p + rj[p:], p, 0.3 * (i % 2), f"f:{i}",
                        (-3.0 - i, -5.0 + 0.5 * i) if ref else None))
    return out


# One short pair and three long ones: split 1 + 3 pairs, the micro-batches differ in pairs and tokens.
LENGTHS = [(2, 1, 2), (9, 14, 11), (7, 12, 16), (10, 15, 9)]


def _load(tiny_dir, classifier: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = tiny_dir("llama")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(seed)
        if classifier:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok = AutoTokenizer.from_pretrained(path)
    if classifier:
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.float()
    for m in model.modules():  # deterministic forwards: the two runs must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, tok


def _assert_same_grads(a: dict, b: dict, what: str):
    assert a.keys() == b.keys() and a, what
    worst = max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)
    total = sum(float(a[k].abs().sum()) for k in a)
    assert total > 0, what
    assert worst < 1e-4, (what, worst)


# ----------------------------------------------------------------------------- step 2 (reward model)


def _step2_run(tiny_dir, monkeypatch, splits):
    import step2_reward.trainer as t
    from utils.pairs import collate_pairs

    model, tok = _load(tiny_dir, classifier=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items = _pairs(tok, LENGTHS)
    batches = [collate_pairs([items[i] for i in part], pad) for part in splits]
    monkeypatch.setattr(t, "Checkpointer", NoCheckpointer)
    monkeypatch.setattr(t, "evaluate", lambda *a, **k: {"loss": 0.0})
    args = types.SimpleNamespace(gradient_accumulation_steps=len(splits), compute_fp32_loss=True,
                                 center_rewards_coefficient=0.01, per_device_eval_batch_size=2, log_interval=1,
                                 eval_interval=0, output_dir="unused")
    engine = AccumulatingEngine(model, len(splits))
    model.zero_grad(set_to_none=True)
    logger = FakeLogger()
    t.train(args, engine, FakeStream(batches), [], logger, None, total_steps=1)
    train_lines = [line for line in logger.lines if line.get("split") == "train"]
    return engine.grads(), logger.advanced[0]["loss"], train_lines[0]["loss"]


def test_step2_train_gradient_and_loss_do_not_depend_on_the_micro_batch_split(tiny_dir, monkeypatch):
    """Rule 16, step 2's train(): 4 pairs as one micro-batch vs 1 short + 3 long pairs as two micro-batches
    (gradient accumulation 2) give the same accumulated gradient and reported loss: every micro-batch is
    normalised by the step's pair count, not its own (a per-micro-batch mean weights the lone pair 3x)."""
    g1, adv1, log1 = _step2_run(tiny_dir, monkeypatch, [[0, 1, 2, 3]])
    g2, adv2, log2 = _step2_run(tiny_dir, monkeypatch, [[0], [1, 2, 3]])
    _assert_same_grads(g1, g2, "step 2 reward-model gradient")
    assert adv2 == pytest.approx(adv1, rel=1e-5) and log2 == pytest.approx(log1, rel=1e-5)


# ----------------------------------------------------------------------------- DPO


def _dpo_run(tiny_dir, monkeypatch, splits, anchor: float = 0.0):
    import copy

    import dpo.trainer as t
    from utils.pairs import collate_pairs

    model, tok = _load(tiny_dir, classifier=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ref = None  # precomputed reference log-probs: no reference model
    if anchor:  # the anchor reads a live reference's logits: a perturbed copy, so the KL and its gradient are not 0
        ref = copy.deepcopy(model).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
    items = _pairs(tok, LENGTHS, ref=not anchor)
    batches = [collate_pairs([items[i] for i in part], pad) for part in splits]
    monkeypatch.setattr(t, "Checkpointer", NoCheckpointer)
    monkeypatch.setattr(t, "evaluate", lambda *a, **k: {"loss": 0.0, "rewards/chosen": 0.0})
    # rpo_alpha > 0: the chosen-NLL term is normalised by the step's chosen tokens as well (and the anchor).
    args = types.SimpleNamespace(gradient_accumulation_steps=len(splits), compute_fp32_loss=True,
                                 displacement_warn_nats=0.0, beta=0.1, rpo_alpha=0.5, loss_type="sigmoid",
                                 label_smoothing=0.0, log_interval=1, eval_interval=0, output_dir="unused",
                                 anchor_coef=anchor)
    engine = AccumulatingEngine(model, len(splits))
    model.zero_grad(set_to_none=True)
    logger = FakeLogger()
    t.train(args, engine, ref, FakeStream(batches), [], logger, pad, total_steps=1)
    train_lines = [line for line in logger.lines if line.get("split") == "train"]
    assert (train_lines[0].get("kl/chosen", 0.0) > 0) == bool(anchor), train_lines[0]
    return engine.grads(), logger.advanced[0]["loss"], train_lines[0]["loss"]


@pytest.mark.parametrize("anchor", [0.0, 5.0])
def test_dpo_train_gradient_and_loss_do_not_depend_on_the_micro_batch_split(tiny_dir, monkeypatch, anchor):
    """Rule 16, DPO's train(): 4 pairs as one micro-batch vs 1 short + 3 long pairs as two micro-batches give
    the same accumulated gradient and the same reported step loss (the sum of the micro-batch losses), with
    the DPO term normalised by the step's pairs and the RPO term and the anchor by its chosen tokens."""
    g1, adv1, log1 = _dpo_run(tiny_dir, monkeypatch, [[0, 1, 2, 3]], anchor)
    g2, adv2, log2 = _dpo_run(tiny_dir, monkeypatch, [[0], [1, 2, 3]], anchor)
    _assert_same_grads(g1, g2, "DPO policy gradient")
    assert adv2 == pytest.approx(adv1, rel=1e-5)
    assert log2 == pytest.approx(log1, rel=1e-5)
    assert adv1 == pytest.approx(log1, rel=1e-5)  # the logged objective is the one trained, anchor included


# ----------------------------------------------------------------------------- step 3 (PPO update)


def _ppo_rows(tok, seed: int = 0, ref_vocab: int = 0):
    """4 buffer rows with answers of 1, 2, 4 and 11 tokens: any 2 + 2 split has unequal token counts.
    ref_vocab: also the reference's answer logits over that many tokens (the anchor's input)."""
    g, eos = random.Random(seed), tok.eos_token_id
    vocab = min(len(tok), 200)
    torch.manual_seed(seed)
    rows = []
    for p, n in ((3, 1), (5, 2), (4, 4), (6, 11)):
        rows.append({"prompt": torch.tensor(_ids(g, p, vocab, eos)), "answer": torch.tensor(_ids(g, n, vocab, eos)),
                     "logp": -2.0 - torch.rand(n), "values": 0.3 * torch.randn(n), "returns": torch.randn(n),
                     "advantages": torch.randn(n)})
        if ref_vocab:
            rows[-1]["ref_logits"] = torch.randn(n, ref_vocab)
    return rows


def _ppo_run(tiny_dir, ga: int, anchor: float = 0.0):
    from step3_ppo.config import GROUPS, REQUIRED, resolve_algorithm
    from step3_ppo.trainer import ppo_update
    from utils.args import parse

    mb = 4 // ga
    args = parse(GROUPS, "test", ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                                  "--data_path", "p.jsonl", "--output_dir", "o", "--ppo_epochs", "1",
                                  "--per_device_training_batch_size", str(mb),
                                  "--gradient_accumulation_steps", str(ga), "--anchor_coef", str(anchor),
                                  "--anchor_confidence", "0"],
                 required=REQUIRED)
    algo = resolve_algorithm(args)
    assert algo.critic
    actor_model, tok = _load(tiny_dir, classifier=False, seed=1)
    critic_model, _ = _load(tiny_dir, classifier=True, seed=2)
    actor, critic = AccumulatingEngine(actor_model, ga), AccumulatingEngine(critic_model, ga)
    models = types.SimpleNamespace(actor=actor, critic=critic, ref=None, reward=None, ema=None,
                                   trained=lambda: [actor, critic])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(123)  # ppo_update shuffles the buffer; each run draws its own order
    rows = _ppo_rows(tok, ref_vocab=actor_model.config.vocab_size if anchor else 0)
    out = ppo_update(args, algo, models, rows, None, pad, step=1, kl_coef=0.05)
    assert critic.backwards == ga and actor.backwards == ga
    assert ("kl/anchor" in out) == bool(anchor)
    return actor.grads(), critic.grads(), out


@pytest.mark.parametrize("anchor", [0.0, 2.0])
def test_ppo_update_gradients_and_losses_do_not_depend_on_the_micro_batch_split(tiny_dir, anchor):
    """Rule 16, step 3's ppo_update(): the 4-answer buffer as one micro-batch vs two micro-batches of 2 answers
    with unequal token counts (gradient accumulation 2) give the same critic and actor gradients and the same
    reported critic and actor losses: the value loss is a token mean over the whole optimizer step, not over
    each micro-batch; so is the anchor (--anchor_coef)."""
    a1, c1, o1 = _ppo_run(tiny_dir, ga=1, anchor=anchor)
    a2, c2, o2 = _ppo_run(tiny_dir, ga=2, anchor=anchor)
    _assert_same_grads(c1, c2, "critic gradient")
    _assert_same_grads(a1, a2, "actor gradient")
    assert o2["critic_loss"] == pytest.approx(o1["critic_loss"], rel=1e-5)
    assert o2["actor_loss"] == pytest.approx(o1["actor_loss"], rel=1e-5, abs=1e-7)
    if anchor:
        assert o1["kl/anchor"] > 0 and o2["kl/anchor"] == pytest.approx(o1["kl/anchor"], rel=1e-5)


def test_ppo_value_loss_is_a_token_mean_whatever_the_loss_agg(tiny_dir):
    """README, Step 3 item 4: the policy loss follows --loss_agg, the value loss is always a token mean over the
    step (pinned with --loss_agg seq_mean_token_mean, where the two differ on answers of 1, 2, 4 and 11 tokens)."""
    from step3_ppo.config import GROUPS, REQUIRED, resolve_algorithm
    from step3_ppo.rollout import answer_values, collate_samples
    from step3_ppo.trainer import ppo_update
    from utils.args import parse
    from utils.rl import value_loss_per_token

    args = parse(GROUPS, "test", ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
                                  "--data_path", "p.jsonl", "--output_dir", "o", "--per_device_training_batch_size",
                                  "4", "--loss_agg", "seq_mean_token_mean"], required=REQUIRED)
    algo = resolve_algorithm(args)
    actor_model, tok = _load(tiny_dir, classifier=False, seed=1)
    critic_model, _ = _load(tiny_dir, classifier=True, seed=2)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = _ppo_rows(tok)
    b = collate_samples(rows, pad)
    with torch.no_grad():
        per_token, _ = value_loss_per_token(answer_values(critic_model, b), b["values"], b["returns"],
                                            args.cliprange_value)
    mask = b["action_mask"].float()
    token_mean = float((per_token * mask).sum() / mask.sum())
    seq_mean = float(((per_token * mask).sum(-1) / mask.sum(-1)).mean())
    assert abs(token_mean - seq_mean) > 1e-3
    actor, critic = AccumulatingEngine(actor_model, 1), AccumulatingEngine(critic_model, 1)
    models = types.SimpleNamespace(actor=actor, critic=critic, ref=None, reward=None, ema=None,
                                   trained=lambda: [actor, critic])
    out = ppo_update(args, algo, models, rows, None, pad, step=1, kl_coef=0.05)
    assert out["critic_loss"] == pytest.approx(token_mean, rel=1e-5)
