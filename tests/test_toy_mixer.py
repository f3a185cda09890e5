"""A mixer is one file and one registration: a toy mixer (`toy_mixer.py`, written in the test suite, touching no library
file) converts, distills, saves, loads (also where hybridize cannot be imported), generates, speculates, and gets the
one clear refusal from compression and export."""

import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import TINY, decode_one_by_one, make_tiny, tiny_hybrid
from toy_mixer import ToyMixer, init_toy_from_attention

import hybridize
from hybridize.configs import ExportConfig, FactorizeConfig, FuseConfig, PruneConfig
from hybridize.convert import ConvertConfig
from hybridize.convert.registry import Initializer
from hybridize.distill import DistillConfig
from hybridize.errors import UnsupportedModelError
from hybridize.generate import GenerateConfig, early_exit_draft
from hybridize.mixers import register_mixer, unregister_mixer
from hybridize.modeling import MIXERS, HybridConfig

LAYERS = ["toy", "attention", "toy", "toy"]


@pytest.fixture(autouse=True)
def toy():
    register_mixer("toy", ToyMixer, Initializer(build=init_toy_from_attention))
    yield
    unregister_mixer("toy")
    assert "toy" not in MIXERS


@pytest.fixture
def hybrid(tokenizer, text_file):
    """A tiny Llama converted to the toy mixer in layers 0, 2 and 3, the readouts calibrated on text."""
    config = ConvertConfig(
        mixer="toy", attn_layers=(1,), calibration=str(text_file), calibration_docs=4, calibration_len=128
    )
    return hybridize.convert(make_tiny("llama"), config, tokenizer=tokenizer)


def test_a_registered_mixer_cannot_be_registered_twice():
    with pytest.raises(hybridize.ConfigError, match="already registered"):
        register_mixer("toy", ToyMixer, Initializer(build=init_toy_from_attention))
    with pytest.raises(hybridize.ConfigError, match="not a hybridize.modeling.Mixer"):
        register_mixer("other", torch.nn.Linear, Initializer(build=init_toy_from_attention))


@pytest.mark.parametrize("length", [1, 7, 25])
def test_reference_equals_scan_equals_steps(length):
    ids = torch.randint(0, 128, (2, length))
    ref = tiny_hybrid(LAYERS, torch.float64, {"toy": {"impl": "ref"}})
    fast = tiny_hybrid(LAYERS, torch.float64)
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(fast(ids).logits, expected, rtol=1e-10, atol=1e-10)
    stepped, _ = decode_one_by_one(fast, ids, torch.ones_like(ids), prefill=1)
    torch.testing.assert_close(stepped, expected, rtol=1e-10, atol=1e-10)


def test_conversion_reuses_attention_and_calibrates_the_readout(hybrid):
    source = make_tiny("llama")
    assert hybrid.config.mixer_types == LAYERS
    assert all(isinstance(hybrid.model.layers[i].mixer, ToyMixer) for i in (0, 2, 3))
    mixer, attn = hybrid.model.layers[0].mixer, source.model.layers[0].self_attn
    assert torch.equal(mixer.v_proj.weight, attn.v_proj.weight)
    assert not torch.equal(mixer.o_proj.weight, attn.o_proj.weight)  # refit on the source attention's output
    step = hybrid.hybridize_steps[-1]
    assert step["config"]["mixer_init"] == "calibrated" and set(step["metrics"]["readout"]) == {"0", "2", "3"}


def test_distill_trains_the_toy_layers(hybrid, tokenizer, text_file):
    before = {name: p.detach().clone() for name, p in hybrid.named_parameters()}
    config = DistillConfig(
        data=str(text_file), stage="layerwise", tokens=16 * 4 * 3, seq_len=16, batch_size=4, eval_tokens=0
    )
    student = hybridize.distill(hybrid, config, teacher=make_tiny("llama"), tokenizer=tokenizer)
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert {name.split(".")[2] for name in changed} == {"0", "2", "3"}
    assert any(name.endswith("mixer.decay") for name in changed)


def test_save_load_generate_and_speculate(hybrid, tokenizer, tmp_path):
    hybridize.save(hybrid, tmp_path / "toy", tokenizer=tokenizer)
    assert (tmp_path / "toy" / "toy_mixer.py").exists()
    loaded, _ = hybridize.load(str(tmp_path / "toy"))
    ids = torch.randint(2, 128, (2, 19))
    torch.testing.assert_close(loaded(ids).logits, hybrid(ids).logits, rtol=0, atol=0)

    prompt = ids[:1, :9]
    cached = loaded.generate(prompt, max_new_tokens=12, do_sample=False)
    greedy = prompt
    for _ in range(12):  # greedy decoding by hand, recomputing the whole prefix each time
        greedy = torch.cat([greedy, loaded(greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, greedy)

    config = GenerateConfig(max_new_tokens=12, draft_tokens=3, adaptive=False, ignore_eos=True)
    result = hybridize.generate(
        loaded, config, tokenizer=tokenizer, prompt=prompt[0].tolist(), draft=early_exit_draft(loaded, 2)
    )
    assert list(result.token_ids) == greedy[0, 9:].tolist()
    assert result.drafted > 0


def test_the_saved_checkpoint_loads_without_hybridize(hybrid, tmp_path):
    hybridize.save(hybrid, tmp_path / "toy")
    ids = torch.randint(0, 128, (1, 11))
    torch.save({"ids": ids, "expected": hybrid(ids).logits}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["hybridize"] = None  # importing hybridize now fails
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "toy")!r}, trust_remote_code=True).eval()
        assert type(model.model.layers[0].mixer).__name__ == "ToyMixer"
        assert "hybridize" not in type(model.model.layers[0].mixer).__module__
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(model(io["ids"]).logits, io["expected"], rtol=1e-4, atol=1e-5)
        model.generate(io["ids"], max_new_tokens=3, do_sample=False)
        print("ok")
        """
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_a_hybrid_of_library_mixers_saves_as_before(tmp_path):
    hybridize.save(tiny_hybrid(["mamba2", "attention", "mamba2", "mamba2"]), tmp_path / "m")
    assert not (tmp_path / "m" / "toy_mixer.py").exists()
    assert "toy" not in (tmp_path / "m" / "mixers.py").read_text()


def _tiny_toy_hybrid():
    return hybridize.modeling.HybridForCausalLM(HybridConfig(**TINY, mixer_types=LAYERS)).eval()


@pytest.mark.parametrize(
    "operation",
    [
        ("prune", lambda m, out, tok: hybridize.prune(m, PruneConfig(ffn=64), tokenizer=tok)),
        ("fuse", lambda m, out, tok: hybridize.fuse([m, m], FuseConfig(), tokenizer=tok)),
        ("factorize", lambda m, out, tok: hybridize.factorize(m, FactorizeConfig(ratio=0.5), tokenizer=tok)),
        ("export", lambda m, out, tok: hybridize.export(m, ExportConfig(to="granitemoehybrid"))),
        ("export_gguf", lambda m, out, tok: hybridize.export_gguf(m, out, ExportConfig(to="gguf"), tokenizer=tok)),
    ],
    ids=["prune", "fuse", "factorize", "export", "export-gguf"],
)
def test_compression_and_export_refuse_it_in_one_message(operation, tokenizer, tmp_path):
    name, run = operation
    with pytest.raises(UnsupportedModelError, match=f"^{name} does not support toy: "):
        run(_tiny_toy_hybrid(), tmp_path / "out.gguf", tokenizer)
    assert not (tmp_path / "out.gguf").exists()
