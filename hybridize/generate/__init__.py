"""Text generation with optional speculative decoding, for hybrids and plain transformers models alike.

A small draft model proposes K tokens; the target checks all of them in **one** forward over [last token, d1..dK]
and keeps the longest acceptable prefix plus one token of its own, so every round yields 1 to K + 1 tokens for one
target forward (speculative sampling: Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318). Greedy
decoding accepts a draft token when it is the target's argmax; sampling accepts d with probability
min(1, p(d) / q(d)) and on rejection draws from norm(max(0, p - q)), so the output follows the target's (warped)
distribution exactly, whatever the draft.

`GenerateConfig` holds everything that changes the output; `generate(model, config, tokenizer=..., prompt=..., draft=...)`
returns a `GenerateResult` (text, ids, acceptance rate, tokens/s). `compare_generate` times plain and speculative
decoding side by side (interleaved: a shared machine is noisy, only ratios mean something), and `early_exit_draft`
makes a draft from a model's first layers that shares its weights (self-speculative decoding: Draft & Verify,
arXiv 2309.08168; LayerSkip, arXiv 2404.16710, here without its early-exit training). `PromptLookupDraft` drafts
without a model, by copying what followed the text's last n-gram earlier on (prompt lookup decoding).

The package, one idea per file: `speculative.py` holds one round (the caches' rollback, the verify forward,
acceptance), `drafts.py` the drafters, `text.py` the prompt's ids and the streamed text, `loop.py` the loop
(`generate`), `result.py` what it returns and `compare.py` the side-by-side benchmark.
"""

from ..configs.generate import GenerateConfig, PromptLookupDraft
from .compare import compare_generate, format_compare
from .drafts import check_draft, early_exit_draft, load_draft
from .loop import generate
from .result import GenerateResult, format_generate

__all__ = [
    "GenerateConfig",
    "GenerateResult",
    "PromptLookupDraft",
    "check_draft",
    "compare_generate",
    "early_exit_draft",
    "format_compare",
    "format_generate",
    "generate",
    "load_draft",
]
