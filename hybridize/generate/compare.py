"""`compare_generate`: decode speed with and without speculation, side by side (interleaved runs: a shared machine
is noisy, only ratios mean something), and its table (`format_compare`)."""

import statistics
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compat import config_second
from ..configs.generate import GenerateConfig, PromptLookupDraft
from ..errors import ConfigError
from .loop import generate
from .result import GenerateResult


@config_second(GenerateConfig, old=("tokenizer", "prompt", "config"))
def compare_generate(
    model: PreTrainedModel,
    config: GenerateConfig,
    *,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[int],
    draft: PreTrainedModel | PromptLookupDraft | None,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
    repeats: int = 3,
) -> dict:
    """Decode tokens/s with and without speculation, side by side: `repeats` interleaved rounds of plain and
    speculative `generate` with the same config, medians and their ratio.

    Returns:
        `dict` with `plain` and `speculative` (each: the medians of `tokens_per_s`, `decode_s`, `prefill_s`, and the
        first run's `GenerateResult.to_dict()`), `speedup` (speculative over plain tokens/s) and `same_tokens`
        (whether both gave the same ids: always for greedy decoding).
    """
    if draft is None:
        raise ConfigError("comparing needs a draft to compare with; give --draft, --draft-layers or --prompt-lookup")
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    runs: dict[str, list[GenerateResult]] = {"plain": [], "speculative": []}
    for _ in range(repeats):
        runs["plain"].append(generate(model, config, tokenizer=tokenizer, prompt=prompt))
        runs["speculative"].append(
            generate(model, config, tokenizer=tokenizer, prompt=prompt, draft=draft, draft_tokenizer=draft_tokenizer)
        )
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "tokens_per_s": statistics.median(r.tokens_per_s for r in results),
            "decode_s": statistics.median(r.decode_s for r in results),
            "prefill_s": statistics.median(r.prefill_s for r in results),
            "first_run": results[0].to_dict(),
        }
    summary["speedup"] = summary["speculative"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    summary["same_tokens"] = runs["plain"][0].token_ids == runs["speculative"][0].token_ids
    summary["repeats"] = repeats
    return summary


def format_compare(result: dict) -> str:
    """The table of `compare_generate`."""
    lines = [f"{'':<12} {'tokens/s':>9} {'decode s':>9} {'prefill s':>9} {'acceptance':>10} {'tokens/fwd':>10}"]
    for name in ("plain", "speculative"):
        row, first = result[name], result[name]["first_run"]
        rate = "-" if first["acceptance_rate"] is None else f"{first['acceptance_rate']:.2f}"
        lines.append(
            f"{name:<12} {row['tokens_per_s']:>9.2f} {row['decode_s']:>9.2f} {row['prefill_s']:>9.2f} {rate:>10} "
            f"{first['tokens_per_round']:>10.2f}"
        )
    same = "yes" if result["same_tokens"] else "no (sampling)"
    lines.append(
        f"speedup x{result['speedup']:.2f} (medians of {result['repeats']} interleaved runs; same tokens: {same})"
    )
    return "\n".join(lines)


__all__ = ["compare_generate", "format_compare"]
