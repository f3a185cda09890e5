"""Recipes: validated before any work (keys and values named with their line), the same calls as the Python API,
and resumption after an interrupted step."""

from pathlib import Path

import pytest
import torch
import yaml
from tiny import save_tiny
from transformers import AutoModelForCausalLM

import hybridize
from hybridize import pipeline
from hybridize.errors import ConfigError, OutputExistsError
from hybridize.provenance import read_manifest

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny(tmp_path / "llama")


def _recipe(tmp_path, llama_dir, steps: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {llama_dir}\noutput: {tmp_path / 'out'}\nsteps:\n{steps}")
    return path


STEPS = """  - convert: {ratio: 0.5, seed: 3}
  - eval: {seq_len: 16, max_tokens: 64}
  - export: {output: OUT/native}
"""


def test_recipe_makes_the_same_calls_as_the_api(tmp_path, llama_dir):
    report = hybridize.run(_recipe(tmp_path, llama_dir, STEPS.replace("OUT", str(tmp_path))))
    assert [(r["step"], r["status"]) for r in report] == [("convert", "ran"), ("eval", "ran"), ("export", "ran")]
    source, tokenizer = hybridize.load(str(llama_dir))
    expected = hybridize.convert(source, hybridize.ConvertConfig(ratio=0.5, seed=3), tokenizer=tokenizer)
    ids = torch.randint(0, 128, (1, 12))
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(got(ids).logits, expected(ids).logits, rtol=0, atol=0)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    torch.testing.assert_close(native(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
    steps = read_manifest(tmp_path / "out")["steps"]
    assert [s["step"] for s in steps] == ["convert", "eval", "export"]
    assert steps[1]["metrics"]["perplexity"] > 0


def test_interrupted_recipe_resumes_at_the_next_step(tmp_path, llama_dir, monkeypatch):
    recipe = _recipe(tmp_path, llama_dir, STEPS.replace("OUT", str(tmp_path)))
    calls = []
    real_export = pipeline.STEPS["export"]

    def crash(state, config, runtime):
        calls.append("export")
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.STEPS, "export", pipeline.Step(pipeline.ExportConfig, crash, ("output",), False))
    with pytest.raises(KeyboardInterrupt):
        hybridize.run(recipe)
    assert calls == ["export"] and not (tmp_path / "native").exists()
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    ran = []
    for name in ("convert", "eval"):
        step = pipeline.STEPS[name]
        monkeypatch.setitem(
            pipeline.STEPS, name, pipeline.Step(step.config_class, lambda *a, n=name: ran.append(n), step.runtime)
        )
    monkeypatch.setitem(pipeline.STEPS, "export", real_export)
    report = hybridize.run(recipe)
    assert [r["status"] for r in report] == ["skipped (done)", "skipped (done)", "ran"]
    assert ran == [] and (tmp_path / "native" / "config.json").is_file()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_distill_step(tmp_path, llama_dir):
    steps = """  - convert: {ratio: 0.5}
  - distill: {teacher: LLAMA, stage: layerwise, tokens: 512, seq_len: 32, batch_size: 2, eval_tokens: 64}
""".replace("LLAMA", str(llama_dir))
    report = hybridize.run(_recipe(tmp_path, llama_dir, steps))
    assert [r["status"] for r in report] == ["ran", "ran"]
    assert [s["step"] for s in read_manifest(tmp_path / "out")["steps"]] == ["convert", "distill"]


@pytest.mark.parametrize(
    "steps, message",
    [
        ("  - convert: {ratoi: 0.5}\n", r"line 4: unknown key\(s\) \['ratoi'\] in step 'convert'"),
        ("  - convert: {ratio: 1.5}\n", r"line 4: step 'convert': ratio must be in \[0, 1\]"),
        ("  - convert: {}\n  - distil: {}\n", r"line 5: unknown step 'distil'"),
        ("  - convert: {}\n  - export: {}\n", r"line 5: step 'export' needs \['output'\]"),
        ("  - eval: {}\n", r"line 4: the first step must produce the output model"),
        ("  - convert: {ratio: [1, 2]}\n", r"line 4: step 'convert'"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, llama_dir, steps, message, monkeypatch):
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=message):
        hybridize.run(_recipe(tmp_path, llama_dir, steps))
    assert not (tmp_path / "out").exists()


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: llama\noutput: x\nsteps:\n  - convert: {}\nstep: 1\n")
    with pytest.raises(ConfigError, match=r"line 5: unknown top-level key\(s\) \['step'\]"):
        hybridize.run(path)


def test_output_made_otherwise_is_refused(tmp_path, llama_dir):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="not made by this recipe"):
        hybridize.run(_recipe(tmp_path, llama_dir, "  - convert: {}\n"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = pipeline.load_recipe(path)
    assert recipe.steps and recipe.steps[0].name == "convert"


# What a shipped recipe's heavy options become on the tiny model: same steps and methods, toy budgets.
_TINY_BUDGETS = {
    "convert": {"calibration_docs": 2, "calibration_len": 64},
    "distill": {"tokens": 256, "seq_len": 16, "batch_size": 2, "eval_tokens": 32},
    "eval": {"seq_len": 16, "max_tokens": 64},
}
_TINY_MIXER_SETTINGS = {"streaming": {"sinks": 2, "window": 8}, "nha": {"slots": 4, "window": 8}}


def _shrink(recipe: dict, source: Path, out: Path) -> dict:
    """The recipe on the tiny model: `llama` becomes `source`, outputs go under `out`, budgets shrink."""
    steps = []
    for i, entry in enumerate(recipe["steps"]):
        ((name, options),) = entry.items()
        options = {k: str(source) if v == "llama" else v for k, v in (options or {}).items()}
        if name == "eval" and options.get("tasks"):
            options["limit"] = 1
        else:
            options.update({k: v for k, v in _TINY_BUDGETS.get(name, {}).items()})
        if str(options.get("data", "")).startswith("generate:"):  # the teacher writes a toy amount
            options["data"] = "generate:64"
        if name == "convert" and options.get("mixer") in _TINY_MIXER_SETTINGS:
            options["mixer_settings"] = _TINY_MIXER_SETTINGS[options["mixer"]]
        if name == "export":
            options["output"] = str(out / f"export{i}")
        steps.append({name: options})
    return {"model": str(source), "output": str(out / "model"), "steps": steps}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_run_on_a_tiny_model(path, tmp_path, llama_dir, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))  # sensitivity scores of the tiny model
    recipe = yaml.safe_load(path.read_text())
    tiny = tmp_path / "recipe.yaml"
    tiny.write_text(yaml.safe_dump(_shrink(recipe, llama_dir, tmp_path)))
    report = hybridize.run(tiny)
    names = [next(iter(entry)) for entry in recipe["steps"]]
    assert [(r["step"], r["status"]) for r in report] == [(name, "ran") for name in names]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    mixer = recipe["steps"][0]["convert"].get("mixer", "mamba2")
    assert mixer in model.config.mixer_types  # the recipe's mixer really replaced attention somewhere
    assert torch.isfinite(model(torch.randint(0, 128, (1, 12))).logits).all()
    assert [s["step"] for s in read_manifest(tmp_path / "model")["steps"]] == names
    again = hybridize.run(tiny)  # a second run resumes past every completed step
    assert [(r["step"], r["status"]) for r in again] == [(name, "skipped (done)") for name in names]
    for planned, result in zip(recipe["steps"], report):
        if planned.get("eval", {}).get("tasks"):  # lm-eval ran every task the recipe names
            assert sorted(result["result"]["tasks"]) == sorted(planned["eval"]["tasks"])
            assert all(0 <= scores["acc"] <= 1 for scores in result["result"]["tasks"].values())


# --- issue 14: a recipe never loses its input or an existing output --------------------------------------------------


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file())


def test_a_recipe_writing_over_its_own_model_is_refused_even_with_overwrite(tmp_path, llama_dir):
    from hybridize.errors import OutputError

    before = _tree(llama_dir)
    for output in (llama_dir, llama_dir / "sub", tmp_path):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"model: {llama_dir}\noutput: {output}\nsteps:\n  - convert: {{ratio: 0.5}}\n")
        with pytest.raises(OutputError, match="input"):
            hybridize.run(recipe, overwrite=True)
        assert _tree(llama_dir) == before


def test_an_export_step_never_replaces_an_existing_directory_without_overwrite(tmp_path, llama_dir, monkeypatch):
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "keep.txt").write_text("mine")
    recipe = _recipe(tmp_path, llama_dir, STEPS.replace("OUT", str(tmp_path)))
    converted = []
    monkeypatch.setattr(pipeline, "convert", lambda *a, **k: converted.append(1))
    with pytest.raises(OutputExistsError, match="native"):
        hybridize.run(recipe)
    assert converted == [] and not (tmp_path / "out").exists()  # refused before any work
    assert (tmp_path / "native" / "keep.txt").read_text() == "mine"


def test_an_export_step_with_overwrite_replaces_it(tmp_path, llama_dir):
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "keep.txt").write_text("mine")
    hybridize.run(_recipe(tmp_path, llama_dir, STEPS.replace("OUT", str(tmp_path))), overwrite=True)
    assert (tmp_path / "native" / "config.json").is_file() and not (tmp_path / "native" / "keep.txt").exists()


def test_the_same_steps_on_another_model_are_another_recipe(tmp_path, llama_dir):
    steps = "  - convert: {ratio: 0.5, seed: 3}\n"
    hybridize.run(_recipe(tmp_path, llama_dir, steps))
    other = save_tiny(tmp_path / "other", seed=1)
    with pytest.raises(OutputExistsError, match="not made by this recipe"):
        hybridize.run(_recipe(tmp_path, other, steps))
    report = hybridize.run(_recipe(tmp_path, other, steps), overwrite=True)
    assert [r["status"] for r in report] == ["ran"]


def test_overwrite_keeps_the_old_output_until_the_new_one_is_written(tmp_path, llama_dir, monkeypatch):
    hybridize.run(_recipe(tmp_path, llama_dir, "  - convert: {ratio: 0.5}\n"))
    before = _tree(tmp_path / "out")

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(pipeline, "convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        hybridize.run(_recipe(tmp_path, llama_dir, "  - convert: {ratio: 0.25}\n"), overwrite=True)
    assert _tree(tmp_path / "out") == before
