"""Config values are type-checked from their annotations (`hybridize.validation`), in the configs themselves, so the
Python API, the CLI and recipes reject the same bad values with a `ConfigError` naming field, value and type."""

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytest
from tiny import run_cli

from hybridize.analyze import AnalyzeConfig
from hybridize.compress.fuse import FuseConfig
from hybridize.compress.lowrank import FactorizeConfig
from hybridize.compress.prune import PruneConfig
from hybridize.convert import ConvertConfig
from hybridize.distill import DistillConfig
from hybridize.distill.generated import GenerateConfig as GeneratedDataConfig
from hybridize.errors import ConfigError
from hybridize.evaluate import BenchConfig, EvalConfig
from hybridize.export import ExportConfig
from hybridize.generate import GenerateConfig, PromptLookupDraft
from hybridize.hub import PushConfig
from hybridize.pipeline import parse_recipe
from hybridize.validation import check_fields

# The bad values a bad-input battery found (issue 14, item 10), and their neighbours
BAD_VALUES = [
    (ConvertConfig, {"seed": "abc"}, "seed='abc' must be an integer, not a string"),
    (ConvertConfig, {"ratio": True}, "ratio=True must be a number, not a bool"),
    (ConvertConfig, {"ratio": "0.5"}, "ratio='0.5' must be a number, not a string"),
    (ConvertConfig, {"ratio": float("nan")}, "ratio=nan must be a number, not NaN"),
    (
        ConvertConfig,
        {"attn_layers": (1.7,)},
        r"attn_layers=\(1.7,\) must be a list of integers or None; 1.7 is a float",
    ),
    (ConvertConfig, {"attn_layers": (1, 3, 1)}, r"attn_layers=\(1, 3, 1\) has 1 more than once"),
    (ConvertConfig, {"attn_layers": "1,3"}, "attn_layers='1,3' must be a list of integers or None, not a string"),
    (ConvertConfig, {"full_every": 2.5}, "full_every=2.5 must be an integer or None, not a float"),
    (ConvertConfig, {"mixer_settings": [("chunk_size", 64)]}, "mixer_settings=.* must be a mapping, not a list"),
    (ConvertConfig, {"mixer": None}, "mixer=None must be a string, not None"),
    (DistillConfig, {"tokens": True}, "tokens=True must be an integer or a string, not a bool"),
    (DistillConfig, {"lr": "1e-3"}, "lr='1e-3' must be a number or None, not a string"),
    (DistillConfig, {"betas": (0.9,)}, r"betas=\(0.9,\) must be a list of 2 numbers; it has 1 item"),
    (DistillConfig, {"stage": "both"}, "stage='both' is not one of layerwise, e2e"),
    (DistillConfig, {"seed": 1.5}, "seed=1.5 must be an integer, not a float"),
    (EvalConfig, {"limit": True}, "limit=True must be an integer or None, not a bool"),
    (EvalConfig, {"tasks": ("wiki_ppl", "wiki_ppl")}, "tasks=.* has 'wiki_ppl' more than once"),
    (EvalConfig, {"tasks": ("wiki_ppl", 3)}, "tasks=.* must be a list of strings; 3 is an int"),
    (BenchConfig, {"contexts": (512, 512)}, r"contexts=\(512, 512\) has 512 more than once"),
    (PruneConfig, {"ffn": 64.5}, "ffn=64.5 must be an integer or None, not a float"),
    (PruneConfig, {"ffn": 64, "rescale_norms": "no"}, "rescale_norms='no' must be a bool"),
    (FactorizeConfig, {"targets": ("mlp", "mlp")}, "targets=.* has 'mlp' more than once"),
    (FuseConfig, {"weights": (1, "a")}, "weights=.* must be a list of numbers or None; 'a' is a string"),
    (GenerateConfig, {"do_sample": 1}, "do_sample=1 must be a bool"),
    (PromptLookupDraft, {"max_ngram": 2.5}, "max_ngram=2.5 must be an integer, not a float"),
    (PushConfig, {"repo_id": 3}, "repo_id=3 must be a string, not an int"),
    (ExportConfig, {"to": 1}, "to=1 must be a string, not an int"),
    (AnalyzeConfig, {"ratio": True}, "ratio=True must be a number, not a bool"),
    (GeneratedDataConfig, {"tokens": "5"}, "tokens='5' must be an integer, not a string"),
]


@pytest.mark.parametrize(("config_class", "kwargs", "message"), BAD_VALUES)
def test_bad_values_are_refused_with_field_value_and_type(config_class, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        config_class(**kwargs)


def test_values_of_the_right_kind_are_accepted_and_normalised():
    assert ConvertConfig(ratio=1).ratio == 1  # an integer is a number
    config = ConvertConfig(attn_layers=[3, 1.0, np.int64(2)])  # a list, an integral float, a NumPy integer
    assert config.attn_layers == (1, 2, 3) and all(type(i) is int for i in config.attn_layers)
    assert DistillConfig(seq_len=512.0, tokens="2M", betas=[0.9, 0.95]).seq_len == 512
    assert DistillConfig(betas=[0.9, 0.95]).betas == (0.9, 0.95)
    assert DistillConfig(tokens=1_000.0).tokens == 1000
    assert EvalConfig(tasks=["wiki_ppl"]).tasks == ("wiki_ppl",)
    assert FactorizeConfig(targets="mlp").targets == ("mlp",)  # one target by name, as before
    assert FuseConfig(weights=[2, 1, 1]).weights == (0.5, 0.25, 0.25)
    assert GenerateConfig(stop="\n\n").stop == ("\n\n",)  # one stop string, not its characters
    assert PruneConfig(params=1).params == 1


# Every config is checked: a value of the wrong kind in any of its fields is refused, naming that field

CONFIGS = {
    ConvertConfig: {},
    DistillConfig: {},
    PruneConfig: {"ffn": 64},
    FactorizeConfig: {},
    FuseConfig: {},
    EvalConfig: {},
    BenchConfig: {},
    ExportConfig: {},
    PushConfig: {"repo_id": "someone/model"},
    GenerateConfig: {},
    PromptLookupDraft: {},
    AnalyzeConfig: {},
    GeneratedDataConfig: {"tokens": 100},
}


def _wrong_value(annotation) -> Any:
    """A value no field of this annotation takes: a bool for a number, a float with a fraction for anything else
    (strings, choices, bools, lists, mappings)."""
    kinds = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) else {annotation}
    return True if kinds & {int, float} else 1.5


@pytest.mark.parametrize(
    ("config_class", "name"),
    [(cls, field.name) for cls in CONFIGS for field in dataclasses.fields(cls)],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_every_field_of_every_config_is_type_checked(config_class, name):
    value = _wrong_value(typing.get_type_hints(config_class)[name])
    with pytest.raises(ConfigError, match=f"^{name}="):
        config_class(**{**CONFIGS[config_class], name: value})


# The helper on its own


@dataclass(frozen=True, kw_only=True)
class _Example:
    choice: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (0.0, 1.0)
    counts: dict[str, int] | None = None
    anything: Any = None
    flag: bool = False

    def __post_init__(self):
        check_fields(self)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"choice": "c"}, "choice='c' is not one of a, b"),
        ({"pair": (1.0, 2.0, 3.0)}, "pair=.* must be a list of 2 numbers; it has 3 items"),
        ({"pair": (1.0, False)}, "pair=.* must be a list of 2 numbers; False is a bool"),
        ({"counts": {"x": "1"}}, "counts=.* must be a mapping or None"),
        ({"flag": 0}, "flag=0 must be a bool"),
    ],
)
def test_check_fields_reads_the_annotations(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _Example(**kwargs)
    assert _Example(pair=[1, 2.5], counts={"x": 1}, anything=object()).pair == (1, 2.5)


# Recipes: the same errors, with the line of the step


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ('  - convert: {ratio: 0.5, seed: "abc"}\n', r"line 4: step 'convert': seed='abc' must be an integer"),
        ("  - convert:\n      ratio: yes\n", r"line 4: step 'convert': ratio=True must be a number, not a bool"),
        ("  - convert: {attn_layers: [1, 3, 1]}\n", r"line 4: step 'convert': attn_layers=\(1, 3, 1\) has 1 more"),
        ("  - convert: {}\n  - distill: {teacher: llama, tokens: yes}\n", r"line 5: step 'distill': tokens=True"),
    ],
)
def test_recipe_values_are_type_checked_with_their_line(step, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(f"model: llama\noutput: out\nsteps:\n{step}")


def test_run_check_reports_a_bad_recipe_value(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f'model: llama\noutput: {tmp_path / "out"}\nsteps:\n  - convert: {{seed: "abc"}}\n')
    code, out = run_cli("run", recipe, "--check")
    assert code == 1
    assert "error: line 4: step 'convert': seed='abc' must be an integer, not a string" in out
    assert "Traceback" not in out and not (tmp_path / "out").exists()
