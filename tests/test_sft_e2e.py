"""Step 1 end to end: real `deepspeed --num_gpus 2` runs on tiny models, checked by numbers."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from conftest import DATA, assert_user_error, read_metrics, run_deepspeed, run_python

pytestmark = pytest.mark.e2e
FORM = re.compile(r"^ ?The \w+ is \w+\.$")


def eval_loss_plain_transformers(out_dir: str) -> float:
    """Eval loss of the saved directory loaded with plain transformers, on the run's own eval split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.data import load_splits
    from utils.encoding import Encoder, pad_batch
    from utils.losses import count_target_tokens, sft_loss

    args = json.load(open(os.path.join(out_dir, "args.json")))
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tok = AutoTokenizer.from_pretrained(out_dir)
    _, ev = load_splits(args["data_path"], args["eval_data_path"], args["eval_fraction"], args["seed"], "sft")
    enc = Encoder(tok, args["template"], args["max_seq_len"])
    items = [enc.encode_sft(s) for s in ev]
    batch = pad_batch([i for i, _ in items], [l for _, l in items], enc.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sft_loss(logits, batch["labels"], count_target_tokens(batch["labels"]))[0].item()


def greedy_answers(out_dir: str) -> list[tuple[str, bool]]:
    """(answer text, ended with EOS) for the run's held-out eval prompts, rendered with its template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.data import load_splits
    from utils.encoding import Encoder

    args = json.load(open(os.path.join(out_dir, "args.json")))
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tok = AutoTokenizer.from_pretrained(out_dir)
    enc = Encoder(tok, args["template"], args["max_seq_len"])
    _, ev = load_splits(args["data_path"], args["eval_data_path"], args["eval_fraction"], args["seed"], "sft")
    out = []
    for s in ev:
        ids = torch.tensor([enc.encode_prompt(s.prompt)])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=enc.pad_id, eos_token_id=tok.eos_token_id)[0, ids.size(1):].tolist()
        ended = tok.eos_token_id in gen
        gen = gen[: gen.index(tok.eos_token_id)] if ended else gen
        out.append((tok.decode(gen), ended))
    return out


@pytest.mark.parametrize("family,extra", [
    ("llama", ["--zero_stage", "3", "--offload"]),
    ("gpt2", ["--zero_stage", "2"]),
])
def test_sft_learns_form_and_eos(tiny_dir, tmp_path, family, extra):
    out = str(tmp_path / "out")
    run_deepspeed("step1_sft/main.py", [
        "--model_name_or_path", tiny_dir(family), "--data_path", os.path.join(DATA, "sft.jsonl"),
        "--output_dir", out, "--learning_rate", "3e-3", "--num_train_epochs", "12",
        "--per_device_train_batch_size", "8", "--log_interval", "20", "--eval_interval", "100", *extra])
    metrics = read_metrics(out)
    evals = [m for m in metrics if m["split"] == "eval"]
    assert evals[0]["step"] == 0 and len(evals) >= 3
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"], evals
    train = [m for m in metrics if m["split"] == "train"]
    assert all(k in train[-1] for k in ("loss", "lr", "samples_per_sec", "tokens_per_sec"))
    assert "ppl" in evals[-1]
    # The saved directory, loaded with plain transformers, gives the trained model's eval loss.
    assert eval_loss_plain_transformers(out) == pytest.approx(evals[-1]["loss"], abs=1e-4)
    answers = greedy_answers(out)
    ok = [ended and bool(FORM.match(text)) for text, ended in answers]
    assert sum(ok) >= 0.8 * len(ok), answers
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["template"] == "hh" and args["trust_remote_code"] is False
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(out))


def test_lora_zero3_merged_on_save(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "lora")
    base = tiny_dir("gpt2")
    run_deepspeed("step1_sft/main.py", [
        "--model_name_or_path", base, "--data_path", os.path.join(DATA, "sft.jsonl"), "--output_dir", out,
        "--zero_stage", "3", "--lora_dim", "8", "--only_optimize_lora", "--learning_rate", "1e-2",
        "--max_steps", "20", "--per_device_train_batch_size", "8"])
    evals = [m for m in read_metrics(out) if m["split"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3
    saved, orig = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(base, "model.safetensors"))
    assert set(saved) == set(orig)  # a plain model: no peft keys
    changed = [k for k in saved if not torch.equal(saved[k], orig[k])]
    assert changed and all(k.endswith("c_attn.weight") or "c_proj" in k or "c_fc" in k for k in changed)
    assert eval_loss_plain_transformers(out) == pytest.approx(evals[-1]["loss"], abs=1e-4)


BAD = {
    "malformed.jsonl": (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', r"malformed.jsonl:2: malformed JSON"),
    "noformat.jsonl": (b'{"question": "a", "answer": "b"}\n', r"noformat.jsonl:1: record matches no known format"),
    "missing.jsonl": (b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', r"missing.jsonl:2: field 'response': missing field"),
    "empty_field.jsonl": (b'{"prompt": "a", "response": ""}\n', r"empty_field.jsonl:1: field 'response': field is empty"),
    "bytes.jsonl": (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n', r"bytes.jsonl:2: undecodable bytes"),
    "empty.jsonl": (b"", r"empty.jsonl: file is empty"),
}


@pytest.mark.slow
def test_bad_inputs_clear_errors(tiny_dir, tmp_path):
    """Each bad file through `python step1_sft/main.py`. Slow: test_bad_input_corpus.py checks every one of
    these messages in the readers main() calls, one such file end to end per program, and the missing model
    directory in process."""
    model = tiny_dir("llama")
    for name, (content, expected) in BAD.items():
        path = tmp_path / name
        path.write_bytes(content)
        p = run_python("step1_sft/main.py", ["--model_name_or_path", model, "--data_path", str(path),
                                             "--output_dir", str(tmp_path / "o")])
        assert_user_error(p, expected, name)
    for args, expected in [
        (["--data_path", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--data_path", os.path.join(DATA, "sft.jsonl"), "--model_name_or_path", str(tmp_path / "nomodel")],
         "does not exist"),
    ]:
        full = ["--model_name_or_path", model, "--output_dir", str(tmp_path / "o")] + args
        p = run_python("step1_sft/main.py", full)
        assert_user_error(p, expected)
