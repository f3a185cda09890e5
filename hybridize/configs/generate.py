"""The options of `hybridize.generate` (`GenerateConfig`, `PromptLookupDraft`, re-exported by
`hybridize.generate`)."""

from dataclasses import dataclass

from ..errors import ConfigError
from ..validation import check_fields


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Settings of `generate`. Everything here can change the generated text; nothing else can.

    Args:
        max_new_tokens (`int`, *optional*, defaults to 256): tokens generated at most.
        do_sample (`bool`, *optional*, defaults to `False`): sample from the (warped) target distribution; greedy if
            `False`. Speculative decoding never changes which tokens greedy decoding gives, nor the distribution
            sampling draws from.
        temperature (`float`, *optional*, defaults to 1.0): sampling temperature (> 0).
        top_p (`float`, *optional*, defaults to 1.0): nucleus sampling: keep the smallest set of tokens whose
            probability reaches `top_p` (1.0 keeps all). Applied to target and draft alike.
        draft_tokens (`int`, *optional*, defaults to 4): K, tokens the draft proposes per round (the starting value
            when `adaptive`). Ignored without a draft.
        adaptive (`bool`, *optional*, defaults to `True`): grow K by 2 after a round that accepts every draft token
            and shrink it by 1 after a rejection (as transformers' assisted generation), within [1, `max_draft_tokens`].
        max_draft_tokens (`int`, *optional*, defaults to 12): the largest K adaptive rounds may reach.
        seed (`int`, *optional*, defaults to 0): seed of sampling and of the acceptance tests.
        stop (`tuple[str, ...]`, *optional*, defaults to `()`): stop strings: generation ends when the text contains
            one; the text returned ends before it.
        chat (`bool`, *optional*, defaults to `False`): wrap the prompt as a user message in the tokenizer's chat
            template, with the generation prompt.
        ignore_eos (`bool`, *optional*, defaults to `False`): go on past end-of-sequence tokens (for timing).

    Example:
        ```python
        >>> config = GenerateConfig(max_new_tokens=64, draft_tokens=4, stop=("\\n\\n",))
        ```
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    draft_tokens: int = 4
    adaptive: bool = True
    max_draft_tokens: int = 12
    seed: int = 0
    stop: tuple[str, ...] = ()
    chat: bool = False
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        check_fields(self)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(
                f"temperature must be positive, got {self.temperature}; for greedy decoding drop --sample"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.draft_tokens < 1:
            raise ConfigError(
                f"draft_tokens must be at least 1, got {self.draft_tokens}; to decode without a draft omit it"
            )
        if self.max_draft_tokens < self.draft_tokens:
            raise ConfigError(
                f"max_draft_tokens ({self.max_draft_tokens}) must be >= draft_tokens ({self.draft_tokens})"
            )
        if any(not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty, got {self.stop!r}")


@dataclass(frozen=True, kw_only=True)
class PromptLookupDraft:
    """A draft without a model: propose the tokens that followed the latest earlier occurrence of the text's last
    n-gram (prompt lookup decoding, Saxena 2023, github.com/apoorvumang/prompt-lookup-decoding; transformers'
    `prompt_lookup_num_tokens`). Free to run and often right when the output repeats the prompt (editing,
    summarising, extracting, code); for sampling its proposals count as certain (q = 1), which the acceptance rule
    handles exactly.

    Args:
        max_ngram (`int`, *optional*, defaults to 3): longest n-gram matched first.
        min_ngram (`int`, *optional*, defaults to 2): shortest n-gram tried before giving up (a plain round). Not 1:
            on the README's copy prompt, drafts after a one-token match were accepted 8-24% of the time unless the
            model copied verbatim, and on a CPU verifying even one draft token costs about 1.5 plain steps, so those
            rounds lose time.

    Example:
        ```python
        >>> generate(model, config, tokenizer=tokenizer, prompt=prompt, draft=PromptLookupDraft())
        ```
    """

    max_ngram: int = 3
    min_ngram: int = 2

    def __post_init__(self):
        check_fields(self)
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the latest earlier occurrence
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []


__all__ = ["GenerateConfig", "PromptLookupDraft"]
