"""Native Hybrid Attention mixer in place of attention (NHA, arXiv 2510.07019; research/methods-conversion.md §3).

Per KV head, M slot memories (hk: K x M, hv: M x V) hold every token older than a sliding window of w tokens; each
query attends with **one softmax** over [M slot logits ; window logits]. A token joins the slots when it leaves the
window (no overlap, no gap), through a gated linear recurrence with one forget gate per slot (GSA / ABC update):

    g_j = logsigmoid(g_proj(x_j)) / τ          log forget gate per slot, <= 0   (τ = gate_normalizer, 8)
    α_j = exp(g_j),  s_j = 1 - α_j             decay and write strength
    hk <- hk · diag(α_j) + k_j s_j^T           column m: a decaying average of the keys
    hv <- diag(α_j) hv + s_j v_j^T             row m: the same average of the values

    query t, after absorbing every token j <= t - w:
    p = softmax([scale · q_t^T hk ; scale · RoPE(q_t) · RoPE(k_i) for t - w < i <= t])
    o_t = p_slots^T hv + Σ_i p_i v_i           then o_proj

The slot path uses the raw (position-free) q and k: a slot is an average over many positions, so no single rotation
fits it. The window path is the source's attention, RoPE included, so with w >= length and `mask_empty_slots` the layer
*is* the source attention. `scale` is head_dim^-0.5 on both paths, the source's: the window logits must be exactly the
source's logits, and the slot keys are convex-like averages of the same keys, so they live on the same scale (the
hybridized NHA layers use this scale too; only the from-scratch NHA layer, with feature maps, uses 1).

Empty slots (nothing absorbed yet) have logit 0 and value 0: unmasked they are M zero-value sinks that shrink every
attention weight, so a converted layer would not equal its source even inside the window. `mask_empty_slots` (ours,
default on) leaves them out of the softmax until the first real token has been absorbed.

Shapes: b batch, h query heads, n KV heads (h = n · G, query head i reads KV head i // G as in `repeat_kv`), l new
tokens, K = V = head_dim, M slots, P window tokens carried in the state. Tensors are heads-first, (b, h, l, K), as in
transformers' attention. `nha_ref` (token by token: `nha_step` over the sequence, the definition), `nha_chunked`
(prefill and training) and `nha_step` (one decode token) compute one function and are tested equal; `NHAMixer._step`
is `nha_step` with the state written in place. `NHACacheLayer` holds the state between calls: the slots and the last
w - 1 tokens' (raw k, RoPE'd k, v, g), a constant size once past the window. Keys are cached after RoPE, at their own
positions, so decode equals the full forward.
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import LinearAttentionAndSlidingWindowAttentionLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from .attention import add_attention_projections
from .configuration import HybridConfig, mixer_settings
from .mixer import Mixer, RollbackCacheLayer


@dataclass(frozen=True, kw_only=True)
class NHAMixerConfig:
    """Settings of the NHA mixers of a hybrid (stored in `HybridConfig.mixers["nha"]`). Layers that should see the
    whole context are not NHA layers with a huge window: they stay `attention` layers (exact, faster, and the same as
    an NHA layer with masked empty slots and w >= length, which the tests check). `convert` picks them with
    `full_every`, `attn_layers` or a selection; the window below is the same for every NHA layer.

    Args:
        slots (`int`, *optional*, defaults to 64): slot memories M per KV head.
        window (`int`, *optional*, defaults to 64): recent tokens w attended exactly (with RoPE), the current one
            included; 0 makes the layer a pure slot RNN (GSA-like). Same meaning as the streaming mixer's `window`.
        mask_empty_slots (`bool`, *optional*, defaults to `True`): leave slots out of the softmax until a real token
            has been absorbed, so that with `window` >= length the layer equals the source attention exactly. `False`
            is the paper's layer (empty slots act as M zero-value sinks).
        gate_normalizer (`float`, *optional*, defaults to 8.0): τ in `g = logsigmoid(g_proj(x)) / τ`; larger τ means
            slower forgetting (the paper's `gate_logit_normalizer`).
        chunk_size (`int`, *optional*, defaults to 32): queries per block of `nha_chunked`; never changes the output,
            only speed and memory (the intra-block decay tensor is chunk² · M per KV head).
        impl (`str`, *optional*, defaults to `"auto"`): `"auto"` takes the fastest available path (the chunked form on
            CPU); `"ref"` forces the token-by-token reference (slow, for debugging).
    """

    slots: int = 64
    window: int = 64
    mask_empty_slots: bool = True
    gate_normalizer: float = 8.0
    chunk_size: int = 32
    impl: Literal["auto", "ref"] = "auto"

    def __post_init__(self):
        if self.slots < 1:
            raise ValueError(f"nha slots must be at least 1, got {self.slots}")
        if self.window < 0:
            raise ValueError(f"nha window must be >= 0 (0: slots only), got {self.window}")
        if not self.gate_normalizer > 0:
            raise ValueError(f"nha gate_normalizer must be positive (the paper uses 8), got {self.gate_normalizer}")
        if self.chunk_size < 1:
            raise ValueError(f"nha chunk_size must be at least 1, got {self.chunk_size}")
        if self.impl not in ("auto", "ref"):
            raise ValueError(f"nha impl must be 'auto' or 'ref', got {self.impl!r}")

    @classmethod
    def from_hybrid_config(cls, config: HybridConfig) -> "NHAMixerConfig":
        """The settings in `config.mixers["nha"]`; the others keep their defaults."""
        return mixer_settings(cls, config, "nha")


class NHAState(NamedTuple):
    """What an NHA layer carries from one call to the next.

    hk (b, n, K, M) and hv (b, n, M, V): the slots. num_absorbed (b,): real tokens absorbed so far (for
    `mask_empty_slots`). The window, tokens not yet absorbed, oldest first: keys (b, n, P, K) raw, keys_rot
    (b, n, P, K) after RoPE, values (b, n, P, V), gates (b, n, P, M) log forget gates (0 at padding), mask (b, P) True
    at real tokens.
    """

    hk: torch.Tensor
    hv: torch.Tensor
    num_absorbed: torch.Tensor
    keys: torch.Tensor
    keys_rot: torch.Tensor
    values: torch.Tensor
    gates: torch.Tensor
    mask: torch.Tensor


def nha_initial_state(
    batch_size: int, num_kv_heads: int, head_dim: int, slots: int, *, dtype: torch.dtype, device=None
) -> NHAState:
    """Empty slots and an empty window."""
    b, n, K, M = batch_size, num_kv_heads, head_dim, slots
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
    return NHAState(
        hk=zeros(b, n, K, M),
        hv=zeros(b, n, M, K),
        num_absorbed=torch.zeros(b, dtype=torch.long, device=device),
        keys=zeros(b, n, 0, K),
        keys_rot=zeros(b, n, 0, K),
        values=zeros(b, n, 0, K),
        gates=zeros(b, n, 0, M),
        mask=torch.zeros(b, 0, dtype=torch.bool, device=device),
    )


def _pending(state: NHAState, k, k_rot, v, g, mask):
    """The window carried in `state` followed by the new tokens, (b, n, P + l, ·); padding gets gate 0 (α = 1, s = 0),
    so absorbing it changes nothing."""
    mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if mask is None else mask.bool()
    ms = torch.cat([state.mask, mask], dim=1)  # (b, P + l)
    gs = torch.cat([state.gates, g * mask[:, None, :, None].to(g.dtype)], dim=2)
    cat = lambda old, new: torch.cat([old.to(new.dtype), new], dim=2)
    return cat(state.keys, k), cat(state.keys_rot, k_rot), cat(state.values, v), gs, ms


def _absorb_token(hk, hv, num_absorbed, k, v, g, mask):
    """The slot update with one token: k (b, n, K), v (b, n, V), g (b, n, M) (0 at padding), mask (b,)."""
    alpha, s = torch.exp(g), -torch.expm1(g)  # decay, write strength
    hk = hk * alpha[:, :, None, :] + k[..., None] * s[:, :, None, :]
    hv = hv * alpha[..., None] + s[..., None] * v[:, :, None, :]
    return hk, hv, num_absorbed + mask.long()


def _absorb_token_(hk, hv, num_absorbed, k, v, g, mask) -> None:
    """`_absorb_token` in place, with the same operations (so the same rounding)."""
    alpha, s = torch.exp(g), -torch.expm1(g)
    hk.mul_(alpha[:, :, None, :]).add_(k[..., None] * s[:, :, None, :])
    hv.mul_(alpha[..., None]).add_(s[..., None] * v[:, :, None, :])
    num_absorbed.add_(mask)


def _joint_softmax(slot_logits, window_logits, slot_visible, window_visible):
    """One softmax over [slots ; window]. Hidden entries get the dtype's lowest value rather than -inf, so that a query
    that sees nothing (padding) gets weights 0 instead of NaN; any visible logit makes the hidden weights exactly 0."""
    low = torch.finfo(slot_logits.dtype).min
    slot_visible, window_visible = slot_visible.expand_as(slot_logits), window_visible.expand_as(window_logits)
    logits = torch.cat(
        [slot_logits.masked_fill(~slot_visible, low), window_logits.masked_fill(~window_visible, low)], -1
    )
    p = torch.softmax(logits, dim=-1) * torch.cat([slot_visible, window_visible], dim=-1)
    return p.split([slot_logits.shape[-1], window_logits.shape[-1]], dim=-1)


def _pop_oldest(hk, hv, num, keys, keys_rot, values, gates, ms):
    """Absorb the oldest window token into the slots and drop it from the window."""
    slots = _absorb_token(hk, hv, num, keys[:, :, 0], values[:, :, 0], gates[:, :, 0], ms[:, 0])
    return slots, (keys[:, :, 1:], keys_rot[:, :, 1:], values[:, :, 1:], gates[:, :, 1:], ms[:, 1:])


def nha_step(q, k, v, q_rot, k_rot, g, mask, state: NHAState, *, window: int, scale: float, mask_empty_slots=True):
    """One token. q and q_rot (b, h, 1, K), k and k_rot (b, n, 1, K), v (b, n, 1, V), g (b, n, 1, M), mask (b, 1) or
    None -> o (b, h, 1, V) and the new state. The window of `state` holds at most max(w - 1, 0) tokens."""
    b, h, _, K = q.shape
    n = k.shape[1]
    keys, keys_rot, values, gates, ms = _pending(state, k, k_rot, v, g, mask)  # (b, n, P + 1, ·)
    hk, hv, num = state.hk.to(q.dtype), state.hv.to(q.dtype), state.num_absorbed
    # 1. Absorb what has left the window: with w = 0 the current token itself
    if window == 0:
        (hk, hv, num), (keys, keys_rot, values, gates, ms) = _pop_oldest(
            hk, hv, num, keys, keys_rot, values, gates, ms
        )
    # 2. One softmax over the slots (raw q) and the window (RoPE'd q)
    qg, qrg = q.reshape(b, n, h // n, K), q_rot.reshape(b, n, h // n, K)  # (b, n, G, K)
    slot_logits = scale * torch.einsum("bngk,bnkm->bngm", qg, hk)
    window_logits = scale * torch.einsum("bngk,bnjk->bngj", qrg, keys_rot)
    slot_visible = (
        (num > 0)[:, None, None, None] if mask_empty_slots else torch.ones_like(slot_logits, dtype=torch.bool)
    )
    p_slot, p_window = _joint_softmax(slot_logits, window_logits, slot_visible, ms[:, None, None, :])
    o = torch.einsum("bngm,bnmv->bngv", p_slot, hv) + torch.einsum("bngj,bnjv->bngv", p_window, values)
    # 3. Keep w - 1 tokens: the oldest leaves the window and enters the slots (pop-on-shift)
    if window > 0 and keys.shape[2] > window - 1:
        (hk, hv, num), (keys, keys_rot, values, gates, ms) = _pop_oldest(
            hk, hv, num, keys, keys_rot, values, gates, ms
        )
    return o.reshape(b, h, 1, -1), NHAState(hk, hv, num, keys, keys_rot, values, gates, ms)


def nha_ref(q, k, v, q_rot, k_rot, g, mask=None, state=None, *, window: int, scale: float, mask_empty_slots=True):
    """`nha_step` over the sequence: the definition. q and q_rot (b, h, l, K), k and k_rot (b, n, l, K), v (b, n, l, V),
    g (b, n, l, M) log forget gates, mask (b, l) (True at real tokens) or None, state from an earlier call or None ->
    o (b, h, l, V) and the state after the last token."""
    if state is None:
        state = nha_initial_state(q.shape[0], k.shape[1], q.shape[-1], g.shape[-1], dtype=q.dtype, device=q.device)
    outputs = []
    for t in range(q.shape[2]):
        o, state = nha_step(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], q_rot[:, :, t : t + 1],
            k_rot[:, :, t : t + 1], g[:, :, t : t + 1], None if mask is None else mask[:, t : t + 1], state,
            window=window, scale=scale, mask_empty_slots=mask_empty_slots,
        )  # fmt: skip
        outputs.append(o)
    return torch.cat(outputs, dim=2), state


def _absorb_block(hk, hv, num_absorbed, k, v, g, mask):
    """The slot update with a block of tokens at once. k (b, n, T, K), v (b, n, T, V), g (b, n, T, M), mask (b, T)."""
    if k.shape[2] == 0:
        return hk, hv, num_absorbed
    g_cum = torch.cumsum(g, dim=2)  # (b, n, T, M)
    to_end = -torch.expm1(g) * torch.exp(g_cum[:, :, -1:] - g_cum)  # s_j · Π_{r > j} α_r  (b, n, T, M)
    decay = torch.exp(g_cum[:, :, -1])  # (b, n, M)
    hk = hk * decay[:, :, None, :] + torch.einsum("bnjk,bnjm->bnkm", k, to_end)
    hv = hv * decay[..., None] + torch.einsum("bnjm,bnjv->bnmv", to_end, v)
    return hk, hv, num_absorbed + mask.sum(-1)


def _shift(x: torch.Tensor, front: int, length: int, dim: int) -> torch.Tensor:
    """`front` zeros (False for bool) before `x` along `dim`, then cut or zero-padded to `length`."""
    pad_shape = list(x.shape)
    pad_shape[dim] = front
    x = torch.cat([x.new_zeros(pad_shape), x], dim=dim).narrow(dim, 0, min(length, x.shape[dim] + front))
    if x.shape[dim] < length:
        pad_shape[dim] = length - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    return x


def nha_chunked(
    q, k, v, q_rot, k_rot, g, mask=None, state=None, *, window: int, scale: float, mask_empty_slots=True, chunk_size=32
):
    """Same inputs and outputs as `nha_ref`, computed chunk by chunk (GLA-style, arXiv 2312.06635).

    New token i reads the slots after pending token P + i - w. With X = (w - P neutral tokens) ++ pending (neutral:
    gate 0, so absorbing it changes nothing), that is "after X[0..i]": a causal gated linear attention over X aligned
    with the queries. A scan gives the slots entering every chunk; inside a chunk, a (query, token, slot) decay tensor
    carries the chunk's own tokens, so every exponent is <= 0 whatever the gates. The window of query i is
    Y[i : i + w] with Y = (w - 1 - P neutral tokens) ++ pending, a band taken for all queries of a chunk at once.
    Chunks are processed in groups of about 1024 queries, which bounds the memory."""
    b, h, l, K = q.shape
    n = k.shape[1]
    G, M, C = h // n, g.shape[-1], chunk_size
    if state is None:
        state = nha_initial_state(b, n, K, M, dtype=q.dtype, device=q.device)
    P = state.keys.shape[2]
    if P > max(window - 1, 0):
        raise ValueError(f"the state holds {P} window tokens but window={window} keeps at most {max(window - 1, 0)}")
    keys, keys_rot, values, gates, ms = _pending(state, k, k_rot, v, g, mask)  # (b, n, N, ·), N = P + l
    N, nc = P + l, -(-l // C)
    L = nc * C

    # 1. The slot path over X, one chunk per row: (b, n, nc, C, ·)
    front = window - P
    chunks = lambda x: _shift(x, front, L, 2).unflatten(2, (nc, C))
    xk, xv, xg = chunks(keys), chunks(values), chunks(gates)
    xm = _shift(ms, front, L, 1).view(b, nc, C)
    g_cum = torch.cumsum(xg, dim=3)  # log decay from the chunk start through each token  (b, n, nc, C, M)
    strength = -torch.expm1(xg)
    to_end = strength * torch.exp(g_cum[:, :, :, -1:] - g_cum)  # s_j · Π_{r > j in chunk} α_r
    chunk_k = torch.einsum("bncjk,bncjm->bnckm", xk, to_end)  # what each chunk adds to hk, hv
    chunk_v = torch.einsum("bncjm,bncjv->bncmv", to_end, xv)
    chunk_decay = torch.exp(g_cum[:, :, :, -1])  # (b, n, nc, M)
    hk, hv = state.hk.to(q.dtype), state.hv.to(q.dtype)
    entering_k, entering_v = [], []  # the slots entering each chunk
    for c in range(nc):
        entering_k.append(hk), entering_v.append(hv)
        hk = hk * chunk_decay[:, :, c, None, :] + chunk_k[:, :, c]
        hv = hv * chunk_decay[:, :, c, :, None] + chunk_v[:, :, c]
    entering_k, entering_v = torch.stack(entering_k, 2), torch.stack(entering_v, 2)  # (b, n, nc, K, M), (.., M, V)
    absorbed = torch.cumsum(xm.flatten(1).long(), dim=1).view(b, nc, C)
    counts = state.num_absorbed[:, None, None] + absorbed  # after X[..i]

    # 2. The window: keys Y[i : i + w] for query i, a band of C + w - 1 keys per chunk
    span = C + max(window, 1) - 1
    band = lambda x, dim: _shift(x, max(window - 1 - P, 0), L + span - C, dim).unfold(dim, span, C)
    yk, yv = band(keys_rot, 2).transpose(-1, -2), band(values, 2).transpose(-1, -2)  # (b, n, nc, span, K)
    ym = band(ms, 1)  # (b, nc, span)
    offset = torch.arange(span, device=q.device)[None, :] - torch.arange(C, device=q.device)[:, None]  # r - t
    in_band = (offset >= 0) & (offset < window)  # (C, span); empty when w = 0

    # 3. Queries, chunk by chunk in groups: one softmax over [slots ; window]
    pad_q = lambda x: F.pad(x, (0, 0, 0, L - l)).view(b, n, G, nc, C, K)
    qc, qrc = pad_q(q), pad_q(q_rot)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    outputs = []
    group = max(1, 1024 // C)
    for c0 in range(0, nc, group):
        cs = slice(c0, min(c0 + group, nc))
        decay_read = torch.exp(g_cum[:, :, cs])  # entering slots -> read point  (b, n, c, C, M)
        exponent = g_cum[:, :, cs, :, None] - g_cum[:, :, cs, None]  # (b, n, c, C, C, M)
        pair = torch.exp(exponent.masked_fill(~causal[:, :, None], -torch.inf)) * strength[:, :, cs, None]
        qk = qc[:, :, :, cs] @ xk[:, :, None, cs].transpose(-1, -2)  # raw q, raw k  (b, n, G, c, C, C)
        slot_logits = torch.einsum("bngctk,bnckm->bngctm", qc[:, :, :, cs], entering_k[:, :, cs])
        slot_logits = scale * (slot_logits * decay_read[:, :, None] + torch.einsum("bngctj,bnctjm->bngctm", qk, pair))
        if mask_empty_slots:
            slot_visible = (counts[:, cs] > 0)[:, None, None, :, :, None]
        else:
            slot_visible = torch.ones_like(slot_logits, dtype=torch.bool)
        window_logits = scale * qrc[:, :, :, cs] @ yk[:, :, None, cs].transpose(-1, -2)  # (b, n, G, c, C, span)
        window_visible = (in_band & ym[:, cs, None, :])[:, None, None]
        p_slot, p_window = _joint_softmax(slot_logits, window_logits, slot_visible, window_visible)
        o = p_window @ yv[:, :, None, cs]
        o = o + torch.einsum("bngctm,bncmv->bngctv", p_slot * decay_read[:, :, None], entering_v[:, :, cs])
        o = o + torch.einsum("bngctm,bnctjm->bngctj", p_slot, pair) @ xv[:, :, None, cs]
        outputs.append(o)  # (b, n, G, c, C, V)
    o = torch.cat(outputs, dim=3).flatten(3, 4)[:, :, :, :l].reshape(b, h, l, -1)

    # 4. The new state: slots holding all but the last w - 1 tokens (all of them when w = 0), and that window
    stop = max(N - max(window - 1, 0), 0)  # pending tokens absorbed in the end
    x_stop = stop + front  # the same point in X
    c_stop = min(x_stop // C, nc)
    hk, hv = (entering_k[:, :, c_stop], entering_v[:, :, c_stop]) if c_stop < nc else (hk, hv)
    num = state.num_absorbed + ms[:, : max(c_stop * C - front, 0)].sum(-1)
    rest = slice(max(c_stop * C - front, 0), stop)  # absorbed after the last whole chunk
    hk, hv, num = _absorb_block(hk, hv, num, keys[:, :, rest], values[:, :, rest], gates[:, :, rest], ms[:, rest])
    window_part = slice(stop, N)
    new_state = NHAState(hk, hv, num, keys[:, :, window_part], keys_rot[:, :, window_part], values[:, :, window_part],
                         gates[:, :, window_part], ms[:, window_part])  # fmt: skip
    return o, new_state


@dataclass(kw_only=True)
class NHADecodeBuffers:
    """Where the decode path keeps an NHA layer's state, written in place (`NHAMixer._step`): the slots, and the window
    at positions [start, start + length) of buffers with room to grow. The layer's window tensors are views of them,
    oldest first as in `NHAState`, and its slots and counts are these very tensors. A decode step writes its token
    after the window, attends to the window through a view, then absorbs the oldest token into the slots and moves
    `start` up by one; when the buffers run out of room, the window moves to the front of new ones (once every
    `capacity - window` steps) instead of being concatenated at every step.

    Args:
        hk (`torch.Tensor`), hv (`torch.Tensor`), num_absorbed (`torch.Tensor`): the slots and counts, as in `NHAState`.
        raw_keys (`torch.Tensor`), keys (`torch.Tensor`): (b, n, capacity, K), the keys without and with RoPE.
        values (`torch.Tensor`): (b, n, capacity, V). gates (`torch.Tensor`): (b, n, capacity, M).
        mask (`torch.Tensor`): (b, capacity), True at real tokens.
        start (`int`), length (`int`): the window in use.
        padded_until (`int`): one past the newest position (counted as `cumulative_length`) that may be padding.
        all_absorbed (`bool`): every sequence has absorbed a real token (no slot is masked as empty any more).
    """

    hk: torch.Tensor
    hv: torch.Tensor
    num_absorbed: torch.Tensor
    raw_keys: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    gates: torch.Tensor
    mask: torch.Tensor
    start: int
    length: int
    padded_until: int
    all_absorbed: bool

    def window(self) -> tuple[torch.Tensor, ...]:
        """Views of the window: raw keys, keys, values, gates and mask."""
        part = slice(self.start, self.start + self.length)
        return tuple(t[:, :, part] for t in (self.raw_keys, self.keys, self.values, self.gates)) + (
            self.mask[:, part],
        )

    def reallocate(self, capacity: int) -> None:
        """Move the window to the front of new buffers of `capacity` positions."""
        part = slice(self.start, self.start + self.length)
        for name in ("raw_keys", "keys", "values", "gates"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : self.length].copy_(old[:, :, part])
            setattr(self, name, new)
        mask = self.mask.new_empty(self.mask.shape[0], capacity)
        mask[:, : self.length].copy_(self.mask[:, part])
        self.mask, self.start = mask, 0

    def push(self, k, k_rot, v, g, mask) -> None:
        """Write one token after the window: k and k_rot (b, n, K), v (b, n, V), g (b, n, M) (0 at padding), mask (b,)
        or None (real)."""
        end = self.start + self.length
        if end == self.keys.shape[2]:
            self.reallocate(self.keys.shape[2])
            end = self.length
        self.raw_keys[:, :, end].copy_(k)
        self.keys[:, :, end].copy_(k_rot)
        self.values[:, :, end].copy_(v)
        self.gates[:, :, end].copy_(g)
        if mask is None:
            self.mask[:, end] = True
        else:
            self.mask[:, end].copy_(mask)
        self.length += 1

    def pop_(self) -> None:
        """Absorb the oldest window token into the slots, in place, and drop it from the window."""
        i = self.start
        _absorb_token_(
            self.hk, self.hv, self.num_absorbed, self.raw_keys[:, :, i], self.values[:, :, i], self.gates[:, :, i],
            self.mask[:, i],
        )  # fmt: skip
        self.start, self.length = i + 1, self.length - 1
        if not self.all_absorbed:  # only until every sequence has absorbed a real token
            self.all_absorbed = bool((self.num_absorbed > 0).all())


class NHACacheLayer(LinearAttentionAndSlidingWindowAttentionLayer, RollbackCacheLayer):
    """The cache of one NHA layer: transformers' "linear state + sliding window" layer, with NHA's contents.

    `recurrent_states` {0: hk, 1: hv} hold the slots; `keys`/`values` the window's RoPE'd keys and values, beside its
    raw keys, gates and padding mask, and the count of absorbed tokens. At most max(w - 1, 0) window tokens are kept
    (the next query brings the w-th), so the size is constant once past the window. `cumulative_length` counts every
    token seen, as for transformers' sliding layers. It reports itself as non-sliding with full-length mask sizes:
    the window is applied inside the mixer, and transformers picks the mask sizes of other layers from the first
    non-sliding cache layer, which must then give the plain causal sizes.

    `set_state` (the generic path) keeps new tensors and never writes them. The decode path writes its state in place
    into `buffers` (`NHADecodeBuffers`, made by `decode_buffers` from the current state), of which the attributes
    above are views; any other change drops the buffers.
    """

    min_slack = 64  # room beyond the window in decode buffers: the window moves once every that many steps

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int):
        super().__init__(sliding_window=window, number_of_states=2)
        self.raw_keys = self.gates = self.window_mask = self.num_absorbed = None
        self.checkpoint: tuple | None = None  # speculative decoding: the state at begin_verify
        self.buffers: NHADecodeBuffers | None = None  # the decode path's in-place storage

    @property
    def max_rollback(self) -> int:
        """Tokens one `begin_verify` ... `commit` span may hold: the window's last w - 1."""
        return max(self.sliding_window - 1, 0)

    def begin_verify(self) -> None:
        """Keep the current state (speculative decoding); tokens run from now on can be undone by `commit`."""
        self.checkpoint = (self.get_state(), self.cumulative_length)

    def commit(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens run since `begin_verify`: the checkpoint's window followed by their raw
        keys, RoPE'd keys, values and gates, read back from the window, with the tokens beyond the last w - 1 absorbed
        into the slots in one block (`_absorb_block`, as a prefill ends), not replayed step by step."""
        (state, length), self.checkpoint = self.checkpoint, None
        seen = self.cumulative_length - length
        if num_tokens == seen:
            return
        if seen > self.raw_keys.shape[2]:
            raise ValueError(
                f"NHA layer no longer holds the {seen} tokens to roll back (window {self.sliding_window})"
            )
        keep = slice(-seen, -seen + num_tokens)  # the newest entries are the tokens run since begin
        keys, keys_rot, values, gates, mask = _pending(
            state, self.raw_keys[:, :, keep], self.keys[:, :, keep], self.values[:, :, keep], self.gates[:, :, keep],
            self.window_mask[:, keep],
        )  # fmt: skip
        stop = max(keys.shape[2] - max(self.sliding_window - 1, 0), 0)  # absorbed: all but the last w - 1
        hk, hv, num = _absorb_block(
            state.hk, state.hv, state.num_absorbed, keys[:, :, :stop], values[:, :, :stop], gates[:, :, :stop],
            mask[:, :stop],
        )  # fmt: skip
        window = slice(stop, None)
        state = NHAState(hk, hv, num, keys[:, :, window], keys_rot[:, :, window], values[:, :, window],
                         gates[:, :, window], mask[:, window])  # fmt: skip
        self.cumulative_length = length
        self.set_state(state, num_tokens)

    def get_state(self) -> NHAState | None:
        if self.num_absorbed is None:
            return None
        return NHAState(
            self.recurrent_states[0], self.recurrent_states[1], self.num_absorbed, self.raw_keys, self.keys,
            self.values, self.gates, self.window_mask,
        )  # fmt: skip

    def set_state(self, state: NHAState, num_new_tokens: int) -> None:
        """Keep `state` after a call that brought `num_new_tokens` tokens (padding included). A tensor that views a much
        larger one (the window after a prefill is the tail of all its tokens) is copied, so the rest can be freed."""
        self.buffers = None
        state = NHAState(*(t.clone() if t.untyped_storage().nbytes() > 2 * t.nbytes else t for t in state))
        self.recurrent_states[0], self.recurrent_states[1], self.num_absorbed = state.hk, state.hv, state.num_absorbed
        self.raw_keys, self.keys, self.values = state.keys, state.keys_rot, state.values
        self.gates, self.window_mask = state.gates, state.mask
        self.is_initialized = self.is_recurrent_states_initialized[0] = self.is_recurrent_states_initialized[1] = True
        self.has_previous_state[0] = self.has_previous_state[1] = True
        self.device = state.hk.device
        self.cumulative_length += num_new_tokens

    def decode_buffers(self) -> NHADecodeBuffers:
        """The decode buffers, made from the current state (copied) at the first decode step after any other change."""
        if self.buffers is None:
            state = self.get_state()
            length = state.keys.shape[2]
            capacity = self.sliding_window + max(self.sliding_window // 4, self.min_slack)

            def buffer(t: torch.Tensor) -> torch.Tensor:  # (b, n, length, ·) -> (b, n, capacity, ·)
                new = t.new_empty(*t.shape[:2], capacity, t.shape[-1])
                new[:, :, :length].copy_(t)
                return new

            mask = state.mask.new_zeros(state.mask.shape[0], capacity)
            mask[:, :length] = state.mask
            padding = (~state.mask).any(0).nonzero()  # window positions that are padding in some sequence
            own = lambda t: t.clone(memory_format=torch.contiguous_format)
            self.buffers = NHADecodeBuffers(
                hk=own(state.hk), hv=own(state.hv), num_absorbed=own(state.num_absorbed), raw_keys=buffer(state.keys),
                keys=buffer(state.keys_rot), values=buffer(state.values), gates=buffer(state.gates),
                mask=mask, start=0, length=length,
                padded_until=self.cumulative_length - length + int(padding[-1]) + 1 if len(padding) else 0,
                all_absorbed=bool((state.num_absorbed > 0).all()),
            )  # fmt: skip
            self.publish()
        return self.buffers

    def publish(self) -> None:
        """Point the layer's state at the decode buffers, after a decode step changed them."""
        buf = self.buffers
        self.recurrent_states[0], self.recurrent_states[1], self.num_absorbed = buf.hk, buf.hv, buf.num_absorbed
        self.raw_keys, self.keys, self.values, self.gates, self.window_mask = buf.window()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _tensor_names(self) -> tuple[str, ...]:
        return ("raw_keys", "keys", "values", "gates", "window_mask", "num_absorbed")

    def _map(self, fn) -> None:
        if self.num_absorbed is None:
            return
        self.buffers = None
        for name in self._tensor_names():
            setattr(self, name, fn(getattr(self, name)))
        for i in (0, 1):
            self.recurrent_states[i] = fn(self.recurrent_states[i])

    def reset(self) -> None:
        self.buffers = None
        self.recurrent_states = dict.fromkeys(range(2))
        self.is_recurrent_states_initialized = dict.fromkeys(range(2), False)
        self.has_previous_state = dict.fromkeys(range(2), False)
        for name in self._tensor_names():
            setattr(self, name, None)
        self.is_initialized = False
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("an NHA cache cannot be cropped: tokens that left the window are merged into the slots")


class NHAMixer(Mixer):
    """Native Hybrid Attention token mixer: the source attention's q/k/v/o (and biases) plus `g_proj`, the slot gates.

    `g_proj`: hidden -> n_kv · M, bias-free; conversion initialises it from `k_proj` (`convert/nha.py`).
    """

    settings_class = NHAMixerConfig
    mask_type = "padding"  # the window mask is built inside; only padding comes from outside
    readout = "o_proj"  # the output projection a calibrated conversion refits

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.settings = s = NHAMixerConfig.from_hybrid_config(config)
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scaling = self.head_dim**-0.5  # the source's: the window logits are its logits
        add_attention_projections(self, config)
        self.g_proj = nn.Linear(config.hidden_size, self.num_kv_heads * s.slots, bias=False)

    @staticmethod
    def new_cache_layer(config: HybridConfig, layer_idx: int) -> NHACacheLayer:
        return NHACacheLayer(NHAMixerConfig.from_hybrid_config(config).window)

    def _can_step(self, hidden_states, cache) -> bool:
        """Whether `_step` applies: one token after a prefill, with the slots in the dtype it computes in, and nothing
        recording (autograd, speculative verification, transformers' past recording)."""
        if cache is None or hidden_states.shape[1] != 1 or self.settings.impl == "ref":
            return False
        if torch.is_grad_enabled() and hidden_states.requires_grad:  # autograd must not see buffers written in place
            return False
        layer = cache.layers[self.layer_idx]
        if layer.num_absorbed is None or layer.checkpoint is not None or layer.record_past:
            return False
        return layer.recurrent_states[0].dtype == torch.promote_types(hidden_states.dtype, torch.float32)

    def _step(self, hidden_states, position_embeddings, attention_mask, layer: NHACacheLayer) -> torch.Tensor:
        """One decode token (b, 1, hidden) -> (b, 1, hidden): `nha_step` doing only what one token needs. The token is
        written after the window in the cache's buffers and the oldest one absorbed into the slots in place
        (`NHADecodeBuffers`), query heads are grouped by KV head (no repeat), and the softmax is masked only while
        something may be hidden: empty slots until every sequence has absorbed a real token (then exactly as
        `nha_step` does), padding while it may be in the window."""
        s = self.settings
        b, n, K = hidden_states.shape[0], self.num_kv_heads, self.head_dim
        buf = layer.decode_buffers()
        dtype = buf.hk.dtype  # float32 at least, as in the generic path
        x = hidden_states[:, 0]  # (b, hidden)
        # (b, heads, 1, head_dim): with one token, no transpose
        q = self.q_proj(x).view(b, -1, 1, K)
        k = self.k_proj(x).view(b, n, 1, K)
        v = self.v_proj(x).view(b, n, K).to(dtype)
        f = self.g_proj(x).view(b, n, s.slots)
        # RoPE (window path) of q and k in one go, with the formula of `apply_rotary_pos_emb`
        cos, sin = (t[:, None] for t in position_embeddings)  # (b, 1, 1, K)
        qk = torch.cat([q, k], 1)
        qk_rot = qk * cos + rotate_half(qk) * sin
        h = q.shape[1]
        q, k, q_rot, k_rot = (t.to(dtype) for t in (q, k, qk_rot[:, :h], qk_rot[:, h:]))
        g = F.logsigmoid(f.to(dtype)) / s.gate_normalizer  # (b, n, M)
        position, mask = layer.cumulative_length, None
        if attention_mask is not None:
            mask = attention_mask[:, -1].bool()
            g = g * mask[:, None, None].to(dtype)  # padding: α = 1, s = 0
            buf.padded_until = position + 1

        # 1. The token joins the window; with w = 0 it goes straight into the slots
        buf.push(k[:, :, 0], k_rot[:, :, 0], v, g, mask)
        if s.window == 0:
            buf.pop_()
        _, keys, values, _, window_mask = buf.window()
        # 2. One softmax over the slots (raw q) and the window (RoPE'd q), heads grouped by KV head: (b, n, G, M + P)
        logits = torch.cat([q.view(b, n, -1, K) @ buf.hk, q_rot.view(b, n, -1, K) @ keys.transpose(-1, -2)], -1)
        logits = logits * self.scaling
        if s.mask_empty_slots and not buf.all_absorbed:  # until every sequence has absorbed a token: as `nha_step`
            slot_visible = (buf.num_absorbed > 0)[:, None, None, None]
            p_slot, p_window = _joint_softmax(
                *logits.split([s.slots, keys.shape[2]], -1), slot_visible, window_mask[:, None, None]
            )
        else:  # every slot visible, so a hidden logit gets weight exactly 0 without zeroing it
            if buf.padded_until > position - buf.length + 1:  # padding may be in the window
                logits[..., s.slots :].masked_fill_(~window_mask[:, None, None], torch.finfo(dtype).min)
            p_slot, p_window = torch.softmax(logits, -1).split([s.slots, keys.shape[2]], -1)
        o = p_slot @ buf.hv + p_window @ values  # (b, n, G, V)
        # 3. Keep w - 1 tokens: the oldest leaves the window and enters the slots
        if s.window > 0 and buf.length > s.window - 1:
            buf.pop_()
        layer.cumulative_length += 1
        layer.publish()
        return self.o_proj(o.view(b, -1).to(hidden_states.dtype))[:, None]

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (b, l, hidden) -> (b, l, hidden). `attention_mask` is the 2-D padding mask (1 = token)."""
        if self._can_step(hidden_states, cache):
            return self._step(hidden_states, position_embeddings, attention_mask, cache.layers[self.layer_idx])
        s = self.settings
        b, l, _ = hidden_states.shape
        # (b, heads, l, head_dim), as in the source attention
        q = self.q_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        f = self.g_proj(hidden_states).view(b, l, self.num_kv_heads, s.slots).transpose(1, 2)  # (b, n, l, M)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)  # window path only; the slots take raw q and k
        # the slots run in float32 at least: exp/cumsum of the gates lose too much in half precision
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v, q_rot, k_rot = (t.to(dtype) for t in (q, k, v, q_rot, k_rot))
        g = F.logsigmoid(f.to(dtype)) / s.gate_normalizer  # log forget gate per slot, <= 0
        mask = attention_mask[:, -l:].bool() if attention_mask is not None else None

        layer = cache.layers[self.layer_idx] if cache is not None else None
        state = layer.get_state() if layer is not None else None
        options = {"window": s.window, "scale": self.scaling, "mask_empty_slots": s.mask_empty_slots}
        if state is not None and l == 1:
            o, state = nha_step(q, k, v, q_rot, k_rot, g, mask, state, **options)
        elif s.impl == "ref":
            o, state = nha_ref(q, k, v, q_rot, k_rot, g, mask, state, **options)
        else:
            # a short call (speculative verification: K + 1 tokens) is one chunk of its length, not padded to a chunk
            chunk_size = min(s.chunk_size, l)
            o, state = nha_chunked(q, k, v, q_rot, k_rot, g, mask, state, chunk_size=chunk_size, **options)
        if layer is not None:
            layer.set_state(state, l)
        o = o.transpose(1, 2).reshape(b, l, -1).to(hidden_states.dtype)  # (b, l, h · V)
        return self.o_proj(o)


__all__ = [
    "NHACacheLayer",
    "NHADecodeBuffers",
    "NHAMixer",
    "NHAMixerConfig",
    "NHAState",
    "nha_chunked",
    "nha_initial_state",
    "nha_ref",
    "nha_step",
]
