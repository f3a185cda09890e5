"""fuse(): a model fused with a copy of itself whose every permutable axis is permuted gives the model back (and plain
averaging does not), the transport maps, heterogeneous fusion, families, any number of models, errors and the CLI."""

import pytest
import torch
from tiny import make_tiny, run_cli, word_tokenizer
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.compress.fuse import (
    FuseConfig,
    check_fuse,
    consumer_map,
    fuse,
    grouped_plan,
    permuted,
    producer_map,
    solve,
)
from hybridize.convert import ConvertConfig, convert
from hybridize.errors import ConfigError, UnsupportedModelError
from hybridize.modeling import HybridForCausalLM

IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))


def _hybrid(family="llama", ratio=0.5, seed=0, **overrides):
    """A tiny hybrid: mamba2, attention, mamba2, attention."""
    return convert(
        make_tiny(family, seed=seed, **overrides), ConvertConfig(mixer_init="attention", ratio=ratio)
    ).eval()


def _blocks(n=4, seq_len=48):
    return torch.randint(2, 128, (n, seq_len), generator=torch.Generator().manual_seed(1))


def test_permuted_copy_computes_the_same_function():
    model = _hybrid()
    shuffled = permuted(model)
    torch.testing.assert_close(shuffled(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(shuffled.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    ("align", "solver"),
    [("activations", "emd"), ("weights", "emd"), ("activations", "sinkhorn"), ("weights", "sinkhorn")],
)
def test_fusing_a_permuted_copy_gives_the_model_back(align, solver):
    model = _hybrid()
    reference = model(IDS).logits
    config = FuseConfig(align=align, solver=solver, reg=0.01)
    fused = fuse([model, permuted(model)], config, calibration=_blocks())
    torch.testing.assert_close(fused(IDS).logits, reference, rtol=1e-4, atol=1e-4)
    plain = fuse([model, permuted(model)], FuseConfig(align="none"))
    assert (plain(IDS).logits - reference).abs().max() > 0.1


def test_default_sinkhorn_stays_close_to_the_model():
    model = _hybrid()
    reference = model(IDS).logits
    fused = fuse([model, permuted(model)], FuseConfig(solver="sinkhorn"), calibration=_blocks())
    plain = fuse([model, permuted(model)], FuseConfig(align="none"))
    assert (fused(IDS).logits - reference).abs().max() < 0.5 * (plain(IDS).logits - reference).abs().max()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_fusion_of_each_family(family, tmp_path):
    a, b = _hybrid(family, seed=0), _hybrid(family, seed=1)
    fused = fuse([a, b], FuseConfig(), calibration=_blocks(2, 32))
    assert fused.config.source_model_type == family and fused.config.hidden_size == a.config.hidden_size
    assert torch.isfinite(fused(IDS).logits).all()
    hybridize.save(fused, tmp_path / "fused")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    torch.testing.assert_close(loaded(IDS).logits, fused(IDS).logits)
    assert loaded.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)
    assert [step["step"] for step in fused.hybridize_steps][-1] == "fuse"


def test_dense_sources_and_three_models_with_weights():
    sources = [make_tiny("llama", seed=s) for s in range(3)]
    fused = fuse(sources, FuseConfig(align="weights", weights=(2, 1, 1)))
    assert isinstance(fused, HybridForCausalLM) and set(fused.config.mixer_types) == {"attention"}
    assert fused.hybridize_steps[-1]["config"]["weights"] == (0.5, 0.25, 0.25)
    # aligned with weights (1, 0, 0) the anchor comes back unchanged
    alone = fuse(sources, FuseConfig(align="weights", weights=(1, 0, 0)))
    torch.testing.assert_close(alone(IDS).logits, sources[0](IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("align", ["activations", "weights"])
def test_heterogeneous_fusion_into_a_narrower_anchor(align):
    model = _hybrid()
    fused = fuse([model, permuted(model)], FuseConfig(align=align, width=0.5), calibration=_blocks())
    c = fused.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads) == (32, 64, 2)
    assert c.num_key_value_heads == 2 and c.mixers["mamba2"]["num_heads"] == 2
    assert torch.isfinite(fused(IDS).logits).all()
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())


def test_merging_duplicate_neurons_is_exact():
    """A layer whose 2k neurons are k duplicated pairs merges into k neurons with the same output (average in, sum
    out)."""
    generator = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(3, 5, generator=generator), torch.randn(4, 3, generator=generator)
    w_in, w_out = torch.cat([w_in, w_in]), torch.cat([w_out, w_out], 1) / 2  # (6, 5), (4, 6): same function
    x = torch.randn(7, 5, generator=generator)
    cost = torch.cdist(w_in.double(), w_in[:3].double())
    plan = solve(cost, "emd", 0.0)
    merged_in = producer_map(plan).float() @ w_in
    merged_out = w_out @ consumer_map(plan).float().T
    torch.testing.assert_close(torch.relu(x @ merged_in.T) @ merged_out.T, torch.relu(x @ w_in.T) @ w_out.T)


def test_grouped_plan_keeps_heads_inside_their_groups():
    generator = torch.Generator().manual_seed(0)
    group_plan, head_plan = grouped_plan(torch.rand(6, 6, generator=generator), 3, None, "sinkhorn", 0.05)
    assert torch.allclose(head_plan.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-6)
    for ga in range(3):  # the mass a group sends to another is the group plan's
        for gb in range(3):
            block = head_plan[2 * ga : 2 * ga + 2, 2 * gb : 2 * gb + 2]
            assert block.sum().item() == pytest.approx(group_plan[ga, gb].item(), abs=1e-6)


def test_bad_inputs():
    llama, qwen = _hybrid("llama"), _hybrid("qwen2")
    with pytest.raises(ConfigError, match="'qwen2' model but the anchor is 'llama'"):
        fuse([llama, qwen], FuseConfig(align="weights"))
    with pytest.raises(ConfigError, match="vocab_size=256"):
        fuse([llama, _hybrid("llama", vocab_size=256)], FuseConfig(align="weights"))
    with pytest.raises(ConfigError, match="mixer_types"):
        fuse([llama, _hybrid("llama", ratio=0.0)], FuseConfig(align="weights"))
    with pytest.raises(ConfigError, match="at least two models"):
        fuse([llama], FuseConfig())
    with pytest.raises(ConfigError, match="3 weights given for 2 models"):
        check_fuse([llama.config, llama.config], FuseConfig(weights=(1, 1, 1)))
    with pytest.raises(ConfigError, match="pass the anchor's tokenizer"):
        fuse([llama, llama], FuseConfig())
    nha = convert(
        make_tiny("llama"),
        ConvertConfig(mixer_init="attention", mixer="streaming", ratio=0.5, mixer_settings={"window": 8}),
    )
    with pytest.raises(UnsupportedModelError, match="streaming"):
        check_fuse([nha.config, nha.config], FuseConfig())
    kernel = convert(
        make_tiny("llama"), ConvertConfig(mixer_init="attention", ratio=0.5, mixer_settings={"conv_kernel": 2})
    )
    with pytest.raises(ConfigError, match="mamba2 settings .*'conv_kernel': 2"):
        check_fuse([_hybrid().config, kernel.config], FuseConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0.0}, "width must be in \\(0, 1\\]"),
        ({"width": 1.5}, "width must be in \\(0, 1\\]"),
        ({"align": "random"}, "align 'random'"),
        ({"solver": "greedy"}, "solver 'greedy'"),
        ({"reg": 0.0}, "reg must be positive"),
        ({"weights": (1, -1)}, "non-negative"),
        ({"width_axes": ("depth",)}, "width_axes"),
        ({"align": "none", "width": 0.5}, "width < 1"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FuseConfig(**kwargs)


def test_cli(tmp_path):
    tokenizer = word_tokenizer()
    model = _hybrid()
    hybridize.save(model, tmp_path / "a", tokenizer=tokenizer)
    hybridize.save(permuted(model), tmp_path / "b", tokenizer=tokenizer)
    code, out = run_cli(
        "fuse", tmp_path / "a", tmp_path / "b", "--align", "weights", "--weights", "0.5,0.5", "-o", tmp_path / "f"
    )
    assert code == 0, out
    assert "fused 2 models" in out
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    torch.testing.assert_close(fused(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)
    code, out = run_cli("fuse", tmp_path / "a", tmp_path / "b", "--width", "2", "-o", tmp_path / "bad")
    assert code == 1 and "width must be in (0, 1]" in out and not (tmp_path / "bad").exists()
