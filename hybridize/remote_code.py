"""The modeling code a saved hybrid carries for mixers registered from outside the library.

`save_pretrained` copies `hybridize/modeling/` into the checkpoint (`model.py` and every file it imports relatively),
so a checkpoint loads with `trust_remote_code=True` where hybridize is not installed. A mixer registered with
`hybridize.register_mixer` lives in its own file elsewhere: `ship_mixer_code` copies that file beside the others and
rewrites the copied `mixers.py` so that its `MIXERS` names it too. Such a file imports only torch, transformers and
the modeling siblings (`from .mixer import Mixer`, falling back to `hybridize.modeling.mixer` inside a `try` when it
is imported outside a checkpoint).
"""

import inspect
import shutil
from pathlib import Path

from .errors import ConfigError
from .modeling import mixers as library_mixers
from .modeling.mixers import MIXERS

_LIBRARY_PACKAGE = library_mixers.__name__.rpartition(".")[0]  # "hybridize.modeling"


def _is_library(mixer_class: type) -> bool:
    return mixer_class.__module__.rpartition(".")[0] == _LIBRARY_PACKAGE


def _mixers_source(classes: dict[str, type]) -> str:
    imports = sorted({f"from .{cls.__module__.rpartition('.')[2]} import {cls.__name__}" for cls in classes.values()})
    entries = "".join(f"    {name!r}: {cls.__name__},\n" for name, cls in classes.items())
    return (
        '"""The mixer registry of this checkpoint: the library\'s mixers and those registered with '
        '`hybridize.register_mixer`."""\n\n' + "\n".join(imports) + f"\n\nMIXERS = {{\n{entries}}}\n\n"
        '__all__ = ["MIXERS"]\n'
    )


def ship_mixer_code(mixer_types: list[str], directory: Path) -> list[Path]:
    """Copy the file of each mixer in `mixer_types` that is not the library's into `directory` (a saved hybrid's
    folder, where `save_pretrained` has put the library's modeling files) and list it in the copied `mixers.py`.

    Returns:
        `list[Path]`: the files copied (none for a hybrid of the library's mixers only, whose folder is unchanged).

    Raises:
        `ConfigError`: an outside mixer's file has the name of a library modeling file.
    """
    outside = {name: MIXERS[name] for name in dict.fromkeys(mixer_types) if not _is_library(MIXERS[name])}
    copied = []
    for source in dict.fromkeys(Path(inspect.getsourcefile(cls)) for cls in outside.values()):
        target = directory / source.name
        if (Path(library_mixers.__file__).parent / source.name).exists() or target.exists():
            raise ConfigError(
                f"the mixer file {source} has the name of a hybridize modeling file; rename it to register its mixer"
            )
        shutil.copyfile(source, target)
        copied.append(target)
    if outside:
        classes = {name: cls for name, cls in MIXERS.items() if _is_library(cls)} | outside
        (directory / "mixers.py").write_text(_mixers_source(classes), encoding="utf-8")
    return copied


__all__ = ["ship_mixer_code"]
