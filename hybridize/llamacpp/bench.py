"""`hybridize bench` on GGUF files: prefill tokens/s, decode ms/token, the sequence state llama.cpp keeps and the
peak RSS growth, per context length and thread count, for a model and its baseline in one process, interleaved and
repeated, reported as medians and ratios (as `hybridize.evaluate.bench` does for PyTorch models: on a shared
machine only a ratio measured side by side means anything).

Each model decodes greedily (the argmax of llama.cpp's logits) after a prompt of held-out text tokenized by its own
GGUF tokenizer, from an emptied context each run, after one untimed forward that pages its memory-mapped weights in. The state is `llama_state_seq_get_size`: the KV cells of the
attention layers plus the conv and SSM states of Mamba2 layers, what a context costs in memory.
"""

import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm.auto import tqdm

from ..configs.llamacpp import LlamaCppBenchConfig
from ..errors import ConfigError
from ..evaluate.bench import _PeakRSS
from ..io.corpus import load_corpus, token_blocks
from .runtime import LlamaCppTokenizer, clear, last_logits, load_gguf, require_llama_cpp


def _prompt(llm: Any, length: int) -> list[int]:
    """The first `length` tokens of the held-out corpus, as this model's tokenizer cuts it."""
    return token_blocks(LlamaCppTokenizer(llm), load_corpus("heldout"), seq_len=length, max_tokens=length)[0].tolist()


def _run_once(llm: Any, prompt: list[int], config: LlamaCppBenchConfig) -> dict[str, float]:
    llama_cpp = require_llama_cpp()
    clear(llm)
    with _PeakRSS() as rss:
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(last_logits(llm)))
        prefill = time.perf_counter() - start
        state = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        for step in range(config.warmup_tokens + config.new_tokens):
            if step == config.warmup_tokens:
                start = time.perf_counter()
            llm.eval([token])
            token = int(np.argmax(last_logits(llm)))
        decode = time.perf_counter() - start
    return {
        "prefill_tokens_per_s": len(prompt) / prefill,
        "decode_ms_per_token": 1000 * decode / config.new_tokens,
        "cache_bytes": state,
        "peak_rss_growth_bytes": rss.peak - rss.start,
    }


def _describe(path: Path, llm: Any) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    file_type = reader.fields.get(gguf.Keys.General.FILE_TYPE)
    return {
        "path": str(path),
        "arch": llm.metadata.get("general.architecture"),
        "file_type": gguf.LlamaFileType(int(file_type.contents())).name if file_type else None,
        "weight_bytes": int(sum(int(t.n_bytes) for t in reader.tensors)),
    }


def bench_gguf(
    model: str | Path,
    config: LlamaCppBenchConfig,
    *,
    baseline: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure the GGUF file `model` (and `baseline`, interleaved) through llama.cpp at each context and thread count.

    Returns:
        `dict`: `rows`, one per (context, threads), with an entry per run (`model`, `baseline`) holding medians over
        `repeats` of `prefill_tokens_per_s`, `decode_ms_per_token`, `decode_tokens_per_s`, `cache_bytes` and
        `peak_rss_growth_bytes`, and `ratios` (`decode_speedup`, `prefill_speedup`, `cache_ratio`,
        `peak_rss_growth_ratio`: baseline time over model time, model size over baseline size). `models`: each
        file's path, architecture, file type and `weight_bytes`. `machine`, `runtime` and `config`.

    Raises:
        `ConfigError`: a context longer than a model's training context (the tokens decoded after it may go past it,
            as in `hybridize.bench`).

    Example: `bench_gguf("out/gguf/hybrid-q8_0.gguf", LlamaCppBenchConfig(threads=(1, 2)), baseline="source.gguf")`
    """
    llama_cpp = require_llama_cpp()
    threads = config.threads or (os.cpu_count() or 1,)
    steps = config.warmup_tokens + config.new_tokens
    n_ctx = max(config.contexts) + steps + 1
    paths = {"model": Path(model)} | ({"baseline": Path(baseline)} if baseline is not None else {})
    llms = {
        name: load_gguf(path, n_ctx=n_ctx, threads=threads[0], kv_cache=config.kv_cache, flash_attn=config.flash_attn)
        for name, path in paths.items()
    }
    for name, llm in llms.items():
        if (limit := llama_cpp.llama_model_n_ctx_train(llm.model)) < max(config.contexts):
            raise ConfigError(
                f"context {max(config.contexts)} exceeds the {name}'s training context of {limit} tokens; pass "
                "shorter --context values"
            )
    prompts = {name: _prompt(llm, max(config.contexts)) for name, llm in llms.items()}
    for name, llm in llms.items():  # untimed: the first forward pages the memory-mapped weights in
        clear(llm)
        llm.eval(prompts[name][:32])
    rows = []
    bar = tqdm(total=len(config.contexts) * len(threads) * config.repeats * len(llms), desc="bench", unit="run")
    bar.disable = not progress
    for context in config.contexts:
        for count in threads:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in llms}
            for _ in range(config.repeats):
                for name, llm in llms.items():  # interleaved: each round runs every model once
                    llama_cpp.llama_set_n_threads(llm.ctx, count, count)
                    runs[name].append(_run_once(llm, prompts[name][:context], config))
                    bar.update()
            row: dict[str, Any] = {"context": context, "threads": count}
            for name, results in runs.items():
                medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
                row[name] = {**medians, "decode_tokens_per_s": 1000 / medians["decode_ms_per_token"]}
            if "baseline" in row:
                m, b = row["model"], row["baseline"]
                row["ratios"] = {
                    "decode_speedup": b["decode_ms_per_token"] / m["decode_ms_per_token"],
                    "prefill_speedup": m["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                    "cache_ratio": m["cache_bytes"] / max(b["cache_bytes"], 1),
                    "peak_rss_growth_ratio": m["peak_rss_growth_bytes"] / max(b["peak_rss_growth_bytes"], 1),
                }
            rows.append(row)
    bar.close()
    models = {name: _describe(paths[name], llm) for name, llm in llms.items()}
    for llm in llms.values():
        llm.close()  # now, not at exit, when llama-cpp-python's teardown fails noisily
    return {
        "config": {**asdict(config), "threads": list(threads)},
        "rows": rows,
        "models": models,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "runtime": {"name": "llama.cpp", "llama_cpp_python": llama_cpp.__version__},
    }


def format_bench_gguf(result: dict[str, Any]) -> str:
    """A plain-text table of `bench_gguf` results: per context and thread count the speed-ups, then one line per run."""
    lines = [
        f"{name}: {m['arch']} {m['file_type']}, {m['weight_bytes'] / 2**20:.1f} MiB"
        for name, m in result["models"].items()
    ]
    for row in result["rows"]:
        head = f"context {row['context']:>6}  threads {row['threads']}"
        if r := row.get("ratios"):
            head += (
                f"  decode speed-up {r['decode_speedup']:.2f}x  prefill speed-up {r['prefill_speedup']:.2f}x"
                f"  cache {r['cache_ratio']:.3f}x"
            )
        lines.append(head)
        lines.append(
            f"  {'':>8}  {'decode tok/s':>12}  {'decode ms/token':>15}  {'prefill tok/s':>13}  {'cache MiB':>9}"
            f"  {'peak RSS growth MiB':>19}"
        )
        for name in ("model", "baseline"):
            if name in row:
                m = row[name]
                lines.append(
                    f"  {name:>8}  {m['decode_tokens_per_s']:12.1f}  {m['decode_ms_per_token']:15.2f}"
                    f"  {m['prefill_tokens_per_s']:13.0f}  {m['cache_bytes'] / 2**20:9.2f}"
                    f"  {m['peak_rss_growth_bytes'] / 2**20:19.1f}"
                )
    return "\n".join(lines)


__all__ = ["LlamaCppBenchConfig", "bench_gguf", "format_bench_gguf"]
