"""The mixer registry: a `mixer_types` entry -> its module class. Adding a mixer is one file and one line here."""

from .attention import AttentionMixer
from .gdn import GatedDeltaNetMixer
from .mamba2 import Mamba2Mixer
from .nha import NHAMixer
from .streaming import StreamingMixer

MIXERS = {
    "attention": AttentionMixer,
    "gdn": GatedDeltaNetMixer,
    "mamba2": Mamba2Mixer,
    "nha": NHAMixer,
    "streaming": StreamingMixer,
}

__all__ = ["MIXERS"]
