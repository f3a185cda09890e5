"""bench on tiny models: every field and ratio present and consistent, cache bytes counted exactly."""

import time

import pytest
import torch
from tiny import TINY, make_tiny, word_tokenizer

import hybridize
from hybridize.errors import ConfigError
from hybridize.evaluate.bench import BenchConfig, bench, cache_bytes, format_bench, plot_bench


def test_bench_reports_every_field_and_ratio(tmp_path):
    source = make_tiny("llama")
    hybrid = hybridize.convert(source, hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    result = bench(
        hybrid,
        word_tokenizer(),
        BenchConfig(contexts=(16, 64), new_tokens=3, repeats=2, batch_sizes=(1, 3)),
        baseline=source,
    )
    assert [(row["context"], row["batch_size"]) for row in result["rows"]] == [(16, 1), (16, 3), (64, 1), (64, 3)]
    for row in result["rows"]:
        for name in ("model", "baseline"):
            assert row[name]["decode_ms_per_token"] > 0 and row[name]["prefill_tokens_per_s"] > 0
            assert row[name]["peak_rss_growth_bytes"] >= 0
        r = row["ratios"]
        assert r["decode_speedup"] == pytest.approx(
            row["baseline"]["decode_ms_per_token"] / row["model"]["decode_ms_per_token"]
        )
        assert r["cache_ratio"] == pytest.approx(row["model"]["cache_bytes"] / row["baseline"]["cache_bytes"])
    # the source's KV cache after a 64-token prompt: 4 layers x (k + v) x 2 heads x 16 dims x 64 tokens x 4 bytes
    assert result["rows"][2]["baseline"]["cache_bytes"] == 4 * 2 * 2 * 16 * 64 * 4
    assert result["rows"][3]["baseline"]["cache_bytes"] == 3 * 4 * 2 * 2 * 16 * 64 * 4  # batch 3
    assert "decode speed-up" in format_bench(result) and "peak RSS growth" in format_bench(result)
    png = plot_bench(result, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_rss_sees_a_short_lived_allocation():
    from hybridize.evaluate.bench import _PeakRSS

    with _PeakRSS() as rss:
        block = torch.ones(25_000_000)  # 100 MB, touched
        time.sleep(0.5)  # the sampler thread must get a turn while the block is alive, even on a loaded machine
        del block
    assert rss.peak - rss.start > 80e6


def test_cache_bytes_of_a_hybrid_counts_states_once():
    config = hybridize.HybridConfig(**TINY, mixer_types=["mamba2", "attention"] * 2)
    model = hybridize.HybridForCausalLM(config).eval()
    cache = model(torch.randint(0, 128, (1, 10)), use_cache=True).cache
    kv = 2 * 2 * 2 * 16 * 10 * 4  # 2 attention layers, k + v
    ssm = 2 * 4 * 16 * 16 * 4  # 2 mamba layers, (heads, head_dim, state) float32
    conv = 2 * (2 * (16 + 16) + 4 * 16) * 4 * 4  # conv channels x kernel 4
    assert cache_bytes(cache) == kv + ssm + conv


def test_bad_bench_config():
    with pytest.raises(ConfigError, match="contexts"):
        BenchConfig(contexts=())
    with pytest.raises(ConfigError, match="batch_sizes"):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(ConfigError, match="repeats"):
        BenchConfig(repeats=0)
