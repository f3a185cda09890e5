"""What can be checked against a model's config is checked before its weights load: `bench --context` beyond
`max_position_embeddings`, `convert --attn-layers` outside the model, `eval --tasks` with an unknown name or a context
too short for a pass key. The API refuses the same inputs."""

import pytest
from tiny import make_tiny, run_cli, save_tiny
from transformers import LlamaConfig

import hybridize
from hybridize.convert import ConvertConfig, check_convert
from hybridize.errors import ConfigError
from hybridize.evaluate.bench import BenchConfig, bench, check_bench
from hybridize.evaluate.perplexity import EvalConfig, check_eval


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny(tmp_path / "llama")  # max_position_embeddings 512, 4 layers


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(hybridize, "load", lambda *args, **kwargs: pytest.fail("a model was loaded"))


def test_bench_context_beyond_the_model(llama_dir, tmp_path, no_loading):
    code, out = run_cli("bench", llama_dir, "--context", "256,600", "--json", tmp_path / "b.json")
    assert code == 1 and "error: contexts 600 exceed the model's max_position_embeddings=512" in out, out
    assert "--context" in out and not (tmp_path / "b.json").exists()


def test_bench_context_beyond_the_baseline(llama_dir, tmp_path, no_loading):
    short = save_tiny(tmp_path / "short", max_position_embeddings=256)
    code, out = run_cli("bench", llama_dir, "--baseline", short, "--context", "128,400")
    assert code == 1 and "contexts 400 exceed the model's max_position_embeddings=256" in out, out


def test_bench_api_refuses_before_measuring():
    model = make_tiny("llama", max_position_embeddings=64)
    with pytest.raises(ConfigError, match="contexts 65 exceed the model's max_position_embeddings=64"):
        bench(model, BenchConfig(contexts=(64, 65)), tokenizer=None)
    check_bench(model.config, BenchConfig(contexts=(64,)))  # the longest allowed prompt


def test_attention_layers_outside_the_model(llama_dir, tmp_path, no_loading):
    code, out = run_cli("convert", llama_dir, "--attn-layers", "0,4", "-o", tmp_path / "h")
    assert code == 1 and "error: attn_layers [4] out of range: the model has layers 0..3" in out, out
    assert not (tmp_path / "h").exists()


def test_check_convert():
    config = LlamaConfig(num_hidden_layers=4)
    with pytest.raises(ConfigError, match=r"attn_layers \[4, 9\] out of range"):
        check_convert(config, ConvertConfig(attn_layers=(0, 4, 9)))
    check_convert(config, ConvertConfig(attn_layers=(0, 3)))
    check_convert(config, ConvertConfig(ratio=1.0))


def test_pass_key_task_longer_than_the_model(llama_dir, no_loading):
    code, out = run_cli("eval", llama_dir, "--tasks", "passkey_4k")
    assert code == 1 and "passkey_4k need max_length >= 4096, got 512" in out, out


@pytest.mark.slow  # indexes lm-eval's whole registry
def test_unknown_task(llama_dir, no_loading):
    code, out = run_cli("eval", llama_dir, "--tasks", "wiki_ppl,no_such_task")
    assert code == 1 and "unknown lm-eval task(s) 'no_such_task'" in out, out


def test_check_eval_reads_the_context_from_the_config():
    config = LlamaConfig(max_position_embeddings=4096)
    check_eval(config, EvalConfig(tasks=("passkey_4k",)))
    with pytest.raises(ConfigError, match="passkey_8k need max_length >= 8192, got 4096"):
        check_eval(config, EvalConfig(tasks=("passkey_8k",)))
    check_eval(config, EvalConfig())  # the built-in perplexity: nothing to check against the model


def test_checks_pass_on_good_input(llama_dir, tmp_path):
    code, out = run_cli("convert", llama_dir, "--attn-layers", "0,3", "--init", "attention", "-o", tmp_path / "h")
    assert code == 0, out
    code, out = run_cli(
        "bench", tmp_path / "h", "--baseline", llama_dir, "--context", "16,512", "--new-tokens", "2", "--repeats", "1"
    )
    assert code == 0 and "512" in out, out
