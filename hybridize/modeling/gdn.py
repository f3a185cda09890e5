"""Gated DeltaNet mixer in place of attention (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", arXiv 2412.06464).

Shapes: b batch, l length, h query heads, g KV groups, r = h // g heads per group, d head_dim (keys and values alike),
c chunks of C tokens. The recurrence, per head, with the state S (d_v x d_k) mapping keys to values:

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    o_t = S_t q_t

alpha_t = exp(g_t) in (0, 1) is a data-dependent decay (Mamba2's: g = -exp(A_log) softplus(a_proj(x) + dt_bias)),
beta_t = sigmoid(b_proj(x)) in (0, 1) the write strength; q and k pass a short causal depthwise conv and SiLU, then are
L2-normalised (q also scaled by 1 / sqrt(d), as fla does); v passes the conv and SiLU. The output is RMS-normalised
per head and gated by SiLU(g_proj(x)) before o_proj.

GQA: q has h heads, k and v have g (the source attention's sizes). The state is kept per query head, with k and v
repeated to the r heads of their group (as GQA repeats keys and values, and as our Mamba2 repeats x and B), and
alpha and beta per query head. Sharing one state per group would hold r times less, but every head of a group would
then have the same decay and write strength, read differently only by q; per-head states let each head keep its own
memory horizon (the decay a calibration chooses per head), at r times the state (SmolLM2-135M: 9 x 64 x 64 floats a
layer, 147 KB in float32). Production GDN hybrids do the same: Qwen3-Next keeps one state per value head, twice as many
as its query and key heads, which are repeated to them.

`gdn_ref` (token by token: the definition as written above), `gdn_chunked` (the paper's chunkwise WY / UT-transform
form, for prefill and training) and `gdn_step` (one decode token, in place) compute one function and are tested
equal.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import LinearAttentionLayer

from .common import causal_conv1d
from .configuration import HybridConfig, mixer_settings
from .mixer import Mixer, RollbackCacheLayer

L2_EPS = 1e-6  # inside the L2 norm of q and k, as fla's l2norm: a zero vector (a padded position) stays zero


@dataclass(frozen=True, kw_only=True)
class GatedDeltaNetMixerConfig:
    """Settings of the Gated DeltaNet mixers of a hybrid (stored in `HybridConfig.mixers["gdn"]`).

    Args:
        num_heads (`int`): query heads, each with its own state; the source's attention heads.
        num_kv_heads (`int`): key and value heads, each shared by `num_heads // num_kv_heads` query heads; the
            source's KV heads.
        head_dim (`int`): channels per head, of queries, keys and values alike (d).
        conv_kernel (`int`, *optional*, defaults to 4): width of the causal depthwise convolution over q, k and v.
        chunk_size (`int`, *optional*, defaults to 64): length of the chunks of `gdn_chunked`; never changes the output,
            only speed.
        impl (`str`, *optional*, defaults to `"auto"`): `"auto"` takes the fastest available path (the chunked form on
            CPU); `"ref"` forces the token-by-token reference (slow, for debugging).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    conv_kernel: int = 4
    chunk_size: int = 64
    impl: Literal["auto", "ref"] = "auto"

    def __post_init__(self):
        if min(self.num_heads, self.num_kv_heads, self.head_dim, self.conv_kernel, self.chunk_size) < 1:
            raise ValueError(f"gdn sizes must be positive, got {self}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"gdn num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.impl not in ("auto", "ref"):
            raise ValueError(f"gdn impl must be 'auto' or 'ref', got {self.impl!r}")

    @classmethod
    def from_hybrid_config(cls, config: HybridConfig) -> "GatedDeltaNetMixerConfig":
        """The settings in `config.mixers["gdn"]`, with shapes defaulting to the source attention's."""
        defaults = {
            "num_heads": config.num_attention_heads,
            "num_kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
        }
        return mixer_settings(cls, config, "gdn", defaults)


def gdn_ref(q, k, v, g, beta, state=None):
    """The gated delta rule token by token, as written in the paper (a d x d matrix product per token: slow).

    Args:
        q, k (`torch.Tensor`): (b, l, h, d_k) queries and keys (normalised and scaled by the caller).
        v (`torch.Tensor`): (b, l, h, d_v) values.
        g (`torch.Tensor`): (b, l, h) log decays, alpha = exp(g) (g <= 0).
        beta (`torch.Tensor`): (b, l, h) write strengths.
        state (`torch.Tensor`, *optional*): (b, h, d_v, d_k) the state before the first token (zeros if None).

    Returns:
        The outputs (b, l, h, d_v) and the state after the last token (b, h, d_v, d_k).
    """
    b, l, h, d_k = k.shape
    S = v.new_zeros(b, h, v.shape[-1], d_k) if state is None else state
    eye = torch.eye(d_k, dtype=k.dtype, device=k.device)
    outputs = []
    for t in range(l):
        k_t, a_t, b_t = k[:, t], g[:, t].exp()[..., None, None], beta[:, t][..., None, None]
        # S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
        S = (
            a_t * S @ (eye - b_t * k_t[..., :, None] * k_t[..., None, :])
            + b_t * v[:, t, ..., None] * k_t[..., None, :]
        )
        outputs.append((S @ q[:, t, ..., None])[..., 0])  # o_t = S_t q_t
    return torch.stack(outputs, dim=1), S


def gdn_chunked(q, k, v, g, beta, state=None, *, chunk_size=64):
    """Same inputs and outputs as `gdn_ref`, chunk by chunk: the paper's chunkwise form, i.e. DeltaNet's WY
    representation of the products of Householder-like factors computed with the UT transform (Yang et al., arXiv
    2406.06484), with the decays folded in.

    Inside a chunk, with G_t = g_1 + ... + g_t (cumulated from the chunk's start) and S_0 the state entering it, the
    state is S_t = e^{G_t} S_0 + sum_{s <= t} e^{G_t - G_s} u_s k_s^T, where the "pseudo-values"
    u_t = beta_t (v_t - alpha_t S_{t-1} k_t) solve the unit lower-triangular system

        u_t + beta_t sum_{s < t} e^{G_t - G_s} (k_t . k_s) u_s = beta_t v_t - beta_t e^{G_t} S_0 k_t,

    i.e. U = T (beta V) - T (beta e^G K) S_0^T with T = (I + A)^{-1} (the UT transform). Then
    O = e^G Q S_0^T + (Q K^T o Gamma) U with Gamma_ts = e^{G_t - G_s} (s <= t), and the next chunk starts from
    e^{G_C} S_0 + U^T (e^{G_C - G} K). Only what involves S_0 (U's correction, the outputs' reading of it, the next
    state: four (T x d) by (d x d) products) runs chunk after chunk; everything else is batched over all chunks. Every
    exponent is <= 0: nothing overflows.
    """
    b, l, h, d_k = k.shape
    d_v = v.shape[-1]
    T = chunk_size
    pad = (-l) % T
    if pad:  # k = v = 0 and g = 0 (alpha = 1) leave the state untouched, so padding changes nothing
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    c = (l + pad) // T
    # chunk-major, so that each step of the loop below reads contiguous blocks: (c, b, h, T, d), gates (c, b, h, T)
    q, k, v = (t.reshape(b, c, T, h, -1).permute(1, 0, 3, 2, 4).contiguous() for t in (q, k, v))
    g, beta = (t.reshape(b, c, T, h).permute(1, 0, 3, 2) for t in (g, beta))
    G = g.cumsum(-1)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
    # Gamma_ts = exp(G_t - G_s) for s <= t, 0 above the diagonal (masked before exp: those exponents are positive)
    Gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, -torch.inf).exp()  # (c, b, h, T, T)

    # 1. The UT transform: W = T (beta e^G K) and U' = T (beta V) with T = (I + A)^{-1}, by triangular solves for all
    # chunks at once (A is zero above the diagonal, and the solve takes its diagonal as ones)
    k_beta = k * beta[..., None]
    A = (k_beta @ k.transpose(-1, -2)) * Gamma  # A_ts = beta_t e^{G_t - G_s} (k_t . k_s) for s < t
    W = torch.linalg.solve_triangular(A, k_beta * G.exp()[..., None], upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)

    # 2. Inside each chunk: Q K^T o Gamma (the diagonal included); what reads and writes the state between chunks
    scores = (q @ k.transpose(-1, -2)) * Gamma  # (c, b, h, T, T)
    q_decayed = q * G.exp()[..., None]  # e^{G_t} q_t reads the entering state
    writes = (k * (G[..., -1:] - G).exp()[..., None]).transpose(-1, -2).contiguous()  # e^{G_C - G_s} k_s^T
    chunk_decay = G[..., -1, None, None].exp()  # (c, b, h, 1, 1)

    # 3. Chunk after chunk, on S^T (d_k x d_v): the pseudo-values given the entering state, the outputs, the next state
    S_t = q.new_zeros(b, h, d_k, d_v) if state is None else state.transpose(-1, -2).to(q.dtype)
    outputs = []
    for i in range(c):
        u = U[i] - W[i] @ S_t  # (b, h, T, d_v)
        outputs.append(q_decayed[i] @ S_t + scores[i] @ u)
        S_t = chunk_decay[i] * S_t + writes[i] @ u
    o = torch.stack(outputs).permute(1, 0, 3, 2, 4).reshape(b, c * T, h, d_v)  # (b, c·T, h, d_v)
    return o[:, :l], S_t.transpose(-1, -2).contiguous()


def gdn_step(state, q, k, v, g, beta):
    """One token, updating `state` (b, h, d_v, d_k) in place: S <- alpha S, then S <- S + beta (v - S k) k^T (the
    same rule, rearranged: alpha S (I - beta k k^T) + beta v k^T = alpha S + beta (v - alpha S k) k^T).

    q, k (b, h, d_k), v (b, h, d_v), g and beta (b, h) -> o (b, h, d_v).
    """
    # products with one vector as multiply-and-sum: a batched matrix-vector product is several times slower on CPU
    state.mul_(g.exp()[..., None, None])
    delta = beta[..., None] * (v - (state * k[..., None, :]).sum(-1))  # (b, h, d_v)
    state.addcmul_(delta[..., :, None], k[..., None, :])
    return (state * q[..., None, :]).sum(-1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim; a zero vector stays zero."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


class GatedRMSNorm(nn.Module):
    """`rmsnorm(x) * weight * silu(gate)` per head of `head_size` channels, the weight shared by the heads: the norm
    before the gate, as fla's `FusedRMSNormGated` and transformers' `Qwen3NextRMSNormGated` (Mamba2's
    `common.RMSNormGated` gates first)."""

    def __init__(self, head_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """hidden_states and gate (..., head_size) -> (..., head_size), computed in float32 at least."""
        input_dtype = hidden_states.dtype
        dtype = torch.promote_types(input_dtype, torch.float32)
        x = hidden_states.to(dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.to(dtype) * x * F.silu(gate.to(dtype))).to(input_dtype)


class GatedDeltaNetCacheLayer(LinearAttentionLayer, RollbackCacheLayer):
    """Conv state (b, (h + 2g)·d, k) + recurrent state (b, h, d, d) (transformers' `LinearAttentionLayer`), which
    rolls back for speculative decoding. `begin_verify()` marks the stored states; while verifying, the mixer leaves
    them alone, runs the verified tokens one by one from the last state it reached, and `record`s each call's conv
    inputs and the recurrent state after each of its tokens. `commit(n)` stores the conv state after the first n of
    them (the last k inputs) and the recurrent state recorded after the n-th: exact, nothing recomputed, one
    (h, d, d) state kept per verified token.
    """

    max_rollback = float("inf")  # a state is recorded after every token

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint: tuple[torch.Tensor, torch.Tensor] | None = None  # (conv state, state) at begin_verify
        self.conv_inputs: list[torch.Tensor] = []  # per call since begin_verify, (b, channels, l)
        self.states: list[torch.Tensor] = []  # the recurrent state after each token since begin_verify

    def begin_verify(self) -> None:
        """Mark the current state; tokens run from now on can be undone by `commit`."""
        if not self.has_previous_state[0]:
            raise ValueError("a Gated DeltaNet cache layer can only begin verification after a prefill has filled it")
        self.checkpoint = (self.conv_states[0], self.recurrent_states[0])  # not written until commit
        self.conv_inputs, self.states = [], []

    def verify_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv state and recurrent state that the next call continues from while verifying."""
        conv_state, state = self.checkpoint
        if self.conv_inputs:
            kernel = conv_state.shape[-1]
            conv_state = torch.cat([conv_state, *(x.to(conv_state.dtype) for x in self.conv_inputs)], -1)
            conv_state = conv_state[..., -kernel:]
        return conv_state, self.states[-1] if self.states else state

    def record(self, conv_inputs: torch.Tensor, states: list[torch.Tensor]) -> None:
        """Called by `GatedDeltaNetMixer` for each call while verifying: its conv inputs and its states per token."""
        self.conv_inputs.append(conv_inputs)
        self.states.extend(states)

    def commit(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens run since `begin_verify` and forget the others."""
        (conv_state, _), conv_inputs, states = self.checkpoint, self.conv_inputs, self.states
        self.checkpoint, self.conv_inputs, self.states = None, [], []
        if not 0 <= num_tokens <= len(states):
            raise ValueError(f"cannot keep {num_tokens} tokens: {len(states)} were run since begin_verify")
        if num_tokens == 0:  # the stored states are still those at begin_verify
            return
        kernel = conv_state.shape[-1]
        inputs = torch.cat([conv_state, *(x.to(conv_state.dtype) for x in conv_inputs)], -1)
        self.conv_states[0].copy_(inputs[..., : kernel + num_tokens][..., -kernel:])
        self.recurrent_states[0].copy_(states[num_tokens - 1])


class GatedDeltaNetMixer(Mixer):
    """Gated DeltaNet token mixer: q/k/v projections -> causal conv + SiLU -> L2 norm of q and k -> gated delta rule
    -> per-head RMSNorm gated by SiLU(g_proj(x)) -> o_proj.

    q/k/v/o are sized and named as the source attention's (`q_proj` h·d, `k_proj` and `v_proj` g·d, `o_proj`), so a
    conversion copies them; `a_proj` (h, the decay's input, with `A_log` and `dt_bias`), `b_proj` (h, beta) and
    `g_proj` (h·d, the output gate) are new, named as fla's `GatedDeltaNet` layer. `conv1d` is one depthwise conv
    over the concatenated q|k|v channels, without bias (transformers' Qwen3-Next layer).
    """

    settings_class = GatedDeltaNetMixerConfig
    mask_type = "padding"  # recurrent: only needs to know which tokens are padding
    readout = "o_proj"  # the output projection a calibrated conversion refits

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.settings = s = GatedDeltaNetMixerConfig.from_hybrid_config(config)
        self.layer_idx = layer_idx
        hidden, h, g, d = config.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = nn.Linear(hidden, h * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, g * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, g * d, bias=config.attention_bias)
        self.a_proj = nn.Linear(hidden, h, bias=False)
        self.b_proj = nn.Linear(hidden, h, bias=False)
        self.g_proj = nn.Linear(hidden, h * d, bias=False)
        self.conv_size = (h + 2 * g) * d
        self.conv1d = nn.Conv1d(self.conv_size, self.conv_size, s.conv_kernel, groups=self.conv_size, bias=False)
        self.A_log = nn.Parameter(torch.zeros(h))
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.norm = GatedRMSNorm(d, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(h * d, hidden, bias=config.attention_out_bias)
        self.init_weights()

    @staticmethod
    def new_cache_layer(config: HybridConfig, layer_idx: int) -> GatedDeltaNetCacheLayer:
        return GatedDeltaNetCacheLayer()  # conv state + recurrent state, as transformers' Qwen3-Next layers

    @torch.no_grad()
    def init_weights(self) -> None:
        """fla's ranges, spread evenly over the heads instead of drawn: A from 1 to 16 (A_log = log A), dt from 1e-3
        to 1e-1 log-spaced (dt_bias = softplus^-1(dt)), so the heads' decays per token exp(-A dt) span half-lives of
        about 0.4 to 700 tokens; norm weight 1. Conversion overwrites them."""
        h = self.A_log.numel()
        spread = torch.linspace(0, 1, h, dtype=torch.float64)
        self.A_log.copy_(torch.log(1 + 15 * spread))
        dt = torch.exp(math.log(1e-3) + spread * (math.log(1e-1) - math.log(1e-3)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        self.norm.weight.fill_(1.0)

    def _project(self, hidden_states, attention_mask):
        """hidden_states (b, l, hidden) -> the conv inputs q|k|v (b, l, channels), zero at padded positions (after the
        projections, so that a q/k/v bias (Qwen2) of a padded position does not enter the conv either)."""
        qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        if attention_mask is not None:
            qkv = qkv * attention_mask[:, -qkv.shape[1] :, None].to(qkv.dtype)
        return qkv

    def _heads(self, hidden_states, qkv, attention_mask):
        """The conv outputs qkv (b, l, channels) and the inputs hidden_states (b, l, hidden) -> q, k, v repeated to
        the heads (b, l, h, d) in the scan dtype (float32 at least), q normalised and scaled, k normalised; g and
        beta (b, l, h); the gate (b, l, h, d). Padded positions get k = v = 0 and g = 0 (alpha = 1): they leave the
        state as it was."""
        s = self.settings
        b, l, _ = hidden_states.shape
        h, kv, d = s.num_heads, s.num_kv_heads, s.head_dim
        scan_dtype = torch.promote_types(qkv.dtype, torch.float32)
        q, k, v = F.silu(qkv).to(scan_dtype).split([h * d, kv * d, kv * d], -1)
        # GQA: the keys and values of a group serve its h // g consecutive query heads
        q = l2_normalize(q.view(b, l, h, d)) / math.sqrt(d)
        k = l2_normalize(k.view(b, l, kv, d)).repeat_interleave(h // kv, dim=2)  # (b, l, h, d)
        v = v.view(b, l, kv, d).repeat_interleave(h // kv, dim=2)
        a = self.a_proj(hidden_states).to(scan_dtype) + self.dt_bias.to(scan_dtype)
        g = -torch.exp(self.A_log.to(scan_dtype)) * F.softplus(a)  # (b, l, h) log decay
        beta = torch.sigmoid(self.b_proj(hidden_states).to(scan_dtype))
        if attention_mask is not None:
            mask = attention_mask[:, -l:, None].to(scan_dtype)  # (b, l, 1)
            k, v, g = k * mask[..., None], v * mask[..., None], g * mask
        return q, k, v, g, beta, self.g_proj(hidden_states).view(b, l, h, d)

    def _features(self, hidden_states, attention_mask, conv_state):
        """`_project`, the causal conv continuing from `conv_state`, `_heads`: q, k, v, g, beta, the gate, the conv
        inputs (b, channels, l) and the new conv state."""
        conv_inputs = self._project(hidden_states, attention_mask).transpose(1, 2)  # (b, channels, l)
        qkv, conv_state = causal_conv1d(conv_inputs, self.conv1d.weight, None, conv_state)
        return *self._heads(hidden_states, qkv.transpose(1, 2), attention_mask), conv_inputs, conv_state

    def _readout(self, o: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """o (b, l, h, d) -> per-head gated RMSNorm -> o_proj -> (b, l, hidden)."""
        return self.o_proj(self.norm(o.to(dtype), gate).flatten(2))

    def forward(self, hidden_states, *, attention_mask=None, cache=None, **kwargs) -> torch.Tensor:
        """hidden_states (b, l, hidden) -> (b, l, hidden). `attention_mask` is the 2-D padding mask (1 = token)."""
        layer = cache.layers[self.layer_idx] if cache is not None else None
        if getattr(layer, "checkpoint", None) is not None:
            return self._verify(hidden_states, attention_mask, layer)  # speculative decoding
        if self._can_step(hidden_states, layer):
            return self._step(hidden_states, attention_mask, layer)
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        q, k, v, g, beta, gate, _, conv_state = self._features(hidden_states, attention_mask, conv_state)
        state = None if state is None else state.to(q.dtype)
        if self.settings.impl == "ref":
            o, state = gdn_ref(q, k, v, g, beta, state)
        else:
            o, state = gdn_chunked(q, k, v, g, beta, state, chunk_size=self.settings.chunk_size)
        if cache is not None:
            cache.update_conv_state(conv_state, self.layer_idx)
            cache.update_recurrent_state(state, self.layer_idx)
        return self._readout(o, gate, hidden_states.dtype)

    def _can_step(self, hidden_states, layer) -> bool:
        """Whether `_step` applies: one token after a prefill, states in the dtypes it writes in place, and no
        transformers past recording (the generic path's bookkeeping)."""
        if layer is None or hidden_states.shape[1] != 1 or not layer.has_previous_state[0] or layer.record_past:
            return False
        scan_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        return layer.conv_states[0].dtype == hidden_states.dtype and layer.recurrent_states[0].dtype == scan_dtype

    def _step(self, hidden_states, attention_mask, layer: GatedDeltaNetCacheLayer) -> torch.Tensor:
        """One decode token (b, 1, hidden) -> (b, 1, hidden), the conv and recurrent states of `layer` updated in
        place (`gdn_step`): O(1) in the length."""
        # Causal conv: shift the last k inputs left by one in place, append this token, multiply-and-sum the taps
        conv_state = layer.conv_states[0]  # (b, channels, k)
        conv_state.copy_(conv_state.roll(-1, dims=-1))
        conv_state[..., -1] = self._project(hidden_states, attention_mask)[:, 0]
        qkv = (conv_state * self.conv1d.weight[:, 0]).sum(-1)[:, None]  # (b, 1, channels)
        q, k, v, g, beta, gate = self._heads(hidden_states, qkv, attention_mask)
        o = gdn_step(layer.recurrent_states[0], q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
        return self._readout(o[:, None], gate, hidden_states.dtype)

    def _verify(self, hidden_states, attention_mask, layer: GatedDeltaNetCacheLayer) -> torch.Tensor:
        """The generic path's function while speculative decoding verifies a few tokens: the stored states are left as
        they are, the tokens run one by one (`gdn_step` on a copy) and `layer.record`s the state after each, from
        which `layer.commit` keeps the one after the accepted tokens."""
        conv_state, state = layer.verify_states()
        q, k, v, g, beta, gate, conv_inputs, _ = self._features(hidden_states, attention_mask, conv_state)
        state = state.to(q.dtype).clone()
        outputs, states = [], []
        for t in range(q.shape[1]):
            outputs.append(gdn_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t]))
            states.append(state.clone())
        layer.record(conv_inputs, states)
        return self._readout(torch.stack(outputs, 1), gate, hidden_states.dtype)


__all__ = [
    "GatedDeltaNetCacheLayer",
    "GatedDeltaNetMixer",
    "GatedDeltaNetMixerConfig",
    "GatedRMSNorm",
    "gdn_chunked",
    "gdn_ref",
    "gdn_step",
    "l2_normalize",
]
