"""utils.model.prepare_model's --freeze_embeddings on untied (Llama) and tied (GPT-2) embeddings, a
classifier (no LM head), LoRA, and the optimizer groups that follow from it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from utils.ds import _param_groups
from utils.model import prepare_model


def _args(which: str, lora_dim: int = 0, only_lora: bool = False):
    return SimpleNamespace(gradient_checkpointing=False, lora_dim=lora_dim, lora_alpha=16,
                           lora_module_name="q_proj,v_proj,c_attn", only_optimize_lora=only_lora,
                           freeze_embeddings=which)


def _frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("which, frozen", [("none", set()), ("input", {"model.embed_tokens.weight"}),
                                           ("output", {"lm_head.weight"}),
                                           ("both", {"model.embed_tokens.weight", "lm_head.weight"})])
def test_untied_embeddings_freeze_one_side_or_both(tiny_dir, which, frozen):
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")), _args(which))
    assert _frozen(model) == frozen
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    trained = sum(p.numel() for g in _param_groups(model, 0.1) for p in g["params"])
    assert trained == sum(p.numel() for p in model.parameters()) - n_frozen  # the optimizer skips them


@pytest.mark.parametrize("which", ["input", "output", "both"])
def test_tied_embeddings_are_one_matrix(tiny_dir, which):
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_dir("gpt2")), _args(which))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _frozen(model) == {"transformer.wte.weight"}  # named once; position embeddings still train


def test_a_classifier_has_no_lm_head_to_freeze(tiny_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("llama"), num_labels=1)
    assert _frozen(prepare_model(model, _args("output"), task_type="SEQ_CLS")) == set()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("llama"), num_labels=1)
    assert _frozen(prepare_model(model, _args("both"), task_type="SEQ_CLS")) == {"model.embed_tokens.weight"}


def test_lora_with_trained_base_weights_keeps_the_embeddings_frozen(tiny_dir):
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")), _args("both", lora_dim=4))
    frozen = _frozen(model)
    assert {n.rsplit(".", 2)[-2] for n in frozen} == {"embed_tokens", "lm_head"}, frozen
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


DROPOUT_RATES = {"gpt2": {"resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3},
                 # Falcon reads its rates from the config at every forward (dropout_add(..., config.hidden_dropout))
                 "falcon": {"hidden_dropout": 0.3, "attention_dropout": 0.3}}


@pytest.mark.parametrize("family", sorted(DROPOUT_RATES))
@pytest.mark.parametrize("disable", [True, False])
def test_prepare_model_turns_dropout_off_only_when_asked_and_the_saved_config_keeps_it(tiny_dir, tmp_path, disable,
                                                                                        family):
    """--disable_dropout (one shared flag) zeroes the model's dropout for training, the rates its modules
    hold and the ones it reads from its config; the saved config keeps the model's own rates, so a
    user's later fine-tuning sees the model as it came."""
    import torch
    from transformers import AutoConfig

    from utils.model import save_hf

    rates = DROPOUT_RATES[family]
    config = AutoConfig.from_pretrained(tiny_dir(family), **rates)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    args = SimpleNamespace(**vars(_args("none")), disable_dropout=disable)
    model = prepare_model(model, args).train()
    ids = torch.tensor([[2, 5, 9, 11, 3, 7, 8, 4]])
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(input_ids=ids).logits
        torch.manual_seed(2)
        b = model(input_ids=ids).logits
    assert torch.equal(a, b) == disable
    from utils.model import load_tokenizer

    save_hf(model, load_tokenizer(tiny_dir(family)), str(tmp_path / "out"), {"step": "test"})
    saved = AutoConfig.from_pretrained(tmp_path / "out")
    assert {k: getattr(saved, k) for k in rates} == rates
    assert {k: getattr(model.config, k) for k in rates} == ({k: 0.0 for k in rates} if disable else rates)


def _linear_layers(model) -> set[str]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "bloom", "falcon"])
def test_all_linear_lora_covers_every_family_and_merges_to_the_same_model(tiny_dir, family):
    """The default --lora_module_name all-linear adapts every linear layer but the LM head in any family
    (GPT-NeoX, Bloom and Falcon name theirs query_key_value / dense_*: the former default list matched none),
    and the merged weights (utils.model.merge_lora_state_dict, GPT-2's transposed Conv1D included) give
    the adapted model's logits in a plain model."""
    import torch

    from utils.model import apply_lora, merge_lora_state_dict

    base = AutoModelForCausalLM.from_pretrained(tiny_dir(family)).eval()
    linear = _linear_layers(base)
    head = next(n for n, m in base.named_modules() if m is base.get_output_embeddings())
    wrapped = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir(family)), 4, 16, "all-linear", False).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == linear - {head}, (adapted ^ (linear - {head}))
    torch.manual_seed(0)
    for n, p in wrapped.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # peft starts B at zero; a merge of zeros would prove nothing
    ids = torch.tensor([[5, 9, 11, 3, 7, 8, 4, 20]])
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
        merged = merge_lora_state_dict(wrapped.state_dict(), wrapped.peft_config["default"])
        missing, unexpected = base.load_state_dict(merged, strict=False)
        assert not unexpected and not missing, (missing, unexpected)
        got = base(input_ids=ids).logits
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(tiny_dir(family)).eval()(input_ids=ids).logits)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_all_linear_lora_on_a_classifier_trains_the_score_head_whole(tiny_dir):
    from utils.model import apply_lora

    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("gpt_neox"), num_labels=1)
    wrapped = apply_lora(model, 4, 16, "all-linear", True, task_type="SEQ_CLS")
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("query_key_value.lora_A" in n for n in trained)
    assert {n for n in trained if "lora_" not in n} == {"base_model.model.score.modules_to_save.default.weight"}


@pytest.mark.parametrize("lora_dim", [0, 4])
def test_gradient_checkpointing_does_not_change_the_saved_config(tiny_dir, tmp_path, lora_dim):
    """Training with --gradient_checkpointing turns the KV cache off in the model's config; the saved
    model must keep its own `use_cache` (a saved `false` made every later generate() slow)."""
    import json

    from utils.model import load_tokenizer, save_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    assert model.config.use_cache is True
    args = SimpleNamespace(**{**vars(_args("none", lora_dim=lora_dim)), "gradient_checkpointing": True})
    model = prepare_model(model, args)
    save_hf(model, load_tokenizer(tiny_dir("llama")), str(tmp_path / "out"), {"step": "test"})
    assert json.load(open(tmp_path / "out" / "config.json"))["use_cache"] is True
    base = model.get_base_model() if lora_dim else model
    assert base.config.use_cache is False  # still off for the rest of training


def test_a_config_asking_for_flash_attention_loads_with_sdpa_where_it_cannot_run(tiny_dir, tmp_path, capsys):
    """A checkpoint saved on a GPU machine with attn_implementation flash_attention_2 in config.json
    failed to load on a machine without flash-attn with an ImportError traceback."""
    import json
    import shutil

    import torch

    from utils.model import load_model

    d = tmp_path / "fa2"
    shutil.copytree(tiny_dir("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "attn_implementation": "flash_attention_2"}))
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may have flash-attn")
    model = load_model(AutoModelForCausalLM, str(d))
    assert model.config._attn_implementation == "sdpa"
    assert "asks for flash_attention_2, which this machine cannot run" in capsys.readouterr().out


def test_a_failed_model_write_is_one_line_and_leaves_no_half_model(tiny_dir, tmp_path, monkeypatch):
    """A disk that filled during the final save was a raw SafetensorError traceback and left `.tmp` files."""
    import os

    from utils.errors import UserError
    from utils.model import load_tokenizer, save_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))

    def full_disk(path, **kw):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "model.safetensors"), "wb").write(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"could not write the model to '{out}': .*No space left on device"):
        save_hf(model, load_tokenizer(tiny_dir("llama")), str(out), {"step": "test"})
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("lora_dim", [0, 4])
def test_save_hf_writes_the_weights_in_the_dtype_asked_for(tiny_dir, tmp_path, lora_dim):
    """Step 3's EMA actor is averaged in fp32; with --dtype bf16 it was saved in fp32 (twice the actor's
    size, and `dtype="auto"` loaded it in another dtype than the actor) although the run saves in bf16."""
    import json

    import torch

    from utils.model import load_tokenizer, save_hf

    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")), _args("none", lora_dim=lora_dim))
    save_hf(model, load_tokenizer(tiny_dir("llama")), str(tmp_path / "out"), {"step": "test"}, dtype="bf16")
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert saved.dtype == torch.bfloat16
    base = model.get_base_model() if lora_dim else model
    assert base.dtype == torch.float32 and base.config.dtype in (torch.float32, "float32")  # the EMA goes on in fp32
    trained = base.get_input_embeddings().weight.detach()
    assert torch.equal(saved.get_input_embeddings().weight, trained.to(torch.bfloat16))


def test_tiny_runs_as_the_script_the_readme_names(tmp_path):
    """`python utils/tiny.py --family gpt2 ...` stopped with "attempted relative import with no known parent
    package" (only `python -m utils.tiny` worked)."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, os.path.join(repo, "utils", "tiny.py"), "--family", "gpt2", "--output_dir", str(out)],
                   check=True, env={**os.environ, "PYTHONPATH": repo}, capture_output=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"
