"""Publish a saved model on the Hugging Face Hub with the model card of `model_card.py`.

`push` never modifies the input directory: it stages the upload in a temporary directory of symbolic links to the
input's files plus the generated `README.md`, and hands that to `HfApi.upload_folder`, which uploads large files the
way the library does (Xet when `hf_xet` is installed, else LFS) and can resume an interrupted upload. A `README.md`
already in the directory is the user's own card and is uploaded unchanged instead.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    filter_repo_objects,
    get_token,
)

from .configs.hub import PushConfig
from .errors import CheckpointError, ConfigError, HybridizeError
from .model_card import model_card
from .sources import resolve

logger = logging.getLogger(__name__)

_LOGIN = "run `hf auth login` (with a write token), set the HF_TOKEN environment variable, or pass token="


# Upload


def _check_saved_model(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} is not a directory; pass a model directory written by `hybridize convert` or save_pretrained"
        )
    resolve(str(directory.resolve()))  # config.json and readable safetensors headers, else CheckpointError


def _stage(directory: Path, staging: Path, card: ModelCard | None) -> int:
    """Mirror `directory` into `staging` with symbolic links (hard links, then copies where those fail), add the
    card as README.md; returns the number of files."""
    files = [p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*")) if p.is_file()]
    files = list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    for relative in files:
        source, target = (directory / relative).resolve(), staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(source)
        except OSError:  # e.g. Windows without the symlink privilege
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    if card is not None:
        (staging / "README.md").write_text(str(card), encoding="utf-8")
    return len(files) + (card is not None)


def _hub_error(error: HfHubHTTPError, config: PushConfig, endpoint: str) -> HybridizeError:
    status = error.response.status_code if error.response is not None else None
    if status in (401, 403):
        return ConfigError(
            f"the Hub at {endpoint} refused the token for {config.repo_id} (HTTP {status}); {_LOGIN}, with write "
            f"access to {config.repo_id.split('/')[0]}"
        )
    return HybridizeError(f"uploading to {config.repo_id} at {endpoint} failed: {error}")


def push(directory: str | Path, config: PushConfig, *, token: str | None = None) -> str:
    """Create the Hub repository if needed and upload a saved model with its generated model card.

    Args:
        directory (`str` or `Path`): a saved model directory (config.json and safetensors weights). It is not
            modified: the card is added in a temporary staging directory.
        config (`PushConfig`): repository, visibility, branch and commit message.
        token (`str`, *optional*): a Hub token with write access; defaults to `$HF_TOKEN`, else the token saved by
            `hf auth login` (huggingface_hub's own lookup). It is never printed or logged.

    Returns:
        `str`: the URL of the repository (of the branch, when `config.revision` is set).

    Raises:
        `CheckpointError`: `directory` is not a saved model; checked before any network call.
        `ConfigError`: no token, offline mode, a token the Hub refuses, or invalid metadata in the directory's own
            README.md.
        `HybridizeError`: any other error answered by the Hub.

    Example:
        ```python
        >>> push("out/smol-mamba50", PushConfig(repo_id="someone/smol-mamba50"))
        'https://huggingface.co/someone/smol-mamba50'
        ```
    """
    directory = Path(directory)
    _check_saved_model(directory)
    own_readme = (directory / "README.md").is_file()
    card = None if own_readme else model_card(directory, repo_id=config.repo_id)
    token = token or get_token()
    if not token:
        raise ConfigError(f"no Hugging Face token found to push {config.repo_id}; {_LOGIN}")
    if hub_constants.is_offline_mode():
        raise ConfigError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset HF_HUB_OFFLINE to push")
    endpoint = (config.endpoint or os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token, library_name="hybridize")
    message = config.commit_message or f"Upload {directory.resolve().name} with hybridize"
    with tempfile.TemporaryDirectory(prefix="hybridize-push-") as staging:
        count = _stage(directory, Path(staging), card)
        logger.info(
            "uploading %d files to %s (%s)",
            count,
            config.repo_id,
            "README.md from the directory" if own_readme else "generated model card",
        )
        try:
            url = api.create_repo(config.repo_id, private=config.private, exist_ok=True)
            if config.revision not in (None, hub_constants.DEFAULT_REVISION):
                api.create_branch(config.repo_id, branch=config.revision, exist_ok=True)
            api.upload_folder(
                repo_id=config.repo_id, folder_path=staging, revision=config.revision, commit_message=message
            )
        except HfHubHTTPError as error:
            raise _hub_error(error, config, endpoint) from error
        except ValueError as error:  # the Hub's README metadata check (only a user's own README.md can fail it)
            if "Invalid metadata in README.md" not in str(error):
                raise
            raise ConfigError(
                f"the Hub rejected the metadata of {directory / 'README.md'} ({' '.join(str(error).split())}); fix it, "
                "or remove the file to upload the generated model card"
            ) from error
    return f"{url}/tree/{config.revision}" if config.revision else str(url)


__all__ = ["PushConfig", "push"]
