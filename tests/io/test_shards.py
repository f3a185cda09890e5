"""The lazy tensor loader and the shard writer: a round trip through several shards keeps every tensor (dtype, shape,
values), the files are named as transformers names them and load with transformers and safetensors, and a corrupt or
incomplete checkpoint is refused before any tensor is read."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny
from transformers import AutoModelForCausalLM

from hybridize.errors import CheckpointError
from hybridize.io.shards import INDEX_FILE, SINGLE_FILE, LazyTensorLoader, ShardWriter, shard_files

# every dtype the writer stores, in an order that mixes element sizes (the writer realigns them)
TENSORS = {
    "a.bf16": torch.randn(3, 5).to(torch.bfloat16),
    "b.f32": torch.randn(7, 2),
    "c.i64": torch.arange(5),
    "d.scalar": torch.tensor(2.5, dtype=torch.float64),
    "e.bool": torch.tensor([True, False, True]),
    "f.empty": torch.zeros(0, 4),
    "g.f16": torch.randn(3).half(),
    "h.u8": torch.arange(7, dtype=torch.uint8),
    "i.f32": torch.randn(11),
}


def _write(directory, tensors, **kwargs):
    with ShardWriter(directory, **kwargs) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    return writer


def _assert_same(tensors, read):
    assert set(read) == set(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape, name
        assert torch.equal(read[name], tensor), name


def test_one_shard_is_model_safetensors_and_loads_with_safetensors(tmp_path):
    writer = _write(tmp_path, TENSORS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    _assert_same(TENSORS, load_file(tmp_path / SINGLE_FILE))
    assert writer.total_parameters == sum(t.numel() for t in TENSORS.values())


def test_shards_are_named_and_indexed_as_transformers_does(tmp_path):
    writer = _write(tmp_path, TENSORS, max_shard_bytes=48)
    n = len(writer.shards)
    assert n > 2
    names = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, INDEX_FILE])  # no temporary file left
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    assert set(index["weight_map"]) == set(TENSORS) and set(index["weight_map"].values()) == set(names)
    for name in names:  # a shard never exceeds the limit unless one tensor alone does
        shard = load_file(tmp_path / name)
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= 48 or len(shard) == 1
    with LazyTensorLoader(tmp_path) as loader:
        _assert_same(TENSORS, {name: loader.get_tensor(name) for name in loader.keys()})
    assert shard_files(tmp_path) == [tmp_path / name for name in names]


def test_a_sharded_model_written_tensor_by_tensor_loads_with_transformers(tmp_path):
    model = make_tiny("llama")
    model.config.save_pretrained(tmp_path)
    _write(tmp_path, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, max_shard_bytes=20_000)
    assert (tmp_path / INDEX_FILE).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_loader_reads_a_transformers_checkpoint_by_module(tmp_path):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(shard_files(tmp_path)) > 1
    with LazyTensorLoader(tmp_path) as loader:
        layer = loader.get_tensors("model.layers.2.")
        assert set(layer) == set(model.model.layers[2].state_dict())
        for name, tensor in model.model.layers[2].state_dict().items():
            assert torch.equal(layer[name], tensor)
        loader.release()  # tensors read stay valid; the next read reopens its shard
        assert torch.equal(layer["mlp.up_proj.weight"], model.model.layers[2].mlp.up_proj.weight)
        assert torch.equal(loader.get_tensor("model.norm.weight"), model.model.norm.weight)
        with pytest.raises(KeyError):
            loader.get_tensor("model.layers.99.mlp.up_proj.weight")


def test_changing_a_loaded_tensor_does_not_change_the_file(tmp_path):
    _write(tmp_path, {"w": torch.zeros(64)})
    before = (tmp_path / SINGLE_FILE).read_bytes()
    with LazyTensorLoader(tmp_path) as loader:
        loader.get_tensor("w").add_(1)  # a copy-on-write page: seen by reads through the same handle only
        loader.release()
        assert torch.equal(loader.get_tensor("w"), torch.zeros(64))
    assert (tmp_path / SINGLE_FILE).read_bytes() == before


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="stop"), ShardWriter(tmp_path, max_shard_bytes=48) as writer:
        for name, tensor in TENSORS.items():
            writer.add(name, tensor)
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_name_twice_and_a_closed_writer(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("x", torch.ones(2))
    with pytest.raises(ValueError, match="already written"):
        writer.add("x", torch.ones(2))
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add("y", torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        ShardWriter(tmp_path, max_shard_bytes=0)


def test_truncated_shard_is_refused_naming_the_file(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=48)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=shard.name):
        LazyTensorLoader(tmp_path)


def test_missing_shard_and_corrupt_index_are_refused(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=48)
    index = (tmp_path / INDEX_FILE).read_text()
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt safetensors index"):
        LazyTensorLoader(tmp_path)
    (tmp_path / INDEX_FILE).write_text(index)
    missing = sorted(tmp_path.glob("model-*.safetensors"))[0]
    missing.unlink()
    with pytest.raises(CheckpointError, match=f"lacks shards.*{missing.name}"):
        LazyTensorLoader(tmp_path)


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LazyTensorLoader(tmp_path)
