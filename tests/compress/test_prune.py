"""prune(): full size is the identity, a pruned model equals the original with the pruned channels zeroed, group
structure, the parameter formula, the `params` search, save/load/generate, dense sources, errors and the CLI."""

import copy
import json

import pytest
import torch
from tiny import make_tiny, run_cli, word_tokenizer
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.compress.prune import (
    Importance,
    PruneConfig,
    PruneShape,
    check_prune,
    count_params,
    measure_importance,
    model_shape,
    prune,
    select,
)
from hybridize.convert import ConvertConfig, as_hybrid, convert
from hybridize.errors import ConfigError
from hybridize.modeling import HybridForCausalLM, Mamba2Mixer

FULL = {"hidden": 64, "ffn": 128, "attn_heads": 4, "ssm_heads": 4, "ssm_head_dim": 16, "drop_layers": 0}
AXIS_CASES = {
    "ffn": {"ffn": 48},
    "attn_heads": {"attn_heads": 2},
    "ssm_heads": {"ssm_heads": 2},
    "ssm_head_dim": {"ssm_head_dim": 8},
    "hidden": {"hidden": 40},
    "depth": {"drop_layers": 1},
    "all": {"hidden": 48, "ffn": 64, "attn_heads": 2, "ssm_heads": 2, "ssm_head_dim": 12, "drop_layers": 1},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared machine
    yield
    torch.set_num_threads(threads)


def _hybrid(family="llama", ratio=0.5, mixer="mamba2", **overrides):
    """A tiny hybrid (mamba2, attention, mamba2, attention) in float64 with a negligible norm epsilon, so that a
    pruned model and the zeroed original agree to rounding."""
    source = make_tiny(family, rms_norm_eps=1e-12, **overrides)
    return convert(source, ConvertConfig(mixer=mixer, mixer_init="attention", ratio=ratio)).double().eval()


def _blocks(n=6, seq_len=24):
    return torch.randint(2, 128, (n, seq_len), generator=torch.Generator().manual_seed(1))


IDS = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(2))


def _dropped(kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


@torch.no_grad()
def _zeroed(model: HybridForCausalLM, kept) -> HybridForCausalLM:
    """The original model with every pruned channel, head and layer zeroed (the pruned model's definition)."""
    model = copy.deepcopy(model)
    full = model_shape(model.config)
    hidden = _dropped(kept.hidden, full.hidden)
    model.model.embed_tokens.weight[:, hidden] = 0  # and the tied head
    for i, layer in enumerate(model.model.layers):
        mixer = layer.mixer
        outputs = [layer.mlp.down_proj, mixer.out_proj if isinstance(mixer, Mamba2Mixer) else mixer.o_proj]
        for linear in outputs:  # nothing is ever written into a pruned residual channel
            linear.weight[hidden] = 0
            if linear.bias is not None:
                linear.bias[hidden] = 0
        if i not in kept.layers:  # a layer whose mixer and MLP add nothing is the identity
            for linear in outputs:
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
            continue
        layer.mlp.down_proj.weight[:, _dropped(kept.ffn[i], full.ffn)] = 0
        if isinstance(mixer, Mamba2Mixer):
            s = mixer.settings
            heads = _dropped(kept.ssm_heads[i], s.num_heads)
            cols = (heads[:, None] * s.head_dim + torch.arange(s.head_dim)).flatten()
            mixer.out_proj.weight[:, cols] = 0
            channels = _dropped(kept.ssm_channels[i], s.head_dim)
            x = (torch.arange(s.num_groups)[:, None] * s.head_dim + channels).flatten()
            mixer.in_proj.weight[mixer.inner_size + x] = 0  # x = silu(conv(0) + 0) = 0, so y = 0 there
            if mixer.in_proj.bias is not None:
                mixer.in_proj.bias[mixer.inner_size + x] = 0
            mixer.conv1d.bias[x] = 0
        else:  # attention and Gated DeltaNet: a dropped query head writes nothing into o_proj
            heads = _dropped(kept.attn_heads[i], model.config.num_attention_heads)
            size = model.config.head_dim
            mixer.o_proj.weight[:, (heads[:, None] * size + torch.arange(size)).flatten()] = 0
    return model


def _target(model, **axes) -> PruneShape:
    return check_prune(model.config, PruneConfig(**axes))


def test_full_size_is_the_identity(tiny_source):
    hybrid = convert(tiny_source, ConvertConfig(mixer_init="attention", ratio=0.5)).eval()
    pruned = prune(hybrid, PruneConfig(**FULL, num_blocks=2), blocks=_blocks())
    torch.testing.assert_close(pruned(IDS).logits, hybrid(IDS).logits, rtol=0, atol=0)
    for name, tensor in hybrid.state_dict().items():
        assert torch.equal(pruned.state_dict()[name], tensor), name


@pytest.mark.parametrize("axes", AXIS_CASES.values(), ids=AXIS_CASES.keys())
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_equals_original_with_pruned_channels_zeroed(family, axes):
    hybrid = _hybrid(family)
    blocks = _blocks()
    kept = select(hybrid, measure_importance(hybrid, blocks[:4]), _target(hybrid, **axes))
    pruned = prune(hybrid, PruneConfig(**axes, num_blocks=4), blocks=blocks)
    expected = _zeroed(hybrid, kept)(IDS).logits
    assert not torch.allclose(expected, hybrid(IDS).logits, atol=1e-6)  # something was actually pruned
    torch.testing.assert_close(pruned(IDS).logits, expected, rtol=1e-5, atol=1e-6)  # the gated norm runs in float32


def test_pruned_model_config_and_parameter_count():
    hybrid = _hybrid()
    pruned = prune(hybrid, PruneConfig(**AXIS_CASES["all"], num_blocks=2), blocks=_blocks())
    config = pruned.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (48, 64, 2)
    assert config.num_hidden_layers == len(config.mixer_types) == 3
    assert config.mixers["mamba2"] == {"num_heads": 2, "num_groups": 2, "head_dim": 12, "state_size": 16}
    assert config.head_dim == hybrid.config.head_dim and config.num_key_value_heads == 2
    assert count_params(config, model_shape(config), config.mixer_types) == sum(p.numel() for p in pruned.parameters())
    metrics = pruned.hybridize_steps[-1]["metrics"]
    assert [s["step"] for s in pruned.hybridize_steps] == ["convert", "prune"]
    assert metrics["params_after"] == sum(p.numel() for p in pruned.parameters()) < metrics["params_before"]
    assert len(metrics["dropped_layers"]) == 1


def test_group_aware_keeps_as_many_heads_in_every_group_and_leaves_B_alone():
    hybrid = _hybrid()
    pruned = prune(hybrid, PruneConfig(ssm_heads=2, num_blocks=4), blocks=_blocks())
    kept = select(hybrid, measure_importance(hybrid, _blocks()[:4]), _target(hybrid, ssm_heads=2))
    for i, heads in kept.ssm_heads.items():
        assert torch.bincount(heads // 2, minlength=2).tolist() == [1, 1]  # 4 heads in 2 groups of 2
        old, new = hybrid.model.layers[i].mixer, pruned.model.layers[i].mixer
        s = old.settings
        start = s.num_heads * s.head_dim + s.num_groups * s.head_dim  # after z and x
        B_old = old.in_proj.weight[start : start + s.num_groups * s.state_size]
        start = 2 * s.head_dim + s.num_groups * s.head_dim
        assert torch.equal(new.in_proj.weight[start : start + s.num_groups * s.state_size], B_old)
        assert new.settings.num_groups == 2 and new.settings.state_size == s.state_size


def test_ignore_groups_keeps_the_best_heads_anywhere():
    hybrid = _hybrid()
    importance = measure_importance(hybrid, _blocks()[:2])
    for i in importance.ssm_out:  # heads 0 and 1 (both in group 0) are the most important
        importance.ssm_out[i] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)[:, None].expand(4, 16)
    shape = _target(hybrid, ssm_heads=2)
    aware = select(hybrid, importance, shape, ssm_grouping="aware")
    ignore = select(hybrid, importance, shape, ssm_grouping="ignore")
    for i in importance.ssm_out:
        assert aware.ssm_heads[i].tolist() == [0, 2] and ignore.ssm_heads[i].tolist() == [0, 1]


def test_attention_heads_are_ranked_inside_their_kv_group():
    hybrid = _hybrid(ratio=0.0)
    importance = measure_importance(hybrid, _blocks()[:2])
    importance.attn[1] = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64)[:, None].expand(4, 16)
    kept = select(hybrid, importance, _target(hybrid, attn_heads=2))
    assert kept.attn_heads[1].tolist() == [1, 2]
    kept = select(hybrid, importance, _target(hybrid, attn_heads=2), attn_grouping="ignore")
    assert kept.attn_heads[1].tolist() == [2, 3]


def test_saves_loads_and_generates(tmp_path):
    hybrid = convert(make_tiny("llama"), ConvertConfig(mixer_init="attention", ratio=0.5)).eval()
    pruned = prune(hybrid, PruneConfig(**AXIS_CASES["all"], num_blocks=2), blocks=_blocks())
    hybridize.save(pruned, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(loaded(IDS).logits, pruned(IDS).logits, rtol=0, atol=0)
    out = loaded.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    # decoding with the cache agrees with running the whole sequence
    full = loaded(out).logits[0, 4:-1].argmax(-1)
    assert torch.equal(full, out[0, 5:])
    steps = json.loads((tmp_path / "pruned" / "hybridize.json").read_text())["steps"]
    assert steps[-1]["step"] == "prune" and steps[-1]["config"]["ssm_heads"] == 2


def test_params_search_meets_the_budget_and_reports_its_candidates():
    hybrid = _hybrid(num_hidden_layers=5)
    before = sum(p.numel() for p in hybrid.parameters())
    pruned = prune(hybrid, PruneConfig(params=0.7, num_blocks=2, score_blocks=2, num_candidates=3), blocks=_blocks())
    after = sum(p.numel() for p in pruned.parameters())
    assert after <= 0.7 * before
    metrics = pruned.hybridize_steps[-1]["metrics"]
    search = metrics["search"]
    assert len(search) == 3 and all(c["params"] <= 0.7 * before for c in search)
    best = min(search, key=lambda c: c["loss"])
    assert best["params"] == after and metrics["shape_after"]["hidden"] == best["hidden"]


def test_depth_by_loss_drops_the_layer_that_costs_least():
    hybrid = _hybrid()
    pruned = prune(
        hybrid, PruneConfig(drop_layers=1, depth_metric="ppl", num_blocks=2, score_blocks=2), blocks=_blocks()
    )
    metrics = pruned.hybridize_steps[-1]["metrics"]
    scores = metrics["depth_scores"]
    assert metrics["dropped_layers"] == [scores.index(min(scores))]


def test_dense_source_is_pruned_as_a_ratio_zero_hybrid():
    dense = make_tiny("llama", rms_norm_eps=1e-12).double()
    pruned = prune(dense, PruneConfig(ffn=64, attn_heads=2, num_blocks=2), blocks=_blocks())
    assert isinstance(pruned, HybridForCausalLM) and pruned.config.mixer_types == ["attention"] * 4
    assert [s["step"] for s in pruned.hybridize_steps] == ["convert", "prune"]
    hybrid = convert(dense, ConvertConfig(mixer_init="attention", ratio=0.0))
    kept = select(hybrid, measure_importance(hybrid, _blocks()[:2]), _target(hybrid, ffn=64, attn_heads=2))
    torch.testing.assert_close(
        pruned(IDS).logits, _zeroed(hybrid, kept)(IDS).logits, rtol=1e-5, atol=1e-6
    )  # the gated norm runs in float32


def test_as_hybrid_returns_a_hybrid_as_is_and_converts_a_dense_source_at_ratio_zero():
    hybrid = _hybrid()
    assert as_hybrid(hybrid) is hybrid
    dense = make_tiny("llama").double().eval()
    converted = as_hybrid(dense)
    assert isinstance(converted, HybridForCausalLM) and converted.config.mixer_types == ["attention"] * 4
    with torch.no_grad():
        torch.testing.assert_close(converted(IDS).logits, dense(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        ({"ssm_heads": 6}, "ssm_heads=6 is more than the model's 4"),
        ({"ssm_heads": 3}, "ssm_heads=3 is not a multiple of 2"),
        ({"attn_heads": 3}, "attn_heads=3 is not a multiple of 2"),
        ({"attn_heads": 8}, "more than the model's 4"),
        ({"ffn": 200}, "ffn=200 is more than"),
        ({"hidden": 65}, "hidden=65 is more than"),
        ({"ssm_head_dim": 17}, "ssm_head_dim=17"),
        ({"drop_layers": 4}, "leaves no layer"),
        ({"params": 0.01}, "below the embedding"),
        ({"hidden": 42}, "hidden=42 is not a multiple of the 4 attention heads"),
    ],
)
def test_impossible_targets(axes, match):
    hybrid = _hybrid()
    with pytest.raises(ConfigError, match=match):
        prune(hybrid, PruneConfig(**axes), blocks=_blocks())


def test_ssm_axes_on_a_model_without_mamba2():
    with pytest.raises(ConfigError, match="no mamba2 layer"):
        prune(make_tiny("llama"), PruneConfig(ssm_heads=2), blocks=_blocks())


def test_a_params_target_the_search_cannot_reach():
    with pytest.raises(ConfigError, match="below what the search reaches"):
        prune(_hybrid(vocab_size=16), PruneConfig(params=0.3, score_blocks=1, num_blocks=1), blocks=_blocks(n=2) % 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "nothing to prune"),
        ({"params": 0.8, "ffn": 64}, "cannot be combined"),
        ({"params": 1.5}, r"in \(0, 1\]"),
        ({"ffn": 0}, "ffn=0 must be a positive integer"),
        ({"ffn": 64, "ssm_grouping": "groups"}, "ssm_grouping"),
        ({"ffn": 64, "attn_grouping": "none"}, "attn_grouping"),
        ({"ffn": 64, "depth_metric": "bi"}, "depth_metric"),
        ({"ffn": 64, "num_blocks": 0}, "num_blocks"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_too_few_calibration_blocks():
    with pytest.raises(ConfigError, match="calibration blocks"):
        prune(_hybrid(), PruneConfig(ffn=64, num_blocks=8), blocks=_blocks(n=3))


def test_importance_shapes():
    hybrid = _hybrid()
    importance = measure_importance(hybrid, _blocks()[:2])
    assert isinstance(importance, Importance)
    assert importance.hidden.shape == (64,) and importance.depth.shape == (4,) and (importance.depth > 0).all()
    assert sorted(importance.ssm_x) == [0, 2] and importance.ssm_x[0].shape == (2, 16)
    assert importance.ssm_out[2].shape == (4, 16) and sorted(importance.attn) == [1, 3]
    assert importance.ffn[3].shape == (128,)


def test_cli(tmp_path):
    hybridize.save(
        convert(make_tiny("llama"), ConvertConfig(mixer_init="attention", ratio=0.5)),
        tmp_path / "hybrid",
        tokenizer=word_tokenizer(),
    )
    args = ["--ssm-heads", "2", "--ffn", "64", "--num-blocks", "2", "--seq-len", "16", "-o", tmp_path / "p"]
    code, out = run_cli("prune", tmp_path / "hybrid", *args)
    assert code == 0, out
    assert "ssm_heads  4 -> 2" in out and "wrote" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.mixers["mamba2"]["num_heads"] == 2
    code, out = run_cli("prune", tmp_path / "hybrid", "--ssm-heads", "3", "-o", tmp_path / "q")
    assert code == 1 and "ssm_heads=3 is not a multiple of 2" in out and not (tmp_path / "q").exists()


# Gated DeltaNet: its query heads are pruned on attention's axis, inside their KV groups

GDN_CASES = {
    "attn_heads": {"attn_heads": 2},
    "hidden": {"hidden": 40},
    "all": {"hidden": 48, "ffn": 64, "attn_heads": 2, "drop_layers": 1},
}


@pytest.mark.parametrize("axes", GDN_CASES.values(), ids=GDN_CASES.keys())
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gdn_pruned_equals_original_with_pruned_heads_zeroed(family, axes):
    hybrid = _hybrid(family, mixer="gdn")
    blocks = _blocks()
    kept = select(hybrid, measure_importance(hybrid, blocks[:4]), _target(hybrid, **axes))
    pruned = prune(hybrid, PruneConfig(**axes, num_blocks=4), blocks=blocks)
    expected = _zeroed(hybrid, kept)(IDS).logits
    assert not torch.allclose(expected, hybrid(IDS).logits, atol=1e-3)
    # the residual RMSNorms round through float32 (transformers' Llama norm), and q and k are L2-normalised after
    torch.testing.assert_close(pruned(IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_gdn_full_size_is_the_identity():
    hybrid = _hybrid(mixer="gdn")
    pruned = prune(hybrid, PruneConfig(attn_heads=4, ffn=128, num_blocks=2), blocks=_blocks())
    for name, tensor in hybrid.state_dict().items():
        assert torch.equal(pruned.state_dict()[name], tensor), name


def test_gdn_heads_group_aware_config_and_parameter_count(tmp_path):
    hybrid = _hybrid(mixer="gdn")
    importance = measure_importance(hybrid, _blocks()[:4])
    assert sorted(importance.attn) == [0, 1, 2, 3] and importance.attn[0].shape == (4, 16)
    importance.attn[0] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)[:, None].expand(4, 16)
    shape = _target(hybrid, attn_heads=2)
    assert select(hybrid, importance, shape).attn_heads[0].tolist() == [0, 2]  # one per KV group
    assert select(hybrid, importance, shape, attn_grouping="ignore").attn_heads[0].tolist() == [0, 1]

    pruned = prune(hybrid, PruneConfig(attn_heads=2, num_blocks=4), blocks=_blocks())
    config = pruned.config
    assert config.num_attention_heads == 2 and config.mixers["gdn"] == {
        "num_heads": 2,
        "num_kv_heads": 2,
        "head_dim": 16,
    }
    assert count_params(config, model_shape(config), config.mixer_types) == sum(p.numel() for p in pruned.parameters())
    kept = select(hybrid, measure_importance(hybrid, _blocks()[:4]), shape)
    old, new = hybrid.model.layers[0].mixer, pruned.model.layers[0].mixer
    assert torch.equal(new.k_proj.weight, old.k_proj.weight) and torch.equal(new.v_proj.weight, old.v_proj.weight)
    assert torch.equal(new.dt_bias, old.dt_bias[kept.attn_heads[0]])
    hybridize.save(pruned, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(loaded(IDS).logits, pruned(IDS).logits, rtol=0, atol=0)
    out = loaded.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded(out).logits[0, 4:-1].argmax(-1), out[0, 5:])  # cached decoding = one forward


def test_gdn_only_model_takes_attn_heads_and_a_params_search():
    hybrid = _hybrid(mixer="gdn", ratio=1.0)
    assert set(hybrid.config.mixer_types) == {"gdn"}
    pruned = prune(hybrid, PruneConfig(attn_heads=2, num_blocks=2), blocks=_blocks())  # not "no attention layer"
    assert pruned.config.mixers["gdn"]["num_heads"] == 2
    searched = prune(hybrid, PruneConfig(params=0.8, score_blocks=1, num_blocks=2), blocks=_blocks())
    assert sum(p.numel() for p in searched.parameters()) <= 0.8 * sum(p.numel() for p in hybrid.parameters())
    with pytest.raises(ConfigError, match="attn_heads=3 is not a multiple of 2"):
        prune(hybrid, PruneConfig(attn_heads=3), blocks=_blocks())
