"""`analyze` on tiny models: the lazy-ratio table, JSON and plot, the short-document warning, and the sensitivity
column next to the lazy ratio (the same scores `convert --select sensitivity` uses)."""

import json

from tiny import fragile_tiny, word_tokenizer

from hybridize.analyze import AnalyzeConfig, analyze, format_analysis, save_analysis
from hybridize.convert import ConvertConfig, convert


# The same calibration text and fragile model as tests/convert/test_calibrated.py's
def test_analyze_writes_table_json_and_plot(tiny_llama, tmp_path):
    config = AnalyzeConfig(sinks=2, window=16, w_last=8, num_docs=2, seq_len=64)
    result = analyze(tiny_llama, config, tokenizer=word_tokenizer())
    assert [row["layer"] for row in result["layers"]] == [0, 1, 2, 3] and len(result["selected"]) == 2
    assert not result["warnings"] and all(0 < row["lazy_ratio"] < 1 for row in result["layers"])
    table = format_analysis(result)
    assert "lazy ratio" in table and "warning" not in table
    save_analysis(result, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "lazy_ratio.json").read_text())["selected"] == result["selected"]
    assert (tmp_path / "a" / "lazy_ratio.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_says_short_documents_rank_nothing(tiny_llama):
    result = analyze(tiny_llama, AnalyzeConfig(sinks=4, window=60, num_docs=1, seq_len=64), tokenizer=word_tokenizer())
    assert all(row["lazy_ratio"] == 1.0 for row in result["layers"])
    assert "every lazy ratio is 1" in result["warnings"][0]
    assert "warning: the calibration documents have 64 tokens" in format_analysis(result)


def test_analyze_prints_and_plots_sensitivity_next_to_the_lazy_ratio(calibration_text, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    config = AnalyzeConfig(data=calibration_text, sinks=1, window=8, w_last=4, num_docs=4, seq_len=64, mixer="mamba2")
    result = analyze(fragile_tiny(2), config, tokenizer=word_tokenizer())
    scores = [row["sensitivity_kl"] for row in result["layers"]]
    assert max(range(4), key=scores.__getitem__) == 2
    assert 2 not in result["sensitivity_selected"] and len(result["sensitivity_selected"]) == 2
    table = format_analysis(result)
    assert "KL alone (mamba2)" in table and "convert --select sensitivity" in table
    save_analysis(result, tmp_path / "analysis")
    assert (tmp_path / "analysis" / "lazy_ratio.png").stat().st_size > 0
    # the same scores as convert --select sensitivity computes (read from the cache it shares)
    converted = convert(
        fragile_tiny(2),
        ConvertConfig(
            ratio=0.5, select="sensitivity", calibration=calibration_text, calibration_docs=4, calibration_len=64
        ),
        tokenizer=word_tokenizer(),
    )
    assert converted.hybridize_steps[-1]["metrics"]["converted_layers"] == result["sensitivity_selected"]
