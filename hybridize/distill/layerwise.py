"""The layerwise stage: each converted layer learns, on its own, to do what the teacher's layer did.

MaTVLM (arXiv 2503.13440) feeds each student Mamba layer the teacher's hidden state at that layer's input and pulls
its output towards the teacher layer's output; MambaInLlama's stage 1 (arXiv 2408.15237) likewise trains only the
new mixers. Here the teacher runs once per batch under `no_grad`; forward hooks on its decoder layers record the input
and the output of every layer that the student converted (the teacher stops after the last of them). Then only those
student blocks run (norm -> new mixer -> residual -> norm -> MLP -> residual, everything but the mixer frozen), each
on the teacher's input, and the loss is the sum over layers of `hidden_state_loss(student out, teacher out)`. No
student forward through the whole model, no logits and no vocabulary-sized softmax: per token this costs one teacher
forward plus a forward and backward of the converted blocks, against one teacher forward plus a forward and backward
of the whole student for the end-to-end stage.

Since every block sees the teacher's input, the layers train independently of each other: the loss of layer i only
reaches layer i's mixer, so summing over layers is the same as training each layer alone with the same step size.

`loss="mixer"` is the attention-transfer objective of LoLCATs and RADLADS' first step (research/
recovery-and-runtimes.md §1): the hooks record the teacher attention's input (the normed hidden state) and output
instead, and each student mixer alone runs on that input, pulled towards that output by the MSE. No norm, no MLP and
no residual run in the student, forward or backward: only the mixers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..configs.distill import LAYER_LOSSES
from ..errors import ConfigError
from .losses import hidden_state_loss

# per-layer losses: the block output under `hidden_state_loss` (l2, mse), or the mixer output against the attention's


class _TeacherDone(Exception):
    """Raised by the hook of the last recorded layer: the rest of the teacher is not needed."""


class TeacherTaps:
    """Records the input and output hidden states of some decoder layers of a (frozen) teacher, or of their token
    mixers (`self_attn`, or `mixer` in a hybrid teacher) with `part="mixer"`.

    Args:
        teacher (`PreTrainedModel`): a causal LM whose decoder (`teacher.base_model`) has `.layers`.
        layer_indices (`Sequence[int]`): the layers to record.
        part (`str`, *optional*, defaults to `"layer"`): `"layer"` or `"mixer"`.
    """

    def __init__(self, teacher: nn.Module, layer_indices: Sequence[int], part: str = "layer"):
        decoder = teacher.base_model
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ConfigError(
                f"the teacher {type(teacher).__name__} has no decoder layers at .model.layers; the layerwise stage "
                "needs a Llama-family teacher (or a hybrid)"
            )
        self.decoder = decoder
        self.layers = [layers[i] for i in layer_indices]
        if part == "mixer":
            self.layers = [getattr(layer, "self_attn", None) or layer.mixer for layer in self.layers]
        self.last = max(layer_indices)
        self.layer_indices = list(layer_indices)

    def __call__(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the teacher on `input_ids` (b, l); return (input, output) hidden states (b, l, d) per recorded layer."""
        records: dict[int, list[torch.Tensor]] = {i: [] for i in self.layer_indices}

        def before(index):
            def hook(module, args, kwargs):
                records[index].append(args[0] if args else kwargs["hidden_states"])

            return hook

        def after(index):
            def hook(module, args, kwargs, output):
                records[index].append(output[0] if isinstance(output, tuple) else output)
                if index == self.last:
                    raise _TeacherDone

            return hook

        handles = []
        for index, layer in zip(self.layer_indices, self.layers):
            handles.append(layer.register_forward_pre_hook(before(index), with_kwargs=True))
            handles.append(layer.register_forward_hook(after(index), with_kwargs=True))
        try:
            with torch.no_grad():
                self.decoder(input_ids=input_ids, use_cache=False)
        except _TeacherDone:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [(records[i][0], records[i][1]) for i in self.layer_indices]


class LayerwiseObjective(nn.Module):
    """The converted blocks of a hybrid student as one trainable module; `forward(input_ids)` runs the teacher, then
    each block on the teacher's input, and returns the summed hidden-state loss.

    The student's blocks are registered as submodules (their parameters are the student's, shared, not copied); the
    teacher is held outside the module tree so that it is neither trained, synchronised across processes nor saved.

    Args:
        student (`HybridForCausalLM`): the hybrid; only the mixers of `layer_indices` should require grad.
        teacher (`PreTrainedModel`): the frozen teacher, with as many layers as the student.
        layer_indices (`Sequence[int]`): the converted layers trained.
        loss (`str`, *optional*, defaults to `"l2"`): one of `LAYER_LOSSES`: a `hidden_state_loss` kind on the
            block outputs, or `"mixer"` (MSE of each mixer's output against the teacher attention's).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layer_indices: Sequence[int], *, loss: str = "l2"):
        super().__init__()
        self.layer_indices = list(layer_indices)
        self.blocks = nn.ModuleList(student.model.layers[i] for i in self.layer_indices)
        self.rotary_emb = student.model.rotary_emb
        self.loss = loss
        self._taps = TeacherTaps(teacher, self.layer_indices, part="mixer" if loss == "mixer" else "layer")

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        recorded = self._taps(input_ids)
        hidden = recorded[0][0]
        position_ids = torch.arange(input_ids.shape[1], device=hidden.device)[None]
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        losses = []
        for block, (teacher_in, teacher_out) in zip(self.blocks, recorded):
            # packed blocks have no padding; converted (non-attention) mixers take only the padding mask
            if self.loss == "mixer":
                predicted = block.mixer(teacher_in.to(hidden.dtype), position_embeddings=position_embeddings)
            else:
                predicted = block(
                    teacher_in.to(hidden.dtype),
                    position_embeddings=position_embeddings,
                    causal_mask=None,
                    padding_mask=None,
                )
            kind = "mse" if self.loss == "mixer" else self.loss
            losses.append(hidden_state_loss(predicted, teacher_out, kind=kind))
        per_layer = torch.stack(losses)
        logs = {f"layer_{i}": value for i, value in zip(self.layer_indices, per_layer.detach().tolist())}
        return per_layer.sum(), logs


__all__ = ["LAYER_LOSSES", "LayerwiseObjective", "TeacherTaps"]
