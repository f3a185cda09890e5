"""factorize(): the decomposition identities (full rank reproduces W; SVD-LLM's truncation theorem), every method and
rank allocation on tiny hybrids, save/load/generate, dense sources, errors and the CLI."""

import math

import pytest
import torch
from tiny import make_tiny, run_cli, save_tiny, tiny_hybrid, word_tokenizer
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.compress.lowrank import (
    METHODS,
    FactorizeConfig,
    allocate_ranks,
    cholesky_whitening,
    error_curve,
    factorize,
    factors,
    target_linears,
    uniform_rank,
    whitened_svd,
)
from hybridize.convert import ConvertConfig, convert
from hybridize.errors import ConfigError
from hybridize.modeling import HybridForCausalLM, LowRankLinear
from hybridize.provenance import read_manifest

IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))


def _hybrid(family="llama", ratio=0.5):
    """A tiny hybrid: mamba2, attention, mamba2, attention."""
    return convert(make_tiny(family), ConvertConfig(mixer_init="attention", ratio=ratio)).eval()


def _blocks(n=8, seq_len=32):
    return torch.randint(2, 128, (n, seq_len), generator=torch.Generator().manual_seed(1))


def _inputs(model, name: str, blocks: torch.Tensor) -> torch.Tensor:
    """The (tokens, in) inputs of one linear over the calibration blocks."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(0, 1)))
    with torch.no_grad():
        for block in blocks:
            model(input_ids=block[None], use_cache=False)
    handle.remove()
    return torch.cat(seen).double()


@pytest.mark.parametrize("transform", ["none", "diagonal", "cholesky"])
def test_full_rank_reproduces_the_weights(transform):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=generator)
    x = torch.randn(200, 32, generator=generator, dtype=torch.float64)
    D = {"none": None, "diagonal": x.abs().mean(0), "cholesky": cholesky_whitening(x.T @ x)}[transform]
    down, up = factors(*whitened_svd(weight, D), rank=32)
    torch.testing.assert_close(up @ down, weight.double(), rtol=1e-10, atol=1e-10)


def test_full_rank_factorization_of_a_model_reproduces_its_logits():
    model = _hybrid()
    reference = model(IDS).logits
    names = list(target_linears(model, ("attn", "mlp", "mamba")))
    for name in names:  # what factorize does, at full rank (ratio 1 would keep every matrix dense)
        linear = model.get_submodule(name)
        down, up = factors(*whitened_svd(linear.weight), rank=min(linear.weight.shape))
        factored = LowRankLinear(linear.in_features, linear.out_features, down.shape[0], bias=linear.bias is not None)
        with torch.no_grad():
            factored.down.weight.copy_(down), factored.up.weight.copy_(up)
            if linear.bias is not None:
                factored.up.bias.copy_(linear.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, factored)
    torch.testing.assert_close(model(IDS).logits, reference, rtol=1e-4, atol=1e-4)


def test_svd_llm_error_on_the_calibration_set_is_the_dropped_singular_values():
    """SVD-LLM's theorem: with S S^T = X^T X, ||(W - W') X^T||_F = sqrt(sum of the dropped sigma_i^2) of W S."""
    model, blocks = _hybrid(), _blocks()
    names = ["model.layers.0.mlp.gate_proj", "model.layers.1.mixer.o_proj", "model.layers.3.mlp.down_proj",
             "model.layers.2.mixer.in_proj"]  # fmt: skip
    weights = {name: model.get_submodule(name).weight.detach().double().clone() for name in names}
    inputs = {name: _inputs(model, name, blocks) for name in names}
    factorize(model, FactorizeConfig(ratio=0.5, method="svd-llm"), calibration=blocks)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        W, X = weights[name], inputs[name]
        error = torch.linalg.matrix_norm((W - layer.weight.double()) @ X.T)
        sigma = torch.linalg.svdvals(W @ torch.linalg.cholesky(X.T @ X))
        expected = sigma[layer.rank :].square().sum().sqrt()
        assert error.item() == pytest.approx(expected.item(), rel=1e-3)
        # and its error curve predicts it for every rank
        curve = error_curve(*whitened_svd(W, torch.linalg.cholesky(X.T @ X)), X.T @ X)
        assert curve[layer.rank].sqrt().item() == pytest.approx(expected.item(), rel=1e-6)


def test_error_curve_of_a_singular_gram_is_never_negative():
    """Fewer distinct calibration inputs than input channels: the float32 Gram matrix is singular, rounding puts its
    smallest eigenvalues just below 0, and the error of every rank past the inputs' rank (exactly 0) came out
    negative, so that `factorize` failed in `math.sqrt` (`factorize --calibration-docs 2 --calibration-len 32`)."""
    generator = torch.Generator().manual_seed(0)
    distinct = torch.randn(12, 48, generator=generator) * torch.linspace(0.1, 10, 48)
    x = distinct[torch.randint(0, 12, (64,), generator=generator)]  # 64 tokens, 12 distinct, 48 channels
    weight, gram = torch.randn(64, 48, generator=generator), x.T @ x
    decomposition = whitened_svd(weight, cholesky_whitening(gram))
    curve = error_curve(*decomposition, gram)
    assert (curve >= 0).all() and (curve[:-1] >= curve[1:]).all()
    for rank in (4, 12, 30):  # still the error measured on the inputs; 0 from their rank on
        down, up = factors(*decomposition, rank)
        measured = torch.linalg.matrix_norm((weight.double() - up @ down) @ x.double().T).square()
        assert curve[rank].item() == pytest.approx(measured.item(), rel=1e-3, abs=1e-6 * curve[0].item())


def test_svd_llm_beats_plain_svd_on_the_calibration_outputs():
    model, blocks = _hybrid(), _blocks()
    name = "model.layers.1.mlp.down_proj"
    W, X = model.get_submodule(name).weight.detach().double(), _inputs(model, name, blocks)
    errors = {}
    for method, D in (("svd", None), ("svd-llm", cholesky_whitening(X.T @ X))):
        down, up = factors(*whitened_svd(W, D), rank=20)
        errors[method] = torch.linalg.matrix_norm((W - up @ down) @ X.T).item()
    assert errors["svd-llm"] < errors["svd"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank_alloc", ["uniform", "sensitivity"])
def test_every_method_and_allocation_meets_the_budget(method, rank_alloc):
    model = _hybrid()
    config = FactorizeConfig(ratio=0.6, method=method, rank_alloc=rank_alloc, sensitivity_tokens=16)
    model = factorize(model, config, calibration=_blocks(4, 16))
    metrics = model.hybridize_steps[-1]["metrics"]
    assert metrics["targeted_params_ratio"] <= 0.6 + 1e-9
    assert metrics["factorized"] == len(model.config.lowrank) > 0
    assert metrics["params_after"] < metrics["params_before"]
    assert torch.isfinite(model(IDS).logits).all()
    for name, rank in model.config.lowrank.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == rank
        assert rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features


def test_allocation_spends_the_budget_where_the_cost_is():
    shapes = {"a": (64, 64), "b": (64, 64)}
    steep = torch.linspace(1, 0, 65).square() * 100  # cost of truncating "a" to rank r
    flat = torch.linspace(1, 0, 65).square()
    ranks = allocate_ranks(shapes, {"a": steep, "b": flat}, budget=0.5 * 2 * 64 * 64)
    assert ranks["a"] is None or ranks["a"] > (ranks["b"] or 0)
    used = sum(64 * 64 if r is None else r * 128 for r in ranks.values())
    assert used <= 0.5 * 2 * 64 * 64


def test_targets_select_their_linears():
    model = _hybrid()
    mamba = target_linears(model, ("mamba",))
    assert sorted(n.rpartition(".")[2] for n in mamba) == ["in_proj", "in_proj", "out_proj", "out_proj"]
    factorize(model, FactorizeConfig(ratio=0.5, method="svd", targets=("mlp",)))
    assert all(".mlp." in name for name in model.config.lowrank) and len(model.config.lowrank) == 12


@pytest.mark.parametrize("mixer", ["gdn", "nha", "streaming"])
def test_attention_like_mixers_factorize_their_attention_projections(mixer):
    model = tiny_hybrid([mixer, "attention"] * 2)
    names = list(target_linears(model, ("attn", "mamba")))
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert names == [f"model.layers.{i}.mixer.{leaf}" for i in range(4) for leaf in leaves]
    assert target_linears(model, ("mamba",)) == {}  # NHA's slot gates, GDN's a/b/g projections are no target
    factorize(model, FactorizeConfig(ratio=0.5, method="svd", targets=("attn",)))
    assert sorted(model.config.lowrank) == sorted(names)


def test_a_matrix_that_low_rank_cannot_shrink_stays_dense():
    assert uniform_rank(64, 64, 1.0) is None  # rank 32 holds 32 * 128 = 64 * 64 parameters: no saving
    model = _hybrid()
    factorize(model, FactorizeConfig(ratio=1.0, method="svd"))
    assert model.config.lowrank == {} and model.hybridize_steps[-1]["metrics"]["factorized"] == 0


def test_saves_loads_and_generates(tmp_path):
    model = factorize(_hybrid(), FactorizeConfig(ratio=0.7, method="svd-llm"), calibration=_blocks(4, 32))
    hybridize.save(model, tmp_path / "lr")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lr")
    assert isinstance(loaded, HybridForCausalLM) and loaded.config.lowrank == model.config.lowrank
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)
    assert loaded.generate(IDS[:1], max_new_tokens=4, do_sample=False).shape == (1, IDS.shape[1] + 4)
    manifest = (tmp_path / "lr" / "hybridize.json").read_text()
    assert '"factorize"' in manifest and '"svd-llm"' in manifest


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_dense_source_is_factorized_as_a_ratio_zero_hybrid(family):
    source = make_tiny(family)
    reference = source(IDS).logits
    model = factorize(source, FactorizeConfig(ratio=0.8, method="svd"))
    assert isinstance(model, HybridForCausalLM) and set(model.config.mixer_types) == {"attention"}
    assert [step["step"] for step in model.hybridize_steps] == ["convert", "factorize"]
    torch.testing.assert_close(source(IDS).logits, reference)  # the source is untouched
    assert not torch.allclose(model(IDS).logits, reference)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, "ratio must be in \\(0, 1\\]"),
        ({"ratio": 1.5}, "ratio must be in \\(0, 1\\]"),
        ({"method": "qr"}, "method 'qr' is not supported"),
        ({"rank_alloc": "greedy"}, "rank_alloc 'greedy'"),
        ({"targets": ("attn", "embed")}, "targets"),
        ({"targets": ()}, "targets"),
        ({"alpha": -1.0}, "must not be negative"),
        ({"calibration_docs": 0}, "calibration_docs"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FactorizeConfig(**kwargs)


def test_model_errors():
    attention_only = _hybrid(ratio=0.0)
    with pytest.raises(ConfigError, match="select no linear layer"):
        factorize(attention_only, FactorizeConfig(targets=("mamba",), method="svd"))
    with pytest.raises(ConfigError, match="pass the model's tokenizer"):
        factorize(_hybrid(), FactorizeConfig(method="svd-llm"))


def test_cli(tmp_path):
    hybridize.save(_hybrid(), tmp_path / "hybrid", tokenizer=word_tokenizer())
    args = ["--ratio", "0.7", "--method", "svd", "--targets", "mlp,mamba", "-o", tmp_path / "lr"]
    code, out = run_cli("factorize", tmp_path / "hybrid", *args)
    assert code == 0, out
    assert "factorized 16 linears" in out and "wrote" in out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lr")
    assert len(loaded.config.lowrank) == 16 and math.isfinite(loaded(IDS).logits.sum().item())
    code, out = run_cli("factorize", tmp_path / "hybrid", "--ratio", "0", "-o", tmp_path / "bad")
    assert code == 1 and "ratio must be in (0, 1]" in out and not (tmp_path / "bad").exists()


def test_cli_with_fewer_calibration_tokens_than_input_channels(tmp_path):
    """The reported crash: 2 blocks of 32 tokens calibrate matrices of 64 and 128 input channels."""
    model = save_tiny(tmp_path / "tiny")
    args = ["--ratio", "0.8", "--calibration-docs", "2", "--calibration-len", "32", "-o", tmp_path / "lr"]
    code, out = run_cli("factorize", model, *args)
    assert code == 0, out
    metrics = read_manifest(tmp_path / "lr")["steps"][-1]["metrics"]
    assert metrics["calibration_tokens"] == 64 and 0 <= metrics["mean_relative_error"] < 1
