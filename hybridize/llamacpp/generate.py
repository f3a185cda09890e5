"""`hybridize generate` on a GGUF file: llama.cpp computes the logits; the choice of each token (greedy, or
temperature and top-p sampling from the same seeded generator), the chat template, stop strings and the result are
those of `hybridize.generate`, so that the two runtimes give the same tokens wherever their logits agree.
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..configs.generate import GenerateConfig
from ..errors import ConfigError
from ..generate.result import GenerateResult
from ..generate.speculative import _pick
from ..generate.text import _prompt_ids, _TextStream
from .runtime import LlamaCppTokenizer, clear, last_logits, load_gguf, require_llama_cpp


def _end_of_generation_ids(llm: Any) -> set[int]:
    """Every token llama.cpp's vocabulary marks as ending a generation (EOS, EOT, ...)."""
    llama_cpp = require_llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def generate_gguf(
    model: str | Path | Any,
    prompt: str | Sequence[int],
    config: GenerateConfig,
    *,
    threads: int | None = None,
    kv_cache: str = "f16",
    flash_attn: bool = True,
    stream: Callable[[str], None] | None = None,
) -> GenerateResult:
    """Generate a continuation of `prompt` with a GGUF model run by llama.cpp (no draft model: llama.cpp's own
    speculative decoding is not wired here).

    Args:
        model (`str`, `Path` or `llama_cpp.Llama`): the GGUF file, or a model `load_gguf` opened.
        prompt (`str` or a sequence of token ids): the prompt (with `config.chat`, the user message, wrapped in the
            GGUF's chat template).
        config (`GenerateConfig`): as for `hybridize.generate`; its draft settings do not apply.
        threads (`int`, *optional*): llama.cpp threads when `model` is a path.
        kv_cache (`str`, *optional*, defaults to `"f16"`), flash_attn (`bool`, *optional*, defaults to `True`): when
            `model` is a path, as `load_gguf`.
        stream (`Callable[[str], None]`, *optional*): called with each new piece of text once it is final.

    Returns:
        `GenerateResult`: `rounds` counts decode steps; `drafted` and `accepted` are 0.

    Example: `generate_gguf("out/gguf/smol-mamba50-q8_0.gguf", "The capital of France is", GenerateConfig())`
    """
    if not isinstance(model, (str, Path)):
        return _generate(model, prompt, config, stream)
    llm = load_gguf(model, n_ctx=0, threads=threads, kv_cache=kv_cache, flash_attn=flash_attn)
    try:
        return _generate(llm, prompt, config, stream)
    finally:
        llm.close()  # now, not at exit, when llama-cpp-python's teardown fails noisily


def _generate(
    llm: Any, prompt: str | Sequence[int], config: GenerateConfig, stream: Callable[[str], None] | None
) -> GenerateResult:
    tokenizer = LlamaCppTokenizer(llm)
    prompt_ids = _prompt_ids(tokenizer, prompt, config)
    if len(prompt_ids) + config.max_new_tokens > llm.n_ctx():
        raise ConfigError(
            f"{len(prompt_ids)} prompt tokens + max_new_tokens {config.max_new_tokens} exceed the model's context "
            f"of {llm.n_ctx()} tokens; shorten the prompt or lower --max-new-tokens"
        )
    eog = set() if config.ignore_eos else _end_of_generation_ids(llm)
    generator = torch.Generator().manual_seed(config.seed)
    text = _TextStream(tokenizer, config.stop, stream)

    def pick() -> int:
        return _pick(torch.from_numpy(last_logits(llm)), config, generator)[0]

    start = time.perf_counter()
    clear(llm)
    llm.eval(prompt_ids)
    new = [pick()]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    stop_reason, keep = "length", text.add(new)
    while True:
        if keep is not None:
            new, stop_reason = new[:keep], "stop"
            break
        if new[-1] in eog:
            stop_reason = "eos"
            break
        if len(new) >= config.max_new_tokens:
            break
        llm.eval([new[-1]])
        new.append(pick())
        keep = text.add(new[-1:])
    return GenerateResult(
        text=text.finish(),
        token_ids=tuple(new),
        prompt_tokens=len(prompt_ids),
        stop_reason=stop_reason,
        drafted=0,
        accepted=0,
        rounds=len(new) - 1,
        prefill_s=prefill_s,
        decode_s=time.perf_counter() - start,
    )


__all__ = ["generate_gguf"]
