"""Where draft tokens come from: a draft model with its own cache (`_ModelDrafter`), or prompt lookup, which copies
what followed the text's last n-gram earlier on (`_LookupDrafter`); the check that a draft speaks the target's
vocabulary; a draft cut from the target's own first layers (`early_exit_draft`: self-speculative decoding, Draft &
Verify, arXiv 2309.08168; LayerSkip, arXiv 2404.16710, here without its early-exit training); and the draft the
command line asks for (`load_draft`).

A drafter has `max_rollback()`, `propose(tokens, k, config, generator) -> (drafts, their distributions)` and
`accept(num_accepted, num_drafted)`.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..configs.generate import PromptLookupDraft
from ..errors import ConfigError
from ..sources import load
from .speculative import _Decoder, _pick


def _vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


class _ModelDrafter:
    """A draft model with its own cache: each round it runs what it has not seen, then its own tokens but the last,
    and afterwards keeps only what the target accepted."""

    def __init__(self, model: nn.Module, prompt_ids: list[int], vocab: int):
        self.decoder, self.vocab = _Decoder(model), vocab
        self.decoder.forward(prompt_ids, last_only=True)
        self.first_feed = 0

    def max_rollback(self) -> float:
        return self.decoder.max_rollback()

    def propose(self, tokens, k, config, generator) -> tuple[list[int], list[torch.Tensor | None]]:
        self.decoder.begin()
        feed = tokens[self.decoder.seen :]
        self.first_feed = len(feed)
        drafts, probs = [], []
        for _ in range(k):
            logits = self.decoder.forward(feed, last_only=True)[-1, : self.vocab]
            if logits.shape[-1] < self.vocab:  # the target has padding rows beyond the shared tokenizer
                logits = F.pad(logits, (0, self.vocab - logits.shape[-1]), value=-torch.inf)
            token, q = _pick(logits, config, generator)
            drafts.append(token)
            probs.append(q)
            feed = [token]
        return drafts, probs

    def accept(self, num_accepted: int, num_drafted: int) -> None:
        self.decoder.commit(self.first_feed + min(num_accepted, num_drafted - 1))


class _LookupDrafter:
    def __init__(self, lookup: PromptLookupDraft, vocab: int):
        self.lookup, self.vocab = lookup, vocab

    def max_rollback(self) -> float:
        return float("inf")

    def propose(self, tokens, k, config, generator) -> tuple[list[int], list[torch.Tensor | None]]:
        drafts = [t for t in self.lookup.propose(tokens, k) if t < self.vocab]
        if not config.do_sample:
            return drafts, [None] * len(drafts)
        return drafts, list(F.one_hot(torch.tensor(drafts, dtype=torch.long), self.vocab).float())  # q = 1

    def accept(self, num_accepted: int, num_drafted: int) -> None:
        pass


def check_draft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    draft: nn.Module,
    draft_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise `ConfigError` unless `draft` speaks the target's vocabulary: the same tokenizer (when given) and the same
    number of logits, up to padding rows beyond the tokenizer."""
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"the draft's tokenizer ({len(draft_tokenizer)} tokens) differs from the target's ({len(tokenizer)} "
            "tokens); a draft must share the target's tokenizer, e.g. a model converted, pruned or cut from it"
        )
    target_size, draft_size = _vocab_size(model), _vocab_size(draft)
    if target_size != draft_size and min(target_size, draft_size) < len(tokenizer):
        raise ConfigError(
            f"the draft predicts {draft_size} tokens and the target {target_size} (tokenizer: {len(tokenizer)}); "
            "a draft must share the target's vocabulary, e.g. a model converted, pruned or cut from it"
        )


def early_exit_draft(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A draft made of `model`'s first `num_layers` layers, its final norm and its head, sharing their weights (no
    copy, no extra memory): self-speculative decoding (Draft & Verify, arXiv 2309.08168; LayerSkip, arXiv 2404.16710,
    which also trains the early exit; here it is used as is, so acceptance depends on how settled the hidden state
    already is at that depth).

    Args:
        model (`PreTrainedModel`): a hybrid or a Llama-family model (`model.model.layers`). Not modified.
        num_layers (`int`): layers kept, 1 to the model's depth - 1.

    Example:
        ```python
        >>> draft = early_exit_draft(model, 8)
        ```
    """
    layers = model.model.layers
    if not 1 <= num_layers < len(layers):
        raise ConfigError(
            f"draft layers must be in [1, {len(layers) - 1}] for this {len(layers)}-layer model, got {num_layers}"
        )
    values = model.config.to_dict()
    values["num_hidden_layers"] = num_layers
    for name in ("mixer_types", "layer_types"):
        if values.get(name) is not None:
            values[name] = values[name][:num_layers]
    if values.get("lowrank"):
        values["lowrank"] = {k: r for k, r in values["lowrank"].items() if int(k.split(".")[2]) < num_layers}
    config = type(model.config).from_dict(values)
    with torch.device("meta"):
        draft = type(model)(config)
    draft.model.embed_tokens, draft.model.norm = model.model.embed_tokens, model.model.norm
    draft.model.rotary_emb, draft.lm_head = model.model.rotary_emb, model.lm_head
    draft.model.layers = nn.ModuleList(layers[:num_layers])
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.eval()


def load_draft(
    target: PreTrainedModel, spec: str | None = None, *, layers: int | None = None, lookup: bool = False
) -> tuple[PreTrainedModel | PromptLookupDraft | None, PreTrainedTokenizerBase | None]:
    """The draft the command line asks for: a model spec (`load`), the first `layers` layers of that model or of
    `target` itself (`early_exit_draft`), or a `PromptLookupDraft`. Returns the draft (`None`: no draft) and its
    tokenizer (`None` when it shares the target's)."""
    if lookup and (spec is not None or layers is not None):
        raise ConfigError(
            "the prompt-lookup draft needs no model; drop --draft and --draft-layers, or --prompt-lookup"
        )
    if lookup:
        return PromptLookupDraft(), None
    draft, tokenizer = (None, None)
    if spec is not None:  # in the target's dtype and layout
        draft, tokenizer = load(spec, dtype=target.dtype, decode_layout=True)
    if layers is not None:
        draft = early_exit_draft(draft if draft is not None else target, layers)
    return draft, tokenizer


__all__ = ["check_draft", "early_exit_draft", "load_draft"]
