"""Math shared by several mixers: the gated RMSNorm of Mamba2 and a causal depthwise convolution with a state."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNormGated(nn.Module):
    """`rmsnorm(y * silu(gate)) * weight`, normalised over the whole width (gate before norm).

    This is the torch path of transformers' Bamba/GraniteMoeHybrid Mamba2 (`norm_before_gate=False`, one group), so a
    hybrid exports to GraniteMoeHybrid with identical outputs. mamba_ssm's fused kernel normalises per group instead,
    which differs when there are several groups (research/peers.md §2.4); we always run this one.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float() * F.silu(gate.float())
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution continuing from `state`.

    Args:
        x (`torch.Tensor`): (b, channels, l) inputs.
        weight (`torch.Tensor`): (channels, 1, k) depthwise kernel.
        bias (`torch.Tensor`, *optional*): (channels,).
        state (`torch.Tensor`, *optional*): (b, channels, k) the last k inputs seen before `x` (zeros if None).

    Returns:
        The (b, channels, l) outputs and the new state, the last k inputs including `x`.
    """
    k = weight.shape[-1]
    if state is None:
        context = x.new_zeros(x.shape[0], x.shape[1], k - 1)
    else:
        context = state[..., 1:].to(x.dtype)
    inputs = torch.cat([context, x], dim=-1)  # (b, c, k - 1 + l)
    out = F.conv1d(inputs, weight, bias, groups=x.shape[1])
    return out, inputs[..., -k:]


__all__ = ["RMSNormGated", "causal_conv1d"]
