"""Registering a mixer from outside the library: one call puts it in every table a mixer is looked up in.

A mixer is a `hybridize.modeling.Mixer` subclass in its own file (see `Mixer` for the contract) and an initialiser
that builds it from a source attention layer. `register_mixer` adds it to the modeling registry (`MIXERS`: models,
caches, saving, loading, generation), the conversion registry (`INITIALIZERS`) and the torch-free table the configs
check (`MIXER_INITS`). Compression stays off until a surgery handler is registered for it
(`hybridize.surgery.register_surgery`): prune, fuse, factorize and export refuse it with one message until then.
Saving ships the mixer's file inside the checkpoint (`hybridize.remote_code`).
"""

from .configs.convert import MIXER_INITS, MixerInit, NoInitOptions
from .convert.registry import INITIALIZERS, Initializer
from .errors import ConfigError
from .modeling import Mixer
from .modeling.mixers import MIXERS
from .surgery.base import unregister_surgery


def register_mixer(
    name: str,
    mixer_class: type[Mixer],
    initializer: Initializer,
    *,
    init_options: type = NoInitOptions,
    allows_random: bool = False,
) -> None:
    """Make `mixer_class` the mixer called `name` in configs (`mixer_types`, `ConvertConfig.mixer`) and conversions.

    Args:
        name (`str`): its `mixer_types` entry; not one already registered.
        mixer_class (`type[Mixer]`): the module class.
        initializer (`Initializer`): how `convert` builds it from a source attention layer.
        init_options (`type`, *optional*): the frozen dataclass of its `ConvertConfig.init_options`.
        allows_random (`bool`, *optional*, defaults to `False`): whether `mixer_init="random"` applies.

    Example:
        ```python
        >>> register_mixer("toy", ToyMixer, Initializer(build=init_toy_from_attention))
        >>> hybrid = hybridize.convert(model, ConvertConfig(mixer="toy"), tokenizer=tokenizer)
        ```
    """
    if not (isinstance(mixer_class, type) and issubclass(mixer_class, Mixer)):
        raise ConfigError(f"{mixer_class!r} is not a hybridize.modeling.Mixer subclass")
    if name in MIXERS or name in INITIALIZERS or name in MIXER_INITS:
        raise ConfigError(f"a mixer called {name!r} is already registered; unregister_mixer({name!r}) first")
    MIXERS[name] = mixer_class
    INITIALIZERS[name] = initializer
    MIXER_INITS[name] = MixerInit(
        options_class=init_options, has_readout=mixer_class.readout is not None, allows_random=allows_random
    )


def unregister_mixer(name: str) -> None:
    """Remove the mixer `name` (and its surgery handler) from every table `register_mixer` wrote."""
    mixer_class = MIXERS.pop(name, None)
    INITIALIZERS.pop(name, None)
    MIXER_INITS.pop(name, None)
    if mixer_class is not None:
        unregister_surgery(mixer_class)


__all__ = ["NoInitOptions", "register_mixer", "unregister_mixer"]
