"""`analyze` on tiny models: the lazy-ratio table, JSON and plot, the short-document warning, and the sensitivity
column next to the lazy ratio (the same scores `convert --select sensitivity` uses)."""

import json
import random

import pytest
import torch
from tiny import make_tiny, word_tokenizer

from hybridize.analyze import AnalyzeConfig, analyze, format_analysis, save_analysis
from hybridize.convert import ConvertConfig, convert


# The same calibration text and fragile model as tests/convert/test_calibrated.py's
@pytest.fixture
def calibration_text(tmp_path):
    """Random words of the tiny vocabulary, 40 paragraphs: real text for `word_tokenizer`."""
    rng = random.Random(0)
    path = tmp_path / "calibration.txt"
    paragraphs = [" ".join(f"w{rng.randrange(2, 128)}" for _ in range(60)) for _ in range(40)]
    path.write_text("\n\n".join(paragraphs))
    return str(path)


def _fragile(layer_index: int):
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
    result = analyze(_fragile(2), config, tokenizer=word_tokenizer())
    scores = [row["sensitivity_kl"] for row in result["layers"]]
    assert max(range(4), key=scores.__getitem__) == 2
    assert 2 not in result["sensitivity_selected"] and len(result["sensitivity_selected"]) == 2
    table = format_analysis(result)
    assert "KL alone (mamba2)" in table and "convert --select sensitivity" in table
    save_analysis(result, tmp_path / "analysis")
    assert (tmp_path / "analysis" / "lazy_ratio.png").stat().st_size > 0
    # the same scores as convert --select sensitivity computes (read from the cache it shares)
    converted = convert(
        _fragile(2),
        ConvertConfig(
            ratio=0.5, select="sensitivity", calibration=calibration_text, calibration_docs=4, calibration_len=64
        ),
        tokenizer=word_tokenizer(),
    )
    assert converted.hybridize_steps[-1]["metrics"]["converted_layers"] == result["sensitivity_selected"]
