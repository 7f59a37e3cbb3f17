"""Tiny random-init models and tokenizers built from text the project ships (no hub needed).

Used by the tests, the CPU demo and the benchmarks. Each family mirrors its real tokenizer's
special-token habits, because that is where pipelines break:
  llama     BOS <s> prepended, EOS </s>, no pad token
  llama-sp  a sentencepiece BPE model with byte fallback, as Llama 2's tokenizer.model: BOS <s>
            prepended, EOS </s>, and a separate <pad> (as Llama fine-tunes add one)
  gpt2      <|endoftext|> is BOS = EOS = UNK, no pad token, nothing prepended
  opt       </s> prepended as BOS and also the EOS, separate <pad>
  qwen2     ChatML chat template, EOS <|im_end|>, pad <|endoftext|>, no BOS
Architectures the tests use to check that nothing is tied to those five (their own head and weight
names: GPT-NeoX's `embed_out`, GPT-J's and Phi's LM-head bias, Bloom's ALiBi, Falcon's fused
query_key_value) share the llama-sp tokenizer: ARCHITECTURES.

The vocabulary is learned from the shipped text (data/) plus any `extra_lines`, so a tokenizer
for another task's text covers that text's words (bench/alignment builds one per task).

Command line: python -m utils.tiny --family llama --output_dir /tmp/tiny-llama
"""
from __future__ import annotations

import argparse
import glob
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("llama", "llama-sp", "gpt2", "opt", "qwen2")
# model_type -> config fields of a tiny model; vocabulary and special ids come from the llama-sp tokenizer
# (the MLP width is 2 x hidden where the config has one; GPT-J, Bloom and Falcon fix it at 4 x hidden)
ARCHITECTURES = {
    "mistral": dict(sliding_window=None),
    "gemma": dict(),
    "qwen3": dict(),
    "phi": dict(),
    "phi3": dict(original_max_position_embeddings=512),
    "gpt_neox": dict(hidden_dropout=0.1, attention_dropout=0.1),  # Pythia's untied `embed_out` head
    "gptj": dict(rotary_dim=8),
    "bloom": dict(hidden_dropout=0.1, attention_dropout=0.1),
    "falcon": dict(new_decoder_architecture=False),
}

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = {
    "llama": dict(bos="<s>", eos="</s>", unk="<unk>", pad=None, prepend_bos=True, extra=[]),
    "gpt2": dict(bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad=None, prepend_bos=False, extra=[]),
    "opt": dict(bos="</s>", eos="</s>", unk="<unk>", pad="<pad>", prepend_bos=True, extra=[]),
    "qwen2": dict(bos=None, eos="<|im_end|>", unk=None, pad="<|endoftext|>", prepend_bos=False,
                  extra=["<|im_start|>"]),
}


def corpus_lines(extra_lines=()) -> list[str]:
    """Shipped text: the data files, the template words and the vocabulary list, then `extra_lines`."""
    from utils.templates import ALPACA_HEADER, ALPACA_HEADER_INPUT

    lines = [ALPACA_HEADER, ALPACA_HEADER_INPUT, "### Instruction:\n", "### Input:\n", "### Response:\n",
             "Human: ", "\n\nAssistant:", "system\n", "user\n", "assistant\n"]
    for path in sorted(glob.glob(os.path.join(REPO, "data", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                lines.extend(v for v in row.values() if isinstance(v, str))
    with open(os.path.join(REPO, "data", "vocab_words.txt")) as f:
        lines.extend(w.strip() for w in f)
    return lines + list(extra_lines)


def build_sentencepiece_tokenizer(vocab_size: int = 512, extra_lines=()):
    """Llama-style tokenizer from a sentencepiece BPE model trained on the corpus: byte fallback (no
    unknown characters), ids unk 0, <s> 1, </s> 2, <pad> 3, BOS prepended, no EOS appended. Whitespace
    is kept as written ("\n\n" of the hh template is a token), so rendering stays reversible."""
    import io
    import tempfile

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = [line for line in corpus_lines(extra_lines) if line]
    buf = io.BytesIO()
    # 256 byte pieces + the corpus characters must fit; hard_vocab_limit=False lets a small corpus stop early.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=max(vocab_size, 320), model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        pad_piece="<pad>", remove_extra_whitespaces=False, normalization_rule_name="identity",
        hard_vocab_limit=False, minloglevel=2)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "tokenizer.model"), "wb") as f:
            f.write(buf.getvalue())
        return LlamaTokenizer.from_pretrained(d, pad_token="<pad>", legacy=False, add_bos_token=True,
                                              add_eos_token=False, model_max_length=2048)


def build_tokenizer(family: str, vocab_size: int = 512, extra_lines=()):
    if family == "llama-sp":
        return build_sentencepiece_tokenizer(vocab_size, extra_lines)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = SPECIALS[family]
    specials = list(dict.fromkeys(t for t in [sp["pad"], sp["bos"], sp["eos"], sp["unk"], *sp["extra"]] if t))
    tok = Tokenizer(models.BPE(unk_token=sp["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(extra_lines), trainer=trainer)
    if sp["prepend_bos"]:
        bos_id = tok.token_to_id(sp["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A {sp['bos']} $B", special_tokens=[(sp["bos"], bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kw = {k + "_token": sp[k] for k in ("bos", "eos", "unk", "pad") if sp[k]}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **kw)
    if sp["extra"]:
        hf.add_special_tokens({"additional_special_tokens": sp["extra"]})
    if family == "qwen2":
        hf.chat_template = CHATML
    return hf


def build_config(family: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, max_pos: int = 512):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family in ("llama", "llama-sp"):
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=max_pos, tie_word_embeddings=False, **ids)
    if family == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=max_pos, tie_word_embeddings=True, **ids)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos, **ids)
    if family == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         word_embed_proj_dim=hidden, max_position_embeddings=max_pos, **ids)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_architecture_config(model_type: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4,
                              max_pos: int = 512):
    """A tiny config of one of ARCHITECTURES (the field names differ by family; AutoConfig maps the common ones)."""
    from transformers import AutoConfig

    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {model_type!r}; expected one of {sorted(ARCHITECTURES)}")
    sizes = {"gptj": dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos),
             "bloom": dict(hidden_size=hidden, n_layer=layers, n_head=heads),
             "falcon": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=max_pos)}.get(
        model_type, dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=max_pos))
    if model_type in ("mistral", "gemma", "qwen3"):  # grouped-query attention, as the real models
        sizes.update(num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads)
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **sizes, **ARCHITECTURES[model_type])


def make_tiny_model(family: str, output_dir: str, seed: int = 0, hidden: int = 64, layers: int = 2,
                    heads: int = 4, vocab_size: int = 512, extra_lines=()) -> str:
    """Write a random-init causal LM + tokenizer as a Hugging Face directory; returns the path.
    `family`: one of FAMILIES or ARCHITECTURES (the latter with the llama-sp tokenizer).
    `extra_lines`: more text for the tokenizer's vocabulary (see corpus_lines)."""
    import torch
    from transformers import AutoModelForCausalLM

    if family in ARCHITECTURES:
        tok = build_tokenizer("llama-sp", vocab_size, extra_lines)
        cfg = build_architecture_config(family, tok, hidden, layers, heads)
    else:
        tok = build_tokenizer(family, vocab_size, extra_lines)
        cfg = build_config(family, tok, hidden, layers, heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    return output_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES + tuple(ARCHITECTURES), default="llama")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra_text", default=None, help="a text file whose lines are added to the tokenizer corpus")
    a = p.parse_args()
    extra = []
    if a.extra_text:
        with open(a.extra_text) as f:
            extra = [line.rstrip("\n") for line in f]
    print(make_tiny_model(a.family, a.output_dir, a.seed, a.hidden, a.layers, a.heads, a.vocab_size, extra))


if __name__ == "__main__":
    main()
