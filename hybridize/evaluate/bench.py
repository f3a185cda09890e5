"""Speed and memory side by side: prefill tokens/s, decode ms/token and cache bytes at each context length, for a
model and its baseline in the same process, interleaved and repeated, reported as ratios.

On a CPU, decoding a small model is memory-bandwidth bound (weights + cache bytes per token), so absolute numbers
move with the machine's load; only ratios measured in one run mean anything.
"""

import ctypes
import gc
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configs.evaluate import BenchConfig
from ..errors import ConfigError
from .corpus import load_corpus, token_blocks


def check_bench(model_config: Any, config: BenchConfig) -> None:
    """Check `config` against a model's config, before any weights are read: no prompt may be longer than the
    model's `max_position_embeddings` (beyond it, the numbers would describe positions the model was never trained
    on, and a long run would measure nothing useful).

    Raises:
        `ConfigError`: a context longer than `max_position_embeddings`.

    Example: `check_bench(load_config("llama"), BenchConfig(contexts=(512, 2048)))`
    """
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and (too_long := [context for context in config.contexts if context > limit]):
        raise ConfigError(
            f"contexts {', '.join(map(str, too_long))} exceed the model's max_position_embeddings={limit}; pass "
            f"prompt lengths up to {limit} (--context)"
        )


def cache_bytes(cache) -> int:
    """Bytes held by every tensor of a transformers cache (KV tensors, conv and recurrent states)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _return_free_memory_to_the_os() -> None:
    """glibc keeps freed heap pages resident and reuses them without RSS growing, which would hide an allocation
    from the growth measured below; `malloc_trim(0)` hands them back first. A no-op where glibc is absent."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakRSS:
    """Samples this process's RSS every few milliseconds in a thread; `peak` is the highest seen. Both models of a
    side-by-side run live in one process, so what is reported is the peak *growth* over the RSS before the run:
    activations and cache, the memory that depends on the model's mixers and the context."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> Self:
        _return_free_memory_to_the_os()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@torch.inference_mode()
def _run_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    with _PeakRSS() as rss:
        result = _prefill_and_decode(model, prompt, new_tokens)
    return {**result, "peak_rss_growth_bytes": rss.peak - rss.start}


def _prefill_and_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - start
    cache, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
    size = cache_bytes(cache)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_ids, cache=cache, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(-1)
    decode = time.perf_counter() - start
    return {
        "prefill_tokens_per_s": prompt.numel() / prefill,
        "decode_ms_per_token": 1000 * decode / new_tokens,
        "cache_bytes": size,
    }


def bench(
    model: nn.Module, tokenizer: Any, config: BenchConfig, *, baseline: nn.Module | None = None, progress: bool = False
) -> dict[str, Any]:
    """Measure `model` (and `baseline`, interleaved) at each context length.

    Returns:
        `dict`: `rows`, one per context, with `model` and `baseline` measurements (medians over `repeats`) and
        `ratios` (model / baseline for times and bytes; baseline / model is the speed-up); `machine`.

    Raises:
        `ConfigError`: a context longer than either model's `max_position_embeddings` (`check_bench`).

    Example: `bench(hybrid, tokenizer, BenchConfig(contexts=(512, 2048)), baseline=source)`
    """
    models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    for m in models.values():
        check_bench(m.config, config)
    for m in models.values():
        m.eval()
    batch = max(config.batch_sizes)
    stream = token_blocks(
        tokenizer, load_corpus("heldout"), seq_len=max(config.contexts), max_tokens=max(config.contexts) * batch
    )
    stream = stream[:batch]
    if stream.shape[0] < batch:  # the held-out split is ~120K tokens; a large batch of long contexts repeats it
        stream = stream.repeat(-(-batch // stream.shape[0]), 1)[:batch]
    rows = []
    total = len(config.contexts) * len(config.batch_sizes) * config.repeats * len(models)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for context, batch_size in ((c, b) for c in config.contexts for b in config.batch_sizes):
        prompt = stream[:batch_size, :context]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for _ in range(config.repeats):
            for name, m in models.items():
                runs[name].append(_run_once(m, prompt, config.new_tokens))
                bar.update()
        row: dict[str, Any] = {"context": context, "batch_size": batch_size}
        for name, results in runs.items():
            row[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        if baseline is not None:
            m, b = row["model"], row["baseline"]
            row["ratios"] = {
                "decode_speedup": b["decode_ms_per_token"] / m["decode_ms_per_token"],
                "prefill_speedup": m["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                "cache_ratio": m["cache_bytes"] / b["cache_bytes"],
                "peak_rss_growth_ratio": m["peak_rss_growth_bytes"] / max(b["peak_rss_growth_bytes"], 1),
            }
        rows.append(row)
    bar.close()
    return {"config": vars(config), "rows": rows, "machine": _machine()}


def _machine() -> dict[str, Any]:
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


__all__ = ["BenchConfig", "bench", "cache_bytes", "check_bench", "format_bench", "plot_bench"]


def format_bench(result: dict[str, Any]) -> str:
    """A plain-text table of `bench` results, ratios first."""
    lines = []
    for row in result["rows"]:
        head = f"context {row['context']:>6}  batch {row['batch_size']}"
        if "ratios" in row:
            r = row["ratios"]
            head += (
                f"  decode speed-up {r['decode_speedup']:.2f}x  prefill speed-up {r['prefill_speedup']:.2f}x"
                f"  cache {r['cache_ratio']:.3f}x"
            )
        lines.append(head)
        for name in ("model", "baseline"):
            if name in row:
                m = row[name]
                lines.append(
                    f"  {name:>8}: decode {m['decode_ms_per_token']:8.1f} ms/token  prefill "
                    f"{m['prefill_tokens_per_s']:8.0f} tokens/s  cache {m['cache_bytes'] / 2**20:8.2f} MiB"
                    f"  peak RSS growth {m['peak_rss_growth_bytes'] / 2**20:8.1f} MiB"
                )
    return "\n".join(lines)


def plot_bench(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG of `bench` results: decode ms/token, prefill tokens/s and cache MiB against context, one line per
    model (and the baseline), so the crossover with the source is visible at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    contexts = [row["context"] for row in rows]
    panels = [
        ("decode_ms_per_token", "decode ms/token"),
        ("prefill_tokens_per_s", "prefill tokens/s"),
        ("cache_bytes", "cache MiB"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, panels):
        for name in ("model", "baseline"):
            if name in rows[0]:
                scale = 2**-20 if key == "cache_bytes" else 1
                ax.plot(contexts, [row[name][key] * scale for row in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
