"""The options of `hybridize.evaluate` and `hybridize.bench` (`EvalConfig`, `BenchConfig`, re-exported by
`hybridize.evaluate.perplexity` and `.bench`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..validation import check_fields


def check_decode_counts(config) -> None:
    """The checks every decode benchmark config shares: positive contexts, new_tokens and repeats, warm-up >= 0."""
    if not config.contexts or min(config.contexts) < 1:
        raise ConfigError(f"contexts must be positive token counts, got {config.contexts}")
    for name in ("new_tokens", "repeats"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.warmup_tokens < 0:
        raise ConfigError(f"warmup_tokens must be at least 0, got {config.warmup_tokens}")


SPLITS = ("train", "heldout")  # of the packaged corpus (`hybridize.io.corpus`)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What `evaluate` measures on.

    Args:
        split (`str`, *optional*, defaults to `"heldout"`): the corpus split, `"heldout"` or `"train"`.
        data (`str`, *optional*): evaluate on this text instead of the packaged split: a local `.txt`/`.jsonl`/
            `.parquet` file or folder, or a Hub dataset `name[:config]` (the specs `distill --data` reads).
        prompt_len (`int`, *optional*, defaults to 0): when > 0, the first `prompt_len` tokens of each block are a
            prompt, run as one cached prefill; the rest of the block goes through that cache in chunks, and only
            its tokens are scored (perplexity, KL and agreement).
        seq_len (`int`, *optional*, defaults to 512): tokens per block; each block is scored independently.
        max_tokens (`int`, *optional*, defaults to 16384): at most this many tokens in all blocks.
        batch_size (`int`, *optional*, defaults to 1): blocks (or, with `tasks`, lm-eval requests) per forward
            pass; never changes the result beyond floating-point rounding.
        tasks (`tuple[str, ...]`, *optional*, defaults to `()`): lm-eval tasks to run instead of the built-in
            perplexity (see `hybridize.evaluate.harness`): the offline `wiki_ppl`, `lambada_wiki`, `passkey_2k`,
            `passkey_4k`, `passkey_8k`, or any lm-eval registry task whose data is reachable. Empty: the built-in
            held-out perplexity (and KL with a baseline), configured by the fields above.
        max_length (`int`, *optional*): with `tasks`, the context of every lm-eval request; defaults to the model's
            `max_position_embeddings`, at most 8192. Perplexities depend on it: compare models at the same value.
        limit (`int`, *optional*): with `tasks`, evaluate only the first `limit` items of each task (quick checks).
    """

    split: str = "heldout"
    data: str | None = None
    seq_len: int = 512
    max_tokens: int = 16384
    batch_size: int = 1
    tasks: tuple[str, ...] = ()
    max_length: int | None = None
    limit: int | None = None
    prompt_len: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            raise ConfigError(f"tasks={self.tasks!r} must be a tuple of task names, e.g. ('wiki_ppl', 'passkey_4k')")
        check_fields(self, distinct=("tasks",))
        if self.split not in SPLITS:
            raise ConfigError(f"split={self.split!r} is not a corpus split; use one of {', '.join(SPLITS)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} is too short; a block needs at least 2 tokens to predict one")
        if self.max_tokens < self.seq_len:
            raise ConfigError(f"max_tokens={self.max_tokens} is less than seq_len={self.seq_len}; raise max_tokens")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if not 0 <= self.prompt_len < self.seq_len - 1:
            raise ConfigError(
                f"prompt_len={self.prompt_len} must be in [0, seq_len - 1) = [0, {self.seq_len - 1}) so that a "
                "continuation is left to score"
            )
        if not all(task.strip() for task in self.tasks):
            raise ConfigError(f"tasks={self.tasks!r} must be a tuple of task names, e.g. ('wiki_ppl', 'passkey_4k')")
        if self.tasks and (self.prompt_len or self.data is not None):
            raise ConfigError(
                "prompt_len and data apply to the built-in perplexity; lm-eval tasks bring their own text"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} must be at least 2 (or None for the model's context)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit} must be at least 1 (or None for every item)")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure.

    Args:
        contexts (`tuple[int, ...]`, *optional*, defaults to `(512, 2048, 8192)`): prompt lengths in tokens.
        new_tokens (`int`, *optional*, defaults to 16): tokens decoded (greedy) and timed after each prompt.
        warmup_tokens (`int`, *optional*, defaults to 2): tokens decoded after the prompt before the timing starts,
            so that the first steps' one-time costs (allocations, the prefill's freed memory) are not counted.
        repeats (`int`, *optional*, defaults to 2): rounds; each round runs every model once, interleaved; the
            median is reported.
        batch_sizes (`tuple[int, ...]`, *optional*, defaults to `(1,)`): sequences decoded together; every
            context is measured at every batch size.
        baseline_static (`bool`, *optional*, defaults to `True`): also run the baseline with transformers' static
            cache (`cache_implementation="static"`), its fastest eager path, and report speed-ups against both.
    """

    contexts: tuple[int, ...] = (512, 2048, 8192)
    new_tokens: int = 16
    warmup_tokens: int = 2
    repeats: int = 2
    batch_sizes: tuple[int, ...] = (1,)
    baseline_static: bool = True

    def __post_init__(self):
        check_fields(self, distinct=("contexts", "batch_sizes"))
        check_decode_counts(self)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch_sizes must be positive, got {self.batch_sizes}")


__all__ = ["SPLITS", "BenchConfig", "EvalConfig"]
