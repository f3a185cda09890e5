"""llama.cpp as a runtime for hybridize's own tools, through llama-cpp-python (the optional `gguf` extra).

`load_gguf` opens a GGUF file; `LlamaCppCausalLM` and `LlamaCppTokenizer` give it the two interfaces hybridize's
PyTorch-side tools call (`model(input_ids=...).logits`, `tokenizer(text)["input_ids"]`), so that held-out perplexity
and the KL / top-1 / logit distance against another model (`hybridize.evaluate`) run on a GGUF file as they run on
a PyTorch model, and compare the two: the same token ids go into both. `load_gguf_model` gives the pair for a model spec.
"""

import importlib
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..configs.llamacpp import INSTALL_HINT, KV_CACHE_TYPES, check_kv_cache
from ..errors import CheckpointError, DependencyError
from ..sources import resolve


def require_llama_cpp():
    """The `llama_cpp` module, or `DependencyError` saying how to install it."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as error:
        raise DependencyError(
            f"the llama.cpp runtime needs llama-cpp-python ({error}); install it with {INSTALL_HINT}, or pass "
            "--runtime torch to dequantize the .gguf file into PyTorch"
        ) from None


def gguf_file(spec: str) -> Path:
    """The GGUF file llama.cpp runs for `spec`: a `.gguf` path, or an alias's packaged file (SmolLM2 Q4_1).

    Raises:
        `CheckpointError`: `spec` names no GGUF file (a model directory or Hub id: export it first).
    """
    source = resolve(spec)
    if not source.is_gguf:
        raise CheckpointError(
            f"{spec} is not a .gguf file, and the llama.cpp runtime runs GGUF files; export it first "
            f"(hybridize export {spec} --to gguf -o model.gguf) or pass --runtime torch"
        )
    return Path(source.location)


def load_gguf(
    path: str | Path,
    *,
    n_ctx: int = 4096,
    threads: int | None = None,
    logits_all: bool = False,
    kv_cache: str = "f16",
    flash_attn: bool = True,
) -> Any:
    """A `llama_cpp.Llama` over the GGUF file `path`, quiet.

    `threads` serve prompt and decode alike (default llama-cpp-python's); `logits_all` keeps every position's logits,
    as `LlamaCppCausalLM` needs. `kv_cache` (the attention keys' and values' type) and `flash_attn` default to what
    llama.cpp's own tools run (llama-cli and llama-server: f16, and flash attention "auto", which is on for the CPU;
    llama-cpp-python alone would turn it off). With `kv_cache="f32"` and `flash_attn=False` an f32 export gives the
    PyTorch logits to float32 rounding: both round the attention to 16 bits otherwise.

    Raises:
        `DependencyError`: llama-cpp-python is not installed. `CheckpointError`: llama.cpp cannot load the file.
    """
    check_kv_cache(kv_cache)
    llama_cpp = require_llama_cpp()
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(512, n_ctx or 512),  # n_ctx 0: the model's training context
            n_ubatch=min(512, n_ctx or 512),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            flash_attn=flash_attn,
            type_k=KV_CACHE_TYPES[kv_cache],
            type_v=KV_CACHE_TYPES[kv_cache],
            verbose=False,
        )
    except ValueError as error:
        raise CheckpointError(
            f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) cannot load {path}: {error}; check the file, and "
            f"that llama-cpp-python is the pinned release ({INSTALL_HINT})"
        ) from error


def clear(llm: Any) -> None:
    """Forget every token: KV cells and recurrent states (Mamba2 layers) alike."""
    llama_cpp = require_llama_cpp()
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)


def last_logits(llm: Any) -> np.ndarray:
    """The logits after the last token evaluated, (vocab,) float32 (a copy)."""
    llama_cpp = require_llama_cpp()
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


class LlamaCppCausalLM(nn.Module):
    """A GGUF file run by llama.cpp behind the call a Hugging Face causal LM answers: `model(input_ids=ids).logits`
    is (b, l, vocab) float32, each row evaluated from an empty context. For measuring (perplexity, logit distances),
    not training: nothing here has gradients.

    Args:
        path (`str` or `Path`): the GGUF file.
        n_ctx (`int`, *optional*, defaults to 4096): the longest row it takes.
        threads (`int`, *optional*): llama.cpp threads (default llama-cpp-python's).
        kv_cache (`str`, *optional*, defaults to `"f16"`), flash_attn (`bool`, *optional*, defaults to `True`): as
            `load_gguf`.

    Example: `logits = LlamaCppCausalLM("out/gguf/smol-mamba50-f32.gguf")(input_ids=ids).logits`
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        kv_cache: str = "f16",
        flash_attn: bool = True,
    ):
        super().__init__()
        self.path, self.n_ctx = Path(path), n_ctx
        # an empty parameter: code that asks a model for its device (`next(model.parameters()).device`) finds the CPU
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.llm = load_gguf(
            path, n_ctx=n_ctx, threads=threads, logits_all=True, kv_cache=kv_cache, flash_attn=flash_attn
        )
        # freed with this module, or at exit before Python tears down llama-cpp-python (which then fails noisily)
        weakref.finalize(self, self.llm.close)
        self.name_or_path = str(path)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> Any:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise CheckpointError("the llama.cpp runtime takes whole rows, not a cache (prompt_len is not supported)")
        if input_ids.shape[-1] > self.n_ctx:
            raise CheckpointError(f"rows of {input_ids.shape[-1]} tokens exceed this context of {self.n_ctx}")
        rows = []
        for ids in input_ids.tolist():
            clear(self.llm)
            self.llm.eval(ids)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32)))
        return _Output(logits=torch.stack(rows))


class _Output(dict):
    """`.logits`, as a transformers output reads."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


class LlamaCppTokenizer:
    """The GGUF file's own tokenizer (llama.cpp's) behind the calls `token_blocks` and `generate` make on a
    Hugging Face tokenizer: `tokenizer(text, add_special_tokens=True)["input_ids"]` (special tokens written in the
    text are parsed as such, as transformers does), `eos_token_id`, `decode`, and the GGUF's chat template through
    `apply_chat_template` (rendered by llama-cpp-python's Jinja formatter, which follows transformers')."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.eos_token_id = llm.token_eos()
        self.chat_template = llm.metadata.get("tokenizer.chat_template")

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs) -> dict[str, list[int]]:
        return {"input_ids": self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", errors="replace")

    def _token_text(self, token_id: int) -> str:
        return "" if token_id < 0 else self.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict], *, tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if tokenize:
            raise ValueError("LlamaCppTokenizer.apply_chat_template renders text only (tokenize=False)")
        formatter = Jinja2ChatFormatter(
            template=self.chat_template,
            eos_token=self._token_text(self.llm.token_eos()),
            bos_token=self._token_text(self.llm.token_bos()),
            add_generation_prompt=add_generation_prompt,
        )
        return formatter(messages=messages).prompt


def load_gguf_model(
    spec: str, *, n_ctx: int = 4096, threads: int | None = None, kv_cache: str = "f16", flash_attn: bool = True
) -> tuple[LlamaCppCausalLM, LlamaCppTokenizer]:
    """`(model, tokenizer)` of the GGUF file `spec` names (`gguf_file`), as `hybridize.load` gives a PyTorch pair.

    Example: `model, tokenizer = load_gguf_model("out/gguf/smol-mamba50-f32.gguf", n_ctx=512)`
    """
    model = LlamaCppCausalLM(gguf_file(spec), n_ctx=n_ctx, threads=threads, kv_cache=kv_cache, flash_attn=flash_attn)
    return model, LlamaCppTokenizer(model.llm)


__all__ = [
    "LlamaCppCausalLM",
    "LlamaCppTokenizer",
    "clear",
    "gguf_file",
    "last_logits",
    "load_gguf",
    "load_gguf_model",
    "require_llama_cpp",
]
