"""Lazy conversion: `convert_to_disk` on a tiny Llama saved in several shards writes what
`save(convert(load(...)))` writes (the same files, equal weights and logits, the same manifest but for the seconds),
for every mixer, init and selection; refusals and failures leave nothing behind and never touch the input."""

import hashlib
import json
import random
import shutil

import pytest
import torch
from tiny import eos_word_tokenizer, make_tiny

import hybridize
from hybridize import sources
from hybridize.convert import ConvertConfig, convert, convert_to_disk
from hybridize.errors import CheckpointError, OutputExistsError
from hybridize.io.shards import INDEX_FILE, SINGLE_FILE
from hybridize.provenance import MANIFEST_NAME

WEIGHTS = (SINGLE_FILE, INDEX_FILE)


@pytest.fixture
def calibration(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "calibration.txt"
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(2, 128)}" for _ in range(60)) for _ in range(20)))
    return str(path)


def _save_source(path, family="llama", **overrides):
    """A tiny model saved by transformers in several shards (20 KB each), with its tokenizer."""
    make_tiny(family, **overrides).save_pretrained(path, max_shard_size="20KB")
    eos_word_tokenizer().save_pretrained(path)
    assert (path / INDEX_FILE).is_file()
    return path


@pytest.fixture
def source_dir(tmp_path):
    return _save_source(tmp_path / "source")


def _calibrated(calibration, **kwargs):
    return ConvertConfig(calibration=calibration, calibration_docs=3, calibration_len=32, **kwargs)


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _steps_without_seconds(directory):
    steps = json.loads((directory / MANIFEST_NAME).read_text())["steps"]
    for step in steps:
        step["metrics"].pop("seconds", None)
    return steps


def _assert_same_output(expected, got):
    """The same files; every one but the weights and the manifest byte for byte; equal weights and logits."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in expected.iterdir():
        if path.name not in (*WEIGHTS, MANIFEST_NAME) and not path.name.startswith("model-"):
            assert (got / path.name).read_bytes() == path.read_bytes(), path.name
    assert _steps_without_seconds(got) == _steps_without_seconds(expected)
    a, _ = hybridize.load(str(expected))
    b, _ = hybridize.load(str(got))
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(ids).logits, b(ids).logits)


def _in_memory(spec, output, config):
    model, tokenizer = hybridize.load(spec)
    return hybridize.save(convert(model, config, tokenizer=tokenizer), output, tokenizer=tokenizer, inputs=[spec])


CONFIGS = {
    "mamba2-calibrated": dict(mixer="mamba2"),
    "nha-calibrated": dict(mixer="nha", mixer_settings={"window": 4, "slots": 8, "chunk_size": 8}),
    "streaming": dict(mixer="streaming", mixer_settings={"sinks": 2, "window": 8}),
    "gdn-calibrated": dict(mixer="gdn", mixer_settings={"chunk_size": 8}),
    "ratio-0": dict(ratio=0.0),
}
MORE_CONFIGS = {
    "mamba2-attention": dict(mixer_init="attention"),
    "mamba2-zero": dict(mixer_init="zero", attn_layers=(0, 3)),
    "mamba2-random": dict(mixer_init="random", select="random", seed=3),
    "nha-full-every": dict(mixer="nha", full_every=2),
    "gdn-random": dict(mixer="gdn", mixer_init="random"),
    "streaming-dynamic": dict(mixer="streaming", select="dynamic", mixer_settings={"sinks": 2, "window": 8}),
    "streaming-lazy": dict(mixer="streaming", select="lazy", mixer_settings={"sinks": 2, "window": 8}),
    "all-layers": dict(ratio=1.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_lazy_conversion_writes_what_convert_and_save_write(tmp_path, source_dir, calibration, name):
    config = _calibrated(calibration, **CONFIGS[name])
    before = _digest(source_dir)
    expected = _in_memory(str(source_dir), tmp_path / "memory", config)
    got = convert_to_disk(str(source_dir), tmp_path / "lazy", config)
    assert got == tmp_path / "lazy"
    _assert_same_output(expected, got)
    assert _digest(source_dir) == before  # the input is only read


@pytest.mark.parametrize("name", MORE_CONFIGS)
def test_lazy_conversion_equals_in_memory_for_every_init_and_selection(tmp_path, source_dir, calibration, name):
    config = _calibrated(calibration, **MORE_CONFIGS[name])
    expected = _in_memory(str(source_dir), tmp_path / "memory", config)
    _assert_same_output(expected, convert_to_disk(str(source_dir), tmp_path / "lazy", config))


def test_attention_biases_and_an_untied_head(tmp_path, calibration):
    """Biases on q/k/v/o and a head of its own are carried over as in memory."""
    source = _save_source(tmp_path / "biased", attention_bias=True, tie_word_embeddings=False)
    config = _calibrated(calibration)
    expected = _in_memory(str(source), tmp_path / "memory", config)
    _assert_same_output(expected, convert_to_disk(str(source), tmp_path / "lazy", config))


def test_hybrid_written_in_shards_loads_equal(tmp_path, source_dir, calibration):
    config = _calibrated(calibration, mixer="nha")
    single = convert_to_disk(str(source_dir), tmp_path / "single", config)
    sharded = convert_to_disk(str(source_dir), tmp_path / "sharded", config, max_shard_bytes=30_000)
    names = sorted(p.name for p in sharded.iterdir())
    shards = [name for name in names if name.startswith("model-0")]
    assert INDEX_FILE in names and SINGLE_FILE not in names and len(shards) > 1
    assert set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values()) == set(shards)
    a, b = hybridize.load(str(single))[0], hybridize.load(str(sharded))[0]
    ids = torch.randint(2, 128, (1, 16))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_existing_output_is_refused_before_any_work(tmp_path, source_dir, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    monkeypatch.setattr(sources, "load_lazy", lambda *a, **k: pytest.fail("read the source before refusing"))
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_to_disk(str(source_dir), output, ConvertConfig(ratio=0.0))
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_the_output(tmp_path, source_dir):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    convert_to_disk(str(source_dir), output, ConvertConfig(ratio=0.0), overwrite=True)
    assert not (output / "old.txt").exists() and (output / SINGLE_FILE).is_file()


def _nothing_written(tmp_path, output):
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{output.name}.")] == []


def test_corrupt_shard_is_refused_and_writes_nothing(tmp_path, source_dir):
    shard = sorted(source_dir.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-5])
    output = tmp_path / "out"
    with pytest.raises(CheckpointError, match=shard.name):
        convert_to_disk(str(source_dir), output, ConvertConfig(ratio=0.0))
    _nothing_written(tmp_path, output)


def test_a_bad_weight_in_the_last_layer_stops_the_conversion_and_writes_nothing(tmp_path, calibration):
    """Weights are checked as they are read: a NaN in the last layer is found after the first layers are written,
    and the partial output goes."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="20KB")
    eos_word_tokenizer().save_pretrained(source)
    output = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model.layers.3.mlp.down_proj.weight holds 1 NaN"):
        convert_to_disk(str(source), output, _calibrated(calibration))
    _nothing_written(tmp_path, output)


def test_gguf_source_is_read_from_its_cache(tmp_path, source_dir, monkeypatch, calibration):
    """A GGUF file is dequantized once into the cache (a tiny model stands in for that here) and read from there."""
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setattr(
        sources,
        "_write_gguf_as_pretrained",
        lambda path, output: shutil.copytree(source_dir, output, dirs_exist_ok=True),
    )
    cache = sources._cached_gguf(gguf)  # the first use (the fake file has no metadata to read before it)
    config = _calibrated(calibration)
    got = convert_to_disk(str(gguf), tmp_path / "lazy", config)
    assert json.loads((got / MANIFEST_NAME).read_text())["steps"][-1]["source"] == str(cache)
    _assert_same_output(_in_memory(str(gguf), tmp_path / "memory", config), got)


def test_hub_source_is_downloaded_then_read_lazily(tmp_path, source_dir, monkeypatch):
    seen = []

    def download(repo_id, allow_patterns):
        seen.append(repo_id)
        return str(source_dir)

    monkeypatch.setattr(sources, "snapshot_download", download)
    got = convert_to_disk("someone/tiny-llama", tmp_path / "lazy", ConvertConfig(ratio=0.0))
    assert seen == ["someone/tiny-llama"]
    assert json.loads((got / MANIFEST_NAME).read_text())["steps"][-1]["source"] == "someone/tiny-llama"


@pytest.mark.slow
def test_real_smollm2_lazy_equals_in_memory(tmp_path):
    """SmolLM2 (the packaged GGUF, through its cache) at the default ratio and calibrated init, on a short
    calibration: the same files and logits as in memory."""
    config = ConvertConfig(calibration_docs=2, calibration_len=256)
    expected = _in_memory("smollm2", tmp_path / "memory", config)
    _assert_same_output(expected, convert_to_disk("smollm2", tmp_path / "lazy", config))
