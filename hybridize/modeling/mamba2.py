"""Mamba2 mixer in place of attention (MambaInLlama, arXiv 2408.15237; SSD scan from arXiv 2405.21060).

Shapes: b batch, l length, h heads, g KV groups, p head_dim, n state size. Each SSM head is one attention head:
C comes from q (one per head), x and B from v and k (one per KV group, repeated to the heads of the group exactly as
GQA repeats keys and values). `mamba2_scan_ref` (token by token: the definition), `mamba2_scan_chunked` (SSD, chunk
by chunk) and `mamba2_step` (one decode token) compute one function and are tested equal.

The recurrence, per head: H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T (H is p x n), y_t = H_t C_t + D x_t.
"""

from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import LinearAttentionLayer

from .common import RMSNormGated, causal_conv1d
from .configuration import HybridConfig, mixer_settings
from .mixer import Mixer, RollbackCacheLayer

try:  # the Triton SSD kernel of state-spaces/mamba, used on CUDA when installed; torch is the fallback
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None


@dataclass(frozen=True, kw_only=True)
class Mamba2MixerConfig:
    """Settings of the Mamba2 mixers of a hybrid (stored in `HybridConfig.mixers["mamba2"]`).

    Args:
        num_heads (`int`): SSM heads; the source's attention heads.
        num_groups (`int`): groups sharing x and B; the source's KV heads.
        head_dim (`int`): channels per head (p).
        state_size (`int`): SSM state per head (n); the key size, so that B can be k.
        conv_kernel (`int`, *optional*, defaults to 4): width of the causal depthwise convolution.
        chunk_size (`int`, *optional*, defaults to 64): SSD chunk length; never changes the output, only speed.
        impl (`str`, *optional*, defaults to `"auto"`): `"auto"` takes the fastest available path (the chunked scan on
            CPU); `"ref"` forces the token-by-token reference (slow, for debugging).
    """

    num_heads: int
    num_groups: int
    head_dim: int
    state_size: int
    conv_kernel: int = 4
    chunk_size: int = 64
    impl: Literal["auto", "ref"] = "auto"

    def __post_init__(self):
        if self.num_heads % self.num_groups != 0:
            raise ValueError(
                f"mamba2 num_heads ({self.num_heads}) must be a multiple of num_groups ({self.num_groups})"
            )
        if min(self.head_dim, self.state_size, self.conv_kernel, self.chunk_size) < 1:
            raise ValueError(f"mamba2 sizes must be positive, got {self}")
        if self.impl not in ("auto", "ref"):
            raise ValueError(f"mamba2 impl must be 'auto' or 'ref', got {self.impl!r}")

    @classmethod
    def from_hybrid_config(cls, config: HybridConfig) -> "Mamba2MixerConfig":
        """The settings in `config.mixers["mamba2"]`, with shapes defaulting to the source attention's."""
        defaults = {
            "num_heads": config.num_attention_heads,
            "num_groups": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "state_size": config.head_dim,
        }
        return mixer_settings(cls, config, "mamba2", defaults)


def mamba2_step(state, x, dt, A, B, C, D):
    """One token. state (b, h, p, n), x (b, h, p), dt (b, h), A and D (h,), B and C (b, h, n)."""
    state = torch.exp(dt * A)[..., None, None] * state + (dt[..., None] * x)[..., None] * B[:, :, None]
    return state, (state * C[:, :, None]).sum(-1) + D[:, None] * x


def mamba2_step_grouped_(state, x, dt, A, B, C, D):
    """`mamba2_step` with GQA groups left unexpanded, updating `state` in place (the decode fast path).

    state (b, g, r, p, n) with r = heads per group, x (b, g, 1, p), dt (b, g, r), A and D (g, r), B (b, g, 1, n),
    C (b, g, r, n) -> y (b, g, r, p). Broadcasting over r replaces the `repeat_interleave` of x and B.
    """
    state.mul_(torch.exp(dt * A)[..., None, None])  # decay, (b, g, r, p, n)
    state.addcmul_((dt[..., None] * x)[..., None], B[:, :, :, None])  # + dt x B^T
    return (state @ C[..., None])[..., 0] + D[..., None] * x  # H C + D x, (b, g, r, p)


def mamba2_scan_ref(x, dt, A, B, C, D, state=None):
    """`mamba2_step` over the sequence. x (b, l, h, p), dt (b, l, h), B and C (b, l, h, n) -> y (b, l, h, p) and
    the final state (b, h, p, n)."""
    state = x.new_zeros(x.shape[0], *x.shape[2:], B.shape[-1]) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        state, y = mamba2_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def mamba2_scan_kernel(x, dt, A, B, C, D, state=None, *, chunk_size=64):
    """`mamba2_scan_chunked` through mamba_ssm's fused Triton kernel (CUDA only); same inputs and outputs."""
    y, final_state = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, initial_states=state, return_final_states=True
    )
    return y, final_state


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = x[j+1] + ... + x[i] for i >= j and -inf above the diagonal."""
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)  # x[..., i, j] = x_i
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return sums.masked_fill(~lower, -torch.inf)


def mamba2_scan_chunked(x, dt, A, B, C, D, state=None, *, chunk_size=64):
    """Same inputs and outputs as `mamba2_scan_ref`, computed chunk by chunk (SSD, arXiv 2405.21060 Listing 1):
    quadratic attention-like products inside a chunk, the recurrence only between chunks."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    T = chunk_size
    pad = (-l) % T
    if pad:  # zero dt and x leave the state untouched, so padding changes nothing
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (l + pad) // T
    xs = (x * dt[..., None]).view(b, c, T, h, p)
    Bs, Cs = B.view(b, c, T, h, n), C.view(b, c, T, h, n)
    A_dt = (dt * A).view(b, c, T, h).permute(0, 3, 1, 2)  # (b, h, c, T)
    A_cum = torch.cumsum(A_dt, dim=-1)

    # 1. Inside each chunk: y = (C B^T ∘ decay) x
    scores = torch.einsum("bclhn,bcshn->bhcls", Cs, Bs) * torch.exp(_segsum(A_dt))  # (b, h, c, T, T)
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xs)

    # 2. The state each chunk leaves behind, on its own
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, T)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bs, decay_to_end, xs)

    # 3. Carry states across chunks, starting from `state`
    initial = x.new_zeros(b, h, p, n) if state is None else state.to(x.dtype)
    chunk_states = torch.cat([initial[:, None], chunk_states], dim=1)  # (b, c + 1, h, p, n)
    decay_chunks = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c + 1, c + 1)
    carried = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, chunk_states)
    chunk_states, final_state = carried[:, :-1], carried[:, -1]

    # 4. What the state entering each chunk contributes to its outputs
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cs, chunk_states, torch.exp(A_cum))
    y = y.reshape(b, c * T, h, p)[:, :l]
    return y + D[:, None] * x[:, :l], final_state


def mamba2_chunk_state(x, dt, A, B, state):
    """The state after l tokens in closed form, GQA groups unexpanded: H_l = exp(a_1 + ... + a_l) H_0 +
    sum_s exp(a_{s+1} + ... + a_l) dt_s x_s B_s^T with a = dt A, one contraction over the tokens.

    x (b, l, g, p), dt (b, l, g, r) with r = heads per group, A (g, r), B (b, l, g, n), state (b, g, r, p, n);
    l >= 1 -> (b, g, r, p, n).
    """
    a = dt * A  # (b, l, g, r) log decay of each token
    # a_{s+1} + ... + a_l as a reversed cumulative sum of the next tokens' terms (no difference of large sums)
    after = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1).flip(1).cumsum(1).flip(1)
    added = torch.einsum("blgr,blgp,blgn->bgrpn", torch.exp(after) * dt, x, B)
    return torch.exp(after[:, 0] + a[:, 0])[..., None, None] * state + added


def mamba2_chunk_grouped(x, dt, A, B, C, D, state):
    """The outputs of `mamba2_scan_chunked` for a few tokens: one chunk of exactly l tokens (no padding to
    `chunk_size`) with GQA groups unexpanded (x and B broadcast over the heads of their group, not repeated), and no
    final state (`mamba2_chunk_state` gives the state after any of them). The verify path of speculative decoding,
    which runs K + 1 tokens from a cached state and keeps the state after the accepted ones only.

    x (b, l, g, p), dt (b, l, g, r), A and D (g, r), B (b, l, g, n), C (b, l, g, r, n), state (b, g, r, p, n)
    -> y (b, l, g, r, p).
    """
    a = (dt * A).permute(0, 2, 3, 1)  # (b, g, r, l)
    # Inside the chunk: y_t = sum_{s <= t} exp(a_{s+1} + ... + a_t) (C_t . B_s) dt_s x_s
    scores = torch.einsum("btgrn,bsgn->bgrts", C, B) * torch.exp(_segsum(a)) * dt.permute(0, 2, 3, 1)[..., None, :]
    y = torch.einsum("bgrts,bsgp->btgrp", scores, x)
    # The cached state decayed to each token, exp(a_1 + ... + a_t) H_0 C_t, and the skip D x_t
    decay = torch.exp(torch.cumsum(a, -1)).permute(0, 3, 1, 2)[..., None]  # (b, l, g, r, 1)
    return y + decay * torch.einsum("bgrpn,btgrn->btgrp", state, C) + D[..., None] * x[:, :, :, None]


PREFILL_SEGMENT = 2048  # tokens mixed at a time by the generic path (`Mamba2Mixer.forward`)


class VerifiedCall(NamedTuple):
    """What a Mamba2 layer keeps of one call while speculative decoding verifies (`Mamba2CacheLayer.record`): enough
    to give the conv and SSM states after any of its tokens.

    Args:
        conv_inputs (`torch.Tensor`): (b, c, l) the call's conv inputs.
        conv_state (`torch.Tensor`): (b, c, k) the conv state after the call.
        start (`torch.Tensor`): (b, h, p, n) the SSM state before the call.
        x (`torch.Tensor`), dt (`torch.Tensor`), A (`torch.Tensor`), B (`torch.Tensor`): its scan inputs, GQA groups
            unexpanded: x (b, l, g, p), dt (b, l, g, r), A (g, r), B (b, l, g, n).
        state (`torch.Tensor`, *optional*): (b, h, p, n) the SSM state after the call, once known.
    """

    conv_inputs: torch.Tensor
    conv_state: torch.Tensor
    start: torch.Tensor
    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    state: torch.Tensor | None = None

    def state_after(self, num_tokens: int) -> torch.Tensor:
        """The SSM state (b, h, p, n) after the call's first `num_tokens` tokens, in closed form (`mamba2_chunk_state`)."""
        if num_tokens == self.x.shape[1] and self.state is not None:
            return self.state
        x, dt, B = self.x[:, :num_tokens], self.dt[:, :num_tokens], self.B[:, :num_tokens]
        start = self.start.to(x.dtype).unflatten(1, dt.shape[2:])  # (b, g, r, p, n)
        return mamba2_chunk_state(x, dt, self.A, B, start).flatten(1, 2)


class Mamba2CacheLayer(LinearAttentionLayer, RollbackCacheLayer):
    """Conv state + SSM state (transformers' `LinearAttentionLayer`), which can also roll back for speculative
    decoding (MambaInLlama's hardware-aware speculative decoding, arXiv 2408.15237; research/methods-conversion.md
    §1.5). An SSM state cannot be truncated, so `begin_verify()` marks the state at the last verified token; while
    verifying, the mixer leaves the stored states alone and `record`s each call's inputs after the projections
    (`VerifiedCall`); `commit(n)` stores the states after the first n tokens, the SSM state computed in closed form in
    one contraction (`mamba2_chunk_state`): no step is replayed and no projection recomputed, and nothing is computed
    when every token is rejected. Since nothing writes the stored states while verifying, the mark is a reference,
    not a copy. Nothing is recorded outside a `begin_verify()` ... `commit()` pair.
    """

    max_rollback = float("inf")  # the record gives the state after any number of tokens

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint: tuple[torch.Tensor, torch.Tensor] | None = None  # (conv state, SSM state) at begin_verify
        self.steps: list[VerifiedCall] = []  # the calls since begin_verify

    def begin_verify(self) -> None:
        """Mark the current state; steps run from now on can be undone by `commit`."""
        if not self.has_previous_state[0]:
            raise ValueError("a Mamba2 cache layer can only begin verification after a prefill has filled it")
        self.checkpoint = (self.conv_states[0], self.recurrent_states[0])  # not written until commit
        self.steps = []

    def verify_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv state (b, c, k) and SSM state (b, h, p, n) that the next call continues from while verifying."""
        if not self.steps:
            return self.checkpoint
        last = self.steps[-1]
        if last.state is None:  # computed once another call follows
            self.steps[-1] = last = last._replace(state=last.state_after(last.x.shape[1]))
        return last.conv_state, last.state

    def record(self, call: VerifiedCall) -> None:
        """Called by `Mamba2Mixer` for each call while verifying."""
        self.steps.append(call)

    def commit(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` steps run since `begin_verify` and forget the others."""
        (conv_state, _), steps = self.checkpoint, self.steps
        self.checkpoint, self.steps = None, []
        seen = sum(call.x.shape[1] for call in steps)
        if not 0 <= num_tokens <= seen:
            raise ValueError(f"cannot keep {num_tokens} steps: {seen} were run since begin_verify")
        if num_tokens == 0:  # the stored states are still those at begin_verify
            return
        # The conv state: the last k inputs
        conv_inputs = torch.cat([call.conv_inputs for call in steps], -1)[..., :num_tokens]
        kernel = conv_state.shape[-1]
        self.conv_states[0].copy_(torch.cat([conv_state, conv_inputs.to(conv_state.dtype)], -1)[..., -kernel:])
        # The SSM state after the last kept token, from the call that ran it
        for call in steps:
            if num_tokens <= call.x.shape[1]:
                break
            num_tokens -= call.x.shape[1]
        self.recurrent_states[0].copy_(call.state_after(num_tokens))


class Mamba2Mixer(Mixer):
    """Mamba2 token mixer: in_proj -> causal conv over x|B|C -> SSD scan -> gated RMSNorm -> out_proj.

    `in_proj` rows, in order: z (h·p, gate), x (g·p), B (g·n), C (h·n), dt (h). The names follow transformers'
    Mamba2 modules (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm`, `out_proj`) so export is a rename.
    """

    settings_class = Mamba2MixerConfig
    mask_type = "padding"  # recurrent: only needs to know which tokens are padding
    readout = "out_proj"  # the output projection a calibrated conversion refits

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.settings = s = Mamba2MixerConfig.from_hybrid_config(config)
        self.layer_idx = layer_idx
        self.inner_size = s.num_heads * s.head_dim
        self.conv_size = s.num_groups * (s.head_dim + s.state_size) + s.num_heads * s.state_size
        self.in_proj = nn.Linear(
            config.hidden_size, self.inner_size + self.conv_size + s.num_heads, bias=config.attention_bias
        )
        self.conv1d = nn.Conv1d(self.conv_size, self.conv_size, s.conv_kernel, groups=self.conv_size)
        self.dt_bias = nn.Parameter(torch.ones(s.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, s.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(s.num_heads))
        self.norm = RMSNormGated(self.inner_size, group_size=s.head_dim, eps=config.rms_norm_eps)  # per head
        self.out_proj = nn.Linear(self.inner_size, config.hidden_size, bias=config.attention_out_bias)

    @staticmethod
    def new_cache_layer(config: HybridConfig, layer_idx: int) -> "Mamba2CacheLayer":
        return Mamba2CacheLayer()  # conv state + SSM state, as in transformers' own Mamba2 hybrids

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba_ssm's defaults: A = -(1, ..., h), D = 1, dt_bias = 1, norm weight 1; conversion overwrites them."""
        self.A_log.copy_(torch.log(torch.arange(1, self.A_log.numel() + 1, dtype=self.A_log.dtype)))
        self.D.fill_(1.0)
        self.dt_bias.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def _project(self, hidden_states, attention_mask):
        """in_proj -> gate (b, l, h·p), conv inputs xBC (b, conv_size, l) and dt (b, l, h) before its bias."""
        l = hidden_states.shape[1]
        if attention_mask is not None:  # zero padded positions so they never enter the state
            hidden_states = hidden_states * attention_mask[:, -l:, None].to(hidden_states.dtype)
        sizes = [self.inner_size, self.conv_size, self.settings.num_heads]
        gate, xBC, dt = self.in_proj(hidden_states).split(sizes, dim=-1)
        return gate, xBC.transpose(1, 2), dt

    def _project_and_convolve(self, hidden_states, attention_mask, conv_state):
        """`_project` then `_convolve`: x, dt, B, C, gate and the new conv state."""
        gate, xBC, dt = self._project(hidden_states, attention_mask)
        x, dt, B, C, conv_state = self._convolve(xBC, dt, attention_mask, conv_state)
        return x, dt, B, C, gate, conv_state

    def _convolve(self, xBC, dt, attention_mask, conv_state):
        """Conv inputs xBC (b, conv_size, l) -> x (b, l, h, p), dt (b, l, h), B and C (b, l, h, n), new conv state."""
        s = self.settings
        b, _, l = xBC.shape
        xBC, conv_state = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, conv_state)
        xBC = F.silu(xBC.transpose(1, 2))
        if attention_mask is not None:
            xBC = xBC * attention_mask[:, -l:, None].to(xBC.dtype)
        x, B, C = xBC.split([s.num_groups * s.head_dim, s.num_groups * s.state_size, s.num_heads * s.state_size], -1)
        # GQA: each group's x and B serve num_heads // num_groups consecutive heads
        repeat = s.num_heads // s.num_groups
        x = x.view(b, l, s.num_groups, s.head_dim).repeat_interleave(repeat, dim=2)  # (b, l, h, p)
        B = B.view(b, l, s.num_groups, s.state_size).repeat_interleave(repeat, dim=2)  # (b, l, h, n)
        C = C.view(b, l, s.num_heads, s.state_size)  # (b, l, h, n)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        return x, dt, B, C, conv_state

    def _can_step(self, hidden_states, cache) -> bool:
        """Whether `_step` applies: one token after a prefill, states in the dtypes it writes in place, and no
        speculative verification or transformers past recording (both need the generic path's bookkeeping)."""
        if cache is None or hidden_states.shape[1] != 1:
            return False
        layer = cache.layers[self.layer_idx]
        if not layer.has_previous_state[0] or layer.record_past or getattr(layer, "checkpoint", None) is not None:
            return False
        conv_state, state = layer.conv_states[0], layer.recurrent_states[0]
        scan_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        return (
            conv_state.dtype == hidden_states.dtype
            and state.dtype == scan_dtype
            and conv_state.is_contiguous()
            and state.is_contiguous()
        )

    def _step(self, hidden_states, attention_mask, layer) -> torch.Tensor:
        """One decode token (b, 1, hidden) -> (b, 1, hidden), updating the conv and SSM states of `layer` in place.

        The same function as the generic path with l = 1, doing only what one token needs: the depthwise conv is a
        multiply-and-sum over the rolling conv state, and GQA groups broadcast instead of being repeated.
        """
        s = self.settings
        b, g, r = hidden_states.shape[0], s.num_groups, s.num_heads // s.num_groups
        hidden_states = hidden_states[:, 0]  # (b, hidden)
        if attention_mask is not None:  # as in `_project`: a padded position never enters the state
            hidden_states = hidden_states * attention_mask[:, -1:].to(hidden_states.dtype)
        gate, xBC, dt = self.in_proj(hidden_states).split([self.inner_size, self.conv_size, s.num_heads], dim=-1)

        # Causal conv: shift the last k inputs left by one in place, append this token, multiply-and-sum the taps
        conv_state = layer.conv_states[0]  # (b, conv_size, k)
        conv_state.copy_(conv_state.roll(-1, dims=-1))
        conv_state[..., -1] = xBC
        xBC = (conv_state * self.conv1d.weight[:, 0]).sum(-1)  # (b, conv_size)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = F.silu(xBC)
        if attention_mask is not None:
            xBC = xBC * attention_mask[:, -1:].to(xBC.dtype)

        # SSM step in the scan dtype (float32 at least), heads grouped as (g, r) so x and B broadcast over r
        scan_dtype = layer.recurrent_states[0].dtype
        x, B, C = xBC.to(scan_dtype).split([g * s.head_dim, g * s.state_size, s.num_heads * s.state_size], -1)
        x = x.view(b, g, 1, s.head_dim)
        B = B.view(b, g, 1, s.state_size)
        C = C.view(b, g, r, s.state_size)
        dt = F.softplus(dt + self.dt_bias).to(scan_dtype).view(b, g, r)
        A = -torch.exp(self.A_log.to(scan_dtype)).view(g, r)
        D = self.D.to(scan_dtype).view(g, r)
        state = layer.recurrent_states[0].view(b, g, r, s.head_dim, s.state_size)
        y = mamba2_step_grouped_(state, x, dt, A, B, C, D)  # (b, g, r, p)
        y = y.reshape(b, 1, self.inner_size).to(hidden_states.dtype)
        return self.out_proj(self.norm(y, gate[:, None]))

    def forward(self, hidden_states, *, attention_mask=None, cache=None, **kwargs) -> torch.Tensor:
        """hidden_states (b, l, hidden) -> (b, l, hidden). `attention_mask` is the 2-D padding mask (1 = token).

        Inputs longer than `PREFILL_SEGMENT` are mixed segment by segment, each continuing from the states the previous
        one left: the same output, with the scan's per-chunk tensors held for one segment at a time (an 8K prefill
        otherwise peaks above the attention it replaces)."""
        if self._can_step(hidden_states, cache):
            return self._step(hidden_states, attention_mask, cache.layers[self.layer_idx])
        if cache is not None and getattr(cache.layers[self.layer_idx], "checkpoint", None) is not None:
            return self._verify(hidden_states, attention_mask, cache.layers[self.layer_idx])  # speculative decoding
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        l = hidden_states.shape[1]
        outputs = []
        for start in range(0, l, PREFILL_SEGMENT):
            end = min(start + PREFILL_SEGMENT, l)
            mask = None if attention_mask is None else attention_mask[:, : attention_mask.shape[1] - (l - end)]
            out, conv_state, state = self._mix(hidden_states[:, start:end], mask, conv_state, state)
            outputs.append(out)
        if cache is not None:
            cache.update_conv_state(conv_state, self.layer_idx)
            cache.update_recurrent_state(state, self.layer_idx)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _mix(self, hidden_states, attention_mask, conv_state, state):
        """The generic path on one segment: its output and the conv and SSM states it leaves."""
        gate, conv_inputs, dt = self._project(hidden_states, attention_mask)
        x, dt, B, C, conv_state = self._convolve(conv_inputs, dt, attention_mask, conv_state)
        # the scan runs in float32 at least: exp/cumsum of the decays lose too much in half precision
        scan_dtype = torch.promote_types(x.dtype, torch.float32)
        x, dt, B, C = (t.to(scan_dtype) for t in (x, dt, B, C))
        A = -torch.exp(self.A_log.to(scan_dtype))
        D = self.D.to(scan_dtype)
        if state is not None and x.shape[1] == 1:
            state, y = mamba2_step(state.to(scan_dtype), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
            y = y[:, None]
        elif self.settings.impl == "ref":
            y, state = mamba2_scan_ref(x, dt, A, B, C, D, state)
        elif mamba_chunk_scan_combined is not None and x.is_cuda:
            y, state = mamba2_scan_kernel(x, dt, A, B, C, D, state, chunk_size=self.settings.chunk_size)
        else:
            y, state = mamba2_scan_chunked(x, dt, A, B, C, D, state, chunk_size=self.settings.chunk_size)
        y = y.flatten(2).to(hidden_states.dtype)  # (b, l, h * p)
        return self.out_proj(self.norm(y, gate)), conv_state, state

    def _verify(self, hidden_states, attention_mask, layer: Mamba2CacheLayer) -> torch.Tensor:
        """The generic path's function while speculative decoding verifies a few tokens. The stored states are left
        as they are: `layer.record` keeps the call's inputs, and `layer.commit` computes the states after the kept
        tokens. Only what K + 1 tokens need: the conv is a multiply-and-sum over the last k - 1 inputs and these (as
        `_step`), and the scan one chunk of exactly l tokens with GQA groups unexpanded and no final state
        (`mamba2_chunk_grouped`) instead of the chunked scan, which pads to a whole chunk and repeats x and B."""
        s = self.settings
        b, l, _ = hidden_states.shape
        g, r = s.num_groups, s.num_heads // s.num_groups
        gate, conv_inputs, dt = self._project(hidden_states, attention_mask)  # conv_inputs (b, c, l)
        conv_state, state = layer.verify_states()

        # Causal conv over the last k - 1 inputs and these: each output multiplies-and-sums a window of k
        kernel = conv_state.shape[-1]
        inputs = torch.cat([conv_state[..., 1:].to(conv_inputs.dtype), conv_inputs], -1)  # (b, c, k - 1 + l)
        xBC = (inputs.unfold(-1, kernel, 1) * self.conv1d.weight).sum(-1)  # (b, c, l, k) -> (b, c, l)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias[:, None]
        xBC = F.silu(xBC.transpose(1, 2))  # (b, l, c)
        if attention_mask is not None:
            xBC = xBC * attention_mask[:, -l:, None].to(xBC.dtype)

        # The scan in float32 at least, heads grouped as (g, r)
        scan_dtype = torch.promote_types(xBC.dtype, torch.float32)
        x, B, C = xBC.to(scan_dtype).split([g * s.head_dim, g * s.state_size, s.num_heads * s.state_size], -1)
        x, B = x.view(b, l, g, s.head_dim), B.view(b, l, g, s.state_size)
        C = C.view(b, l, g, r, s.state_size)
        dt = F.softplus(dt + self.dt_bias).to(scan_dtype).view(b, l, g, r)
        A = -torch.exp(self.A_log.to(scan_dtype)).view(g, r)
        D = self.D.to(scan_dtype).view(g, r)
        state = state.to(scan_dtype)
        final = None
        if l <= s.chunk_size and s.impl == "auto":
            y = mamba2_chunk_grouped(x, dt, A, B, C, D, state.unflatten(1, (g, r)))
        else:  # a long call, or the reference: the generic scans, heads expanded
            x_h, B_h = (t.repeat_interleave(r, dim=2) for t in (x, B))  # (b, l, h, ·)
            scan = mamba2_scan_ref if s.impl == "ref" else partial(mamba2_scan_chunked, chunk_size=s.chunk_size)
            y, final = scan(x_h, dt.flatten(2), A.flatten(), B_h, C.flatten(2, 3), D.flatten(), state)
        call = VerifiedCall(conv_inputs, inputs[..., -kernel:], state, x, dt, A, B, final)
        layer.record(call)
        y = y.reshape(b, l, self.inner_size).to(hidden_states.dtype)
        return self.out_proj(self.norm(y, gate))


__all__ = [
    "Mamba2CacheLayer",
    "Mamba2Mixer",
    "Mamba2MixerConfig",
    "VerifiedCall",
    "mamba2_chunk_grouped",
    "mamba2_chunk_state",
    "mamba2_scan_chunked",
    "mamba2_scan_kernel",
    "mamba2_scan_ref",
    "mamba2_step",
    "mamba2_step_grouped_",
]
