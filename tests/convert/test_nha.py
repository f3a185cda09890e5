"""Attention -> NHA: q/k/v/o reused, g_proj from k_proj, the converted model equal to its source while the window
covers the text (empty slots masked), `full_every`, and the conversion's config errors."""

import pytest
import torch
from tiny import make_tiny, save_tiny

from hybridize.convert import ConvertConfig, convert
from hybridize.errors import ConfigError

HEAD_DIM, KV_HEADS = 16, 2  # tiny models: hidden 64, 4 query heads, 2 KV heads


@pytest.mark.parametrize("slots", [HEAD_DIM, 5, 24])
def test_projections_reused_and_gate_from_k_proj(tiny_source, slots):
    hybrid = convert(
        tiny_source, ConvertConfig(mixer_init="attention", mixer="nha", ratio=1.0, mixer_settings={"slots": slots})
    )
    for src_layer, layer in zip(tiny_source.model.layers, hybrid.model.layers):
        attn, mixer = src_layer.self_attn, layer.mixer
        for name, p in attn.named_parameters():  # q/k/v/o and their biases (Qwen2), unchanged
            assert torch.equal(mixer.get_parameter(name), p), name
        assert mixer.g_proj.bias is None and mixer.g_proj.weight.shape == (KV_HEADS * slots, 64)
        gate = mixer.g_proj.weight.view(KV_HEADS, slots, 64)
        w_k = attn.k_proj.weight.view(KV_HEADS, HEAD_DIM, 64)
        kept = min(slots, HEAD_DIM)
        assert torch.equal(gate[:, :kept], w_k[:, :kept])  # a copy, or the first M rows of each head's block
        if slots > HEAD_DIM:  # the extra rows are distinct combinations of the same head's key rows
            extra = gate[:, HEAD_DIM:]
            coeffs = torch.linalg.lstsq(w_k.transpose(1, 2).double(), extra.transpose(1, 2).double()).solution
            torch.testing.assert_close((coeffs.transpose(1, 2) @ w_k.double()).float(), extra, rtol=1e-4, atol=1e-5)
            assert torch.linalg.matrix_rank(extra[0].double()) == slots - HEAD_DIM


def test_extra_gate_rows_follow_the_seed(tiny_llama):
    config = lambda seed: ConvertConfig(
        mixer_init="attention", mixer="nha", ratio=1.0, seed=seed, mixer_settings={"slots": 20}
    )  # noqa: E731
    a, b, c = (convert(tiny_llama, config(seed)).model.layers[1].mixer.g_proj.weight for seed in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_window_covering_the_text_reproduces_the_source(tiny_source):
    """Every layer NHA, w >= length, empty slots masked: the converted model is the source, whatever the gates."""
    source = tiny_source.double()
    ids = torch.randint(0, 128, (2, 21))
    expected = source(ids).logits
    hybrid = convert(
        source, ConvertConfig(mixer_init="attention", mixer="nha", ratio=1.0, mixer_settings={"window": 21})
    ).double()
    assert hybrid.config.mixer_types == ["nha"] * 4
    torch.testing.assert_close(hybrid(ids).logits, expected, rtol=1e-9, atol=1e-9)
    # the paper's layer (empty slots unmasked) is not: M null slots dilute every attention weight
    unmasked = convert(
        source,
        ConvertConfig(
            mixer_init="attention", mixer="nha", ratio=1.0, mixer_settings={"window": 21, "mask_empty_slots": False}
        ),
    ).double()
    assert not torch.allclose(unmasked(ids).logits, expected, atol=1e-3)
    # past the window the slots take over and the model departs from the source, but only after the window
    short = convert(
        source, ConvertConfig(mixer_init="attention", mixer="nha", ratio=1.0, mixer_settings={"window": 8})
    ).double()
    logits = short(ids).logits
    torch.testing.assert_close(logits[:, :8], expected[:, :8], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(logits[:, 8:], expected[:, 8:], atol=1e-3)


def test_full_every_keeps_attention_in_every_nth_layer():
    source = make_tiny("llama", num_hidden_layers=8)
    hybrid = convert(
        source,
        ConvertConfig(mixer_init="attention", mixer="nha", full_every=3, mixer_settings={"slots": 8, "window": 4}),
    )
    assert hybrid.config.mixer_types == ["nha", "nha", "attention"] * 2 + ["nha", "nha"]
    (step,) = hybrid.hybridize_steps
    assert list(step["config"]["attn_layers"]) == [2, 5] and step["config"]["full_every"] is None
    assert step["metrics"]["converted_layers"] == [0, 1, 3, 4, 6, 7]
    for i in (2, 5):  # kept layers are the source's attention
        for name, p in source.model.layers[i].self_attn.named_parameters():
            assert torch.equal(hybrid.model.layers[i].mixer.get_parameter(name), p)


def test_settings_recorded_in_the_config(tiny_llama):
    settings = {"slots": 8, "window": 4, "gate_normalizer": 4.0}
    hybrid = convert(
        tiny_llama, ConvertConfig(mixer_init="attention", mixer="nha", ratio=0.5, mixer_settings=settings)
    )
    assert hybrid.config.mixers == {"nha": settings}
    assert hybrid.config.mixer_types == ["nha", "attention", "nha", "attention"]


def test_config_errors(tiny_llama):
    with pytest.raises(ConfigError, match="full_every must be >= 1"):
        ConvertConfig(mixer_init="attention", mixer="nha", full_every=0)
    with pytest.raises(ConfigError, match="full_every=2 fixes the attention layers"):
        ConvertConfig(mixer_init="attention", mixer="nha", full_every=2, attn_layers=(1,))
    with pytest.raises(ConfigError, match="give only one"):
        ConvertConfig(mixer_init="attention", mixer="nha", full_every=2, select="lazy")
    with pytest.raises(ConfigError, match="bad nha settings.*unknown nha settings"):
        convert(tiny_llama, ConvertConfig(mixer_init="attention", mixer="nha", mixer_settings={"sinks": 4}))
    with pytest.raises(ConfigError, match="bad nha settings.*window must be >= 0"):
        convert(tiny_llama, ConvertConfig(mixer_init="attention", mixer="nha", mixer_settings={"window": -1}))


def test_cli_convert_nha(tmp_path):
    """`hybridize convert DIR --mixer nha --slots --window --full-every`: the options land in the saved config."""
    import contextlib
    import io
    import sys

    from transformers import AutoModelForCausalLM

    from hybridize.cli import main

    source = tmp_path / "llama"
    save_tiny(source, num_hidden_layers=6)

    def run(*args):
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
            mp.setattr(sys, "argv", ["hybridize", *map(str, args)])
            with contextlib.redirect_stderr(out):
                try:
                    main()
                    return 0, out.getvalue()
                except SystemExit as exit_:
                    return exit_.code, out.getvalue()

    code, out = run("convert", source, "--mixer", "nha", "--slots", 8, "--window", 4, "--full-every", 3,
                    "-o", tmp_path / "nha")  # fmt: skip
    assert code == 0, out
    assert "converted 4/6 layers to nha" in out
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "nha").config
    assert config.mixer_types == ["nha", "nha", "attention"] * 2 and config.mixers == {
        "nha": {"slots": 8, "window": 4}
    }
    code, out = run("convert", source, "--mixer", "nha", "--full-every", 2, "--attn-layers", "1", "-o", tmp_path / "x")
    assert code == 1 and "give only one" in out and not (tmp_path / "x").exists()
    code, out = run("convert", source, "--mixer", "nha", "--window", -1, "-o", tmp_path / "x")
    assert code == 1 and "window must be >= 0" in out and not (tmp_path / "x").exists()
