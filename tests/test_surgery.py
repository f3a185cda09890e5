"""The surgery registry (`hybridize.surgery`): exact-class lookup, the one refusal for a mixer without a handler (from
every operation, before any work), a handler for every mixer that prune accepts, and handler parameter counts equal to
the real modules'."""

import pytest
import torch
from tiny import TINY, tiny_hybrid

from hybridize.compress.fuse import FuseConfig, fuse
from hybridize.compress.lowrank import FactorizeConfig, factorize
from hybridize.compress.prune import PruneConfig, check_prune, count_params, model_shape, prune
from hybridize.errors import UnsupportedModelError
from hybridize.export import ExportConfig, export
from hybridize.llamacpp import export_gguf
from hybridize.modeling import HybridConfig, HybridForCausalLM
from hybridize.modeling.attention import AttentionMixer
from hybridize.modeling.mixers import MIXERS
from hybridize.surgery import MixerSurgery, register_surgery, surgery_for
from hybridize.surgery.base import _HANDLERS


class ToyMixer(AttentionMixer):
    """A registered mixer without a handler of its own (its parent's does not count: the lookup is exact)."""


def test_an_unregistered_mixer_gets_the_one_refusal(monkeypatch):
    monkeypatch.setitem(MIXERS, "toy", ToyMixer)
    with pytest.raises(UnsupportedModelError, match=r"^prune does not support toy: prune handles .*attention.*; "):
        surgery_for("toy", "prune")
    with pytest.raises(UnsupportedModelError, match=r"^prune does not support rwkv: it is not a known mixer"):
        surgery_for("rwkv", "prune")
    with pytest.raises(UnsupportedModelError, match=r"^fuse does not support streaming: fuse handles attention, "):
        surgery_for("streaming", "fuse")  # a handler that does not do the operation for this mixer


def test_every_operation_refuses_a_mixer_without_a_handler_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(MIXERS, "toy", ToyMixer)
    model = tiny_hybrid(["toy", "attention", "mamba2", "attention"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    blocks = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    operations = {
        "prune": lambda: prune(model, PruneConfig(ffn=64, num_blocks=2), blocks=blocks),
        "fuse": lambda: fuse([model, model], FuseConfig(align="weights")),
        "factorize": lambda: factorize(model, FactorizeConfig(ratio=0.5, method="svd")),
        "export": lambda: export(model, ExportConfig()),
        "export_gguf": lambda: export_gguf(model, tmp_path / "m.gguf", ExportConfig(to="gguf"), tokenizer=None),
    }
    for operation, run in operations.items():
        with pytest.raises(UnsupportedModelError, match=rf"^{operation} does not support toy: {operation} handles "):
            run()
    assert list(tmp_path.iterdir()) == []
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_gdn_refuses_fuse_and_the_exports_with_its_reasons(tmp_path):
    model = tiny_hybrid(["gdn", "attention"] * 2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    operations = {
        "fuse": (lambda: fuse([model, model], FuseConfig(align="weights")), "no transport for Gated DeltaNet"),
        "export": (lambda: export(model, ExportConfig()), "no GraniteMoeHybrid"),
        "export_gguf": (
            lambda: export_gguf(model, tmp_path / "m.gguf", ExportConfig(to="gguf"), tokenizer=None),
            "qwen3next",
        ),
    }
    for operation, (run, reason) in operations.items():
        with pytest.raises(UnsupportedModelError, match=rf"^{operation} does not support gdn: .*{reason}"):
            run()
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_register_surgery_registers_exact_classes(monkeypatch):
    monkeypatch.setitem(MIXERS, "toy", ToyMixer)
    monkeypatch.setattr("hybridize.surgery.base._HANDLERS", dict(_HANDLERS))

    @register_surgery(ToyMixer)
    class ToySurgery(MixerSurgery):
        operations = ("prune",)

    assert isinstance(surgery_for("toy", "prune"), ToySurgery)
    assert not isinstance(surgery_for("attention", "prune"), ToySurgery)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_prune_accepts_has_a_handler(name):
    model = tiny_hybrid([name, "attention", name, "attention"])
    try:
        check_prune(model.config, PruneConfig(ffn=64))
    except UnsupportedModelError as error:
        assert str(error).startswith(f"prune does not support {name}: ")  # the one refusal, from surgery_for
        with pytest.raises(UnsupportedModelError):
            surgery_for(name, "prune")
    else:
        assert isinstance(surgery_for(name, "prune"), MixerSurgery)


def _prunable():
    names = []
    for name in sorted(MIXERS):
        try:
            surgery_for(name, "prune")
        except UnsupportedModelError:
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", _prunable())
def test_param_count_equals_the_module(name, bias):
    if bias:
        torch.manual_seed(0)
        config = HybridConfig(**TINY, mixer_types=[name, "attention"] * 2, attention_bias=True)
        model = HybridForCausalLM(config)
    else:
        model = tiny_hybrid([name, "attention"] * 2)
    config, handler = model.config, surgery_for(name, "prune")
    expected = sum(p.numel() for p in model.model.layers[0].mixer.parameters())
    assert handler.param_count(config, model_shape(config)) == expected


@pytest.mark.parametrize("name", _prunable())
def test_every_prunable_mixer_prunes_to_the_counted_size(name):
    model = tiny_hybrid([name, "attention"] * 2)
    blocks = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    pruned = prune(model, PruneConfig(ffn=64, hidden=48, num_blocks=2), blocks=blocks)
    config = pruned.config
    assert config.mixer_types == model.config.mixer_types and config.hidden_size == 48
    assert count_params(config, model_shape(config), config.mixer_types) == sum(p.numel() for p in pruned.parameters())
