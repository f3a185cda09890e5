"""The options of the llama.cpp runtime (`hybridize.llamacpp`): which runtime runs a model (`pick_runtime`) and what
`bench_gguf` measures (`LlamaCppBenchConfig`, re-exported by `hybridize.llamacpp.bench`).

The rule of `--runtime` (bench, generate, eval): `auto` runs a `.gguf` file given by path through llama.cpp, since
that is the file a user exported for it (or downloaded to run in it), and everything else (an alias, a model directory,
a Hub id) through PyTorch as before. `torch` dequantizes a `.gguf` file into PyTorch, as every command did before
llama.cpp was a runtime; `llama.cpp` also runs an alias's packaged GGUF file (the Q4_1 SmolLM2 as shipped).
"""

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..validation import check_fields
from .evaluate import check_decode_counts

RUNTIMES = ("auto", "torch", "llama.cpp")
# the llama-cpp-python release the `gguf` extra pins and the tests ran: its llama.cpp computes `granitehybrid`
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
INSTALL_HINT = f"pip install 'hybridize[gguf]' (from a checkout: pip install -e '.[gguf]'), or {LLAMA_CPP_PYTHON}"
# the type of llama.cpp's attention KV cache -> its ggml type id: llama.cpp's default f16, or f32 (exact)
KV_CACHE_TYPES = {"f16": 1, "f32": 0}


def pick_runtime(runtime: str, spec: str) -> str:
    """`"torch"` or `"llama.cpp"` for the model `spec` under `--runtime runtime` (see the module docstring).

    Example: `pick_runtime("auto", "out/gguf/smol-mamba50-f16.gguf")` is `"llama.cpp"`.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    return "llama.cpp" if spec.lower().endswith(".gguf") and not Path(spec).expanduser().is_dir() else "torch"


def refuse_options(runtime: str, given: dict[str, bool]) -> None:
    """Raise `ConfigError` naming the options in `given` (option -> whether the user set it) that `runtime` does not
    take, so that no option is silently ignored."""
    if names := [name for name, is_set in given.items() if is_set]:
        raise ConfigError(f"{', '.join(names)} do(es) not apply to the {runtime} runtime; drop it, or pick --runtime")


@dataclass(frozen=True, kw_only=True)
class LlamaCppBenchConfig:
    """What `bench_gguf` measures, per context length and thread count.

    Args:
        contexts (`tuple[int, ...]`, *optional*, defaults to `(512, 2048, 8192)`): prompt lengths in tokens (held-out
            text, tokenized by each model's own GGUF tokenizer).
        threads (`tuple[int, ...]`, *optional*): llama.cpp threads for prefill and decode; every context is measured at
            every count. Defaults to `(os.cpu_count(),)`.
        new_tokens (`int`, *optional*, defaults to 16): greedy tokens decoded and timed after each prompt.
        warmup_tokens (`int`, *optional*, defaults to 2): tokens decoded before the timing starts.
        repeats (`int`, *optional*, defaults to 2): rounds; each round runs every model once, interleaved; medians are
            reported.
        kv_cache (`str`, *optional*, defaults to `"f16"`): the attention KV cache type, llama.cpp's default `f16` or
            `f32`.
        flash_attn (`bool`, *optional*, defaults to `True`): flash attention, on as llama.cpp's own tools run it on
            a CPU ("auto").
    """

    contexts: tuple[int, ...] = (512, 2048, 8192)
    threads: tuple[int, ...] | None = None
    new_tokens: int = 16
    warmup_tokens: int = 2
    repeats: int = 2
    kv_cache: str = "f16"
    flash_attn: bool = True

    def __post_init__(self):
        check_fields(self, distinct=("contexts", "threads"))
        check_decode_counts(self)
        if self.threads is not None and (not self.threads or min(self.threads) < 1):
            raise ConfigError(f"threads must be positive counts, got {self.threads}")
        check_kv_cache(self.kv_cache)


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHE_TYPES:
        raise ConfigError(f"kv_cache {kv_cache!r} is not one of {', '.join(KV_CACHE_TYPES)}")


__all__ = [
    "INSTALL_HINT",
    "KV_CACHE_TYPES",
    "LLAMA_CPP_PYTHON",
    "RUNTIMES",
    "LlamaCppBenchConfig",
    "check_kv_cache",
    "pick_runtime",
    "refuse_options",
]
