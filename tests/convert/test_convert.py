"""convert(): ratio 0 reproduces the source, the MambaInLlama weight mapping, layer selection, config errors."""

import pytest
import torch

from hybridize.configs.convert import Mamba2InitConfig, MixerInit
from hybridize.convert import ConvertConfig, convert
from hybridize.convert.selection import select_layers, uniform_layers
from hybridize.errors import ConfigError, UnsupportedModelError


def test_ratio_zero_reproduces_source_logits(tiny_source):
    hybrid = convert(tiny_source, ConvertConfig(mixer_init="attention", ratio=0.0))
    ids = torch.randint(0, 128, (2, 23))
    assert hybrid.config.mixer_types == ["attention"] * 4
    torch.testing.assert_close(hybrid(ids).logits, tiny_source(ids).logits, rtol=0, atol=0)


def test_source_is_untouched_and_shares_no_tensors(tiny_source):
    before = {k: v.clone() for k, v in tiny_source.state_dict().items()}
    hybrid = convert(tiny_source, ConvertConfig(mixer_init="attention", ratio=0.5))
    with torch.no_grad():
        for p in hybrid.parameters():
            p.add_(1.0)
    for k, v in tiny_source.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mambainllama_mapping(tiny_source):
    hybrid = convert(tiny_source, ConvertConfig(mixer_init="attention", ratio=0.5))
    assert hybrid.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    for i in (0, 2):
        attn, mixer = tiny_source.model.layers[i].self_attn, hybrid.model.layers[i].mixer
        z, x, B, C, dt = mixer.in_proj.weight.split([64, 32, 32, 64, 4])
        assert torch.equal(x, attn.v_proj.weight) and torch.equal(B, attn.k_proj.weight)
        assert torch.equal(C, attn.q_proj.weight) and torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        if attn.q_proj.bias is not None:  # Qwen2: q/k/v biases follow their weights, the new rows get none
            zb, xb, Bb, Cb, dtb = mixer.in_proj.bias.split([64, 32, 32, 64, 4])
            assert torch.equal(xb, attn.v_proj.bias) and torch.equal(Cb, attn.q_proj.bias)
            assert not zb.any() and not dtb.any()
        dt0 = torch.nn.functional.softplus(mixer.dt_bias)
        assert ((dt0 > 1e-3 - 1e-6) & (dt0 < 1e-1 + 1e-6)).all()
        assert ((-torch.exp(mixer.A_log) <= -1) & (-torch.exp(mixer.A_log) >= -16)).all()
    for i in (1, 3):  # kept layers are the source's
        for name, p in tiny_source.model.layers[i].self_attn.named_parameters():
            assert torch.equal(p, hybrid.model.layers[i].mixer.get_parameter(name))


def test_random_mixer_init_changes_only_the_reused_weights(tiny_source):
    reused = convert(tiny_source, ConvertConfig(mixer_init="attention", ratio=0.5, seed=5))
    fresh = convert(tiny_source, ConvertConfig(ratio=0.5, seed=5, mixer_init="random"))
    for i in (0, 2):
        a, b = reused.model.layers[i].mixer, fresh.model.layers[i].mixer
        attn = tiny_source.model.layers[i].self_attn
        za, xa, Ba, Ca, dta = a.in_proj.weight.split([64, 32, 32, 64, 4])
        zb, xb, Bb, Cb, dtb = b.in_proj.weight.split([64, 32, 32, 64, 4])
        assert torch.equal(za, zb) and torch.equal(dta, dtb)  # the new rows are drawn the same way
        for name in ("dt_bias", "A_log", "D", "conv1d.weight", "norm.weight"):
            assert torch.equal(a.get_parameter(name), b.get_parameter(name)), name
        assert not torch.equal(xb, attn.v_proj.weight) and not torch.equal(b.out_proj.weight, attn.o_proj.weight)
        assert xb.abs().max() <= 64**-0.5 and b.out_proj.weight.abs().max() <= 64**-0.5  # nn.Linear's default bound
    with pytest.raises(ConfigError, match="Mamba2 ablation"):
        ConvertConfig(mixer="streaming", mixer_init="random")
    with pytest.raises(ConfigError, match="mixer_init"):
        ConvertConfig(mixer_init="zeros")


def test_delta_conv_makes_the_mixer_linear_attention_with_decay(tiny_llama):
    """With a delta conv, D = 0 and the gate/norm bypassed, the converted layer is causal linear attention over
    silu(q), silu(k), silu(v) with per-head decay: MambaInLlama's warm start, checked by hand."""
    hybrid = convert(tiny_llama, ConvertConfig(mixer_init="attention", ratio=1.0, conv_init="delta")).double()
    mixer = hybrid.model.layers[0].mixer
    with torch.no_grad():
        mixer.D.zero_()
    u = torch.randn(1, 9, 64, dtype=torch.float64)
    x, dt, B, C, _, _ = mixer._project_and_convolve(u, None, None)
    attn = tiny_llama.model.layers[0].self_attn.double()
    silu = torch.nn.functional.silu
    q = silu(attn.q_proj(u)).view(1, 9, 4, 16)
    k = silu(attn.k_proj(u)).view(1, 9, 2, 16).repeat_interleave(2, 2)
    v = silu(attn.v_proj(u)).view(1, 9, 2, 16).repeat_interleave(2, 2)
    torch.testing.assert_close(C, q), torch.testing.assert_close(B, k), torch.testing.assert_close(x, v)
    from hybridize.modeling.mamba2 import mamba2_scan_chunked

    A = -torch.exp(mixer.A_log)
    y, _ = mamba2_scan_chunked(x, dt, A, B, C, mixer.D, chunk_size=4)
    decay = torch.cumsum(dt * A, 1)  # (1, l, h)
    weights = torch.exp(decay[:, :, None] - decay[:, None]) * dt[:, None]  # [t, s] = exp(sum_{s<r<=t} dt A) dt_s
    scores = torch.einsum("bthn,bshn->bhts", q, k) * weights.permute(0, 3, 1, 2) * torch.ones(9, 9).tril()
    torch.testing.assert_close(y, torch.einsum("bhts,bshp->bthp", scores, v))


def test_same_seed_same_model(tiny_llama):
    a = convert(tiny_llama, ConvertConfig(mixer_init="attention", ratio=0.5, conv_init="random", seed=3))
    b = convert(tiny_llama, ConvertConfig(mixer_init="attention", ratio=0.5, conv_init="random", seed=3))
    c = convert(tiny_llama, ConvertConfig(mixer_init="attention", ratio=0.5, conv_init="random", seed=4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mixer.conv1d.weight, c.model.layers[0].mixer.conv1d.weight)


@pytest.mark.parametrize(
    "num_layers, ratio, expected",
    [
        (32, 0.5, list(range(0, 32, 2))),
        (32, 0.25, list(range(0, 32, 4))),
        (32, 0.75, [i for i in range(32) if i % 4 != 3]),  # MambaInLlama: attention at 3, 7, ..., 31
        (32, 0.875, [i for i in range(32) if i % 8 != 7]),
        (30, 0.5, list(range(0, 30, 2))),
        (30, 1.0, list(range(30))),
        (30, 0.0, []),
    ],
)
def test_uniform_selection_matches_mambainllama(num_layers, ratio, expected):
    assert uniform_layers(num_layers, ratio) == expected


def test_explicit_attention_layers():
    assert select_layers(6, ratio=0.5, attn_layers=(1, 3, 5)) == [0, 2, 4]
    with pytest.raises(ConfigError, match="out of range"):
        select_layers(6, ratio=0.5, attn_layers=(6,))


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="ratio must be in \\[0, 1\\]"):
        ConvertConfig(mixer_init="attention", ratio=ratio)


def test_bad_mixer_and_conv_init():
    with pytest.raises(ConfigError, match="mixer 'rwkv' is not supported"):
        ConvertConfig(mixer_init="attention", mixer="rwkv")
    with pytest.raises(ConfigError, match="conv_init"):
        ConvertConfig(mixer_init="attention", conv_init="identity")


def test_unsupported_architecture_stops_before_work():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        convert(gpt2, ConvertConfig(mixer_init="attention"))


def test_conversion_is_recorded(tiny_llama):
    hybrid = convert(tiny_llama, ConvertConfig(mixer_init="attention", ratio=0.5))
    (step,) = hybrid.hybridize_steps
    assert step["step"] == "convert" and step["config"]["ratio"] == 0.5
    assert step["metrics"]["converted_layers"] == [0, 2]


def test_bad_mixer_settings_stop_before_work(tiny_llama):
    with pytest.raises(ConfigError, match="bad mamba2 settings"):
        convert(tiny_llama, ConvertConfig(mixer_init="attention", mixer_settings={"chunk": 3}))
    with pytest.raises(ConfigError, match="bad mamba2 settings"):
        convert(tiny_llama, ConvertConfig(mixer_init="attention", mixer_settings={"chunk_size": 0}))


def test_init_options_are_the_mixers_and_conv_init_folds_into_them(tiny_llama):
    """`init_options` is checked by the mixer's options class in `MIXER_INITS`; `conv_init` is the same Mamba2
    option given as a field: either way gives the same model, and two different values are refused."""
    by_field = ConvertConfig(mixer_init="attention", ratio=0.5, conv_init="random", seed=3)
    by_option = ConvertConfig(mixer_init="attention", ratio=0.5, init_options={"conv_init": "random"}, seed=3)
    assert by_field == by_option and by_option.conv_init == "random"
    assert by_option.init_config == Mamba2InitConfig(conv_init="random")
    a, b = convert(tiny_llama, by_field), convert(tiny_llama, by_option)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.hybridize_steps[-1]["config"]["init_options"] == {"conv_init": "random"}
    default = ConvertConfig(mixer_init="attention")
    assert default.init_options == {"conv_init": "delta"} and default.conv_init == "delta"
    assert ConvertConfig(mixer="nha").init_options == {} and ConvertConfig(mixer="nha").conv_init is None
    with pytest.raises(ConfigError, match="disagree"):
        ConvertConfig(conv_init="random", init_options={"conv_init": "delta"})
    with pytest.raises(ConfigError, match=r"\['conv_init'\] do not apply to the nha mixer"):
        ConvertConfig(mixer="nha", conv_init="random")
    with pytest.raises(ConfigError, match=r"\['taps'\] do not apply to the mamba2 mixer.*\['conv_init'\]"):
        ConvertConfig(init_options={"taps": 3})
    with pytest.raises(ConfigError, match="conv_init='identity' is not one of"):
        ConvertConfig(init_options={"conv_init": "identity"})


def test_a_mixer_init_entry_added_later_is_convertible(monkeypatch):
    """`ConvertConfig` reads `MIXER_INITS` when it checks itself, so a mixer registered at run time (a test's toy)
    is accepted with its own options class and init choices."""
    from dataclasses import dataclass

    from hybridize.configs import convert as convert_configs

    @dataclass(frozen=True, kw_only=True)
    class ToyInitConfig:
        decay: float = 0.5

    with pytest.raises(ConfigError, match="mixer 'toy' is not supported"):
        ConvertConfig(mixer="toy")
    monkeypatch.setitem(convert_configs.MIXER_INITS, "toy", MixerInit(options_class=ToyInitConfig))
    config = ConvertConfig(mixer="toy", init_options={"decay": 0.9})
    assert config.mixer_init == "attention" and config.init_options == {"decay": 0.9}
    assert "toy" in convert_configs.CONVERT_MIXERS
    with pytest.raises(ConfigError, match="sets the readout of a new mixer"):
        ConvertConfig(mixer="toy", mixer_init="zero")
