"""`HybridForCausalLM`: a Llama-family decoder in which each layer runs the mixer its config names.

Layer = norm -> mixer -> residual -> norm -> MLP -> residual, as in Llama; only the mixer varies. Embeddings, norms,
MLPs and the (tied) head are the source model's, under the same names.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .cache import HybridCache
from .configuration import HybridConfig
from .lowrank import apply_lowrank
from .mixer import Mixer
from .mixers import MIXERS


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        mixer_type = config.mixer_types[layer_idx]
        if mixer_type not in MIXERS:
            raise ValueError(f"layer {layer_idx} has unknown mixer {mixer_type!r}; known mixers: {sorted(MIXERS)}")
        self.mixer_type = mixer_type
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MIXERS[mixer_type](config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        # Linears factorized by `hybridize factorize` are built as two matmuls, so their saved factors load
        apply_lowrank(self, config.lowrank, prefix=f"model.layers.{layer_idx}.")

    def forward(self, hidden_states, *, position_embeddings, causal_mask, padding_mask, cache=None, **kwargs):
        # Token mixing: attention wants the causal mask, recurrent mixers only which tokens are padding
        mask = causal_mask if self.mixer.mask_type == "causal" else padding_mask
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.mixer(
            hidden_states, position_embeddings=position_embeddings, attention_mask=mask, cache=cache
        )
        hidden_states = residual + hidden_states
        # Channel mixing
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Mixer):  # a mixer's own parameters (Mamba2's A_log, D, dt_bias), after the defaults
            module.init_weights()


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = HybridCache(self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        causal_mask = None
        if any(layer.mixer.mask_type == "causal" for layer in self.layers):
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                causal_mask=causal_mask,
                padding_mask=padding_mask,
                cache=cache,
            )
        if cache is not None:
            cache.num_seen_tokens += inputs_embeds.shape[1]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """A causal LM over [`HybridModel`]; loads, saves, trains and generates like any transformers model.

    Example:
        ```python
        >>> import hybridize, transformers
        >>> model = transformers.AutoModelForCausalLM.from_pretrained("out/smol-mamba50")
        ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = kwargs.pop("past_key_values", cache)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # transformers' default DynamicCache only knows attention layers; give generate() a cache per mixer
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = HybridCache(self.config)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


__all__ = ["HybridDecoderLayer", "HybridForCausalLM", "HybridModel", "HybridPreTrainedModel"]
