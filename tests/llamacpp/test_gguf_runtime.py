"""A GGUF export run by llama.cpp (llama-cpp-python, the `gguf` extra) computes the PyTorch model: tiny hybrids and
dense models give the same logits (f32 file, f32 KV cache, no flash attention: float32 rounding) and the same greedy tokens, quantised
files stay close, the GGUF tokenizer splits text as transformers does, and bench, generate and eval run on GGUF
files. CI installs the extra (`.ci/run`), so these run there."""

import json

import pytest
import torch
from tiny import GGUF_VOCAB, byte_bpe_tokenizer, gguf_hybrid, make_tiny, run_cli
from transformers import AutoTokenizer

import hybridize
from hybridize.configs import ExportConfig, GenerateConfig
from hybridize.configs.llamacpp import LlamaCppBenchConfig
from hybridize.evaluate.perplexity import compare_logits
from hybridize.io.corpus import load_corpus
from hybridize.llamacpp import export_gguf
from hybridize.llamacpp.bench import bench_gguf
from hybridize.llamacpp.generate import generate_gguf
from hybridize.llamacpp.runtime import LlamaCppCausalLM, load_gguf
from hybridize.llamacpp.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT

pytest.importorskip("llama_cpp", reason="needs the gguf extra: pip install -e '.[gguf]'")

MODELS = {
    "mamba2 + attention (heads widened x2)": lambda: gguf_hybrid(["mamba2", "attention"] * 2),
    "mamba2 inner = 2 x hidden (not widened)": lambda: gguf_hybrid(
        ["attention", "mamba2"] * 2, {"mamba2": {"head_dim": 32}}
    ),
    "mamba2 narrow heads (widened x4)": lambda: gguf_hybrid(
        ["mamba2", "mamba2", "attention", "mamba2"], {"mamba2": {"head_dim": 8, "conv_kernel": 3}}
    ),
    "ratio-0 hybrid (llama)": lambda: gguf_hybrid(["attention"] * 4),
    "llama": lambda: make_tiny("llama", vocab_size=GGUF_VOCAB),
    "mistral, untied head": lambda: make_tiny("mistral", vocab_size=GGUF_VOCAB, tie_word_embeddings=False),
}


@pytest.fixture
def export(tokenizer, tmp_path):
    def write(model, outtype: str = "f32"):
        config = ExportConfig(to="gguf", outtype=outtype)
        return export_gguf(model, tmp_path / f"model-{outtype}.gguf", config, tokenizer=tokenizer, overwrite=True)

    return write


@pytest.fixture
def opened():
    """Closes every llama.cpp model a test opens (llama-cpp-python frees them noisily at interpreter exit)."""
    models = []
    yield models.append
    for model in models:
        (model.llm if isinstance(model, LlamaCppCausalLM) else model).close()


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.inference_mode()
def test_f32_gguf_gives_the_pytorch_logits(name, export, opened):
    model = MODELS[name]()
    ids = torch.randint(0, GGUF_VOCAB, (2, 150))
    gguf_model = LlamaCppCausalLM(export(model), n_ctx=256, threads=1, kv_cache="f32", flash_attn=False)
    opened(gguf_model)
    torch.testing.assert_close(gguf_model(input_ids=ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_state_carries_across_llama_cpp_batches(export, opened):
    """A prompt split into several llama.cpp batches (Mamba2 conv and SSM states, KV cells carried over) gives the
    logits of one pass."""
    model = gguf_hybrid(["mamba2", "attention"] * 2)
    llm = load_gguf(export(model), n_ctx=256, threads=1, logits_all=True, kv_cache="f32", flash_attn=False)
    opened(llm)
    llm.n_batch = 37  # llama-cpp-python's eval feeds the prompt in chunks of n_batch tokens
    ids = torch.randint(0, GGUF_VOCAB, (1, 150))
    llm.eval(ids[0].tolist())
    logits = torch.tensor(llm.scores[:150])
    torch.testing.assert_close(logits, model(ids).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mamba2 + attention (heads widened x2)", "llama"])
def test_greedy_generation_is_identical(name, export, tokenizer, opened):
    model = MODELS[name]()
    llm = load_gguf(export(model), n_ctx=256, threads=1, kv_cache="f32", flash_attn=False)
    opened(llm)
    config = GenerateConfig(max_new_tokens=40, ignore_eos=True)
    prompt = torch.randint(0, GGUF_VOCAB, (24,)).tolist()
    expected = hybridize.generate(model, config, tokenizer=tokenizer, prompt=prompt)
    assert generate_gguf(llm, prompt, config).token_ids == expected.token_ids


def test_sampling_and_stop_strings_follow_generate(export, tokenizer, opened):
    model = gguf_hybrid(["mamba2", "attention"] * 2)
    llm = load_gguf(export(model), n_ctx=256, threads=1, kv_cache="f32", flash_attn=False)
    opened(llm)
    sampled = GenerateConfig(max_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    prompt = torch.randint(0, GGUF_VOCAB, (10,)).tolist()
    expected = hybridize.generate(model, sampled, tokenizer=tokenizer, prompt=prompt)
    assert generate_gguf(llm, prompt, sampled).token_ids == expected.token_ids  # same logits, same seeded draws
    greedy = GenerateConfig(max_new_tokens=30, ignore_eos=True)
    text = generate_gguf(llm, prompt, greedy).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        result = generate_gguf(llm, prompt, GenerateConfig(max_new_tokens=30, ignore_eos=True, stop=(stop,)))
        assert result.stop_reason == "stop" and stop not in result.text


def test_chat_prompt_uses_the_template_inside_the_gguf(export, tokenizer, opened):
    llm = load_gguf(export(gguf_hybrid(["mamba2", "attention"] * 2)), n_ctx=256, threads=1)
    opened(llm)
    result = generate_gguf(llm, "Hello there", GenerateConfig(max_new_tokens=3, chat=True))
    messages = [{"role": "user", "content": "Hello there"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert result.prompt_tokens == len(expected)


# KL (nats/token), top-1 agreement and relative perplexity change against f32. The tiny model's near-flat logits make
# top-1 fragile at 4 bits (0.75 measured) while KL stays small (3e-4)
QUANTISED_BOUNDS = {
    "f16": (1e-5, 0.9, 0.005),
    "bf16": (1e-3, 0.9, 0.005),
    "q8_0": (1e-4, 0.9, 0.005),
    "q4_1": (1e-3, 0.6, 0.02),
}


@pytest.mark.parametrize("outtype", sorted(QUANTISED_BOUNDS))
@torch.inference_mode()
def test_quantised_files_load_and_stay_close_to_f32(outtype, export, opened):
    """KL(f32 || outtype) per token on random tokens, and perplexity within 0.5% of the f32 file's (2% at 4 bits)."""
    kl_bound, top1_bound, perplexity_bound = QUANTISED_BOUNDS[outtype]
    model = gguf_hybrid(["mamba2", "attention"] * 2)
    reference = LlamaCppCausalLM(export(model), n_ctx=128, threads=1)
    quantised = LlamaCppCausalLM(export(model, outtype), n_ctx=128, threads=1)
    opened(reference), opened(quantised)
    blocks = torch.randint(0, GGUF_VOCAB, (4, 128))
    result = compare_logits(quantised, reference, blocks)
    assert result["kl"] < kl_bound and result["top1_agreement"] > top1_bound
    assert abs(result["perplexity"] / result["baseline_perplexity"] - 1) < perplexity_bound


PRE_TOKENIZERS = {
    "gpt-2": lambda p: p.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda p: p.Sequence([p.Digits(individual_digits=True), p.ByteLevel(add_prefix_space=False)]),
    "llama-bpe": lambda p: p.Sequence(
        [p.Split(_regex(_LLAMA3_SPLIT), behavior="isolated"), p.ByteLevel(add_prefix_space=False, use_regex=False)]
    ),
    "qwen2": lambda p: p.Sequence(
        [p.Split(_regex(_QWEN2_SPLIT), behavior="isolated"), p.ByteLevel(add_prefix_space=False, use_regex=False)]
    ),
}
TEXT = (
    "It's 2024: 12345 apples, 3.14159 pies and a naïve café — don't they'LL? I've 7 cats.\n\n"
    "  spaced   out\tand tabs\r\nNEW LINES 1,000,000 ünïcödé 你好 😀 "
)


def _regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_gguf_tokenizer_splits_text_as_transformers(pre, tmp_path, opened):
    from tokenizers import pre_tokenizers

    hf = byte_bpe_tokenizer(pre_tokenizer=PRE_TOKENIZERS[pre](pre_tokenizers), ignore_merges=pre == "llama-bpe")
    hf.save_pretrained(tmp_path / "tokenizer")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    path = export_gguf(make_tiny("llama", vocab_size=GGUF_VOCAB), tmp_path / "m.gguf", tokenizer=hf)
    llm = load_gguf(path, n_ctx=64)
    opened(llm)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    for text in (TEXT, load_corpus("heldout")[0][:3000]):
        ids = hf(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == hf.decode(ids)


def test_bench_gguf_side_by_side(export):
    model = gguf_hybrid(["mamba2", "attention"] * 2)
    f32, q8 = export(model), export(model, "q8_0")
    config = LlamaCppBenchConfig(contexts=(32, 96), threads=(1,), new_tokens=4, warmup_tokens=1, repeats=1)
    result = bench_gguf(q8, config, baseline=f32)
    assert [(row["context"], row["threads"]) for row in result["rows"]] == [(32, 1), (96, 1)]
    for row in result["rows"]:
        assert row["model"]["decode_tokens_per_s"] > 0 and row["model"]["cache_bytes"] > 0
        assert set(row["ratios"]) == {"decode_speedup", "prefill_speedup", "cache_ratio", "peak_rss_growth_ratio"}
    assert result["models"]["model"]["file_type"] == "MOSTLY_Q8_0" and result["models"]["baseline"]["arch"] == (
        "granitehybrid"
    )
    assert result["models"]["model"]["weight_bytes"] < result["models"]["baseline"]["weight_bytes"]


def test_cli_runs_gguf_files_through_llama_cpp(export, tokenizer, tmp_path):
    model = gguf_hybrid(["mamba2", "attention"] * 2)
    hybridize.save(model, tmp_path / "hybrid", tokenizer=tokenizer)
    f32 = export(model)
    code, out = run_cli("generate", f32, "--prompt", "The history of", "--max-new-tokens", "5", "--threads", "1")
    assert code == 0 and "5 tokens (length)" in out
    code, out = run_cli(
        "eval", f32, "--baseline", tmp_path / "hybrid", "--seq-len", "128", "--max-tokens", "256", "--kv-cache", "f32",
        "--no-flash-attn", "--json", tmp_path / "eval.json",
    )  # fmt: skip
    result = json.loads((tmp_path / "eval.json").read_text())
    assert code == 0 and result["max_abs_logit_diff"] < 1e-4 and result["top1_agreement"] == 1.0
    code, out = run_cli(
        "bench", f32, "--context", "32", "--threads", "1", "--new-tokens", "2", "--repeats", "1",
        "--json", tmp_path / "bench.json",
    )  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "bench.json").read_text())["runtime"]["name"] == "llama.cpp"
    code, out = run_cli("bench", f32, "--batch", "2")
    assert code == 1 and "--batch" in out and "llama.cpp runtime" in out
    code, out = run_cli("generate", tmp_path / "hybrid", "--prompt", "Hi", "--threads", "2")
    assert code == 1 and "--threads" in out and "torch runtime" in out
    code, out = run_cli("bench", f32, "--runtime", "llama.cpp", "--baseline", tmp_path / "hybrid")
    assert code == 1 and "export it first" in out
