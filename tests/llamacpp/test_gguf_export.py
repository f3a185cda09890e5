"""GGUF export without llama.cpp: what the file holds, read back with the `gguf` package's own reader (metadata,
tensor names, types and values), the Mamba2 mapping, refusals, and the atomic, no-overwrite output."""

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import CHAT_TEMPLATE, GGUF_VOCAB, TINY, gguf_hybrid, make_tiny, run_cli

import hybridize
from hybridize.configs import ExportConfig
from hybridize.convert import ConvertConfig, convert
from hybridize.errors import ConfigError, DependencyError, OutputExistsError, UnsupportedModelError
from hybridize.llamacpp import export_gguf, tokenizer_origin
from hybridize.surgery.mamba2 import mamba2_copies

GGUF = ExportConfig(to="gguf")


def _fields(path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_hybrid_exports_as_granitehybrid_with_rope_on(tokenizer, tmp_path):
    hybrid = gguf_hybrid(["mamba2", "attention"] * 2)
    path = export_gguf(hybrid, tmp_path / "h.gguf", GGUF, tokenizer=tokenizer)
    fields = _fields(path)
    assert fields["general.architecture"] == "granitehybrid"
    assert fields["granitehybrid.attention.head_count_kv"] == [0, 2, 0, 2]  # 0 marks a recurrent layer
    assert fields["granitehybrid.rope.scaling.finetuned"] is True  # granitehybrid applies RoPE iff this is true
    assert fields["granitehybrid.ssm.inner_size"] == 2 * TINY["hidden_size"]
    assert fields["granitehybrid.ssm.group_count"] == fields["granitehybrid.ssm.time_step_rank"] == 4
    assert fields["granitehybrid.ssm.state_size"] == 16 and fields["granitehybrid.ssm.conv_kernel"] == 4
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # special tokens are CONTROL
    assert len(fields["tokenizer.ggml.tokens"]) == GGUF_VOCAB and fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    tensors = _tensors(path)
    assert {name for name in tensors if name.startswith("blk.0.")} == {
        f"blk.0.{name}"
        for name in (
            "attn_norm.weight",
            "ssm_in.weight",
            "ssm_conv1d.weight",
            "ssm_conv1d.bias",
            "ssm_dt.bias",
            "ssm_a",
            "ssm_d",
            "ssm_norm.weight",
            "ssm_out.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        )
    }
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}


def test_mamba2_tensors_are_mapped_exactly(tokenizer, tmp_path):
    hybrid = gguf_hybrid(["mamba2", "attention"] * 2)
    mixer = hybrid.model.layers[0].mixer
    h, g, p, n = 4, 2, 16, 16  # heads, KV groups, head_dim, state
    tensors = _tensors(export_gguf(hybrid, tmp_path / "h.gguf", GGUF, tokenizer=tokenizer))
    np.testing.assert_allclose(tensors["blk.0.ssm_a"].data[:, 0], -torch.exp(mixer.A_log).detach().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(tensors["blk.0.ssm_d"].data[:, 0], mixer.D.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.0.ssm_dt.bias"].data, mixer.dt_bias.detach().numpy())
    # in_proj rows z | x | B | C | dt: z and x widened to two copies per head, x and B repeated per head of a group
    ssm_in = tensors["blk.0.ssm_in.weight"].data  # (rows, hidden)
    assert ssm_in.shape == (2 * 2 * h * p + 2 * h * n + h, 64)
    z, x, B, C, dt = np.split(ssm_in, np.cumsum([2 * h * p, 2 * h * p, h * n, h * n]))
    weight = mixer.in_proj.weight.detach().numpy()
    ours_z, ours_x = weight[: h * p], weight[h * p : h * p + g * p]
    ours_B = weight[h * p + g * p : h * p + g * (p + n)]
    for head in range(h):
        group = head // (h // g)
        for copy in range(2):
            rows = slice((2 * head + copy) * p, (2 * head + copy + 1) * p)
            np.testing.assert_array_equal(z[rows], ours_z[head * p : (head + 1) * p])
            np.testing.assert_array_equal(x[rows], ours_x[group * p : (group + 1) * p])
        np.testing.assert_array_equal(B[head * n : (head + 1) * n], ours_B[group * n : (group + 1) * n])
    np.testing.assert_array_equal(C, weight[h * p + g * (p + n) : -h])
    np.testing.assert_array_equal(dt, weight[-h:])
    # out_proj reads the first copy of each head; the other copy's columns are zero
    ssm_out = tensors["blk.0.ssm_out.weight"].data.reshape(64, h, 2, p)
    np.testing.assert_array_equal(ssm_out[:, :, 0], mixer.out_proj.weight.detach().numpy().reshape(64, h, p))
    assert not ssm_out[:, :, 1].any()
    assert tensors["blk.0.ssm_norm.weight"].data.shape == (h, 2 * p)  # one norm group per head


def test_widening_follows_the_ssm_inner_size():
    assert mamba2_copies(gguf_hybrid(["mamba2", "attention"]).config) == 2  # heads x head_dim = hidden
    assert mamba2_copies(gguf_hybrid(["mamba2", "attention"], {"mamba2": {"head_dim": 32}}).config) == 1
    assert mamba2_copies(gguf_hybrid(["mamba2", "attention"], {"mamba2": {"head_dim": 8}}).config) == 4
    with pytest.raises(UnsupportedModelError, match="2 x hidden = 128"):
        mamba2_copies(gguf_hybrid(["mamba2", "attention"], {"mamba2": {"head_dim": 24}}).config)


@pytest.mark.parametrize("model", ["ratio0", "plain"])
def test_all_attention_models_export_as_llama(model, tokenizer, tmp_path):
    source = make_tiny("llama", vocab_size=GGUF_VOCAB)
    exported = convert(source, ConvertConfig(mixer_init="attention", ratio=0.0)) if model == "ratio0" else source
    fields = _fields(export_gguf(exported, tmp_path / "m.gguf", GGUF, tokenizer=tokenizer))
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert not any(key.startswith("llama.ssm") for key in fields)
    # q rows reordered per head from rotate-half pairs (i, i + 8) to consecutive pairs (2i, 2i + 1)
    q = _tensors(tmp_path / "m.gguf")["blk.0.attn_q.weight"].data
    ours = source.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(q[0], ours[0])
    np.testing.assert_array_equal(q[1], ours[8])
    np.testing.assert_array_equal(q[16 + 2], ours[16 + 1])


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_1"])
def test_outtypes_quantise_matrices_and_keep_the_rest_f32(outtype, tokenizer, tmp_path):
    hybrid = gguf_hybrid(["mamba2", "attention"] * 2)
    path = export_gguf(hybrid, tmp_path / "h.gguf", ExportConfig(to="gguf", outtype=outtype), tokenizer=tokenizer)
    tensors = _tensors(path)
    expected = gguf.GGMLQuantizationType[outtype.upper()]
    for name in ("blk.0.ssm_in.weight", "blk.0.ssm_out.weight", "blk.1.attn_q.weight"):
        assert tensors[name].tensor_type == expected, name
    # the 4-bit file keeps the tied embedding / head at 8 bits, as the shipped SmolLM2 Q4_1 file does
    embedding = gguf.GGMLQuantizationType.Q8_0 if outtype == "q4_1" else expected
    assert tensors["token_embd.weight"].tensor_type == embedding
    for name in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_norm.weight", "blk.0.ssm_a", "output_norm.weight"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32, name
    v = hybrid.model.layers[1].mixer.v_proj.weight.detach().numpy()
    dequantized = gguf.quants.dequantize(tensors["blk.1.attn_v.weight"].data, expected)
    step = 1 / 15 if outtype == "q4_1" else 1 / 100  # 4 bits: 16 levels between each block's min and max
    np.testing.assert_allclose(dequantized, v, atol=2 * np.abs(v).max() * step)


def _factorized():
    hybrid = convert(make_tiny("llama", vocab_size=GGUF_VOCAB), ConvertConfig(mixer_init="attention", ratio=0.5))
    return hybridize.factorize(hybrid, hybridize.FactorizeConfig(ratio=0.5, method="svd", targets=("mlp",)))


REFUSED = {
    "streaming": (lambda: gguf_hybrid(["streaming", "attention"] * 2, {"streaming": {"window": 8}}), "sinks"),
    "nha": (lambda: gguf_hybrid(["nha", "attention"] * 2), "Native Hybrid Attention"),
    "factorised": (_factorized, "factorised"),
    "no attention": (lambda: gguf_hybrid(["mamba2"] * 4), "no attention layer"),
    "qwen2 biases": (lambda: make_tiny("qwen2", vocab_size=GGUF_VOCAB), "biases"),
    "no exact widening": (lambda: gguf_hybrid(["mamba2", "attention"], {"mamba2": {"head_dim": 24}}), "widened"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_models_llama_cpp_cannot_compute_are_refused_and_nothing_is_written(case, tokenizer, tmp_path):
    make, reason = REFUSED[case]
    with pytest.raises(UnsupportedModelError, match=reason):
        export_gguf(make(), tmp_path / "m.gguf", GGUF, tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_output_is_atomic_and_never_overwritten_unasked(tokenizer, tmp_path, monkeypatch):
    hybrid = gguf_hybrid(["mamba2", "attention"] * 2)
    output = tmp_path / "h.gguf"
    output.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_gguf(hybrid, output, GGUF, tokenizer=tokenizer)
    assert output.read_bytes() == b"keep me"

    from hybridize.llamacpp import export as export_module

    calls = []

    def failing(array, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk gone")
        return array

    monkeypatch.setattr(export_module, "_encode", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        export_gguf(hybrid, output, GGUF, tokenizer=tokenizer, overwrite=True)
    assert output.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["h.gguf"]
    monkeypatch.undo()
    export_gguf(hybrid, output, GGUF, tokenizer=tokenizer, overwrite=True)
    assert _fields(output)["general.architecture"] == "granitehybrid"


def test_export_leaves_the_model_unchanged(tokenizer, tmp_path):
    hybrid = gguf_hybrid(["mamba2", "attention"] * 2)
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    export_gguf(hybrid, tmp_path / "h.gguf", ExportConfig(to="gguf", outtype="q8_0"), tokenizer=tokenizer)
    for key, value in hybrid.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_config_and_native_export_reject_gguf_options():
    with pytest.raises(ConfigError, match="outtype"):
        ExportConfig(outtype="q8_0")
    with pytest.raises(ConfigError, match="q4_k"):
        ExportConfig(to="gguf", outtype="q4_k")
    with pytest.raises(ConfigError, match="export_gguf"):
        hybridize.export(gguf_hybrid(["mamba2", "attention"]), GGUF)


def test_tokenizer_comes_from_the_gguf_the_model_was_converted_from():
    from hybridize.sources import _cache_dir, resolve

    packaged = resolve("llama").location
    assert str(tokenizer_origin(None, "llama")) == packaged
    converted = gguf_hybrid(["mamba2", "attention"])
    converted.hybridize_steps = [{"step": "convert", "source": str(_cache_dir(Path(packaged)))}]
    assert str(tokenizer_origin(converted)) == packaged
    converted.hybridize_steps = [{"step": "convert", "source": "/somewhere/else"}]
    assert tokenizer_origin(converted) is None


def test_cli_exports_gguf(tokenizer, tmp_path):
    directory = tmp_path / "hybrid"
    hybridize.save(gguf_hybrid(["mamba2", "attention"] * 2), directory, tokenizer=tokenizer)
    code, out = run_cli("export", directory, "--to", "gguf", "--outtype", "q8_0", "-o", tmp_path / "h.gguf")
    assert code == 0 and "gguf granitehybrid, q8_0" in out and "tokenizer from its files" in out
    assert _fields(tmp_path / "h.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    code, out = run_cli("export", directory, "--to", "gguf", "-o", tmp_path / "h.gguf")
    assert code == 1 and "already exists" in out
    code, out = run_cli("export", directory, "--outtype", "f16", "-o", tmp_path / "native")
    assert code == 1 and "applies to --to gguf only" in out and not (tmp_path / "native").exists()


def test_missing_llama_cpp_python_says_how_to_install(monkeypatch):
    from hybridize.llamacpp.runtime import require_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importing it now raises ImportError
    with pytest.raises(DependencyError, match=r"\.\[gguf\].*--runtime torch"):
        require_llama_cpp()


def test_a_recipe_exports_gguf(tokenizer, tmp_path):
    source = tmp_path / "source"
    make_tiny("llama", vocab_size=GGUF_VOCAB).save_pretrained(source)
    tokenizer.save_pretrained(source)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {source}\noutput: {tmp_path / 'out'}\nsteps:\n"
        "  - convert: {ratio: 0.5, mixer_init: attention}\n"
        f"  - export: {{to: gguf, outtype: q8_0, output: {tmp_path / 'h.gguf'}}}\n"
    )
    hybridize.run(recipe)
    fields = _fields(tmp_path / "h.gguf")
    assert fields["general.architecture"] == "granitehybrid" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
