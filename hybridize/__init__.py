"""hybridize: turn a pretrained Hugging Face decoder into a cheaper hybrid, then distill, compress and evaluate it.

Importing the package registers the hybrid model with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .analyze import AnalyzeConfig, analyze
from .compress import FactorizeConfig, FuseConfig, PruneConfig, factorize, fuse, prune
from .convert import ConvertConfig, convert
from .distill import DistillConfig, distill
from .errors import CheckpointError, ConfigError, HybridizeError, OutputExistsError, UnsupportedModelError
from .evaluate.bench import BenchConfig, bench
from .evaluate.perplexity import EvalConfig, evaluate
from .export import ExportConfig, export
from .generate import (
    GenerateConfig,
    GenerateResult,
    PromptLookupDraft,
    compare_generate,
    early_exit_draft,
    generate,
)
from .hub import PushConfig, push
from .modeling import HybridConfig, HybridForCausalLM
from .pipeline import run
from .saving import check_output, save
from .sources import load

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
# Saved checkpoints carry the modeling code (auto_map) so trust_remote_code=True loads them without hybridize
HybridConfig.register_for_auto_class()
HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

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
    "distill",
    "early_exit_draft",
    "evaluate",
    "export",
    "factorize",
    "fuse",
    "generate",
    "load",
    "prune",
    "push",
    "run",
    "save",
]
