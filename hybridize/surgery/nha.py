"""Surgery on Native Hybrid Attention layers (`NHAMixer`): its q/k/v/o are the source attention's linears, which
factorize as attention's; prune and fuse do not handle its slot memories (`g_proj` and the slot state), and no native
transformers class or llama.cpp architecture computes them."""

from ..modeling.nha import NHAMixer
from .base import MixerSurgery, register_surgery


@register_surgery(NHAMixer)
class NHASurgery(MixerSurgery):
    """The attention projections, as factorize targets."""

    operations = ("factorize",)
    reasons = {
        "export": "Native Hybrid Attention (slot memories and a window under one softmax) has no GraniteMoeHybrid layer",
        "export_gguf": "Native Hybrid Attention (slot memories and a window under one softmax) has no llama.cpp "
        "architecture",
    }
    factorize_targets = ("attn",)


__all__ = ["NHASurgery"]
