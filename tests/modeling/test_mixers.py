"""The contract every entry of MIXERS meets, peft-style: one table of checks run on a tiny hybrid per mixer."""

import dataclasses
import subprocess
import sys
import textwrap
import typing

import pytest
import torch
from tiny import NHA_SETTINGS, TINY, TOLERANCES, decode_one_by_one, tiny_hybrid
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.generate.speculative import _rollback_for
from hybridize.modeling import MIXERS, HybridConfig, HybridForCausalLM, Mixer

# small chunks and windows, so that the tiny lengths below cross chunks and evict from streaming caches
SETTINGS = {
    "gdn": {"chunk_size": 8},
    "mamba2": {"chunk_size": 8},
    "streaming": {"sinks": 2, "window": 6, "block_size": 4},
}
# every mixer with the settings above, and NHA also in each of its corners
VARIANTS = [(name, SETTINGS.get(name, {})) for name in sorted(MIXERS)] + [("nha", s) for s in NHA_SETTINGS]
# the reference-against-fast test: SETTINGS, and NHA with a window and chunks shorter than the lengths it runs
REFERENCE_SETTINGS = {**SETTINGS, "nha": NHA_SETTINGS[0]}


def _tiny_hybrid(mixer: str, dtype=torch.float32, settings=None) -> HybridForCausalLM:
    settings = SETTINGS.get(mixer, {}) if settings is None else settings
    return tiny_hybrid([mixer, "attention", mixer, mixer], dtype, {mixer: settings} if settings else None)


@pytest.fixture(params=sorted(MIXERS))
def mixer(request):
    return request.param


def test_every_mixer_meets_the_protocol(mixer):
    """A `Mixer` with a reference path beside its fast one (`impl="ref"` in its settings, `"auto"` by default) and a
    cache layer that speculative decoding can roll back."""
    mixer_class = MIXERS[mixer]
    assert issubclass(mixer_class, Mixer)
    fields = {f.name: f for f in dataclasses.fields(mixer_class.settings_class)}
    assert "impl" in fields, f"{mixer} settings have no `impl`: add impl: Literal['auto', 'ref'] and a reference path"
    assert fields["impl"].default == "auto" and "ref" in typing.get_args(fields["impl"].type)
    config = HybridConfig(**TINY, mixer_types=[mixer] * 4)
    _rollback_for(mixer_class.new_cache_layer(config, 0), 0)  # raises for a layer that cannot roll back


def test_a_mixer_missing_part_of_the_contract_fails_when_defined():
    with pytest.raises(TypeError, match="does not define settings_class, new_cache_layer"):

        class NoSettings(Mixer):
            mask_type = "padding"

    with pytest.raises(TypeError, match="mask_type 'full'"):

        class BadMask(Mixer):
            settings_class, mask_type = dict, "full"
            new_cache_layer = staticmethod(lambda config, layer_idx: None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", ["1", "chunk-1", "chunk", "3chunk+1"])
def test_ref_equals_fast_equals_step(mixer, size, dtype):
    """STYLE §10.1: the reference (`impl="ref"`), the fast path (`"auto"`) and one-token decoding after a one-token
    prefill give the same logits, at lengths around the mixer's chunk (streaming: its block)."""
    settings = REFERENCE_SETTINGS.get(mixer, {})
    chunk = settings.get("chunk_size", settings.get("block_size", 8))
    length = {"1": 1, "chunk-1": chunk - 1, "chunk": chunk, "3chunk+1": 3 * chunk + 1}[size]
    ref = _tiny_hybrid(mixer, dtype, {**settings, "impl": "ref"})
    fast = _tiny_hybrid(mixer, dtype, {**settings, "impl": "auto"})
    ids = torch.randint(0, 128, (2, length))
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(fast(ids).logits, expected, **TOLERANCES[dtype])
    stepped, _ = decode_one_by_one(fast, ids, torch.ones_like(ids), prefill=1)
    torch.testing.assert_close(stepped, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{'-'.join(f'{k}{x}' for k, x in v[1].items())}")
@pytest.mark.parametrize("length", [1, 7, 8, 25])
def test_prefill_then_decode_equals_one_prefill(variant, length):
    mixer, settings = variant
    model = _tiny_hybrid(mixer, torch.float64, settings)
    ids = torch.randint(0, 128, (2, length + 7))
    full = model(ids).logits
    out = model(ids[:, :length], use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(length, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    assert cache.get_seq_length() == ids.shape[1]


def test_two_prefills_equal_one(mixer):
    model = _tiny_hybrid(mixer, torch.float64)
    ids = torch.randint(0, 128, (2, 30))
    full = model(ids).logits
    first = model(ids[:, :13], use_cache=True)
    second = model(ids[:, 13:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-9, atol=1e-9)


def test_left_padding_does_not_change_the_sequence(mixer):
    model = _tiny_hybrid(mixer, torch.float64)
    ids = torch.randint(1, 128, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 4:]
    torch.testing.assert_close(out, model(ids).logits, rtol=1e-9, atol=1e-9)


def test_cached_generate_equals_uncached_greedy(mixer):
    model = _tiny_hybrid(mixer)
    prompt = torch.randint(0, 128, (1, 9))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    ids = prompt
    for _ in range(12):  # greedy decoding by hand, recomputing the whole prefix each time
        next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], 1)
    assert torch.equal(cached, ids)


def test_save_load_reproduces_logits(mixer, tmp_path):
    model = _tiny_hybrid(mixer)
    hybridize.save(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is HybridForCausalLM
    ids = torch.randint(0, 128, (2, 17))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_gradients_are_finite(mixer):
    model = _tiny_hybrid(mixer).train()
    ids = torch.randint(0, 128, (2, 19))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_trust_remote_code_loads_without_hybridize(mixer, tmp_path):
    """The saved checkpoint carries its modeling code: a process that cannot import hybridize still loads it."""
    model = _tiny_hybrid(mixer)
    hybridize.save(model, tmp_path / "m")
    ids = torch.randint(0, 128, (1, 11))
    expected = model(ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["hybridize"] = None  # importing hybridize now fails
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True).eval()
        assert "hybridize" not in type(model).__module__, type(model).__module__
        io = torch.load({str(tmp_path / "io.pt")!r})
        # float32 tolerance: this process may run another number of threads, so another summation order
        torch.testing.assert_close(model(io["ids"]).logits, io["expected"], rtol=1e-4, atol=1e-5)
        model.generate(io["ids"], max_new_tokens=3, do_sample=False)
        print("ok")
        """
    )
    env_home = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env_home)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_model_without_attention_tracks_positions_and_generates():
    config = HybridConfig(**TINY, mixer_types=["mamba2"] * 4)
    model = HybridForCausalLM(config).eval()
    prompt = torch.randint(0, 128, (1, 6))
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    ids = prompt
    for _ in range(5):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
