"""Attention -> Mamba2 initialisation (MambaInLlama, arXiv 2408.15237): C <- W_q, B <- W_k, x <- W_v,
out_proj <- W_o (biases too, for Qwen2-style q/k/v biases); the gate z and the step dt are new.

New parameters follow mamba_ssm's defaults, as MambaInLlama does: dt_bias = softplus⁻¹(dt0) with dt0 log-uniform in
[dt_min, dt_max], A = -U[1, 16], D = 1, gated-norm weight 1, z and dt rows nn.Linear's default. The convolution is
either PyTorch's random default (`conv_init="random"`, as published) or a delta (`"delta"`: last tap 1, bias 0), which
passes x, B and C through unchanged at step 0 so the converted layer starts closer to linear attention.
`mixer_init="random"` draws x, B, C and out_proj like the new rows instead of copying attention (the ablation that
measures what the weight reuse is worth); everything else is initialised the same way.
"""

import math

import torch
from torch import nn

from ..modeling import HybridConfig, Mamba2Mixer


@torch.no_grad()
def init_mamba2_from_attention(
    attn: nn.Module, config: HybridConfig, layer_idx: int, convert_config, generator: torch.Generator
) -> Mamba2Mixer:
    """A new `Mamba2Mixer` for layer `layer_idx` whose projections are copied from the attention module `attn`
    (with `q_proj`, `k_proj`, `v_proj`, `o_proj`), with `convert_config.conv_init`. `attn` is not modified."""
    mixer = Mamba2Mixer(config, layer_idx).to(attn.q_proj.weight.dtype)
    s = mixer.settings
    if s.state_size != attn.k_proj.weight.shape[0] // s.num_groups or s.head_dim != s.state_size:
        raise ValueError("attention initialisation needs state_size == head_dim == the attention head size")
    bound = 1 / math.sqrt(config.hidden_size)  # nn.Linear's default for the new rows

    # in_proj rows: z | x | B | C | dt
    z, x, B, C, dt = mixer.in_proj.weight.split(
        [
            mixer.inner_size,
            s.num_groups * s.head_dim,
            s.num_groups * s.state_size,
            s.num_heads * s.state_size,
            s.num_heads,
        ]
    )
    z.uniform_(-bound, bound, generator=generator)
    dt.uniform_(-bound, bound, generator=generator)
    if convert_config.mixer_init == "random":
        # a generator of their own, so every other parameter equals the attention-initialised conversion's
        own = torch.Generator().manual_seed(convert_config.seed * 1_000 + layer_idx)
        for w in (x, B, C):
            w.uniform_(-bound, bound, generator=own)
        out_bound = 1 / math.sqrt(mixer.inner_size)
        mixer.out_proj.weight.uniform_(-out_bound, out_bound, generator=own)
        for b in (mixer.in_proj.bias, mixer.out_proj.bias):
            if b is not None:
                b.zero_()
    else:
        x.copy_(attn.v_proj.weight)  # MambaInLlama: x <- W_v
        B.copy_(attn.k_proj.weight)  #              B <- W_k
        C.copy_(attn.q_proj.weight)  #              C <- W_q
        if mixer.in_proj.bias is not None:
            zb, xb, Bb, Cb, dtb = mixer.in_proj.bias.split([len(z), len(x), len(B), len(C), len(dt)])
            zb.zero_(), dtb.zero_()
            xb.copy_(attn.v_proj.bias), Bb.copy_(attn.k_proj.bias), Cb.copy_(attn.q_proj.bias)
        mixer.out_proj.weight.copy_(attn.o_proj.weight)  # out <- W_o
        if mixer.out_proj.bias is not None:
            mixer.out_proj.bias.copy_(attn.o_proj.bias)

    # mamba_ssm defaults for the SSM parameters
    dt_min, dt_max = 1e-3, 1e-1
    dt0 = torch.exp(torch.rand(s.num_heads, generator=generator) * (math.log(dt_max) - math.log(dt_min)))
    dt0 = (dt0 * dt_min).clamp(min=1e-4)
    mixer.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus⁻¹
    mixer.A_log.copy_(torch.log(1 + 15 * torch.rand(s.num_heads, generator=generator)))
    mixer.D.fill_(1.0)
    mixer.norm.weight.fill_(1.0)

    if convert_config.conv_init == "delta":
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0
        mixer.conv1d.bias.zero_()
    else:  # PyTorch's Conv1d default, drawn from our generator so a seed reproduces it
        fan_in = mixer.conv1d.weight.shape[1] * mixer.conv1d.weight.shape[2]
        conv_bound = 1 / math.sqrt(fan_in)
        mixer.conv1d.weight.uniform_(-conv_bound, conv_bound, generator=generator)
        mixer.conv1d.bias.uniform_(-conv_bound, conv_bound, generator=generator)
    return mixer


__all__ = ["init_mamba2_from_attention"]
