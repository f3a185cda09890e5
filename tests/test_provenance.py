"""The provenance manifest (`hybridize.json`): the steps a saved model went through, and the library versions."""

import torch
from tiny import make_tiny

import hybridize
from hybridize.provenance import read_manifest


def test_manifest_records_steps_and_round_trips(tmp_path):
    hybrid = hybridize.convert(make_tiny("llama"), hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    hybridize.save(hybrid, tmp_path / "h")
    manifest = read_manifest(tmp_path / "h")
    assert [s["step"] for s in manifest["steps"]] == ["convert"]
    assert manifest["versions"]["torch"] == torch.__version__
    assert (tmp_path / "h").stat().st_mode & 0o055  # normal directory permissions, not mkdtemp's 0700
