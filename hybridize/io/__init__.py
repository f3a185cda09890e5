"""The data layer: text in, token blocks out. It imports nothing of hybridize above `configs`, `errors` and
`fingerprint`, so every step (convert, distill, compress, evaluate, analyze) reads its text from here.

- `corpus.py`: the packaged offline Wikipedia corpus and its cut into token blocks (`load_corpus`, `token_blocks`);
- `text.py`: data specs (`wiki`, local files and folders, Hub datasets), packing and the held-out split (`load_data`);
- `calibration.py`: calibration blocks and the hooked forward pass that measures a model on them (`calibrate`);
- `paths.py`: whether a spec names a local path or a Hub name (`looks_like_local_path`).
"""

from .calibration import CalibrationHook, calibrate, calibration_blocks
from .corpus import SPLITS, load_articles, load_corpus, token_blocks
from .paths import looks_like_local_path
from .text import DistillData, load_data

__all__ = [
    "SPLITS",
    "CalibrationHook",
    "DistillData",
    "calibrate",
    "calibration_blocks",
    "load_articles",
    "load_corpus",
    "load_data",
    "looks_like_local_path",
    "token_blocks",
]
