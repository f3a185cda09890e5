"""Per-mixer conversion, one entry per mixer: how the mixer is built from a source attention layer, and what it fits
on calibration text before its readout. `convert`, `--select sensitivity` and the calibrated initialisation read
this table and nothing mixer-specific; a new mixer adds its initialiser file and one line here.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from ..configs.convert import ConvertConfig
from ..errors import ConfigError
from ..families import check_supported, head_dim
from ..modeling import MIXERS, HybridConfig
from .gdn import calibrate_gdn, init_gdn_from_attention
from .mamba2 import calibrate_mamba2, init_mamba2_from_attention
from .nha import init_nha_from_attention
from .streaming import init_streaming_from_attention


@dataclass(frozen=True, kw_only=True)
class Initializer:
    """How one mixer starts from a source attention layer.

    Args:
        build (`Callable`): `(attn, hybrid_config, layer_idx, convert_config, generator) -> mixer`, the new mixer
            with what it reuses of `attn` copied in.
        calibrate (`Callable`, *optional*): `(mixer, inputs, head_outputs, position_embeddings) -> report`, what
            `mixer_init="calibrated"` fits on calibration text before the readout (`calibrated.calibrate_mixer`);
            `None` when the readout alone is fitted.
        version (`int`, *optional*, defaults to 1): raised when what `build` or `calibrate` computes changes, so
            that sensitivity scores cached with the older initialisation are measured again (`sensitivity.cache_key`).
    """

    build: Callable[..., nn.Module]
    calibrate: Callable[..., dict] | None = None
    version: int = 1


INITIALIZERS = {
    "gdn": Initializer(build=init_gdn_from_attention, calibrate=calibrate_gdn, version=2),  # 2: per-head beta
    "mamba2": Initializer(build=init_mamba2_from_attention, calibrate=calibrate_mamba2),
    "nha": Initializer(build=init_nha_from_attention),
    "streaming": Initializer(build=init_streaming_from_attention),
}


def hybrid_config_for(source: PreTrainedModel, mixer_types: list[str], config: ConvertConfig) -> HybridConfig:
    """The `HybridConfig` of `source` with the given mixer per layer; fails before any weight is touched."""
    src = source.config
    family = check_supported(src)
    attn = source.model.layers[0].self_attn
    hybrid_config = HybridConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        head_dim=head_dim(src),
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps,
        rope_parameters=dict(src.rope_parameters),
        tie_word_embeddings=src.tie_word_embeddings,
        attention_bias=attn.q_proj.bias is not None,
        attention_out_bias=attn.o_proj.bias is not None,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id,
        initializer_range=src.initializer_range,
        mixer_types=mixer_types,
        mixers={config.mixer: dict(config.mixer_settings)},
        source_model_type=family.name,
    )
    hybrid_config.dtype = source.dtype
    try:  # the mixer's own settings class checks them, before any weight is touched
        MIXERS[config.mixer].settings_class.from_hybrid_config(hybrid_config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad {config.mixer} settings {config.mixer_settings}: {error}") from None
    return hybrid_config


__all__ = ["INITIALIZERS", "Initializer", "hybrid_config_for"]
