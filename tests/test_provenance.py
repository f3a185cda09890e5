"""The provenance manifest (`hybridize.json`): the steps a saved model went through, and the library versions."""

import json

import torch
from tiny import make_tiny

import hybridize
from hybridize.configs import EvalConfig
from hybridize.provenance import append_step, read_manifest


def test_manifest_records_steps_and_round_trips(tmp_path):
    hybrid = hybridize.convert(make_tiny("llama"), hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    hybridize.save(hybrid, tmp_path / "h")
    manifest = read_manifest(tmp_path / "h")
    assert [s["step"] for s in manifest["steps"]] == ["convert"]
    assert manifest["versions"]["torch"] == torch.__version__
    assert (tmp_path / "h").stat().st_mode & 0o055  # normal directory permissions, not mkdtemp's 0700


def test_append_step_keeps_the_history(tmp_path):
    (tmp_path / "hybridize.json").write_text(json.dumps({"steps": [{"step": "convert"}], "versions": {"torch": "x"}}))
    append_step(tmp_path, "eval", EvalConfig(tasks=("wiki_ppl",)), metrics={"tasks": {"wiki_ppl": {"acc": 1.0}}})
    manifest = read_manifest(tmp_path)
    assert [step["step"] for step in manifest["steps"]] == ["convert", "eval"]
    assert manifest["versions"] == {"torch": "x"}
    assert manifest["steps"][1]["config"]["tasks"] == ["wiki_ppl"] and "lm_eval" in manifest["steps"][1]["versions"]
    assert [path.name for path in tmp_path.iterdir()] == ["hybridize.json"]  # no temporary file left behind
