"""hybridize: turn a pretrained Hugging Face decoder into a cheaper hybrid, then distill, compress and evaluate it.

Importing the package is cheap: the public names (`hybridize.convert`, `hybridize.ConvertConfig`, `hybridize.load`,
...) are imported from their modules on first use (PEP 562), so that `hybridize --help` and argument errors do not
wait for torch and transformers.

Importing the package also registers the hybrid with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid without `trust_remote_code`. Registering needs
transformers and the modeling code, so it happens when transformers is imported, whatever imports it: at once if
transformers is already loaded, otherwise right after transformers' own `__init__` has run, or after the modeling
code's when that is what imports transformers (`_RegisterOnImport`).
Every `from_pretrained` therefore sees the hybrid registered, in any import order (`import hybridize` then
`from transformers import AutoModelForCausalLM`, as the README and model cards write it, or the other way round),
and also when a hybrid directory is loaded through `hybridize.sources.load`, which never imports the modeling code.
Registering on first attribute access or in `hybridize.modeling` would miss those two cases.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it; the configs come from the light `configs`, so
# that building one (and failing on a bad value) imports no torch
_API = {
    "AnalyzeConfig": "configs",
    "analyze": "analyze",
    "FactorizeConfig": "configs",
    "FuseConfig": "configs",
    "PruneConfig": "configs",
    "factorize": "compress",
    "fuse": "compress",
    "prune": "compress",
    "ConvertConfig": "configs",
    "convert": "convert",
    "convert_to_disk": "convert.to_disk",
    "Initializer": "convert.registry",
    "register_mixer": "mixers",
    "unregister_mixer": "mixers",
    "DistillConfig": "configs",
    "distill": "distill",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "HybridizeError": "errors",
    "OutputExistsError": "errors",
    "UnsupportedModelError": "errors",
    "BenchConfig": "configs",
    "bench": "evaluate.bench",
    "EvalConfig": "configs",
    "evaluate": "evaluate.perplexity",
    "ExportConfig": "configs",
    "export": "export",
    "export_gguf": "llamacpp.export",
    "GenerateConfig": "configs",
    "GenerateResult": "generate.result",
    "PromptLookupDraft": "configs",
    "compare_generate": "generate.compare",
    "early_exit_draft": "generate.drafts",
    "generate": "generate.loop",
    "PushConfig": "configs",
    "push": "hub",
    "HybridConfig": "modeling",
    "HybridForCausalLM": "modeling",
    "run": "pipeline",
    "check_output": "saving",
    "save": "saving",
    "load": "sources",
}
# Functions named like the submodule that holds them: `hybridize.convert` is the function, as `from .convert import
# convert` made it when this package imported everything eagerly.
_SHADOWED = {name for name, module in _API.items() if module.split(".")[0] == name}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """This package's module type. Importing a submodule sets it as an attribute of its package (`hybridize.convert`
    = the module); for the names in `_SHADOWED`, the function the submodule exports is set instead."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


def _register_with_transformers() -> None:
    """`AutoConfig` and `AutoModelForCausalLM` load the hybrid; saved checkpoints carry the modeling code (`auto_map`),
    so that `trust_remote_code=True` loads them without hybridize."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import HybridConfig, HybridForCausalLM

    AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
    AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
    HybridConfig.register_for_auto_class()
    HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Calls `_register_with_transformers` once `transformers` is imported (importing the modeling code then) and
    once `hybridize.modeling` is. The modeling code imports transformers first: while it runs, its classes do not
    exist yet, so the end of transformers' import leaves registering to the end of the modeling's. This finder finds
    no module itself: for those two names it asks the other finders and wraps the loader they return."""

    def __init__(self) -> None:
        self.pending = {"transformers", f"{__name__}.modeling"}
        self.modeling_running = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        finders = [finder for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")]
        spec = next(filter(None, (finder.find_spec(fullname, path, target) for finder in finders)), None)
        if spec is None or spec.loader is None:
            return spec
        exec_module, is_modeling = spec.loader.exec_module, fullname != "transformers"

        def exec_then_register(module: types.ModuleType) -> None:
            if is_modeling:
                self.modeling_running = True
                try:
                    exec_module(module)
                finally:
                    self.modeling_running = False
            else:
                exec_module(module)
            if not self.modeling_running:
                _register_with_transformers()

        spec.loader.exec_module = exec_then_register
        return spec


sys.modules[__name__].__class__ = _Package
if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(type(finder).__name__ == "_RegisterOnImport" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())

__all__ = [
    "AnalyzeConfig",
    "BenchConfig",
    "CheckpointError",
    "ConfigError",
    "ConvertConfig",
    "DistillConfig",
    "EvalConfig",
    "ExportConfig",
    "FactorizeConfig",
    "FuseConfig",
    "GenerateConfig",
    "GenerateResult",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridizeError",
    "Initializer",
    "OutputExistsError",
    "PromptLookupDraft",
    "PruneConfig",
    "PushConfig",
    "UnsupportedModelError",
    "analyze",
    "bench",
    "check_output",
    "compare_generate",
    "convert",
    "convert_to_disk",
    "distill",
    "early_exit_draft",
    "evaluate",
    "export",
    "export_gguf",
    "factorize",
    "fuse",
    "generate",
    "load",
    "prune",
    "push",
    "register_mixer",
    "run",
    "save",
    "unregister_mixer",
]
