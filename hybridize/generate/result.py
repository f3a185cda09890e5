"""What `generate` returns (`GenerateResult`), and its one line for the terminal (`format_generate`)."""

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, kw_only=True)
class GenerateResult:
    """What `generate` returns.

    Args:
        text (`str`): the generated text (special tokens skipped; ends before a stop string).
        token_ids (`tuple[int, ...]`): the generated token ids (an end-of-sequence token included).
        prompt_tokens (`int`): tokens in the prompt, after the chat template.
        stop_reason (`str`): `"eos"`, `"stop"` (a stop string) or `"length"` (`max_new_tokens`).
        drafted (`int`), accepted (`int`): draft tokens proposed and accepted (0 without a draft).
        rounds (`int`): target forwards after the prefill.
        prefill_s (`float`): seconds to the first new token (prefill of target and draft).
        decode_s (`float`): seconds for the tokens after the first.
        draft_tokens (`tuple[int, ...]`): K of each round (changes when `adaptive`).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    stop_reason: str
    drafted: int
    accepted: int
    rounds: int
    prefill_s: float
    decode_s: float
    draft_tokens: tuple[int, ...] = field(default=(), repr=False)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over proposed draft tokens; `None` without a draft."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the seconds they took."""
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.token_ids) > 1 else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (len(self.token_ids) - 1) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("token_ids", "draft_tokens")},
            "new_tokens": len(self.token_ids),
            "token_ids": list(self.token_ids),  # to compare runs: greedy tokens across runtimes or files
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_round": self.tokens_per_round,
        }


def format_generate(result: GenerateResult) -> str:
    """One line of statistics for the terminal."""
    line = (
        f"{len(result.token_ids)} tokens ({result.stop_reason}): {result.tokens_per_s:.1f} tokens/s decode, "
        f"prefill {result.prefill_s:.2f} s, decode {result.decode_s:.2f} s"
    )
    if result.drafted:
        ks = result.draft_tokens
        line += (
            f"; acceptance {result.acceptance_rate:.2f} ({result.accepted}/{result.drafted}), "
            f"{result.tokens_per_round:.2f} tokens per target forward, {sum(ks) / len(ks):.1f} drafted per round"
        )
    return line


__all__ = ["GenerateResult", "format_generate"]
