"""Speed and memory side by side: prefill tokens/s, decode ms/token and cache bytes at each context length, for a
model and its baseline in the same process, interleaved and repeated, reported as ratios and against the memory
floor.

On a CPU, decoding a small model is memory-bandwidth bound: each step reads every weight the step uses and the
whole cache. So `bench` measures the machine's read bandwidth in the same run (the machine's load changes it), and
reports each model's *floor*, the bytes one decode step must read over that bandwidth, and how far above it the
model runs (`measured_over_floor`). Absolute times move with the load; only ratios measured in one run mean anything.

The baseline (usually the source model) runs two ways, since a user can pick either: transformers' default path
(`DynamicCache`, appended with `torch.cat` every step) and its static cache (`cache_implementation="static"`: a
`StaticCache` preallocated for the whole run and written in place). Every speed-up is reported against both.
"""

import inspect
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, StaticCache

from ..compat import config_second
from ..configs.evaluate import BenchConfig
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..io.corpus import load_corpus, token_blocks
from ..io.memory import return_freed_memory
from ..modeling import HybridForCausalLM
from ..modeling.layout import is_transposed, transpose_weights_
from ..sources import load, resolve

logger = logging.getLogger(__name__)

# the bandwidth probe reads a buffer at least this large and at least 4x the last-level cache, so that it measures
# memory and not the cache; 256 MiB also covers a large model's per-layer working set
_PROBE_MIN_BYTES = 256 << 20
_PROBE_MAX_BYTES = 2 << 30
_PROBE_REPEATS = 5
# names of the measured runs, in the order they run and print
_RUNS = ("model", "baseline", "baseline_static")


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


def load_causal_lm(
    spec: str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
    decode_layout: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """`hybridize.load`, but also for a causal LM that hybridize cannot convert and can still run: bench measures
    any model `AutoModelForCausalLM` loads, such as the native GraniteMoeHybrid that `hybridize export` writes.
    `dtype` and `decode_layout` as in `hybridize.load`.

    Raises:
        `CheckpointError`: see `hybridize.load`; also an unconvertible `.gguf` file (only the families hybridize
            converts are dequantized and cached).

    Example: `native, tokenizer = load_causal_lm("out/smol-mamba50-granite")`
    """
    try:
        return load(spec, trust_remote_code=trust_remote_code, dtype=dtype, decode_layout=decode_layout)
    except UnsupportedModelError as unsupported:
        source = resolve(spec)
        if source.is_gguf:
            raise CheckpointError(f"{unsupported}; bench reads .gguf files of those families only") from unsupported
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load {spec} as a causal LM: {error}") from error
        if decode_layout:
            transpose_weights_(model)
        return model.eval(), tokenizer


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


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter storage once (a tied embedding and lm_head share
    one, read in full as the lm_head), except an untied input embedding, of which a step reads one row per sequence
    (negligible, so not counted)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and head is not None:
        table = embeddings.weight.untyped_storage()
        if table.data_ptr() != head.weight.untyped_storage().data_ptr():
            storages.pop(table.data_ptr(), None)
    return sum(storages.values())


def _probe_bytes() -> int:
    """At least 4x the largest CPU cache that Linux reports (32 MiB assumed where it reports none)."""
    largest = 32 << 20
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        largest = max(largest, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    return min(max(_PROBE_MIN_BYTES, 4 * largest), _PROBE_MAX_BYTES)


def read_bandwidth(nbytes: int | None = None, repeats: int = _PROBE_REPEATS) -> float:
    """The machine's read bandwidth in bytes/s, with the threads torch runs on now (the models' threads): the best
    of `repeats` sums of a float32 buffer of `nbytes` (default: at least 256 MiB and 4x the last-level cache).

    A sum streams the buffer once with vectorised adds, as close to a pure read as torch gets; the best repeat is
    the least disturbed by other processes. Measure it in the same run as the models: load changes it.

    Example: `read_bandwidth() / 1e9` (GB/s)
    """
    buffer = torch.ones((nbytes or _probe_bytes()) // 4)  # written once, so every page is resident
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class _PeakRSS:
    """Samples this process's RSS every few milliseconds in a thread; `peak` is the highest seen. Both models of a
    side-by-side run live in one process, so what is reported is the peak *growth* over the RSS before the run:
    activations and cache, the memory that depends on the model's mixers and the context."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> Self:
        return_freed_memory()  # else an allocation reusing freed heap pages would not show as growth
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


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _supports_static_cache(model: nn.Module) -> bool:
    """A hybridize model keeps one cache layer per mixer (`HybridCache`); transformers' `StaticCache` knows
    attention (and its own linear-attention layers) only. Models that build their own cache (xlnet, rwkv, ...) say
    so through `_supports_default_dynamic_cache`."""
    if isinstance(model, HybridForCausalLM):
        return False
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    return bool(supports()) if supports is not None else False


def _static_cache(model: nn.Module, max_cache_len: int) -> StaticCache:
    """The cache `generate(cache_implementation="static")` makes: sized for the whole run, allocated on the first
    write (inside the prefill, as in `generate`)."""
    return StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)


def _prefill_and_decode(
    model: nn.Module, prompt: torch.Tensor, config: BenchConfig, *, static: bool = False
) -> tuple[dict[str, float], torch.Tensor]:
    """Greedy: one prefill (last position's logits only, where the model allows it), `warmup_tokens` untimed decode
    steps, then `new_tokens` timed ones. Returns the measurements and the generated tokens (b, warmup + new + 1)."""
    steps = config.warmup_tokens + config.new_tokens
    cache = _static_cache(model, prompt.shape[1] + steps) if static else None
    last_only = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    start = time.perf_counter()
    out = model(input_ids=prompt, cache=cache, use_cache=True, **last_only)
    prefill = time.perf_counter() - start
    cache, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
    size = cache_bytes(cache)
    tokens = [next_ids]
    for step in range(steps):
        if step == config.warmup_tokens:
            start = time.perf_counter()
        out = model(input_ids=next_ids, cache=cache, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(-1)
        tokens.append(next_ids)
    decode = time.perf_counter() - start
    measured = {
        "prefill_tokens_per_s": prompt.numel() / prefill,
        "decode_ms_per_token": 1000 * decode / config.new_tokens,
        "cache_bytes": size,
    }
    return measured, torch.cat(tokens, dim=1)


@torch.inference_mode()
def _run_once(model: nn.Module, prompt: torch.Tensor, config: BenchConfig, *, static: bool) -> dict[str, float]:
    with _PeakRSS() as rss:
        result, _ = _prefill_and_decode(model, prompt, config, static=static)
    return {**result, "peak_rss_growth_bytes": rss.peak - rss.start}


def _derived(medians: dict[str, float], batch_size: int, weight_bytes: int, bandwidth: float) -> dict[str, float]:
    """Figures computed from the medians (so that they agree with them exactly): decode throughput and the floor."""
    step_bytes = weight_bytes + medians["cache_bytes"]
    floor_ms = 1000 * step_bytes / bandwidth
    return {
        **medians,
        "decode_tokens_per_s": 1000 * batch_size / medians["decode_ms_per_token"],
        "step_bytes": step_bytes,
        "floor_ms_per_token": floor_ms,
        "measured_over_floor": medians["decode_ms_per_token"] / floor_ms,
    }


def _ratios(row: dict[str, Any]) -> dict[str, float]:
    """Model against each baseline that ran: speed-ups are baseline time / model time, sizes are model / baseline."""
    m, ratios = row["model"], {}
    for name, suffix in (("baseline", ""), ("baseline_static", "_static")):
        if name in row:
            b = row[name]
            ratios[f"decode_speedup{suffix}"] = b["decode_ms_per_token"] / m["decode_ms_per_token"]
            ratios[f"prefill_speedup{suffix}"] = m["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
            ratios[f"cache_ratio{suffix}"] = m["cache_bytes"] / max(b["cache_bytes"], 1)
            ratios[f"peak_rss_growth_ratio{suffix}"] = m["peak_rss_growth_bytes"] / max(b["peak_rss_growth_bytes"], 1)
    return ratios


@config_second(BenchConfig)
def bench(
    model: nn.Module,
    config: BenchConfig,
    *,
    tokenizer: Any,
    baseline: nn.Module | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure `model` (and `baseline`, interleaved) at each context length and batch size, and how far each runs
    above the memory floor.

    Any causal LM works as either (a hybridize model, a transformers model, a native GraniteMoeHybrid export).
    Prefill computes the last position's logits only (`logits_to_keep=1`, where the forward takes it), as
    `generate` does; `warmup_tokens` untimed decode steps precede the `new_tokens` timed ones. With
    `config.baseline_static`, the baseline also runs with transformers' `StaticCache` (`baseline_static`; skipped,
    with a warning, for a baseline that cannot take one, such as a hybridize model).

    The floor of a decode step is the bytes it must read over the read bandwidth measured at the start of the run
    (`read_bandwidth`, with the threads the models run on). Those bytes are the weights, each parameter storage once
    (a tied embedding is read once, in full, as the lm_head; an untied input embedding is not counted, since a step
    reads one row of it), plus the cache after the prompt (`cache_bytes`: the whole preallocated buffer for a static
    cache, which attention reads masked). At batch b a step reads the weights once and b caches.

    Returns:
        `dict`: `rows`, one per (context, batch size), with an entry per run (`model`, `baseline`,
        `baseline_static`) holding medians over `repeats` of `prefill_tokens_per_s`, `decode_ms_per_token` (per
        step: one token for each sequence of the batch), `decode_tokens_per_s`, `cache_bytes`,
        `peak_rss_growth_bytes` (during prefill and decode), `step_bytes`, `floor_ms_per_token` and
        `measured_over_floor`; and `ratios` (`decode_speedup`, `prefill_speedup`, `cache_ratio`,
        `peak_rss_growth_ratio`, each also with a `_static` suffix, against the static baseline). `models`: each
        run's class and `weight_bytes`. `machine`: CPU, threads and `read_bandwidth_gb_per_s`. `config`.

    Raises:
        `ConfigError`: a context longer than either model's `max_position_embeddings` (`check_bench`).

    Example: `bench(hybrid, BenchConfig(contexts=(512, 2048)), tokenizer=tokenizer, baseline=source)`
    """
    models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    for m in models.values():
        check_bench(m.config, config)
    for m in models.values():
        m.eval()
    if baseline is not None and config.baseline_static:
        if _supports_static_cache(baseline):
            models["baseline_static"] = baseline
        else:
            logger.warning(
                "the baseline (%s) takes no StaticCache; it runs on its default cache only", type(baseline).__name__
            )
    batch = max(config.batch_sizes)
    stream = token_blocks(
        tokenizer, load_corpus("heldout"), seq_len=max(config.contexts), max_tokens=max(config.contexts) * batch
    )
    stream = stream[:batch]
    if stream.shape[0] < batch:  # the held-out split is ~120K tokens; a large batch of long contexts repeats it
        stream = stream.repeat(-(-batch // stream.shape[0]), 1)[:batch]
    weights = {name: weight_bytes_per_step(m) for name, m in models.items()}
    machine = _machine()
    bandwidth = machine["read_bandwidth_gb_per_s"] * 1e9
    rows = []
    total = len(config.contexts) * len(config.batch_sizes) * config.repeats * len(models)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for context, batch_size in ((c, b) for c in config.contexts for b in config.batch_sizes):
        prompt = stream[:batch_size, :context]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for _ in range(config.repeats):
            for name, m in models.items():
                runs[name].append(_run_once(m, prompt, config, static=name == "baseline_static"))
                bar.update()
        row: dict[str, Any] = {"context": context, "batch_size": batch_size}
        for name, results in runs.items():
            medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
            row[name] = _derived(medians, batch_size, weights[name], bandwidth)
        if baseline is not None:
            row["ratios"] = _ratios(row)
        rows.append(row)
    bar.close()
    described = {
        name: {
            "class": type(m).__name__,
            "dtype": str(m.dtype).removeprefix("torch."),
            "decode_layout": any(is_transposed(p) for p in m.parameters()),
            "weight_bytes": weights[name],
        }
        for name, m in models.items()
    }
    return {"config": vars(config), "rows": rows, "models": described, "machine": machine}


def _machine() -> dict[str, Any]:
    import platform

    probe = _probe_bytes()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "read_bandwidth_gb_per_s": read_bandwidth(probe) / 1e9,
        "bandwidth_probe_bytes": probe,
    }


def _threads(machine: dict[str, Any]) -> str:
    return f"{machine['torch_threads']} thread" + ("s" if machine["torch_threads"] != 1 else "")


_LABELS = {"model": "model", "baseline": "baseline", "baseline_static": "baseline (static cache)"}


def format_bench(result: dict[str, Any]) -> str:
    """A plain-text table of `bench` results: per context and batch size, the speed-ups against each baseline, then
    one line per run with decode ms/token, its floor and the ratio of the two, prefill tokens/s, cache and peak RSS
    growth."""
    machine = result["machine"]
    lines = [
        f"read bandwidth {machine['read_bandwidth_gb_per_s']:.1f} GB/s ({_threads(machine)}); "
        "floor = (weight + cache bytes) / bandwidth"
    ]
    for row in result["rows"]:
        head = f"context {row['context']:>6}  batch {row['batch_size']}"
        if r := row.get("ratios"):
            head += f"  decode speed-up {r['decode_speedup']:.2f}x"
            if "decode_speedup_static" in r:
                head += f" (vs static cache {r['decode_speedup_static']:.2f}x)"
            head += f"  prefill speed-up {r['prefill_speedup']:.2f}x"
            if "prefill_speedup_static" in r:
                head += f" (vs static cache {r['prefill_speedup_static']:.2f}x)"
            head += f"  cache {r['cache_ratio']:.3f}x"
        lines.append(head)
        lines.append(
            f"  {'':>23}  {'decode ms/token':>15}  {'floor ms':>8}  {'x floor':>7}  {'prefill tok/s':>13}"
            f"  {'cache MiB':>9}  {'peak RSS growth MiB':>19}"
        )
        for name in _RUNS:
            if name in row:
                m = row[name]
                lines.append(
                    f"  {_LABELS[name]:>23}  {m['decode_ms_per_token']:15.2f}  {m['floor_ms_per_token']:8.2f}"
                    f"  {m['measured_over_floor']:7.2f}  {m['prefill_tokens_per_s']:13.0f}"
                    f"  {m['cache_bytes'] / 2**20:9.2f}  {m['peak_rss_growth_bytes'] / 2**20:19.1f}"
                )
    return "\n".join(lines)


def plot_bench(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG of `bench` results, the same figures as the JSON: against context, one line per run and batch size,
    decode ms/token (solid) over its floor (dashed), measured/floor, the decode speed-ups against each baseline,
    prefill tokens/s, cache MiB and peak RSS growth MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batch_sizes = sorted({row["batch_size"] for row in rows})
    runs = [name for name in _RUNS if name in rows[0]]
    panels = [
        ("decode_ms_per_token", "decode ms/token (dashed: floor)", 1),
        ("measured_over_floor", "decode / floor", 1),
        ("decode_speedup", "model's decode speed-up", 1),
        ("prefill_tokens_per_s", "prefill tokens/s", 1),
        ("cache_bytes", "cache MiB", 2**-20),
        ("peak_rss_growth_bytes", "peak RSS growth MiB", 2**-20),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for j, batch_size in enumerate(batch_sizes):
            sub = [row for row in rows if row["batch_size"] == batch_size]
            contexts = [row["context"] for row in sub]
            suffix = f" b{batch_size}" if len(batch_sizes) > 1 else ""
            marker = "os^v"[j % 4]
            if key == "decode_speedup":
                for i, (ratio, versus) in enumerate(
                    (("decode_speedup", "baseline"), ("decode_speedup_static", "static"))
                ):
                    if "ratios" in sub[0] and ratio in sub[0]["ratios"]:
                        values = [row["ratios"][ratio] for row in sub]
                        ax.plot(contexts, values, marker=marker, color=colors[i + 1], label=f"vs {versus}{suffix}")
                ax.axhline(1, color="gray", lw=0.8)
                continue
            for i, name in enumerate(runs):
                values = [row[name][key] * scale for row in sub]
                ax.plot(contexts, values, marker=marker, color=colors[i], label=f"{_LABELS[name]}{suffix}")
                if key == "decode_ms_per_token":
                    floor = [row[name]["floor_ms_per_token"] for row in sub]
                    ax.plot(contexts, floor, ls="--", color=colors[i], alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    machine = result["machine"]
    fig.suptitle(f"read bandwidth {machine['read_bandwidth_gb_per_s']:.1f} GB/s, {_threads(machine)}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "BenchConfig",
    "bench",
    "cache_bytes",
    "check_bench",
    "format_bench",
    "load_causal_lm",
    "plot_bench",
    "read_bandwidth",
    "weight_bytes_per_step",
]
