"""Distillation losses: logit KL (forward or reverse, per token, mask-aware), next-token cross-entropy, and the
hidden-state loss of the layerwise stage.

- `kl_loss`, `reduction="token"` (default): the KL of each position, averaged over the positions the mask keeps. This
  is what Minitron's `LogitsKLLoss` (arXiv 2407.14679, 2504.11409) and MambaInLlama's M1 refinement (masked, per
  token) compute, and it matches `compare_logits`' `kl`, so the training loss and the evaluation metric are one
  quantity.
- `reduction="batchmean"`: MambaInLlama's stage-1/2 code (arXiv 2408.15237), `F.kl_div(..., reduction="batchmean")`
  on `(b, l, v)` logits, which divides the sum over every position by the batch size `b` only, so the loss is a
  per-sequence sum that grows with the sequence length and outweighs a per-token CE. Kept only to reproduce it.
- Forward KL(teacher || student) is mode-covering (the usual KD objective); reverse KL(student || teacher) is
  mode-seeking (M1's `reverse_kl`).
- `hidden_state_loss`: MaTVLM's per-layer alignment (arXiv 2503.13440): the L2 norm (not squared) of the difference
  between the student layer's output and the teacher's, per token; `"mse"` is the mean squared error per channel.

Shapes: b batch, l length, v vocabulary, d hidden size. A mask is `(b, l)`, 1 for positions that count.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..configs.distill import HIDDEN_LOSSES, KL_KINDS, KL_REDUCTIONS
from ..evaluate.perplexity import token_kl


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-position values `(b, l)` over the positions `mask` keeps (0 if it keeps none)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: Literal["forward_kl", "reverse_kl"] = "forward_kl",
    reduction: Literal["token", "batchmean"] = "token",
) -> torch.Tensor:
    """Logit distillation loss between a student and its teacher on the same tokens.

    Args:
        student_logits (`torch.Tensor` of shape `(b, l, v)`): requires grad.
        teacher_logits (`torch.Tensor` of shape `(b, l, v)`): the target, without grad.
        mask (`torch.Tensor` of shape `(b, l)`, *optional*): 1 where the position counts; all positions if omitted.
        kind (`str`, *optional*, defaults to `"forward_kl"`): `"forward_kl"` KL(teacher || student) or
            `"reverse_kl"` KL(student || teacher).
        reduction (`str`, *optional*, defaults to `"token"`): `"token"` averages over the kept positions;
            `"batchmean"` sums over the kept positions and divides by `b` (MambaInLlama's semantics, see above).

    Returns:
        `torch.Tensor`: a scalar, in nats.

    Example: `loss = kl_loss(student(ids).logits, teacher(ids).logits)`
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    per_token = token_kl(student_logits, teacher_logits, kind=kind)  # (b, l)
    if reduction == "token":
        return _masked_mean(per_token, mask)
    if reduction == "batchmean":
        kept = per_token if mask is None else per_token * mask.to(per_token.dtype)
        return kept.sum() / per_token.shape[0]
    raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of position t predicting token t + 1, averaged over pairs whose both positions the mask keeps."""
    predicted = logits[:, :-1].float()  # (b, l - 1, v)
    per_token = F.cross_entropy(predicted.transpose(1, 2), input_ids[:, 1:], reduction="none")  # (b, l - 1)
    pair_mask = None if mask is None else mask[:, :-1] * mask[:, 1:]
    return _masked_mean(per_token, pair_mask)


def hidden_state_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: Literal["l2", "mse"] = "l2",
) -> torch.Tensor:
    """Distance between a student layer's output and the teacher's, per token, averaged over the kept tokens.

    Args:
        student (`torch.Tensor` of shape `(b, l, d)`): the student layer's output.
        teacher (`torch.Tensor` of shape `(b, l, d)`): the teacher layer's output on the same input.
        mask (`torch.Tensor` of shape `(b, l)`, *optional*): 1 where the token counts.
        kind (`str`, *optional*, defaults to `"l2"`): `"l2"`, the Euclidean norm of the difference (MaTVLM), or
            `"mse"`, the mean squared difference per channel.

    Returns:
        `torch.Tensor`: a scalar.
    """
    diff = student.float() - teacher.float()  # (b, l, d)
    if kind == "l2":
        per_token = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()  # the clamp keeps the gradient finite at 0
    elif kind == "mse":
        per_token = diff.pow(2).mean(-1)
    else:
        raise ValueError(f"kind must be one of {HIDDEN_LOSSES}, got {kind!r}")
    return _masked_mean(per_token, mask)


__all__ = ["HIDDEN_LOSSES", "KL_KINDS", "KL_REDUCTIONS", "hidden_state_loss", "kl_loss", "next_token_loss", "token_kl"]
