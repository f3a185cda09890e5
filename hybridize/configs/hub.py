"""`PushConfig`, the options of `hybridize.push` (re-exported by `hybridize.hub`)."""

import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..validation import check_fields

HUB_ID_PATTERN = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name


@dataclass(frozen=True, kw_only=True)
class PushConfig:
    """Where and how to publish a saved model.

    Args:
        repo_id (`str`): the Hub repository `"owner/name"`; created if it does not exist.
        private (`bool`, *optional*, defaults to `False`): create the repository as private. An existing repository
            keeps its visibility.
        revision (`str`, *optional*): the branch to commit to, created from `main` if missing; defaults to `main`.
        commit_message (`str`, *optional*): defaults to `"Upload <directory name> with hybridize"`.
        endpoint (`str`, *optional*): the Hub URL; defaults to `$HF_ENDPOINT`, else https://huggingface.co.

    Example:
        ```python
        >>> push("out/smol-mamba50", PushConfig(repo_id="someone/smol-mamba50", private=True))
        ```
    """

    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    endpoint: str | None = None

    def __post_init__(self):
        check_fields(self)
        from huggingface_hub.utils import HFValidationError, validate_repo_id  # its HTTP client takes 0.1 s

        try:
            if not HUB_ID_PATTERN.fullmatch(self.repo_id):
                raise HFValidationError("it must have the form 'owner/name'")
            validate_repo_id(self.repo_id)
        except HFValidationError as error:
            raise ConfigError(
                f"repo id {self.repo_id!r} is not valid ({error}); pass 'owner/name' with your user or organisation "
                "name, e.g. someone/smol-mamba50"
            ) from None
        if self.revision is not None and (not self.revision.strip() or self.revision != self.revision.strip()):
            raise ConfigError(f"revision {self.revision!r} is not a branch name; pass e.g. main or dev, or omit it")
        if self.commit_message is not None and not self.commit_message.strip():
            raise ConfigError("commit_message is empty; pass a message or omit it for the default")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint {self.endpoint!r} is not an http(s) URL; pass e.g. https://huggingface.co")


__all__ = ["HUB_ID_PATTERN", "PushConfig"]
