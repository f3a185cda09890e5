"""The user-facing configs, with their checks, importable without torch.

`hybridize --help` reads the options' names, defaults and help from these classes (`configs/options.py`), and a bad
option (`--ratio 1.5`, `--lr -1`) fails when the CLI builds its config, before torch, transformers, lm-eval, POT,
matplotlib or datasets is imported (issue 14, "fast to say no"; `tests/test_fast_cli.py`). So each config and the
constants its checks use (allowed choices, defaults) live here, one module per API module: `configs/convert.py` for
`hybridize.convert`, `configs/distill.py` for `hybridize.distill`, and so on. Checks against a model (`check_convert`,
`check_bench`, ...) stay with the API, since they run after its config is read.

Why a package of its own rather than `hybridize/convert/config.py`: importing `hybridize.convert.config` runs
`hybridize/convert/__init__.py` first, which imports torch. The parent here is `hybridize`, whose `__init__` is light.
Modules here import only the standard library, `hybridize.errors`, `hybridize.validation` and each other (and typer,
inside the functions of `options.py` that declare CLI options).

Each API module re-exports its config (`hybridize.convert.ConvertConfig is hybridize.configs.ConvertConfig`), so
either import path works; the API modules import the constants back from here.
"""

from .analyze import AnalyzeConfig
from .compress import FactorizeConfig, FuseConfig, PruneConfig
from .convert import ConvertConfig
from .distill import DistillConfig
from .evaluate import BenchConfig, EvalConfig
from .export import ExportConfig
from .generate import GenerateConfig, PromptLookupDraft
from .hub import PushConfig

__all__ = [
    "AnalyzeConfig",
    "BenchConfig",
    "ConvertConfig",
    "DistillConfig",
    "EvalConfig",
    "ExportConfig",
    "FactorizeConfig",
    "FuseConfig",
    "GenerateConfig",
    "PromptLookupDraft",
    "PruneConfig",
    "PushConfig",
]
