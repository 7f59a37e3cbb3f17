"""Step 3 pieces outside utils/rl.py: rollout layout and log-probabilities, per-token values and the final
score, fp16 step synchronisation, EMA, prompt truncation, flag checks. Single process, no DeepSpeed launch."""
from __future__ import annotations

import inspect
import types

import pytest
import torch

from conftest import PlainEngine, run_python
from step3_ppo.config import GROUPS, REQUIRED
from step3_ppo.main import encode_prompts
from step3_ppo.models import (check_args, ema_copy_, ema_state, ema_update_, frozen_configs, load_ema_state,
                              step_together)
from step3_ppo.rollout import (answer_logits, answer_values, collate_samples, final_scores, generate,
                               generation_config, split_samples)
from utils.args import build_parser, parse
from utils.data import Sample
from utils.encoding import Encoder
from utils.errors import UserError
from utils.rl import token_logprobs

BASE = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--data_path", "p.jsonl",
        "--output_dir", "o"]


def ppo_args(*flags):
    return parse(GROUPS, "test", BASE + list(flags), required=REQUIRED)


def user(text: str):
    return ({"role": "user", "content": text},)


# ----------------------------------------------------------------------------- rollout layout


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_dir("llama")
    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_pretrained(path).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    critic.config.pad_token_id = critic.config.eos_token_id  # as utils.reward.load_reward_model does
    return AutoTokenizer.from_pretrained(path), actor, critic


def _rollout(tiny_models, temperature=0.7):
    """Greedy answers to prompts of different lengths; EOS is re-pointed at a token the random model
    generates, so answers stop at different lengths and pad (</s>) differs from that EOS."""
    tok, actor, _ = tiny_models
    enc = Encoder(tok, "hh", 64)
    prompts = [enc.encode_prompt(user(t)) for t in ("Tell me about the apple.", "Describe the very old castle "
                                                    "on the hill by the river.", "Hi.", "What do you think of it?")]
    args = types.SimpleNamespace(max_answer_seq_len=8, do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    first = generate(PlainEngine(actor), prompts, enc, generation_config(args, enc, greedy=True))
    enc.eos_id = int(first["answers"][0, 2])
    b = generate(PlainEngine(actor), prompts, enc, generation_config(args, enc, greedy=True))
    return enc, prompts, b


def test_a_models_own_generation_config_does_not_shape_rollouts_or_answers(tiny_models):
    """An instruct model ships generation_config.json with sampling settings (Qwen2.5: repetition_penalty
    1.05, top_k 20, top_p 0.8). generate() fills whatever our config leaves unset from it, so rollouts were
    drawn from another distribution than the one PPO's log-probabilities describe, and "greedy" answers
    were penalised ones. Both the rollout and the evaluation answers must ignore it (and keep it)."""
    from transformers import GenerationConfig

    from utils.generation import generate_answers

    tok, actor, _ = tiny_models
    enc = Encoder(tok, "hh", 64)
    texts = ("Tell me about the apple.", "Hi.", "What do you think of it?")
    prompts = [enc.encode_prompt(user(t)) for t in texts]
    args = types.SimpleNamespace(max_answer_seq_len=12, do_sample=True, temperature=0.7, top_p=1.0, top_k=0)

    def both():
        torch.manual_seed(3)
        sampled = generate(PlainEngine(actor), prompts, enc, generation_config(args, enc, 0.7))["answers"]
        greedy = generate(PlainEngine(actor), prompts, enc, generation_config(args, enc, greedy=True))["answers"]
        evaluated = [a.ids for a in generate_answers(actor, enc, [user(t) for t in texts], max_new_tokens=12)]
        return sampled, greedy, evaluated

    own = actor.generation_config
    try:
        actor.generation_config = GenerationConfig()
        plain = both()
        shipped = GenerationConfig(repetition_penalty=50.0, no_repeat_ngram_size=1, min_new_tokens=12, top_k=1,
                                   bad_words_ids=[[int(plain[1][0, 0])]])
        actor.generation_config = shipped
        assert [torch.equal(a, b) for a, b in zip(both()[:2], plain[:2])] == [True, True]
        assert both()[2] == plain[2]
        assert actor.generation_config is shipped  # the model's own config is back (it is what gets saved)
    finally:
        actor.generation_config = own


def test_rollout_masks_come_from_lengths_and_logprobs_match_unpadded_forwards(tiny_models):
    tok, actor, critic = tiny_models
    T = 0.7
    enc, prompts, b = _rollout(tiny_models, T)
    lengths = b["action_mask"].sum(-1).tolist()
    assert len(set(lengths)) > 1, "the test needs answers of different lengths"
    P = b["prompt_width"]
    for i, n in enumerate(lengths):
        answer = b["answers"][i, :n].tolist()
        assert b["has_eos"][i] == (enc.eos_id in answer)
        assert enc.eos_id not in answer[:-1]  # the first EOS ends the answer, and it is an action
        assert b["attention_mask"][i].tolist() == [0] * (P - len(prompts[i])) + [1] * (len(prompts[i]) + n) + \
            [0] * (b["answers"].shape[1] - n)

    logp = token_logprobs(answer_logits(PlainEngine(actor), b, T), b["answers"])
    values = answer_values(PlainEngine(critic), b)
    scores = final_scores(PlainEngine(critic), b)
    for i, n in enumerate(lengths):
        ids = torch.tensor([prompts[i] + b["answers"][i, :n].tolist()])
        p = len(prompts[i])
        with torch.no_grad():
            ref_logits = actor(input_ids=ids).logits[0, p - 1:p - 1 + n] / T
            ref_scores = _per_token_scores(critic, ids)
        ref_logp = torch.log_softmax(ref_logits.double(), -1).gather(-1, ids[0, p:, None]).squeeze(-1)
        assert torch.allclose(logp[i, :n].double(), ref_logp, atol=1e-5)
        assert torch.allclose(values[i, :n], ref_scores[p - 1:p - 1 + n], atol=1e-5)
        assert scores[i].item() == pytest.approx(ref_scores[-1].item(), abs=1e-5)  # last real token

    # Regrouped into another mini-batch (other order, other padding widths): the same log-probabilities,
    # so the first PPO ratio is exactly 1.
    rows = split_samples(b, {"logp": logp})
    mb = collate_samples([rows[2], rows[0], rows[3]], enc.pad_id)
    again = token_logprobs(answer_logits(PlainEngine(actor), mb, T), mb["answers"])
    assert torch.allclose(again * mb["action_mask"], mb["logp"], atol=1e-5)
    assert mb["action_mask"].sum(-1).tolist() == [lengths[2], lengths[0], lengths[3]]
    # A per-token field over the vocabulary (the anchor's reference logits) travels the same way, zero-padded.
    full = answer_logits(PlainEngine(actor), b, T)
    mb = collate_samples([r | {"ref_logits": full[i, :len(r["logp"])]} for i, r in enumerate(rows)][::-1], enc.pad_id)
    for j, i in enumerate(reversed(range(len(rows)))):
        assert torch.equal(mb["ref_logits"][j, :lengths[i]], full[i, :lengths[i]])
        assert not mb["ref_logits"][j, lengths[i]:].any()


def _per_token_scores(model, ids):
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.score(hidden)[0, :, 0]


def test_generation_config_uses_only_our_flags(tiny_models):
    tok, _, _ = tiny_models
    enc = Encoder(tok, "hh", 64)
    args = types.SimpleNamespace(max_answer_seq_len=5, do_sample=True, top_p=0.9, top_k=7)
    cfg = generation_config(args, enc, 0.5)
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k) == (5, True, 0.5, 0.9, 7)
    assert cfg.eos_token_id == enc.eos_id and cfg.pad_token_id == enc.pad_id and cfg.use_cache
    assert not generation_config(args, enc, greedy=True).do_sample
    with pytest.raises(ValueError, match="temperature"):
        generation_config(args, enc)  # sampling without the run's resolved temperature


# ----------------------------------------------------------------------------- fp16 step synchronisation


class FakeZeroOptimizer:
    """Shaped like DeepSpeed's ZeRO optimizers: step() starts by calling self.check_overflow()."""

    def __init__(self, bad_grads: bool):
        self.bad_grads, self.overflow, self.applied, self.checks = bad_grads, False, 0, 0

    def check_overflow(self, partition_gradients=True):
        self.checks += 1
        self.overflow = self.bad_grads

    def step(self):
        self.overflow = False
        self.check_overflow()
        if not self.overflow:
            self.applied += 1


class FakeEngine:
    def __init__(self, bad_grads: bool, fp16: bool = True):
        self.optimizer, self.fp16 = FakeZeroOptimizer(bad_grads), fp16

    def fp16_enabled(self):
        return self.fp16

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.optimizer.step()


@pytest.mark.parametrize("bad", [(True, False), (False, True), (True, True)])
def test_fp16_overflow_in_either_model_skips_both_steps(bad):
    engines = [FakeEngine(b) for b in bad]
    assert step_together(engines) is False
    assert [e.optimizer.applied for e in engines] == [0, 0]
    # The override is gone afterwards: the next step checks the real gradients again.
    for e in engines:
        assert "check_overflow" not in vars(e.optimizer)
        e.optimizer.bad_grads = False
    assert step_together(engines) is True
    assert [e.optimizer.applied for e in engines] == [1, 1]


def test_without_fp16_engines_step_normally():
    engines = [FakeEngine(True, fp16=False), FakeEngine(False, fp16=False)]
    step_together(engines)
    assert [e.optimizer.checks for e in engines] == [1, 1]  # only their own check, inside step()
    assert [e.optimizer.applied for e in engines] == [0, 1]


def _function_source(module, name: str) -> str:
    """The text of `def name` in a module (the methods are wrapped by DeepSpeed's nvtx decorator)."""
    text = inspect.getsource(module)
    start = text.index(f"    def {name}(")
    end = text.find("\n    def ", start + 1)
    return text[start:end]


def test_deepspeed_zero_optimizers_still_check_overflow_through_check_overflow():
    """The fp16 synchronisation relies on this DeepSpeed detail; fail loudly if an upgrade changes it."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    assert "self.check_overflow(" in _function_source(stage_1_and_2, "step")
    assert "self.check_overflow(" in _function_source(stage3, "_overflow_check_and_loss_scale_update")


# ----------------------------------------------------------------------------- EMA


def test_ema_update_is_the_moving_average():
    torch.manual_seed(0)
    actor, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema_copy_(ema, actor)
    start = [p.detach().clone() for p in actor.parameters()]
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(1.0)
    ema_update_(ema, actor, beta=0.9)  # 0.9 * start + 0.1 * (start + 1) = start + 0.1
    for e, s in zip(ema.parameters(), start):
        assert torch.allclose(e, s + 0.1, atol=1e-6)
    saved = ema_state(ema)
    other = torch.nn.Linear(3, 2)
    load_ema_state(other, saved)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), ema.parameters()))


# ----------------------------------------------------------------------------- flags and prompts


def test_every_flag_has_help_and_the_issue_flags_exist():
    parser = build_parser(GROUPS, "test")
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for name, action in flags.items():
        if name not in ("-h", "--config"):
            assert action.help and len(action.help) > 10, name
    for name in ("actor_zero_stage", "critic_zero_stage", "offload", "offload_reference_model", "offload_reward_model",
                 "actor_lora_dim", "critic_lora_dim", "actor_gradient_checkpointing", "max_prompt_seq_len",
                 "max_answer_seq_len", "temperature", "top_p", "top_k", "kl_coef", "kl_estimator",
                 "clip_reward_value", "normalize_reward", "missing_eos_penalty", "cut_answer_score", "gamma", "lam",
                 "whiten_advantages", "target_kl", "kl_horizon", "early_stop_kl", "generation_batches", "ppo_epochs",
                 "per_device_training_batch_size", "cliprange", "cliprange_value", "entropy_coef", "unsup_data_path",
                 "unsup_coef", "enable_ema", "ema_beta", "max_steps", "num_train_epochs", "print_answers_interval",
                 "attn_implementation"):
        assert f"--{name}" in flags, name
    # Flags that would be ambiguous with four models are not offered.
    for name in ("--model_name_or_path", "--zero_stage", "--learning_rate", "--per_device_train_batch_size"):
        assert name not in flags


@pytest.mark.parametrize("flags, message", [
    (["--offload", "--actor_zero_stage", "0"], "--offload"),
    (["--dtype", "fp16", "--critic_zero_stage", "0"], "fp16"),
    (["--per_device_generation_batch_size", "6", "--per_device_training_batch_size", "4"], "multiple"),
    (["--temperature", "0"], "temperature"),
    (["--ema_beta", "1.0"], "ema_beta"),
])
def test_check_args_refuses_settings_that_cannot_work(flags, message):
    with pytest.raises(UserError, match=message):
        check_args(ppo_args(*flags))


def test_offload_flags_put_frozen_models_under_zero3_parameter_offload():
    ref, reward = frozen_configs(ppo_args("--offload_reference_model"), world=2)
    assert ref["zero_optimization"]["stage"] == 3 and ref["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert reward["zero_optimization"]["stage"] == 0  # follows the critic's ZeRO-2: a full copy per rank
    ref, reward = frozen_configs(ppo_args("--offload_reward_model", "--actor_zero_stage", "3"), world=2)
    assert ref["zero_optimization"]["stage"] == 3 and "offload_param" not in ref["zero_optimization"]
    assert reward["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_prompt_truncation_keeps_the_end_and_the_bos(tokenizer_of):
    tok = tokenizer_of("llama")
    long = Sample(prompt=user("Tell me about the " + "very " * 40 + "old apple."), where="p.jsonl:1")
    short = Sample(prompt=user("Hi."), where="p.jsonl:2")
    full = Encoder(tok, "hh", 999).encode_prompt(long.prompt)
    enc = Encoder(tok, "hh", 32, overlong="truncate")
    cut = encode_prompts([long, short], enc, 32, "prompts")
    assert len(cut[0]) == 32 and cut[0][0] == tok.bos_token_id and cut[0][1:] == full[-31:]
    assert cut[1] == enc.encode_prompt(short.prompt)
    assert encode_prompts([long, short], Encoder(tok, "hh", 32, overlong="skip"), 32, "prompts") == [cut[1]]
    with pytest.raises(UserError, match="p.jsonl:1"):
        encode_prompts([long], Encoder(tok, "hh", 32, overlong="error"), 32, "prompts")


def test_main_refuses_a_causal_lm_as_reward_model(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi."}\n')
    p = run_python("step3_ppo/main.py", ["--actor_model_name_or_path", model, "--critic_model_name_or_path", model,
                                         "--data_path", prompts, "--output_dir", tmp_path / "out"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "not a sequence-classification model" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("flag", ["--critic_model_name_or_path", "--reward_model_name_or_path"])
def test_a_critic_or_reward_model_with_fewer_positions_is_refused(tiny_dir, tmp_path, flag):
    """Both read the whole prompt + answer as the actor's ids: one of fewer positions than that stopped
    mid-run with a traceback (GPT-2's position table: IndexError) after the models were loaded."""
    import json

    actor = tiny_dir("gpt2")  # 512 positions
    small = _reward_model_dir(actor, tmp_path / "rm64")
    cfg = json.loads((tmp_path / "rm64" / "config.json").read_text())
    (tmp_path / "rm64" / "config.json").write_text(json.dumps({**cfg, "n_positions": 64}))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi."}\n{"prompt": "Hello."}\n')
    models = (["--critic_model_name_or_path", small] if flag.startswith("--critic") else
              ["--advantage_estimator", "grpo", "--n_samples_per_prompt", 2, "--reward_model_name_or_path", small])
    p = run_python("step3_ppo/main.py", ["--actor_model_name_or_path", actor, *models, "--max_prompt_seq_len", 32,
                                         "--max_answer_seq_len", 64, "--per_device_generation_batch_size", 2,
                                         "--per_device_training_batch_size", 2, "--max_steps", 1, "--data_path", prompts,
                                         "--output_dir", tmp_path / "out"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert (f"error: --max_prompt_seq_len + --max_answer_seq_len is 96 tokens, more than the 64 positions of {flag} "
            f"'{small}' (config.json ") in p.stderr, p.stderr[-2000:]


def test_a_critic_of_another_template_is_refused(tmp_path):
    """A critic trained on hh text would value ChatML prompts it never saw; step 3 refuses it by name."""
    import json

    from step3_ppo.main import check_critic_template

    for name, template in (("rm_hh", "hh"), ("rm_chat", "chat"), ("old", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(json.dumps({"template": template} if template else {}))
    for ok in ("rm_chat", "old"):
        check_critic_template("chat", str(tmp_path / ok))
    check_critic_template("chat", None)
    with pytest.raises(UserError, match=r"--critic_model_name_or_path '.*rm_hh' was trained with --template hh, and "
                                        r"step 3 renders the prompts with chat"):
        check_critic_template("chat", str(tmp_path / "rm_hh"))


def _reward_model_dir(src: str, out) -> str:
    """A one-label classifier saved from a tiny causal LM (its score head random, fixed once saved)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def test_a_reward_model_reads_the_actors_ids_only_with_its_tokenizer_and_template(tiny_dir, tokenizer_of, tmp_path):
    """Same tokenizer and template (or none recorded): the rollout's ids are scored as they are. Another
    template, or another family's tokenizer: the answers are scored as text, in the reward model's own
    template, cut to its positions."""
    import json
    import shutil

    from step3_ppo.main import reward_reader

    llama = tiny_dir("llama")
    assert reward_reader(tokenizer_of("llama"), "hh", llama, False) == (None, None)
    hh = shutil.copytree(llama, tmp_path / "hh")
    (hh / "args.json").write_text(json.dumps({"template": "hh"}))
    assert reward_reader(tokenizer_of("llama"), "hh", str(hh), False) == (None, None)
    enc, limit = reward_reader(tokenizer_of("llama"), "alpaca", str(hh), False)
    assert (enc.template, limit) == ("hh", 512)
    enc, limit = reward_reader(tokenizer_of("llama"), "hh", tiny_dir("qwen2"), False)
    assert enc.template == "chat" and enc.tokenizer.get_vocab() == tokenizer_of("qwen2").get_vocab()
    assert enc.eos_id == tokenizer_of("qwen2").convert_tokens_to_ids("<|im_end|>")


def test_a_reward_model_with_its_own_tokenizer_scores_the_answer_text_as_plain_transformers_does(
        tiny_dir, tokenizer_of, tmp_path):
    """A Llama actor's answers scored by a Qwen2 (ChatML) reward model: the score of each answer is the
    reward model's output at the last token of the text its own chat template renders (at <|im_end|> for an
    answer that ended, at the answer's last token for one cut at the length limit), as plain transformers
    computes it one text at a time; a prompt too long for the model loses its start, not the answer."""
    from transformers import AutoModelForSequenceClassification

    from step3_ppo.main import reward_reader
    from step3_ppo.rollout import PromptItem, text_scores

    actor_tok, rm_tok = tokenizer_of("llama"), tokenizer_of("qwen2")
    rm_dir = _reward_model_dir(tiny_dir("qwen2"), tmp_path / "rm")
    enc, _ = reward_reader(actor_tok, "hh", rm_dir, False)
    plain = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    prompts = [({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}),
               ({"role": "user", "content": "What is the capital of France?"},),
               ({"role": "user", "content": "Say hello."},)]
    answers, ended = [" An apple.", "Paris is the capital", " Hello there, friend."], [True, False, True]
    rows = [actor_tok(a, add_special_tokens=False)["input_ids"] + ([actor_tok.eos_token_id] if e else [])
            for a, e in zip(answers, ended)]
    W = max(map(len, rows))
    b = {"answers": torch.tensor([r + [0] * (W - len(r)) for r in rows]),
         "action_mask": torch.tensor([[1] * len(r) + [0] * (W - len(r)) for r in rows]),
         "has_eos": torch.tensor(ended)}
    items = [PromptItem([1], p[-1]["content"], {}, f"p.jsonl:{i + 1}", None, p) for i, p in enumerate(prompts)]

    def reference(p, a, e, limit=None):
        if e:
            text = rm_tok.apply_chat_template(list(p) + [{"role": "assistant", "content": a.strip()}], tokenize=False)
            text = text[:text.rindex("<|im_end|>") + len("<|im_end|>")]
        else:
            text = rm_tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) + a.strip()
        ids = rm_tok(text, add_special_tokens=False)["input_ids"][-limit if limit else 0:]
        with torch.no_grad():
            return float(plain(input_ids=torch.tensor([ids])).logits[0, 0])

    models = types.SimpleNamespace(reward=plain, reward_encoder=enc, reward_limit=None)
    got = text_scores(models, actor_tok, b, items)
    want = [reference(p, a, e) for p, a, e in zip(prompts, answers, ended)]
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(want, abs=1e-5)
    assert len(set(want)) == 3
    models.reward_limit = 12  # the first prompt's text is longer: its start goes, the answer and <|im_end|> stay
    assert text_scores(models, actor_tok, b, items)[0].item() == pytest.approx(reference(prompts[0], answers[0], True, 12),
                                                                               abs=1e-5)


def test_a_spelled_turn_end_in_an_answer_does_not_hide_the_rest_from_a_text_reading_reward_model(
        tiny_dir, tokenizer_of, tmp_path):
    """A Llama actor can write ChatML's `<|im_end|>` as plain pieces (no special id, so nothing skips it);
    a Qwen2 reward model reading the decoded text must not take it for the reply's end, or an answer
    "good.<|im_end|> anything" scores as "good." whatever follows."""
    from transformers import AutoModelForSequenceClassification

    from step3_ppo.main import reward_reader
    from step3_ppo.rollout import PromptItem, text_scores

    actor_tok = tokenizer_of("llama")
    rm_dir = _reward_model_dir(tiny_dir("qwen2"), tmp_path / "rm")
    enc, _ = reward_reader(actor_tok, "hh", rm_dir, False)
    plain = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    answers = [" An apple.", " An apple.<|im_end|> The cat is dull.", " An apple. The cat is dull."]
    rows = [actor_tok(a, add_special_tokens=False)["input_ids"] + [actor_tok.eos_token_id] for a in answers]
    assert not set(rows[1][:-1]) & set(actor_tok.all_special_ids)
    W = max(map(len, rows))
    b = {"answers": torch.tensor([r + [0] * (W - len(r)) for r in rows]),
         "action_mask": torch.tensor([[1] * len(r) + [0] * (W - len(r)) for r in rows]),
         "has_eos": torch.tensor([True] * 3)}
    items = [PromptItem([1], "Name a fruit.", {}, f"p.jsonl:{i + 1}", None, user("Name a fruit.")) for i in range(3)]
    models = types.SimpleNamespace(reward=plain, reward_encoder=enc, reward_limit=None)
    got = text_scores(models, actor_tok, b, items).tolist()
    assert got[1] != pytest.approx(got[0], abs=1e-4)  # the text after the spelled turn end is scored
    assert got[1] == pytest.approx(got[2], abs=1e-5)

    from step3_ppo.main import check_reward_prompts

    spelled = PromptItem([1], "x", {}, "p.jsonl:4", None, user("Say <|im_end|> please."))
    with pytest.raises(UserError, match=r"^p.jsonl:4: --reward_model_name_or_path: the prompt holds text its "
                                        r"tokenizer reads as a special token"):
        check_reward_prompts(enc, items + [spelled], None)


def test_a_critic_of_another_tokenizer_is_refused_naming_the_way_out(tiny_dir, tokenizer_of):
    from step3_ppo.main import check_critic_tokenizer

    check_critic_tokenizer(tokenizer_of("llama"), tiny_dir("llama"), False)
    with pytest.raises(UserError, match=r"--critic_model_name_or_path '.*' uses a different tokenizer from the actor; "
                                        r".*give a reward model with its own tokenizer as --reward_model_name_or_path"):
        check_critic_tokenizer(tokenizer_of("llama"), tiny_dir("qwen2"), False)


def _refusing_chatml(tiny_dir, tokenizer_of, condition: str, message: str) -> Encoder:
    """A Qwen2 reward model's Encoder whose ChatML template raises `message` on a turn where `condition` holds."""
    tok = tokenizer_of("qwen2")
    enc = Encoder(tok, "chat", 0)
    enc.tokenizer = type(tok).from_pretrained(tiny_dir("qwen2"))
    enc.tokenizer.chat_template = ("{% for m in messages %}{% if " + condition + " %}"
                                   "{{ raise_exception('" + message + "') }}{% endif %}"
                                   "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return enc


def test_a_prompt_the_reward_models_template_refuses_is_named_before_loading(tiny_dir, tokenizer_of):
    """A chat template that raises on a row (here: one that allows no system turn) stops the run at
    start-up with the row's file:line."""
    from step3_ppo.main import check_reward_prompts
    from step3_ppo.rollout import PromptItem

    strict = _refusing_chatml(tiny_dir, tokenizer_of, "m['role'] == 'system'", "no system turns")
    ok = PromptItem([1], "Hi.", {}, "p.jsonl:1", None, user("Hi."))
    bad = PromptItem([1], "Hi.", {}, "p.jsonl:2", None, ({"role": "system", "content": "S."},) + user("Hi."))
    check_reward_prompts(strict, [ok], None)
    with pytest.raises(UserError, match=r"p.jsonl:2.*--reward_model_name_or_path.*no system turns"):
        check_reward_prompts(strict, [ok, bad], None)
    with pytest.raises(UserError) as e:
        check_reward_prompts(strict, [ok, bad], None)
    # The advice names the reward model's own template; step 3's --template (the actor's) cannot change it.
    assert "pick --template" not in str(e.value) and "reward model's own template 'chat'" in str(e.value)


def test_an_answer_the_reward_models_template_refuses_names_the_reward_model_row_and_answer(tiny_dir,
                                                                                          tokenizer_of):
    from step3_ppo.rollout import PromptItem, text_scores

    actor_tok = tokenizer_of("llama")
    strict = _refusing_chatml(tiny_dir, tokenizer_of, "'dull' in m['content']", "no dull words")
    row = actor_tok(" The cat is dull.", add_special_tokens=False)["input_ids"] + [actor_tok.eos_token_id]
    b = {"answers": torch.tensor([row]), "action_mask": torch.ones(1, len(row), dtype=torch.long),
         "has_eos": torch.tensor([True])}
    models = types.SimpleNamespace(reward=None, reward_encoder=strict, reward_limit=None)
    with pytest.raises(UserError, match=r"^p.jsonl:7: --reward_model_name_or_path: .*no dull words.*"
                                        r"reward model's own template.*answer 'The cat is dull.'"):
        text_scores(models, actor_tok, b, [PromptItem([1], "Hi.", {}, "p.jsonl:7", None, user("Hi."))])


def test_ppo_with_a_reward_model_of_another_family_scores_what_plain_transformers_scores(tiny_dir, tmp_path):
    """One PPO step, a Llama actor and critic, a Qwen2 (ChatML) reward model: the rewards logged for the
    rollout's answers are the reward model's scores of (prompt turns, answer text) rendered with its own chat
    template, as plain transformers computes them. A reward function records what the answers were."""
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from utils.reward_funcs import text_of

    llama, rm_dir = tiny_dir("llama"), _reward_model_dir(tiny_dir("qwen2"), tmp_path / "rm")
    seen = tmp_path / "seen.jsonl"
    funcs = tmp_path / "record.py"
    funcs.write_text(f"""import json
def record(prompts, completions, completion_ids, **kw):
    with open({str(seen)!r}, "a") as f:
        for p, c in zip(prompts, completions):
            f.write(json.dumps({{"prompt": p, "answer": c}}) + "\\n")
    return [0.0] * len(completions)
""")
    data = tmp_path / "p.jsonl"
    city = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city."}]
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Name a fruit."}, {"prompt": "Say hello."}, {"prompt": city}, {"prompt": "Count to three."}]) + "\n")
    turns_of = {"Name a city.": city}  # a batch of mixed rows reaches reward functions as text (TRL's rule)
    p = run_python("step3_ppo/main.py", ["--actor_model_name_or_path", llama, "--critic_model_name_or_path", llama,
                                         "--reward_model_name_or_path", rm_dir, "--reward_funcs", f"{funcs}:record",
                                         "--data_path", data, "--output_dir", tmp_path / "out", "--max_steps", "1",
                                         "--per_device_generation_batch_size", "4",
                                         "--per_device_training_batch_size", "4", "--max_answer_seq_len", "6",
                                         "--print_answers_interval", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "has a tokenizer of its own: it scores every answer as text" in p.stdout + p.stderr
    rows = [r for r in map(json.loads, open(tmp_path / "out" / "metrics.jsonl")) if r["split"] == "samples"]
    samples = rows[0]["samples"]
    seen_rows = [json.loads(line) for line in open(seen)]
    rollout = [r for r in seen_rows if text_of(r["answer"])][:len(samples)]  # the startup check's answers are ""
    tok = AutoTokenizer.from_pretrained(rm_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    assert "Name a city." in [r["prompt"] for r in rollout]  # the system turn travels to the reward model
    for sample, r in zip(samples, rollout):
        turns = turns_of.get(r["prompt"], [{"role": "user", "content": r["prompt"]}])
        answer = text_of(r["answer"]).strip()
        if sample["answer"].endswith("</s>"):
            text = tok.apply_chat_template(turns + [{"role": "assistant", "content": answer}], tokenize=False)
            text = text[:text.rindex("<|im_end|>") + len("<|im_end|>")]
        else:
            text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True) + answer
        with torch.no_grad():
            want = float(plain(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
        assert sample["reward"] == pytest.approx(want, abs=2e-4), (sample, r, text)


@pytest.mark.parametrize("confidence", [0.0, 0.5])
def test_the_anchor_adds_the_full_vocabulary_kl_to_the_reference_per_answer_token(confidence):
    """--anchor_coef c: the actor loss gains c x KL(ref || actor) over the whole vocabulary at the answer
    tokens whose reference top probability is >= --anchor_confidence (every token at 0), divided by all the
    step's answer tokens like the policy loss, computed by hand here (padding excluded), and logged as
    kl/anchor; its gradient pulls the actor's distribution toward the reference's where it holds, and
    leaves the other positions free."""
    import math

    from step3_ppo.config import resolve_algorithm
    from step3_ppo.trainer import actor_loss

    coef = 2.5
    g = torch.Generator().manual_seed(5)
    B, T, V = 3, 4, 6
    lengths = [4, 1, 3]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = 2.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    answers = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(logits.detach(), -1).gather(-1, answers[..., None]).squeeze(-1) * mask
    b = {"answers": answers, "action_mask": mask, "logp": old, "advantages": torch.zeros(B, T, dtype=torch.float64),
         "ref_logits": ref_logits}
    args = ppo_args("--anchor_coef", str(coef), "--anchor_confidence", str(confidence))
    algo = resolve_algorithm(args)
    n_tok = float(mask.sum())
    loss, _, stats = actor_loss(args, algo, None, b, None, 0.1, n_tok, float(B), logits=logits)
    kl_sum, held, free = 0.0, 0, []
    for i, n in enumerate(lengths):
        for t in range(n):
            p = [math.exp(x) for x in logits[i, t].tolist()]
            q = [math.exp(x) for x in ref_logits[i, t].tolist()]
            p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
            if max(q) < confidence:
                free.append((i, t))
                continue
            kl_sum += sum(qv * math.log(qv / pv) for pv, qv in zip(p, q))
            held += 1
    assert held and (free or not confidence)  # both kinds of position occur at 0.5
    assert stats["kl/anchor"] == pytest.approx(kl_sum / n_tok, rel=1e-9)
    assert loss.item() == pytest.approx(coef * kl_sum / n_tok, rel=1e-9)  # zero advantages: the anchor alone
    loss.backward()
    assert logits.grad[1, 1:].abs().max() == 0  # padding
    for i, t in free:
        assert logits.grad[i, t].abs().max() == 0
    step = logits.detach() - 0.1 * logits.grad
    after = actor_loss(args, algo, None, b, None, 0.1, n_tok, float(B), logits=step)[0].item()
    assert after < loss.item()


def test_the_anchor_is_off_by_default_and_loads_the_reference_when_on():
    from step3_ppo.config import resolve_algorithm

    assert ppo_args().anchor_coef == 0.0
    assert not resolve_algorithm(ppo_args("--kl_coef", "0")).reference  # nothing needs a reference
    assert resolve_algorithm(ppo_args("--kl_coef", "0", "--anchor_coef", "1")).reference
    grpo = ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--critic_model_name_or_path", "",
            "--reward_model_name_or_path", "r", "--kl_coef", "0"]
    assert not resolve_algorithm(ppo_args(*grpo)).reference
    assert resolve_algorithm(ppo_args(*grpo, "--anchor_coef", "0.5")).reference


def test_only_optimize_lora_freezes_the_base_of_the_model_with_lora_and_names_step_3s_flags():
    """--only_optimize_lora with LoRA on the actor only: the actor trains its adapters, the critic (no
    LoRA) trains whole; without LoRA on either, the error names step 3's flags (it named --lora_dim, a flag
    step 3 does not have)."""
    from step3_ppo.models import _lora_args

    args = ppo_args("--only_optimize_lora", "--actor_lora_dim", "8")
    check_args(args)
    assert _lora_args(args, "actor").only_optimize_lora and not _lora_args(args, "critic").only_optimize_lora
    with pytest.raises(UserError, match="^--only_optimize_lora needs --actor_lora_dim > 0 or --critic_lora_dim > 0$"):
        check_args(ppo_args("--only_optimize_lora"))
