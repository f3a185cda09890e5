"""Data loader of hybridize's offline lm-eval tasks (the YAML files beside this one use it as `custom_dataset`).

Why a function and not `dataset_path: json` with `data_files`: `datasets` resolves relative `data_files` against the
working directory, not against the YAML, so a plain `lm_eval --include_path <this directory>` would only work from
one place. This file finds the data next to itself (`../data/tasks/` inside the installed `hybridize` package,
written by `evals/build_tasks.py`), falling back to the installed package when the YAML directory was copied
elsewhere, and never touches the network or the `datasets` cache.
"""

from __future__ import annotations

import gzip
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"


def _data_file(name: str) -> Any:
    if (DATA_DIR / name).is_file():
        return DATA_DIR / name
    packaged = files("hybridize") / "data" / "tasks" / name
    if not packaged.is_file():
        raise FileNotFoundError(
            f"task data {name!r} is neither in {DATA_DIR} nor in the installed hybridize package; "
            "rebuild it with `python evals/build_tasks.py`"
        )
    return packaged


def load_test_split(data_file: str, **metadata: Any) -> dict[str, datasets.Dataset]:
    """The `test` split of a task from its packaged `.jsonl.gz` file.

    lm-eval calls it with the task's `dataset_kwargs` (`data_file`) and its metadata (the task version, and on the
    command line the `--model_args`), which are not needed here.
    """
    with _data_file(data_file).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return {"test": datasets.Dataset.from_list(records)}


def passkey_found(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """`acc` of one pass key item: 1.0 when the greedy continuation, leading spaces aside, starts with the key."""
    return {"acc": float(results[0].lstrip().startswith(doc["target"]))}
