"""Math shared by several mixers: the gated RMSNorm of Mamba2 and a causal depthwise convolution with a state."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNormGated(nn.Module):
    """`rmsnorm(y * silu(gate)) * weight` with the RMS taken per group of `group_size` channels (gate before norm).

    With one group per SSM head this is MambaInLlama's norm (mamba_ssm `RMSNormGated`, `norm_before_gate=False`,
    `group_size=head_dim`) and transformers 5's GraniteMoeHybrid norm with `mamba_n_groups = num_heads`, so a hybrid
    exports to GraniteMoeHybrid with identical outputs (research/peers.md §2.4 on why grouping matters).
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float() * F.silu(gate.float())
        grouped = hidden_states.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.flatten(-2).to(input_dtype)


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
