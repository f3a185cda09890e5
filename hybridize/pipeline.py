"""Recipes: a YAML list of steps run through the same API functions, with the same options, as the CLI.

```yaml
model: llama                      # the input: alias, directory, .gguf file or Hub id
output: out/smol-mamba50          # the model after every step that changes it
steps:
  - convert: {mixer: mamba2, ratio: 0.5}
  - distill: {teacher: llama, stage: layerwise, tokens: 200K}
  - eval: {max_tokens: 8192}
  - export: {to: granitemoehybrid, output: out/smol-mamba50-native}
  - export: {to: gguf, outtype: q8_0, output: out/smol-mamba50-q8_0.gguf}
```

Each step's options are its config's fields (`ConvertConfig`, `DistillConfig`, ...), read by `configs.options` as the
CLI reads them (YAML lists where a field is a tuple), plus the few runtime inputs the CLI also takes (`teacher`,
`baseline`, `output`, a distill step's `eval_every`). The whole recipe is validated before anything runs: an unknown
key or a bad value is named with its line. The output's `hybridize.json` records which recipe steps are done (a hash of
the recipe's model and steps, and the step's index), so running the same recipe again resumes after the last completed
step; the same steps from another model are another recipe.

Every path a recipe writes (its output, each export's output) is checked before anything runs, like the CLI's `-o`:
none may overlap a path it reads (the model, a teacher, a baseline, a model to fuse), and an existing one needs
`--overwrite`. `--overwrite` never deletes anything up front: each write replaces its output atomically when done.
"""

import hashlib
import importlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .configs import (
    BenchConfig,
    ConvertConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    FactorizeConfig,
    FuseConfig,
    PruneConfig,
    PushConfig,
)
from .configs.distill import EVAL_EVERY, RESUME_ADVICE
from .configs.options import coerce, config_fields
from .errors import ConfigError, HybridizeError, OutputExistsError
from .provenance import append_step, read_manifest, record_step
from .saving import check_output, save

logger = logging.getLogger(__name__)


def _on_first_call(module: str, name: str) -> Callable:
    """`hybridize.<module>.<name>`, imported when first called: validating a recipe (`hybridize run --check`, or a bad
    recipe refused before any work) needs only the configs above, which import no torch."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f".{module}", __package__), name)(*args, **kwargs)

    return call


bench = _on_first_call("evaluate.bench", "bench")
convert = _on_first_call("convert", "convert")
distill = _on_first_call("distill", "distill")
evaluate = _on_first_call("evaluate.perplexity", "evaluate")
export = _on_first_call("export", "export")
factorize = _on_first_call("compress.lowrank", "factorize")
finish = _on_first_call("distill", "finish")
fuse = _on_first_call("compress.fuse", "fuse")
load = _on_first_call("sources", "load")
prune = _on_first_call("compress.prune", "prune")
push = _on_first_call("hub", "push")
run_dir_for = _on_first_call("distill", "run_dir_for")


@dataclass
class _State:
    """What flows between steps: the current model, its tokenizer, the recipe's output directory, and what a step
    that writes elsewhere must respect (`overwrite`, the paths read)."""

    model: Any
    tokenizer: Any
    output: Path
    overwrite: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    """A recipe step: its config class, the runtime options it also accepts, and the function running it."""

    config_class: type
    run: Callable[[_State, Any, dict], dict | None]
    runtime: tuple[str, ...] = ()
    changes_model: bool = True


def _convert(state: _State, config: ConvertConfig, runtime: dict) -> None:
    state.model = convert(state.model, config, tokenizer=state.tokenizer, progress=True)


def _distill(state: _State, config: DistillConfig, runtime: dict) -> None:
    teacher, teacher_tokenizer = load(runtime["teacher"])
    state.model = distill(
        state.model,
        config,
        teacher=teacher,
        tokenizer=state.tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        work_dir=run_dir_for(state.output),
        resume=(run_dir_for(state.output)).exists(),
        eval_every=int(runtime.get("eval_every", EVAL_EVERY)),
        progress=True,
    )


def _eval(state: _State, config: EvalConfig, runtime: dict) -> dict:
    baseline = load(runtime["baseline"])[0] if runtime.get("baseline") else None
    return evaluate(state.model, config, tokenizer=state.tokenizer, baseline=baseline, progress=True)


def _bench(state: _State, config: BenchConfig, runtime: dict) -> dict:
    baseline = load(runtime["baseline"])[0] if runtime.get("baseline") else None
    return bench(state.model, config, tokenizer=state.tokenizer, baseline=baseline, progress=True)


def _prune(state: _State, config: PruneConfig, runtime: dict) -> None:
    state.model = prune(state.model, config, tokenizer=state.tokenizer, progress=True)


def _factorize(state: _State, config: FactorizeConfig, runtime: dict) -> None:
    state.model = factorize(state.model, config, tokenizer=state.tokenizer, progress=True)


def _fuse(state: _State, config: FuseConfig, runtime: dict) -> None:
    others = [load(str(spec)) for spec in runtime["models"]]
    state.model = fuse(
        [state.model, *(m for m, _ in others)],
        config,
        tokenizer=state.tokenizer,
        tokenizers=[state.tokenizer, *(t for _, t in others)],
        progress=True,
    )


def _export(state: _State, config: ExportConfig, runtime: dict) -> dict:
    inputs = (*state.inputs, state.output)
    if config.to == "gguf":
        from .llamacpp import export_gguf, tokenizer_origin

        origin = tokenizer_origin(state.model)
        export_gguf(
            state.model,
            runtime["output"],
            config,
            tokenizer=state.tokenizer,
            tokenizer_gguf=origin,
            overwrite=state.overwrite,
            inputs=inputs,
        )
        return {"output": str(runtime["output"])}
    save(
        export(state.model, config),
        runtime["output"],
        tokenizer=state.tokenizer,
        overwrite=state.overwrite,
        inputs=inputs,
    )
    return {"output": str(runtime["output"])}


def _push(state: _State, config: PushConfig, runtime: dict) -> dict:
    return {"url": push(state.output, config)}


STEPS: dict[str, Step] = {
    "convert": Step(ConvertConfig, _convert),
    "distill": Step(DistillConfig, _distill, runtime=("teacher", "eval_every")),
    "prune": Step(PruneConfig, _prune),
    "factorize": Step(FactorizeConfig, _factorize),
    "fuse": Step(FuseConfig, _fuse, runtime=("models",)),
    "eval": Step(EvalConfig, _eval, runtime=("baseline",), changes_model=False),
    "bench": Step(BenchConfig, _bench, runtime=("baseline",), changes_model=False),
    "export": Step(ExportConfig, _export, runtime=("output",), changes_model=False),
    "push": Step(PushConfig, _push, changes_model=False),
}
_REQUIRED_RUNTIME = {"distill": ("teacher",), "export": ("output",), "fuse": ("models",)}


@dataclass(frozen=True)
class PlannedStep:
    index: int
    name: str
    config: Any
    runtime: dict
    line: int


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the input model, the output directory and the planned steps."""

    model: str
    output: Path
    steps: tuple[PlannedStep, ...]
    digest: str


def _build_config(name: str, options: dict, line: int) -> tuple[Any, dict]:
    step = STEPS[name]
    fields = config_fields(step.config_class)
    unknown = sorted(set(options) - set(fields) - set(step.runtime))
    if unknown:
        known = sorted(set(fields) | set(step.runtime))
        raise ConfigError(f"line {line}: unknown key(s) {unknown} in step '{name}'; known keys: {known}")
    missing = [key for key in _REQUIRED_RUNTIME.get(name, ()) if key not in options]
    if missing:
        raise ConfigError(f"line {line}: step '{name}' needs {missing}")
    runtime = {key: options[key] for key in step.runtime if key in options}
    values = coerce(step.config_class, {key: value for key, value in options.items() if key in fields})
    try:
        return step.config_class(**values), runtime
    except ConfigError as error:
        raise ConfigError(f"line {line}: step '{name}': {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"line {line}: step '{name}': bad value: {error}") from None


def parse_recipe(text: str) -> Recipe:
    """Validate a recipe's text (YAML) completely, without running anything.

    Raises:
        `ConfigError`: naming the line of an unknown key, unknown step or bad value.
    """
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"the recipe is not valid YAML: {error}") from None
    if not isinstance(data, dict) or root is None:
        raise ConfigError("a recipe is a mapping with keys model, output and steps")
    lines = {key.value: key.start_mark.line + 1 for key, _ in root.value}
    unknown = sorted(set(data) - {"model", "output", "steps"})
    if unknown:
        raise ConfigError(f"line {lines[unknown[0]]}: unknown top-level key(s) {unknown}; known: model, output, steps")
    for key in ("model", "output", "steps"):
        if key not in data:
            raise ConfigError(f"the recipe needs a top-level '{key}'")
    steps_node = {key.value: value for key, value in root.value}["steps"]
    if not isinstance(data["steps"], list) or not data["steps"]:
        raise ConfigError(f"line {lines['steps']}: steps must be a non-empty list")
    planned = []
    for index, (entry, node) in enumerate(zip(data["steps"], steps_node.value)):
        line = node.start_mark.line + 1
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"line {line}: each step is one mapping like '- convert: {{ratio: 0.5}}'")
        ((name, options),) = entry.items()
        if name not in STEPS:
            raise ConfigError(f"line {line}: unknown step '{name}'; known steps: {sorted(STEPS)}")
        config, runtime = _build_config(name, options or {}, line)
        planned.append(PlannedStep(index, name, config, runtime, line))
    if not STEPS[planned[0].name].changes_model:
        first = planned[0]
        makers = sorted(name for name, step in STEPS.items() if step.changes_model)
        raise ConfigError(f"line {first.line}: the first step must produce the output model (one of {makers})")
    identity = {"model": str(data["model"]), "steps": data["steps"]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Recipe(model=str(data["model"]), output=Path(data["output"]), steps=tuple(planned), digest=digest)


def _completed(recipe: Recipe, overwrite: bool) -> set[int]:
    """Indices of this recipe's steps already recorded in the output; refuses an output made otherwise."""
    if not recipe.output.exists() or overwrite:
        return set()
    entries = read_manifest(recipe.output).get("steps", [])
    done = {e["recipe_step"] for e in entries if e.get("recipe") == recipe.digest and "recipe_step" in e}
    if not done:
        raise OutputExistsError(
            f"output {recipe.output} exists and was not made by this recipe; choose another output or pass --overwrite"
        )
    return done


def recipe_inputs(recipe: Recipe) -> tuple[str, ...]:
    """Every model path the recipe reads: its model, and each step's teacher, baseline and models to fuse."""
    paths = [recipe.model]
    for planned in recipe.steps:
        paths += [planned.runtime[key] for key in ("teacher", "baseline") if planned.runtime.get(key)]
        paths += [str(spec) for spec in planned.runtime.get("models", ())]
    return tuple(str(path) for path in paths)


def _check_exports(recipe: Recipe, inputs: tuple[str, ...], done: set[int], overwrite: bool) -> None:
    """Refuse, before any work, an export output that exists (without `overwrite`) or overlaps a path read."""
    for planned in recipe.steps:
        if planned.name == "export" and planned.index not in done:
            check_output(planned.runtime["output"], overwrite=overwrite, inputs=(*inputs, recipe.output))


def run_recipe(recipe: Recipe, *, overwrite: bool = False) -> list[dict]:
    """Run `recipe`, skipping the steps its output already records as done.

    Returns:
        `list[dict]`: one entry per step: its name, whether it ran or was skipped, and what it returned.
    """
    inputs = recipe_inputs(recipe)
    check_output(recipe.output, overwrite=True, inputs=inputs)  # overlap and writability; existence: `_completed`
    done = _completed(recipe, overwrite)
    _check_exports(recipe, inputs, done, overwrite)
    if overwrite:  # an earlier run's unfinished distillation is not this run's to resume
        shutil.rmtree(run_dir_for(recipe.output), ignore_errors=True)
    state = None
    report = []
    for planned in recipe.steps:
        if planned.index in done:
            report.append({"step": planned.name, "index": planned.index, "status": "skipped (done)"})
            continue
        if state is None:  # the model as the last completed step left it
            source = recipe.output if done else recipe.model
            state = _State(*load(str(source)), output=recipe.output, overwrite=overwrite, inputs=inputs)
        step = STEPS[planned.name]
        logger.info("recipe step %d (line %d): %s", planned.index, planned.line, planned.name)
        tag = {"recipe": recipe.digest, "recipe_step": planned.index}
        try:
            result = step.run(state, planned.config, planned.runtime)
        except HybridizeError as error:
            raise type(error)(f"recipe step {planned.index} '{planned.name}' (line {planned.line}): {error}") from None
        if step.changes_model:
            state.model.hybridize_steps[-1].update(tag)
            if planned.name == "distill":
                finish(state.model, recipe.output, tokenizer=state.tokenizer, overwrite=True, inputs=inputs)
            else:
                save(state.model, recipe.output, tokenizer=state.tokenizer, overwrite=True, inputs=inputs)
        else:  # recorded on disk now, and on the model so that a later save keeps it
            record_step(state.model, planned.name, planned.config, metrics=_jsonable(result), **tag)
            append_step(recipe.output, planned.name, planned.config, metrics=_jsonable(result), **tag)
        report.append({"step": planned.name, "index": planned.index, "status": "ran", "result": result})
    return report


def _jsonable(result: dict | None) -> dict:
    return json.loads(json.dumps(result or {}, default=str))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such recipe: {path}")
    return parse_recipe(path.read_text())


def run(path: str | Path, *, overwrite: bool = False) -> list[dict]:
    """Validate and run the recipe at `path` (see the module docstring).

    Example: `hybridize.run("recipes/smol-mamba50.yaml")`
    """
    recipe = load_recipe(path)
    try:
        return run_recipe(recipe, overwrite=overwrite)
    except HybridizeError as error:  # an interrupted distill step: a recipe resumes when run again, not by --resume
        message = str(error)
        if not message.endswith(f"; {RESUME_ADVICE}"):
            raise
        advice = f"run `hybridize run {path}` again to continue from it"
        raise type(error)(message.removesuffix(RESUME_ADVICE) + advice) from None


__all__ = [
    "STEPS",
    "PlannedStep",
    "Recipe",
    "Step",
    "load_recipe",
    "parse_recipe",
    "recipe_inputs",
    "run",
    "run_recipe",
]
