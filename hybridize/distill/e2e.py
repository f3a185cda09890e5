"""The end-to-end stage: the whole student's next-token distributions against the teacher's, and which of its
parameters train.

Freezing presets (named after what is left trainable):
- `mixers`: only the mixers of converted layers (MambaInLlama stage 1, arXiv 2408.15237; MaTVLM, arXiv 2503.13440);
- `all-but-mlp`: everything except the MLPs (NHA's `froze_ffn`, arXiv 2510.07019);
- `all`: every parameter (MambaInLlama stage 2, Minitron's retraining, arXiv 2407.14679).

With `lora_rank > 0` the pretrained linear layers that the preset trains (the kept attention projections, and with
`all` the MLP projections) learn a low-rank update through `peft` instead of a full one, while the new mixers still
train in full (they start far from their optimum); embeddings and norms stay frozen, as usual with LoRA. The adapters
are merged into the weights at the end (`merge_lora`), so the result is a plain hybrid.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..configs.distill import FREEZE_PRESETS
from ..errors import ConfigError
from .losses import kl_loss, next_token_loss

_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def converted_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose mixer is not attention."""
    return [i for i, layer in enumerate(model.model.layers) if layer.mixer_type != "attention"]


def _is_new_mixer(model: nn.Module, name: str) -> bool:
    parts = name.split(".")  # model.layers.{i}.mixer....
    return (
        len(parts) > 3
        and parts[:2] == ["model", "layers"]
        and parts[3] == "mixer"
        and model.model.layers[int(parts[2])].mixer_type != "attention"
    )


def trainable_names(model: nn.Module, preset: Literal["mixers", "all-but-mlp", "all"]) -> list[str]:
    """Names of the parameters a freezing preset trains (see the module docstring)."""
    if preset not in FREEZE_PRESETS:
        raise ConfigError(f"freeze preset {preset!r} is unknown; choose one of {', '.join(FREEZE_PRESETS)}")
    names = [name for name, _ in model.named_parameters()]
    if preset == "mixers":
        return [name for name in names if _is_new_mixer(model, name)]
    if preset == "all-but-mlp":
        return [name for name in names if ".mlp." not in name]
    return names


def pretrained_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters the source model already had: all but the new mixers' (and LoRA adapters')."""
    return {id(p) for name, p in model.named_parameters() if not _is_new_mixer(model, name) and "lora_" not in name}


def freeze(model: nn.Module, preset: Literal["mixers", "all-but-mlp", "all"]) -> list[str]:
    """Set `requires_grad` by preset; return the trained parameter names."""
    trained = set(trainable_names(model, preset))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    return sorted(trained)


def lora_targets(model: nn.Module, preset: Literal["all-but-mlp", "all"]) -> list[str]:
    """Full names of the pretrained linear layers that get LoRA adapters under a preset."""
    kinds = _ATTENTION_PROJECTIONS + (_MLP_PROJECTIONS if preset == "all" else ())
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in kinds and not _is_new_mixer(model, name):
            targets.append(name)
    return targets


def add_lora(model: nn.Module, preset: Literal["all-but-mlp", "all"], *, rank: int, alpha: float) -> nn.Module:
    """Wrap `model` in a `peft` LoRA model on `lora_targets`; the new mixers train in full, all else is frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, preset)
    if not targets:
        raise ConfigError(f"freeze preset {preset!r} leaves no pretrained linear layer for LoRA; use lora_rank=0")
    mixers = set(trainable_names(model, "mixers"))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    for name, parameter in model.named_parameters():  # get_peft_model froze everything but the adapters
        if name in mixers:
            parameter.requires_grad_(True)
    return peft_model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the weights and return the plain model (a no-op for a model without adapters)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


class LogitsObjective(nn.Module):
    """`forward(input_ids)`: `kl_weight` times the KL between the teacher's and the student's logits on the same
    packed blocks, plus `ce_weight` times the student's next-token cross-entropy.

    Args:
        student (`nn.Module`): the hybrid (or its LoRA wrapper); registered, so it trains and synchronises.
        teacher (`nn.Module`): the frozen teacher, kept outside the module tree; not run when `kl_weight` is 0.
        kind (`str`): `"forward_kl"` or `"reverse_kl"`.
        reduction (`str`): `"token"` or `"batchmean"` (see `kl_loss`).
        ce_weight (`float`): weight of the cross-entropy term; 0 leaves pure distillation (Minitron).
        kl_weight (`float`, *optional*, defaults to 1.0): weight of the KL term; 0 is plain fine-tuning.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        kind: str,
        reduction: str,
        ce_weight: float,
        kl_weight: float = 1.0,
    ):
        super().__init__()
        self.student = student
        self._teacher = (teacher,)  # a tuple is not registered as a submodule
        self.kind, self.reduction, self.ce_weight, self.kl_weight = kind, reduction, ce_weight, kl_weight

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        student_logits = self.student(input_ids=input_ids, use_cache=False).logits
        loss = student_logits.new_zeros(())
        logs: dict[str, float] = {}
        if self.kl_weight:
            with torch.no_grad():
                teacher_logits = self._teacher[0](input_ids=input_ids, use_cache=False).logits
            kl = kl_loss(student_logits, teacher_logits, kind=self.kind, reduction=self.reduction)
            loss = loss + self.kl_weight * kl
            logs["kl"] = kl.item()
        if self.ce_weight:
            ce = next_token_loss(student_logits, input_ids)
            loss = loss + self.ce_weight * ce
            logs["ce"] = ce.item()
        return loss, logs


__all__ = [
    "FREEZE_PRESETS",
    "LogitsObjective",
    "add_lora",
    "converted_layers",
    "freeze",
    "pretrained_parameters",
    "lora_targets",
    "merge_lora",
    "trainable_names",
]
