"""The real SmolLM2-135M and its ratio-0.5 Mamba2 hybrid through llama.cpp (slow): the exported f32 GGUF gives the
PyTorch logits, greedy decoding gives the same 64 tokens at f32 and f16, and q8_0 stays within 1% of f32's held-out
perplexity. docs/gguf.md has the same measurements on the distilled hybrid, with the commands."""

import pytest
import torch

import hybridize
from hybridize.configs import ExportConfig, GenerateConfig
from hybridize.evaluate.perplexity import compare_logits
from hybridize.io.corpus import load_corpus, token_blocks
from hybridize.llamacpp import export_gguf, tokenizer_origin
from hybridize.llamacpp.generate import generate_gguf
from hybridize.llamacpp.runtime import LlamaCppCausalLM, LlamaCppTokenizer, load_gguf

pytest.importorskip("llama_cpp", reason="needs the gguf extra: pip install -e '.[gguf]'")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return hybridize.load("llama")


@pytest.fixture(scope="module")
def hybrid50(smollm2):
    """The calibrated ratio-0.5 Mamba2 hybrid on 2K calibration tokens: a model with sane logits (the published
    mapping alone is thousands of times off in perplexity, too fragile for the quantised checks)."""
    config = hybridize.ConvertConfig(ratio=0.5, calibration_docs=2, calibration_len=1024)
    return hybridize.convert(smollm2[0], config, tokenizer=smollm2[1])


@pytest.fixture(scope="module")
def files(hybrid50, smollm2, tmp_path_factory):
    """The hybrid at f32, f16 and q8_0 and the source at f32, each with the packaged GGUF's tokenizer."""
    folder, (source, tokenizer) = tmp_path_factory.mktemp("gguf"), smollm2
    origin = tokenizer_origin(source, "llama")
    written = {}
    for name, model, outtype in [("hybrid-f32", hybrid50, "f32"), ("hybrid-f16", hybrid50, "f16"),
                                 ("hybrid-q8_0", hybrid50, "q8_0"), ("source-f32", source, "f32")]:  # fmt: skip
        config = ExportConfig(to="gguf", outtype=outtype)
        written[name] = export_gguf(model, folder / f"{name}.gguf", config, tokenizer=tokenizer, tokenizer_gguf=origin)
    return written


@pytest.fixture(scope="module")
def blocks(files):
    llm = load_gguf(files["source-f32"], n_ctx=256)
    ids = token_blocks(LlamaCppTokenizer(llm), load_corpus("heldout"), seq_len=256, max_tokens=2048)
    llm.close()
    return ids


@pytest.mark.parametrize("name", ["hybrid-f32", "source-f32"])
@torch.inference_mode()
def test_f32_gguf_gives_the_pytorch_logits(name, files, blocks, hybrid50, smollm2):
    model = hybrid50 if name.startswith("hybrid") else smollm2[0]
    exact = LlamaCppCausalLM(files[name], n_ctx=256, threads=2, kv_cache="f32", flash_attn=False)
    result = compare_logits(exact, model, blocks[:2])
    exact.llm.close()
    # float32 rounding through 30 layers
    assert result["max_abs_logit_diff"] < 1e-2 and result["mean_abs_logit_diff"] < 1e-4, result
    assert result["top1_agreement"] > 0.999, result


def test_greedy_tokens_are_identical_at_f32_and_f16(files, hybrid50, smollm2):
    config = GenerateConfig(max_new_tokens=64, ignore_eos=True)
    prompt = "The history of the city begins with a small settlement on the river, where"
    expected = hybridize.generate(hybrid50, config, tokenizer=smollm2[1], prompt=prompt).token_ids
    for name in ("hybrid-f32", "hybrid-f16"):
        llm = load_gguf(files[name], n_ctx=256, threads=2)  # llama.cpp's defaults: f16 KV cache, flash attention
        assert generate_gguf(llm, prompt, config).token_ids == expected, name
        llm.close()


@torch.inference_mode()
def test_q8_0_perplexity_stays_within_one_percent_of_f32(files, blocks):
    q8 = LlamaCppCausalLM(files["hybrid-q8_0"], n_ctx=256, threads=2)
    f32 = LlamaCppCausalLM(files["hybrid-f32"], n_ctx=256, threads=2)
    result = compare_logits(q8, f32, blocks[:4])
    q8.llm.close(), f32.llm.close()
    assert abs(result["perplexity"] / result["baseline_perplexity"] - 1) < 0.01, result
