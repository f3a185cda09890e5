"""hybridize: turn a pretrained Hugging Face decoder into a cheaper hybrid, then distill, compress and evaluate it.

Importing the package registers the hybrid model with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .convert import ConvertConfig, convert
from .errors import CheckpointError, ConfigError, HybridizeError, OutputExistsError, UnsupportedModelError
from .modeling import HybridConfig, HybridForCausalLM
from .saving import save
from .sources import load_source as load

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
# Saved checkpoints carry the modeling code (auto_map) so trust_remote_code=True loads them without hybridize
HybridConfig.register_for_auto_class()
HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvertConfig",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridizeError",
    "OutputExistsError",
    "UnsupportedModelError",
    "convert",
    "load",
    "save",
]
