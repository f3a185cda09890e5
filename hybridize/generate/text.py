"""The tokenizer's side of generation: the prompt's token ids (with the chat template when asked), and the generated
text handed out as it becomes final, up to the first stop string."""

from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

from ..configs.generate import GenerateConfig
from ..errors import ConfigError


class _TextStream:
    """Decodes the generated ids as they come, finds stop strings, and hands out text that can no longer change:
    never a partial UTF-8 character, never the start of what may become a stop string."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], callback: Callable[[str], None] | None
    ):
        self.tokenizer, self.stop, self.callback = tokenizer, stop, callback
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> int | None:
        """Add ids; if a stop string now appears, return how many of them to keep (up to the one completing it)."""
        searched = len(self.text)
        self.ids += ids
        self.text = self._decode(self.ids)
        hits = [(pos, s) for s in self.stop if (pos := self.text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if hits:
            pos, stop = min(hits)
            keep = next(
                k for k in range(len(self.ids) - len(ids), len(self.ids) + 1) if stop in self._decode(self.ids[:k])
            )
            self.ids, self.text = self.ids[:keep], self.text[:pos]
            self._emit(len(self.text))
            return keep
        safe = len(self.text.rstrip("\ufffd"))
        held = max((n for s in self.stop for n in range(1, len(s)) if self.text[:safe].endswith(s[:n])), default=0)
        self._emit(safe - held)
        return None

    def _emit(self, end: int) -> None:
        if end > self.emitted and self.callback is not None:
            self.callback(self.text[self.emitted : end])
        self.emitted = max(self.emitted, end)

    def finish(self) -> str:
        self._emit(len(self.text))
        return self.text


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[int], config: GenerateConfig) -> list[int]:
    if not isinstance(prompt, str):
        ids = [int(i) for i in prompt]
    elif config.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{type(tokenizer).__name__} has no chat template; drop --chat or use an instruct model")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ConfigError("the prompt is empty after tokenization; give at least one token")
    return ids
