"""Per-mixer surgery: what the compress transformations and the exports need to know about one mixer type, in one
place.

A handler (`MixerSurgery`) holds a mixer's parameter count and how to measure, rank and slice its heads and channels
(prune), its groups and heads and how to transport them (fuse), which of its linears factorize takes, and its
GraniteMoeHybrid and llama.cpp forms (export, export_gguf, and the model card's layer names), and is registered for the
mixer classes it handles, torchao-style:

```python
@register_surgery(Mamba2Mixer)
class Mamba2Surgery(MixerSurgery):
    ...
```

`surgery_for(mixer_type, operation)` finds the handler of a `mixer_types` entry by its exact class in
`hybridize.modeling.mixers.MIXERS` (a subclass does not inherit its parent's handler), and raises the one refusal
`UnsupportedModelError("prune does not support nha: ...")` for a mixer without one. `modeling/` stays free of this
code: it ships with every checkpoint as remote code.
"""

from . import attention, gdn, mamba2, nha  # each registers its handler (`register_surgery`) when imported
from .base import (
    MixerSurgery,
    check_size,
    consumer_map,
    handlers,
    handlers_for,
    head_choices,
    identity_plan,
    map_cols,
    map_rows,
    map_segments,
    mixer_types,
    producer_map,
    register_surgery,
    rows_cols,
    slice_linear,
    surgery_for,
    to_array,
    top,
    top_per_group,
    unregister_surgery,
)

__all__ = [
    "MixerSurgery",
    "attention",
    "check_size",
    "consumer_map",
    "gdn",
    "handlers",
    "handlers_for",
    "head_choices",
    "identity_plan",
    "mamba2",
    "map_cols",
    "map_rows",
    "map_segments",
    "mixer_types",
    "nha",
    "producer_map",
    "register_surgery",
    "rows_cols",
    "slice_linear",
    "surgery_for",
    "to_array",
    "top",
    "top_per_group",
    "unregister_surgery",
]
