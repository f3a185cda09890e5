"""bench on tiny models: every field and ratio present and consistent, the memory floor's byte count exact, both
source baselines (default and static cache) generating what the model generates, any causal LM (a native
GraniteMoeHybrid export included) as model or baseline. No timing assertions: the targets live in `bench` runs."""

import json
import time

import pytest
import torch
from tiny import TINY, TOLERANCES, make_tiny, tiny_hybrid, word_tokenizer

import hybridize
from hybridize.errors import ConfigError
from hybridize.evaluate.bench import (
    BenchConfig,
    _prefill_and_decode,
    bench,
    cache_bytes,
    format_bench,
    plot_bench,
    read_bandwidth,
    weight_bytes_per_step,
)
from hybridize.export import ExportConfig, export

SMALL = dict(contexts=(16, 64), new_tokens=3, repeats=2)


def _unique_parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields a tied one once


@pytest.fixture(scope="module")
def source():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def native(source):
    """The native GraniteMoeHybrid export of a half-Mamba2 tiny hybrid."""
    return export(
        hybridize.convert(source, hybridize.ConvertConfig(mixer_init="attention", ratio=0.5)), ExportConfig()
    )


def test_bench_reports_every_field_the_floor_and_both_baselines(source, tmp_path):
    hybrid = hybridize.convert(source, hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    result = bench(hybrid, BenchConfig(**SMALL, batch_sizes=(1, 3)), tokenizer=word_tokenizer(), baseline=source)
    bandwidth = result["machine"]["read_bandwidth_gb_per_s"]
    assert bandwidth > 0 and result["machine"]["bandwidth_probe_bytes"] >= 256 << 20
    assert result["models"]["model"]["weight_bytes"] == weight_bytes_per_step(hybrid)
    assert result["models"]["baseline_static"]["weight_bytes"] == _unique_parameter_bytes(source)
    assert [(row["context"], row["batch_size"]) for row in result["rows"]] == [(16, 1), (16, 3), (64, 1), (64, 3)]
    for row in result["rows"]:
        for name in ("model", "baseline", "baseline_static"):
            m = row[name]
            assert m["decode_ms_per_token"] > 0 and m["prefill_tokens_per_s"] > 0 and m["peak_rss_growth_bytes"] >= 0
            assert m["decode_tokens_per_s"] == pytest.approx(row["batch_size"] * 1000 / m["decode_ms_per_token"])
            assert m["step_bytes"] == result["models"][name]["weight_bytes"] + m["cache_bytes"]
            assert m["floor_ms_per_token"] == pytest.approx(1000 * m["step_bytes"] / (bandwidth * 1e9))
            assert m["measured_over_floor"] == pytest.approx(m["decode_ms_per_token"] / m["floor_ms_per_token"])
        r, m, b, s = row["ratios"], row["model"], row["baseline"], row["baseline_static"]
        assert r["decode_speedup"] == pytest.approx(b["decode_ms_per_token"] / m["decode_ms_per_token"])
        assert r["decode_speedup_static"] == pytest.approx(s["decode_ms_per_token"] / m["decode_ms_per_token"])
        assert r["prefill_speedup_static"] == pytest.approx(m["prefill_tokens_per_s"] / s["prefill_tokens_per_s"])
        assert r["cache_ratio"] == pytest.approx(m["cache_bytes"] / b["cache_bytes"])
    # the source's KV cache after a 64-token prompt: 4 layers x (k + v) x 2 heads x 16 dims x 64 tokens x 4 bytes
    assert result["rows"][2]["baseline"]["cache_bytes"] == 4 * 2 * 2 * 16 * 64 * 4
    assert result["rows"][3]["baseline"]["cache_bytes"] == 3 * 4 * 2 * 2 * 16 * 64 * 4  # batch 3
    # the static cache is preallocated for the prompt, 2 warm-up and 3 timed tokens
    assert result["rows"][2]["baseline_static"]["cache_bytes"] == 4 * 2 * 2 * 16 * (64 + 2 + 3) * 4 + 4 * 8
    text = format_bench(result)
    for words in ("read bandwidth", "decode speed-up", "vs static cache", "floor ms", "x floor", "peak RSS growth"):
        assert words in text
    json.dumps(result)  # what --json writes
    png = plot_bench(result, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("tied", [True, False])
def test_floor_bytes_are_unique_parameters_without_an_untied_embedding(tied):
    source = make_tiny("llama", tie_word_embeddings=tied)
    table = source.get_input_embeddings().weight
    expected = _unique_parameter_bytes(source) - (0 if tied else table.numel() * 4)
    assert weight_bytes_per_step(source) == expected
    assert expected == 4 * sum(p.numel() for n, p in source.named_parameters() if tied or "embed_tokens" not in n)
    hybrid = tiny_hybrid(["mamba2", "attention", "nha", "streaming"])  # tied, as TINY says
    assert weight_bytes_per_step(hybrid) == _unique_parameter_bytes(hybrid)
    result = bench(source, BenchConfig(contexts=(16,), new_tokens=1, repeats=1), tokenizer=word_tokenizer())
    row = result["rows"][0]["model"]
    assert row["step_bytes"] == expected + row["cache_bytes"] and "baseline" not in result["rows"][0]


def test_read_bandwidth_is_a_rate():
    assert 1e8 < read_bandwidth(32 << 20, repeats=2) < 1e13  # 0.1 GB/s .. 10 TB/s: bytes per second, not per ms


@pytest.mark.parametrize(
    "make",
    [lambda: make_tiny("llama"), lambda: tiny_hybrid(["mamba2", "attention", "nha", "streaming"])],
    ids=["llama", "hybrid"],
)
def test_logits_to_keep_one_is_the_last_position_of_a_full_forward(make):
    model = make()
    ids = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        full, last = model(ids, use_cache=True), model(ids, use_cache=True, logits_to_keep=1)
    assert last.logits.shape == (2, 1, 128)
    # equal up to rounding: the lm_head's matrix product runs over 1 row instead of 23
    torch.testing.assert_close(last.logits, full.logits[:, -1:], **TOLERANCES[torch.float32])
    assert cache_bytes(last.cache) == cache_bytes(full.cache)


def test_prefill_keeps_the_last_logits_and_decode_warms_up(source):
    calls = []
    hook = source.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs.get("logits_to_keep"))),
        with_kwargs=True,
    )
    try:
        with torch.inference_mode():
            _, tokens = _prefill_and_decode(source, torch.randint(0, 128, (1, 12)), BenchConfig(new_tokens=3))
    finally:
        hook.remove()
    assert calls == [(12, 1)] + [(1, None)] * (2 + 3)  # prefill, 2 warm-up steps, 3 timed steps
    assert tokens.shape == (1, 1 + 2 + 3)


@pytest.mark.parametrize("which", ["llama", "native"])
def test_static_cache_generates_the_default_paths_tokens(source, native, which):
    model = source if which == "llama" else native
    prompt = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    config = BenchConfig(new_tokens=6, warmup_tokens=1)
    with torch.inference_mode():
        default, static = (_prefill_and_decode(model, prompt, config, static=s)[1] for s in (False, True))
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[:, 20:]
    assert torch.equal(default, static) and torch.equal(default, expected)


def test_native_export_benches_as_model_and_as_baseline(source, native):
    config = BenchConfig(contexts=(16,), new_tokens=2, repeats=1, batch_sizes=(1, 4))
    as_model = bench(native, config, tokenizer=word_tokenizer(), baseline=source)
    as_baseline = bench(source, config, tokenizer=word_tokenizer(), baseline=native)
    assert as_model["models"]["model"]["class"] == as_baseline["models"]["baseline_static"]["class"]
    assert as_model["models"]["model"]["class"] == "GraniteMoeHybridForCausalLM"
    for result in (as_model, as_baseline):
        assert [row["batch_size"] for row in result["rows"]] == [1, 4]
        for row in result["rows"]:
            assert {"decode_speedup", "decode_speedup_static"} <= set(row["ratios"])
            assert all(row[name]["measured_over_floor"] > 0 for name in ("model", "baseline", "baseline_static"))
    assert as_model["models"]["model"]["weight_bytes"] == _unique_parameter_bytes(native)


def test_a_hybrid_baseline_or_no_static_runs_the_default_path_only(source):
    hybrid = tiny_hybrid(["mamba2", "attention"] * 2)
    for baseline, config in [
        (hybrid, BenchConfig(contexts=(16,), new_tokens=1, repeats=1)),  # HybridCache has no static counterpart
        (make_tiny("llama", seed=1), BenchConfig(contexts=(16,), new_tokens=1, repeats=1, baseline_static=False)),
    ]:
        result = bench(source, config, tokenizer=word_tokenizer(), baseline=baseline)
        row = result["rows"][0]
        assert "baseline_static" not in row and "baseline_static" not in result["models"]
        assert "decode_speedup" in row["ratios"] and "decode_speedup_static" not in row["ratios"]
        assert "vs static cache" not in format_bench(result)


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
    with pytest.raises(ConfigError, match="warmup_tokens"):
        BenchConfig(warmup_tokens=-1)
    with pytest.raises(ConfigError, match="baseline_static"):
        BenchConfig(baseline_static="no")
