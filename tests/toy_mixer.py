"""A toy token mixer written outside the library, to prove that a mixer is one file plus its registration.

Each channel of v keeps an exponential moving average, h_t = a h_(t-1) + (1 - a) v_t with a per-channel decay
a = sigmoid(decay), shared over the query heads of its KV group; o_proj reads it out. It reuses the source attention's
v_proj and o_proj, so it converts like the library's mixers. Three paths: `ema_ref` token by token, `ema_scan` in
closed form over the whole sequence, and one decode step (`ema_ref` on one token, from the cache). Its cache layer
rolls back for speculative decoding.

Like the library's modeling files, it imports only torch, transformers and the hybrid's modeling siblings, so that
`hybridize.save` can ship it inside a checkpoint that loads without hybridize (`trust_remote_code=True`).
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import LinearAttentionLayer

try:  # inside a saved checkpoint: beside the hybrid's own modeling files
    from .configuration import mixer_settings
    from .mixer import Mixer, RollbackCacheLayer
except ImportError:  # imported from the test suite
    from hybridize.modeling.configuration import mixer_settings
    from hybridize.modeling.mixer import Mixer, RollbackCacheLayer

NAME = "toy"


@dataclass(frozen=True, kw_only=True)
class ToyMixerConfig:
    """Settings of the toy mixers of a hybrid (stored in `HybridConfig.mixers["toy"]`).

    Args:
        impl (`str`, *optional*, defaults to `"auto"`): `"auto"` the closed-form scan, `"ref"` the token loop.
    """

    impl: Literal["auto", "ref"] = "auto"

    @classmethod
    def from_hybrid_config(cls, config) -> "ToyMixerConfig":
        return mixer_settings(cls, config, NAME)


def ema_ref(v: torch.Tensor, a: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: v (b, l, c), a (c,), state (b, c) -> every h_t (b, l, c)."""
    out = []
    for t in range(v.shape[1]):
        state = a * state + (1 - a) * v[:, t]
        out.append(state)
    return torch.stack(out, 1)


def ema_scan(v: torch.Tensor, a: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The same in closed form: h_t = a^(t+1) state + sum_(j <= t) a^(t-j) (1 - a) v_j."""
    t = torch.arange(v.shape[1], device=v.device)
    lag = (t[:, None] - t[None, :]).to(v.dtype)  # (l, l)
    weights = (a[:, None, None] ** lag.clamp(min=0)) * (lag >= 0)  # (c, l, l)
    carried = a[None, :] ** (t[:, None] + 1).to(v.dtype)  # (l, c)
    return torch.einsum("ctj,bjc->btc", weights, (1 - a) * v) + carried * state[:, None]


class ToyCacheLayer(LinearAttentionLayer, RollbackCacheLayer):
    """The running average (transformers' recurrent state); while verifying, the average after each token."""

    max_rollback = float("inf")

    def __init__(self):
        super().__init__()
        self.checkpoint: torch.Tensor | None = None
        self.seen: list[torch.Tensor] = []

    def begin_verify(self) -> None:
        self.checkpoint, self.seen = self.recurrent_states[0].clone(), []

    def commit(self, num_tokens: int) -> None:
        seen = torch.cat(self.seen, 1) if self.seen else None
        checkpoint, self.checkpoint, self.seen = self.checkpoint, None, []
        self.recurrent_states[0].copy_(checkpoint if num_tokens == 0 else seen[:, num_tokens - 1])


class ToyMixer(Mixer):
    settings_class = ToyMixerConfig
    mask_type = "padding"
    readout = "o_proj"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.settings = self.settings_class.from_hybrid_config(config)
        self.layer_idx = layer_idx
        channels = config.num_key_value_heads * config.head_dim
        self.repeat = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        self.v_proj = nn.Linear(config.hidden_size, channels, bias=config.attention_bias)
        self.decay = nn.Parameter(torch.zeros(channels))
        self.o_proj = nn.Linear(channels * self.repeat, config.hidden_size, bias=config.attention_out_bias)

    @staticmethod
    def new_cache_layer(config, layer_idx: int) -> ToyCacheLayer:
        return ToyCacheLayer()

    def init_weights(self) -> None:
        self.decay.fill_(2.0)  # a = 0.88: an average over about 8 tokens

    def forward(self, hidden_states, *, attention_mask=None, cache=None, **kwargs) -> torch.Tensor:
        b, l, _ = hidden_states.shape
        v = self.v_proj(hidden_states)
        if attention_mask is not None:  # a padded position never enters the average
            v = v * attention_mask[:, -l:, None].to(v.dtype)
        a = torch.sigmoid(self.decay)
        layer = cache.layers[self.layer_idx] if cache is not None else None
        if layer is not None and layer.is_recurrent_states_initialized[0]:
            state = layer.recurrent_states[0]
        else:
            state = v.new_zeros(b, v.shape[-1])
        h = (ema_ref if self.settings.impl == "ref" or l == 1 else ema_scan)(v, a, state)
        if layer is not None:
            if layer.checkpoint is not None:
                layer.seen.append(h)
            layer.update_recurrent_state(h[:, -1].contiguous())
            layer.has_previous_state[0] = True
        h = h.view(b, l, -1, 1, self.head_dim).expand(-1, -1, -1, self.repeat, -1)  # GQA: one average per group
        return self.o_proj(h.reshape(b, l, -1))


@torch.no_grad()
def init_toy_from_attention(attn: nn.Module, config, layer_idx: int, convert_config, generator) -> ToyMixer:
    """The conversion: the source attention's v_proj and o_proj, the decay at its initial value."""
    mixer = ToyMixer(config, layer_idx).to(attn.v_proj.weight.dtype)
    mixer.init_weights()
    mixer.v_proj.load_state_dict(attn.v_proj.state_dict())
    mixer.o_proj.load_state_dict(attn.o_proj.state_dict())
    return mixer
