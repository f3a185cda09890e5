"""Calibrated readouts and sensitivity-chosen layers on tiny models: the fit is the closed-form least-squares
solution, it never starts worse than a removed mixer, layers are fitted in order on the hybrid's own stream, and a
layer made fragile is the one sensitivity keeps as attention."""

import pytest
import torch
from tiny import fragile_tiny, make_tiny, word_tokenizer

from hybridize.configs.convert import CONVERT_MIXERS, MIXER_INITS
from hybridize.convert import INITIALIZERS, ConvertConfig, convert
from hybridize.convert import sensitivity as sensitivity_module
from hybridize.convert.calibrated import NormalEquations, calibrate_readouts, choose_readout, mixer_features
from hybridize.errors import ConfigError


def _calibrated(source, calibration, **kwargs):
    config = ConvertConfig(
        ratio=0.5, mixer_init="calibrated", calibration=calibration, calibration_docs=4, calibration_len=64, **kwargs
    )
    return convert(source, config, tokenizer=word_tokenizer())


def test_normal_equations_solve_is_least_squares():
    z, y = torch.randn(200, 7, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    eqs = NormalEquations.empty(7, 3)
    eqs.add(z[:120], y[:120])
    eqs.add(z[120:], y[120:])
    torch.testing.assert_close(eqs.solve(0.0), torch.linalg.lstsq(z, y).solution)
    w = torch.randn(7, 3, dtype=torch.float64)
    assert eqs.error(w) == pytest.approx(float(((y - z @ w) ** 2).sum()) / 200)
    ridge = 0.1 * eqs.zz.diagonal().mean()
    torch.testing.assert_close(
        eqs.solve(0.1), torch.linalg.solve(z.T @ z + ridge * torch.eye(7, dtype=z.dtype), z.T @ y)
    )


def test_choose_readout_recovers_a_linear_readout_and_prefers_zero_for_noise():
    z = torch.randn(400, 5, dtype=torch.float64)
    w_true = torch.randn(5, 2, dtype=torch.float64)
    train, held = NormalEquations.empty(5, 2), NormalEquations.empty(5, 2)
    train.add(z[:300], z[:300] @ w_true + 0.01 * torch.randn(300, 2, dtype=torch.float64))
    held.add(z[300:], z[300:] @ w_true + 0.01 * torch.randn(100, 2, dtype=torch.float64))
    w, report = choose_readout(train, held, torch.zeros(5, 2, dtype=torch.float64))
    assert report["choice"].startswith("ridge=")
    torch.testing.assert_close(w, w_true, rtol=0, atol=0.01)
    # targets the features cannot explain: the zero readout wins on held-out tokens over a fit of the noise
    train, held = NormalEquations.empty(5, 2), NormalEquations.empty(5, 2)
    train.add(z[:8], torch.randn(8, 2, dtype=torch.float64))
    held.add(z[8:], torch.randn(392, 2, dtype=torch.float64))
    _, report = choose_readout(train, held, 10 * torch.randn(5, 2, dtype=torch.float64))
    assert report["choice"] in ("zero", "ridge=1")  # the strongest shrinkage, or none of the fit at all


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_calibrated_readout_is_the_closed_form_fit_on_the_hybrids_own_stream(family, calibration_text):
    source = make_tiny(family).double()
    hybrid = _calibrated(source, calibration_text)
    converted = hybrid.hybridize_steps[-1]["metrics"]["converted_layers"]
    reports = hybrid.hybridize_steps[-1]["metrics"]["readout"]
    assert sorted(int(i) for i in reports) == converted

    # Rebuild the normal equations of every converted layer by hand, in order, on the calibrated hybrid's stream
    from hybridize.io.calibration import calibration_blocks

    blocks = calibration_blocks(word_tokenizer(), calibration_text, num_blocks=4, seq_len=64)
    heldout_block = 3  # every fourth block chooses the ridge strength
    h = hybrid.model.embed_tokens(blocks)
    pe = hybrid.model.rotary_emb(h, position_ids=torch.arange(64)[None])
    with torch.no_grad():
        for i, layer in enumerate(hybrid.model.layers):
            if i in converted:
                x = layer.input_layernorm(h)
                z = mixer_features(layer.mixer, x, pe)
                y = source.model.layers[i].self_attn(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
                z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1, y.shape[-1])
                readout = layer.mixer.out_proj
                if readout.bias is not None:
                    z = torch.cat([z, torch.ones_like(z[:, :1])], -1)
                choice = reports[str(i)]["choice"]
                if choice.startswith("ridge="):  # the refit on every block with the chosen strength
                    ridge = float(choice.removeprefix("ridge=")) * (z * z).sum(0).mean()
                    expected = torch.linalg.solve(z.T @ z + ridge * torch.eye(z.shape[1], dtype=z.dtype), z.T @ y)
                    got = readout.weight.T
                    if readout.bias is not None:
                        got = torch.cat([got, readout.bias[None]])
                    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
                # on the held-out block the fit is never worse than a zeroed readout
                rows = slice(heldout_block * 64, (heldout_block + 1) * 64)
                fitted = (
                    (y[rows] - layer.mixer.out_proj(mixer_features(layer.mixer, x, pe)).reshape(-1, y.shape[1])[rows])
                    ** 2
                ).sum()
                assert fitted <= (y[rows] ** 2).sum() + 1e-9
            h = layer(h, position_embeddings=pe, causal_mask=None, padding_mask=None)
    assert all(r["choice"].startswith("ridge=") for r in reports.values())  # the features do explain the attention


def test_calibrated_starts_closer_than_the_published_mapping(calibration_text):
    source = make_tiny("llama")
    blocks = torch.randint(2, 128, (2, 48))
    with torch.no_grad():
        reference = torch.log_softmax(source(blocks).logits, -1)

        def kl(model):
            log_q = torch.log_softmax(model(blocks).logits, -1)
            return float((reference.exp() * (reference - log_q)).sum(-1).mean())

        mapped = convert(source, ConvertConfig(ratio=0.5, mixer_init="attention"))
        assert kl(_calibrated(source, calibration_text)) < kl(mapped)


def test_zero_init_zeroes_the_readout_only():
    source = make_tiny("llama")
    zero = convert(source, ConvertConfig(ratio=0.5, mixer_init="zero"))
    mapped = convert(source, ConvertConfig(ratio=0.5, mixer_init="attention"))
    for a, b in zip(zero.model.layers, mapped.model.layers):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            if a.mixer_type == "mamba2" and name == "mixer.out_proj.weight":
                assert (p == 0).all()
            else:
                torch.testing.assert_close(p, q)


def test_nha_calibration_refits_o_proj_only(calibration_text):
    source = make_tiny("llama")
    config = dict(mixer="nha", mixer_settings={"window": 1, "slots": 2})
    hybrid = _calibrated(source, calibration_text, **config)
    mapped = convert(source, ConvertConfig(ratio=0.5, mixer_init="attention", **config))
    metrics = hybrid.hybridize_steps[-1]["metrics"]
    assert sorted(int(i) for i in metrics["readout"]) == metrics["converted_layers"]
    for i, report in metrics["readout"].items():
        # the source's o_proj is a candidate: the chosen readout is never worse on held-out calibration blocks
        assert report["heldout_mse"] <= min(report["heldout_mse_current"], report["heldout_mse_zero"])
        a, b = hybrid.model.layers[int(i)].mixer, mapped.model.layers[int(i)].mixer
        assert torch.equal(a.o_proj.weight, b.o_proj.weight) == (report["choice"] == "current")
        for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
            torch.testing.assert_close(getattr(a, name).weight, getattr(b, name).weight)
    assert any(r["choice"] != "current" for r in metrics["readout"].values())


def test_calibration_needs_a_tokenizer_and_a_readout():
    with pytest.raises(ConfigError, match="tokenizer"):
        convert(make_tiny("llama"), ConvertConfig(ratio=0.5, mixer_init="calibrated"))
    with pytest.raises(ConfigError, match="streaming"):
        ConvertConfig(mixer="streaming", mixer_init="calibrated")


@pytest.mark.parametrize("mixer", sorted(CONVERT_MIXERS))
def test_sensitivity_keeps_the_fragile_layer(mixer, calibration_text, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    settings = {"streaming": {"sinks": 1, "window": 4}, "nha": {"window": 2, "slots": 2}}.get(mixer, {})
    init = "calibrated" if MIXER_INITS[mixer].has_readout else "attention"
    config = ConvertConfig(
        mixer=mixer,
        ratio=0.75,
        select="sensitivity",
        mixer_init=init,
        mixer_settings=settings,
        calibration=calibration_text,
        calibration_docs=4,
        calibration_len=64,
    )
    hybrid = convert(fragile_tiny(2), config, tokenizer=word_tokenizer())
    metrics = hybrid.hybridize_steps[-1]["metrics"]
    scores = metrics["sensitivity_kl"]
    assert max(range(4), key=scores.__getitem__) == 2
    assert hybrid.config.mixer_types[2] == "attention"
    assert metrics["converted_layers"] == [0, 1, 3]


def test_sensitivity_scores_are_cached(calibration_text, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    config = ConvertConfig(
        ratio=0.5,
        select="sensitivity",
        mixer_init="calibrated",
        calibration=calibration_text,
        calibration_docs=4,
        calibration_len=64,
    )
    source, tokenizer = fragile_tiny(1), word_tokenizer()
    first = sensitivity_module.layer_sensitivity(source, config, tokenizer)
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(sensitivity_module, "measure_sensitivity", fail)
    assert sensitivity_module.layer_sensitivity(source, config, tokenizer) == first
    # another ratio reads the same scores
    convert(source, ConvertConfig(**{**config.__dict__, "ratio": 0.25}), tokenizer=tokenizer)
    with pytest.raises(AssertionError, match="measured again"):  # another mixer init is another measurement
        sensitivity_module.layer_sensitivity(
            source, ConvertConfig(**{**config.__dict__, "mixer_init": "zero"}), tokenizer
        )


def test_a_new_initializer_version_keys_other_scores(monkeypatch):
    """Raising one mixer's `Initializer.version` changes its cache key, and no other mixer's."""
    import dataclasses

    source, blocks = make_tiny("llama"), torch.randint(0, 128, (2, 16))
    config = ConvertConfig(ratio=0.5, mixer_init="calibrated")
    before = sensitivity_module.cache_key(source, config, blocks)
    nha = sensitivity_module.cache_key(source, ConvertConfig(mixer="nha", mixer_init="calibrated"), blocks)
    monkeypatch.setitem(INITIALIZERS, "mamba2", dataclasses.replace(INITIALIZERS["mamba2"], version=2))
    assert sensitivity_module.cache_key(source, config, blocks) != before
    assert sensitivity_module.cache_key(source, ConvertConfig(mixer="nha", mixer_init="calibrated"), blocks) == nha


def test_calibrate_readouts_changes_only_the_readouts_and_restores_the_mode(calibration_text):
    source = make_tiny("llama")
    before = {k: v.clone() for k, v in source.state_dict().items()}
    hybrid = convert(source, ConvertConfig(ratio=0.5, mixer_init="attention")).train()
    mapped = {k: v.clone() for k, v in hybrid.state_dict().items()}
    blocks = torch.randint(2, 128, (2, 32))
    calibrate_readouts(source, hybrid, blocks, [0, 2])  # no mixer-specific fit: the readouts alone
    changed = {k for k, v in hybrid.state_dict().items() if not torch.equal(v, mapped[k])}
    assert changed == {f"model.layers.{i}.mixer.out_proj.weight" for i in (0, 2)}
    calibrate_readouts(source, hybrid, blocks, [0, 2], calibrate=INITIALIZERS["mamba2"].calibrate)
    assert hybrid.training and not source.training
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())
    changed = {k for k, v in hybrid.state_dict().items() if not torch.equal(v, mapped[k])}
    # the readouts, Mamba2's conv taps and D (`convert.mamba2.linearize_features`), its gate and dt rows of in_proj
    # and its decays (`fit_gate`, `fit_decay`)
    fitted = ("out_proj.weight", "conv1d.weight", "D", "in_proj.weight", "A_log", "dt_bias")
    assert changed == {f"model.layers.{i}.mixer.{name}" for i in (0, 2) for name in fitted}


def test_calibration_is_causal_under_eager_attention(calibration_text):
    """The targets and the stream are causal whatever the attention implementation: eager attention with no mask
    would attend both ways."""
    results = []
    for implementation in ("sdpa", "eager"):
        source = make_tiny("llama").double()
        source.config._attn_implementation = implementation
        hybrid = convert(source, ConvertConfig(ratio=0.5, mixer_init="attention")).double()
        hybrid.config._attn_implementation = implementation
        reports = calibrate_readouts(source, hybrid, torch.randint(2, 128, (2, 32)), [0, 2])
        results.append((hybrid.model.layers[2].mixer.out_proj.weight.clone(), reports))
    torch.testing.assert_close(results[0][0], results[1][0])
