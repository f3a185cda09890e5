"""Atomic output: nothing at the output path unless the save completed; existing outputs need overwrite."""

import pytest
import torch
from tiny import make_tiny

import hybridize
from hybridize.errors import OutputExistsError
from hybridize.provenance import read_manifest
from hybridize.saving import atomic_output


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_text("partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    model = make_tiny("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        hybridize.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    hybridize.save(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left behind


def test_manifest_records_steps_and_round_trips(tmp_path):
    hybrid = hybridize.convert(make_tiny("llama"), hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    hybridize.save(hybrid, tmp_path / "h")
    manifest = read_manifest(tmp_path / "h")
    assert [s["step"] for s in manifest["steps"]] == ["convert"]
    assert manifest["versions"]["torch"] == torch.__version__
    assert (tmp_path / "h").stat().st_mode & 0o055  # normal directory permissions, not mkdtemp's 0700
