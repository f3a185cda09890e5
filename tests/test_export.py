"""Native GraniteMoeHybrid export: same logits and generations as the hybrid, loadable by plain transformers."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import make_tiny, tiny_hybrid

import hybridize
from hybridize.convert import ConvertConfig, convert
from hybridize.errors import ConfigError, UnsupportedModelError
from hybridize.export import ExportConfig, export, native_layer_names
from hybridize.model_card import layer_types, model_card


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_export_reproduces_logits_and_generation(ratio):
    hybrid = convert(make_tiny("llama"), ConvertConfig(mixer_init="attention", ratio=ratio, conv_init="random"))
    native = export(hybrid, ExportConfig())
    assert type(native).__name__ == "GraniteMoeHybridForCausalLM"
    ids = torch.randint(0, 128, (2, 37))
    torch.testing.assert_close(native(ids).logits, hybrid(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :7]
    assert torch.equal(
        native.generate(prompt, max_new_tokens=10, do_sample=False),
        hybrid.generate(prompt, max_new_tokens=10, do_sample=False),
    )


def test_exported_checkpoint_loads_without_hybridize(tmp_path):
    hybrid = convert(make_tiny("llama"), ConvertConfig(mixer_init="attention", ratio=0.5))
    hybridize.save(export(hybrid, ExportConfig()), tmp_path / "native")
    ids = torch.randint(0, 128, (1, 15))
    torch.save({"ids": ids, "expected": hybrid(ids).logits}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, json, torch
        sys.modules["hybridize"] = None
        from transformers import AutoModelForCausalLM
        config = json.load(open({str(tmp_path / "native" / "config.json")!r}))
        assert "auto_map" not in config and config["model_type"] == "granitemoehybrid"
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "native")!r}).eval()
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(model(io["ids"]).logits, io["expected"], rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_models_without_a_native_equivalent_are_refused():
    streaming = convert(
        make_tiny("llama"),
        ConvertConfig(mixer_init="attention", mixer="streaming", ratio=0.5, mixer_settings={"window": 8}),
    )
    with pytest.raises(UnsupportedModelError, match="^export does not support streaming: sink .*keep the hybrid"):
        export(streaming, ExportConfig())
    with pytest.raises(UnsupportedModelError, match="^export does not support nha: Native Hybrid Attention"):
        export(tiny_hybrid(["nha", "attention"] * 2), ExportConfig())
    with pytest.raises(UnsupportedModelError, match="d_inner"):  # Granite's Mamba2 inner size is the hidden size
        export(tiny_hybrid(["mamba2", "attention"] * 2, mixers={"mamba2": {"head_dim": 8}}), ExportConfig())
    with pytest.raises(UnsupportedModelError, match="no attention layer"):
        export(convert(make_tiny("llama"), ConvertConfig(mixer_init="attention", ratio=1.0)), ExportConfig())
    with pytest.raises(UnsupportedModelError, match="biases"):
        export(convert(make_tiny("qwen2"), ConvertConfig(mixer_init="attention", ratio=0.5)), ExportConfig())
    with pytest.raises(ConfigError, match="bamba"):
        ExportConfig(to="bamba")


def test_the_card_reads_native_layer_names_and_offers_export_where_the_handlers_do(tmp_path):
    assert native_layer_names() == {"full_attention": "attention", "linear_attention": "mamba2", "mamba": "mamba2"}
    native = {"model_type": "granitemoehybrid", "layer_types": ["full_attention", "linear_attention", "mamba"]}
    assert layer_types(native) == ["attention", "mamba2", "mamba2"]
    for types, offered in [
        (["mamba2", "attention"], True),
        (["attention", "attention"], True),
        (["streaming", "attention"], False),
        (["nha", "attention"], False),
        (["mamba2", "mamba2"], False),  # Granite's cache needs an attention layer
    ]:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "hybridize", "mixer_types": types}))
        assert ("exported to a native transformers class" in model_card(tmp_path).text) == offered, types
