"""Tiny random models of each supported family (hidden 64, 4 layers, 4 query / 2 KV heads,
vocab 128), tiny hybrids, small tokenizers and random text over their words, and float tolerances per dtype."""

import contextlib
import io
import random
import sys

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


# NHA settings that exercise its corners: slots and window, slots only, a one-token window with the paper's unmasked
# empty slots, and a window covering every tiny length (softmax attention)
NHA_SETTINGS = [
    {"window": 4, "slots": 6, "chunk_size": 8},
    {"window": 0, "slots": 16, "chunk_size": 3},
    {"window": 1, "slots": 3, "chunk_size": 5, "mask_empty_slots": False},
    {"window": 64},
]


def tiny_hybrid(mixer_types, dtype=torch.float32, mixers=None):
    """A random tiny hybrid with these layer types; 1-D parameters (norms, SSM terms) moved off their defaults so
    that every term matters."""
    from hybridize.modeling import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    config = HybridConfig(**TINY, mixer_types=list(mixer_types), mixers=mixers or {})
    model = HybridForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def decode_one_by_one(model, ids, mask, prefill: int):
    """Prefill `prefill` tokens, then one token per forward, without autograd (as generate() runs); the logits of
    every position and the cache."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded row
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill])
        cache, logits = out.cache, [out.logits]
        for t in range(prefill, ids.shape[1]):
            step = {"attention_mask": mask[:, : t + 1], "position_ids": positions[:, t : t + 1], "cache": cache}
            logits.append(model(ids[:, t : t + 1], **step, use_cache=True).logits)
    return torch.cat(logits, 1), cache


def count_steps(monkeypatch, mixer_class) -> list:
    """A list that grows by one at every call of `mixer_class._step` (the one-token decode fast path)."""
    calls = []
    step = mixer_class._step
    monkeypatch.setattr(mixer_class, "_step", lambda *args: calls.append(1) or step(*args))
    return calls


def make_tiny(family: str = "llama", seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **extra, **overrides})).eval()
    if family == "qwen2":  # random biases, so that copying them is actually tested
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model


def word_tokenizer(vocab_size: int = 128, eos: str = "w1"):
    """A real fast tokenizer over the words `w0` .. `w{vocab_size - 1}` (`w0` is unknown), split on whitespace and
    punctuation, so that any text (real articles included) tokenizes into ids a tiny model accepts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token=eos)


def eos_word_tokenizer(shift: int = 0):
    """`<unk>` 0, `<eos>` 1 and words `w2`..`w127` -> their ids; `shift` permutes the ids (a tokenizer that
    disagrees with the default one). Special tokens are not words, or `w1` would match inside `w115`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", *(f"w{i}" for i in range(2, 128))]
    vocab = {word: (i + shift) % 128 for i, word in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def bos_word_tokenizer():
    """A real `PreTrainedTokenizerFast` over the words a, b, c that adds BOS itself, as Llama-2 tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class CharTokenizer:
    """One token per character (ids 3..127), with an optional BOS and EOS, called like a Hugging Face tokenizer."""

    def __init__(self, *, bos_token_id: int | None = 1, eos_token_id: int | None = 2) -> None:
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.calls = 0

    def __call__(self, text: str, *, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        self.calls += 1
        ids = [3 + ord(char) % (TINY["vocab_size"] - 3) for char in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


def random_text(rng: random.Random, words: int) -> str:
    """`words` random words of `eos_word_tokenizer` (`w2`..`w127`), space-separated."""
    return " ".join(f"w{rng.randrange(2, 128)}" for _ in range(words))


def random_paragraphs(num_paragraphs: int = 60, seed: int = 0) -> str:
    """Paragraphs of 20-80 `random_text` words separated by blank lines: about 3,000 tokens for 60."""
    rng = random.Random(seed)
    return "\n\n".join(random_text(rng, rng.randrange(20, 80)) for _ in range(num_paragraphs))


def save_tiny(path, family: str = "llama", **overrides):
    """A tiny random model of `family` and `word_tokenizer()` saved in `path`, loadable like any checkpoint."""
    make_tiny(family, **overrides).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def run_cli(*args) -> tuple[int, str]:
    """Run `hybridize ARGS` through `main`, as the console script does; return (exit code, stdout + stderr)."""
    from hybridize.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["hybridize", *map(str, args)])
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue() + err.getvalue()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_bpe_tokenizer(vocab_size: int = 384, pre_tokenizer=None, ignore_merges: bool = False):
    """A real byte-level BPE tokenizer (every byte a token, so any text encodes) trained on the packaged train split
    to `vocab_size` tokens, three ChatML special tokens first, with a chat template: the kind of tokenizer a GGUF
    export writes. `pre_tokenizer` (default: GPT-2's byte-level split) replaces the one it was trained with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hybridize.io.corpus import load_corpus

    backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(load_corpus("train")[:40], trainer)
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


GGUF_VOCAB = 384  # byte_bpe_tokenizer's default size: the tiny models exported to GGUF carry that tokenizer


def gguf_hybrid(mixer_types, mixers=None, **overrides):
    """A random tiny hybrid over `GGUF_VOCAB` tokens (`byte_bpe_tokenizer`'s), one layer per entry of `mixer_types`,
    its 1-D parameters (norms, dt_bias, A_log, D) off their defaults."""
    from hybridize.modeling import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    settings = {**TINY, "vocab_size": GGUF_VOCAB, "num_hidden_layers": len(mixer_types), **overrides}
    config = HybridConfig(**settings, mixer_types=list(mixer_types), mixers=mixers or {})
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def fragile_tiny(layer_index: int):
    """A tiny model in which only one layer's attention matters: the others output nothing (o_proj = 0), so converting
    them costs nothing, and the fragile one attends sharply (q and k x 4) to any earlier token, which neither a
    decaying state nor a short window can hold. The final norm is scaled up so that logits are not near uniform (a
    random tiny model's are, and then every KL is ~0)."""
    source = make_tiny("llama")
    with torch.no_grad():
        source.model.norm.weight.mul_(30)
        for i, layer in enumerate(source.model.layers):
            attn = layer.self_attn
            if i == layer_index:
                attn.q_proj.weight.mul_(4), attn.k_proj.weight.mul_(4)
            else:
                attn.o_proj.weight.zero_()
    return source
