"""Surgery on Native Hybrid Attention layers (`NHAMixer`): its q/k/v/o are the source attention's linears, which
factorize as attention's; prune, fuse and the exports do not handle its slot memories (`g_proj` and the slot state)."""

from ..modeling.nha import NHAMixer
from .base import MixerSurgery, register_surgery


@register_surgery(NHAMixer)
class NHASurgery(MixerSurgery):
    """The attention projections, as factorize targets."""

    operations = ("factorize",)
    factorize_targets = ("attn",)


__all__ = ["NHASurgery"]
