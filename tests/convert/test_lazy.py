"""LightTransfer on tiny models: lazy ratios against brute-force attention probabilities, the laziest-layer choice,
`convert --mixer streaming` with each selection (`analyze` is in tests/test_analyze.py)."""

import pytest
import torch
from tiny import make_tiny, word_tokenizer

from hybridize.convert import ConvertConfig, convert
from hybridize.convert.lazy import laziest_layers, lazy_frequency, measure_lazy_ratios
from hybridize.convert.selection import random_layers
from hybridize.errors import ConfigError
from hybridize.io.calibration import calibration_blocks
from hybridize.modeling.streaming import StreamingMixer


def _brute_force(model, blocks, sinks, window, w_last):
    """Mean over heads and the last queries of the attention probabilities on sinks ∪ window, from eager attention."""
    model.config._attn_implementation = "eager"
    ratios = []
    for block in blocks:
        attentions = model(block[None], output_attentions=True).attentions  # per layer (1, h, l, l)
        length = block.shape[0]
        i, j = torch.arange(length)[:, None], torch.arange(length)[None]
        near = (j <= i) & ((j < sinks) | (i - j < window))
        ratios.append([(a[0] * near).sum(-1)[:, -w_last:].mean().item() for a in attentions])
    model.config._attn_implementation = "sdpa"
    return torch.tensor(ratios, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lazy_ratio_matches_attention_probabilities(family):
    model = make_tiny(family).double()
    blocks = torch.randint(0, 128, (3, 40))
    got = measure_lazy_ratios(model, blocks, sinks=2, window=9, w_last=5)
    torch.testing.assert_close(got, _brute_force(model, blocks, 2, 9, 5), rtol=1e-6, atol=1e-6)
    assert ((got > 0) & (got < 1)).all()


def test_documents_within_sinks_plus_window_give_one_everywhere():
    model = make_tiny("llama")
    got = measure_lazy_ratios(model, torch.randint(0, 128, (2, 30)), sinks=4, window=26, w_last=8)
    assert (got == 1.0).all()


def test_laziest_layers_by_frequency_then_mean():
    ratios = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.9, 0.8, 0.3], [0.95, 0.1, 0.85, 0.2]], dtype=torch.float64)
    # top-2 per document: {0, 1}, {1, 2}, {0, 2}: every layer but 3 twice; the mean breaks the tie
    torch.testing.assert_close(lazy_frequency(ratios, 2), torch.tensor([2 / 3, 2 / 3, 2 / 3, 0], dtype=torch.float64))
    assert laziest_layers(ratios, 2) == [0, 2]
    ratios[:, 3] = torch.nan  # a layer without attention is never picked
    assert laziest_layers(ratios, 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="attention layers"):
        laziest_layers(ratios, 4)


def test_streaming_conversion_copies_attention_and_adds_nothing(tiny_source):
    hybrid = convert(
        tiny_source, ConvertConfig(mixer_init="attention", mixer="streaming", ratio=1.0, mixer_settings={"window": 64})
    )
    assert hybrid.config.mixer_types == ["streaming"] * 4
    for src, layer in zip(tiny_source.model.layers, hybrid.model.layers):
        assert isinstance(layer.mixer, StreamingMixer)
        assert {k: v for k, v in layer.mixer.state_dict().items()}.keys() == src.self_attn.state_dict().keys()
        assert all(torch.equal(v, layer.mixer.state_dict()[k]) for k, v in src.self_attn.state_dict().items())
    ids = torch.randint(0, 128, (2, 60))  # the window covers everything: the source's logits
    torch.testing.assert_close(hybrid(ids).logits, tiny_source(ids).logits, rtol=1e-5, atol=1e-5)


def test_lazy_selection_takes_the_laziest_layers(tiny_llama):
    tokenizer, settings = word_tokenizer(), {"sinks": 2, "window": 16, "w_last": 8}
    config = ConvertConfig(
        mixer_init="attention",
        mixer="streaming",
        ratio=0.5,
        select="lazy",
        mixer_settings=settings,
        calibration_docs=3,
        calibration_len=64,
    )
    hybrid = convert(tiny_llama, config, tokenizer=tokenizer)
    blocks = calibration_blocks(tokenizer, num_blocks=3, seq_len=64)
    expected = laziest_layers(measure_lazy_ratios(tiny_llama, blocks, sinks=2, window=16, w_last=8), 2)
    assert [i for i, t in enumerate(hybrid.config.mixer_types) if t == "streaming"] == expected
    metrics = hybrid.hybridize_steps[-1]["metrics"]
    assert metrics["converted_layers"] == expected and len(metrics["lazy_ratio"]) == 4


def test_random_selection_repeats_with_its_seed(tiny_llama):
    runs = [
        convert(tiny_llama, ConvertConfig(mixer_init="attention", mixer="streaming", select="random", seed=s))
        for s in (1, 1, 2)
    ]
    assert runs[0].config.mixer_types == runs[1].config.mixer_types
    assert runs[0].config.mixer_types.count("streaming") == 2
    assert random_layers(30, 0.5, 1) != random_layers(30, 0.5, 2) and len(random_layers(30, 0.5, 1)) == 15


def test_dynamic_selection_is_every_layer_with_p_full(tiny_llama):
    hybrid = convert(
        tiny_llama, ConvertConfig(mixer_init="attention", mixer="streaming", ratio=0.75, select="dynamic")
    )
    assert hybrid.config.mixer_types == ["streaming"] * 4
    assert hybrid.config.mixers["streaming"]["dynamic_full_layers"] == 1
    assert hybrid.hybridize_steps[-1]["config"]["mixer_settings"]["dynamic_full_layers"] == 1


def test_selection_errors(tiny_llama):
    with pytest.raises(ConfigError, match="use mixer='streaming'"):
        ConvertConfig(mixer_init="attention", select="dynamic")
    with pytest.raises(ConfigError, match="attn_layers"):
        ConvertConfig(mixer_init="attention", mixer="streaming", select="dynamic", attn_layers=(1,))
    with pytest.raises(ConfigError, match="select 'kl' is not supported"):
        ConvertConfig(mixer_init="attention", select="kl")
    with pytest.raises(ConfigError, match="tokenizer"):
        convert(tiny_llama, ConvertConfig(mixer_init="attention", mixer="streaming", select="lazy"))
    with pytest.raises(ConfigError, match="must exceed sinks \\+ window = 1024"):
        convert(
            tiny_llama,
            ConvertConfig(mixer_init="attention", mixer="streaming", select="lazy", calibration_len=1024),
            tokenizer=word_tokenizer(),
        )
    with pytest.raises(ConfigError, match="bad streaming settings"):
        convert(tiny_llama, ConvertConfig(mixer_init="attention", mixer="streaming", mixer_settings={"window": 0}))
