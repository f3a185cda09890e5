"""Build the data of hybridize's offline lm-eval tasks from the held-out Wikipedia articles.

Why: a hybrid is judged against its source on tasks that run with no network, on real text that neither model was
calibrated or distilled on. The held-out split of the packaged corpus (`hybridize/data/wiki_heldout.jsonl.gz`, see
`hybridize/data/README.md`) is that text. The task YAMLs are in `hybridize/evals_tasks/`; this script writes the
documents they read, one JSON object per line, gzip with mtime 0 (the same input gives the same bytes), into
`hybridize/data/tasks/`:

- `wiki_ppl.jsonl.gz`: every held-out article, `{"title", "text"}`, in title order (loglikelihood_rolling: word and
  byte perplexity, bits per byte; lm-eval's `wikitext` task over our text).
- `lambada_wiki.jsonl.gz`: LAMBADA-style last-word prediction (Paperno et al. 2016, arXiv 1606.06031). A passage is
  one held-out paragraph of 30-250 words ending in a full stop; the target is its last word, which must be a content
  word (letters only, 3+ characters, not a stop word). As LAMBADA selects passages whose last word is guessable from
  the context, passages whose target already appears earlier in the passage (`"repeated": true`) are all taken
  first; the rest of the `--lambada-items` are filled with other passages in a fixed hash order. Items are ordered by
  the SHA-256 of the passage, so that `limit` takes a spread of articles. `{"context", "target", "title",
  "repeated"}`; lm-eval scores `context + " " + target`.
- `passkey_{2k,4k,8k}.jsonl.gz`: a random 5-digit pass key hidden in long real text (the passkey retrieval test of
  Mohtashami & Jaggi 2023, arXiv 2305.16300, with held-out Wikipedia in place of repeated filler). Each context is
  an instruction, consecutive held-out paragraphs (each item starts at a different place in the held-out stream)
  with the sentence "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at a sentence boundary, and
  the question "What is the pass key? The pass key is"; the target is the number. Depths follow the golden-ratio
  sequence 0.05 + 0.9 * frac(k * 0.618...), so that every prefix of the items (lm-eval's `limit`) spreads over the
  text. The length is counted in tokens of the SmolLM2 tokenizer (the embedded model's): context and target together
  take at most 2048 / 4096 / 8192 tokens minus `--passkey-margin`, so that they fit `max_length` of that size.
  `{"context", "target", "depth", "num_tokens"}`: `depth` is where the key starts, as a fraction of the text's
  tokens.

Usage:
    python evals/build_tasks.py                        # the SmolLM2 tokenizer of the `llama` alias
    python evals/build_tasks.py --tokenizer path/to/model_dir --output-dir hybridize/data/tasks
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from hybridize.io.corpus import load_articles

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "hybridize" / "data" / "tasks"
PASSKEY_LENGTHS = {"passkey_2k": 2048, "passkey_4k": 4096, "passkey_8k": 8192}
GOLDEN = (5**0.5 - 1) / 2

# Words that do not carry content: a LAMBADA target must not be one of them.
_STOP_WORDS_TEXT = """
a about above after again against all also am an and any are as at be been before being below between both but by
can could did do does doing down during each few for from further had has have having he her here hers herself
him himself his how i if in into is it its itself just may me might more most much must my myself no nor not now
of off on once one only or other our ours ourselves out over own same shall she should so some such than that the
their theirs them themselves then there these they this those three through to too two under until up upon very
was we well were what when where which while who whom why will with would you your yours yourself yourselves
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
LAMBADA_WORDS = (30, 250)
CONTENT_WORD = re.compile(r"[A-Za-z][a-z]{2,}")
# A sentence starts after ., ! or ? and whitespace; the pass key sentence goes there.
SENTENCE_START = re.compile(r"(?<=[.!?])\s+(?=\S)")

PASSKEY_INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def write_jsonl_gz(path: Path, records: list[dict[str, Any]]) -> None:
    """One JSON object per line, gzip-compressed with no timestamp so that the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def wiki_ppl_docs(articles: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"title": article["title"], "text": article["text"]} for article in articles]


def lambada_docs(articles: list[dict[str, str]], num_items: int) -> list[dict[str, Any]]:
    """LAMBADA-style passages: repeated-target passages first, then others in hash order; ordered by hash."""
    candidates = []
    for article in articles:
        # Paragraph lines only: a heading is a line of its own and never ends in a full stop.
        for line in article["text"].split("\n"):
            words = line.split()
            if not LAMBADA_WORDS[0] <= len(words) <= LAMBADA_WORDS[1] or not words[-1].endswith("."):
                continue
            target = words[-1][:-1]
            if not CONTENT_WORD.fullmatch(target) or target.lower() in STOP_WORDS:
                continue
            earlier = {re.sub(r"\W", "", word).lower() for word in words[:-1]}
            line = line.rstrip()
            context = line[: line.rfind(" ")].rstrip()
            candidates.append(
                {
                    "context": context,
                    "target": target,
                    "title": article["title"],
                    "repeated": target.lower() in earlier,
                }
            )
    repeated = sorted((c for c in candidates if c["repeated"]), key=lambda c: _sha(c["context"]))
    others = sorted((c for c in candidates if not c["repeated"]), key=lambda c: _sha(c["context"]))
    chosen = (repeated + others)[:num_items]
    if len(chosen) < num_items:
        raise SystemExit(
            f"only {len(chosen)} LAMBADA passages qualify; ask for --lambada-items {len(chosen)} or fewer"
        )
    return sorted(chosen, key=lambda c: _sha(c["context"]))


def _num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_docs(
    articles: list[dict[str, str]], tokenizer: Any, *, length: int, num_items: int, margin: int, seed: int
) -> list[dict[str, Any]]:
    """Pass keys hidden in held-out text; context plus target fit in `length - margin` tokens of `tokenizer`."""
    paragraphs = [p.strip() for article in articles for p in article["text"].split("\n\n") if p.strip()]
    rng = random.Random(seed * 100_003 + length)
    docs = []
    for k in range(num_items):
        key = str(rng.randint(10_000, 99_999))
        needle = PASSKEY_NEEDLE.format(key=key)
        fixed = _num_tokens(tokenizer, PASSKEY_INSTRUCTION + needle + " " + PASSKEY_QUESTION + " " + key)
        budget = length - margin - fixed
        # Consecutive paragraphs from the item's own starting place (cyclic), a little more than the budget.
        start, haystack = k * len(paragraphs) // num_items, []
        while _num_tokens(tokenizer, "\n\n".join(haystack)) < budget + 64:
            haystack.append(paragraphs[(start + len(haystack)) % len(paragraphs)])
        text = _cut_to_tokens(tokenizer, "\n\n".join(haystack), budget)
        depth_wanted = 0.05 + 0.9 * ((k * GOLDEN) % 1.0)
        while True:
            context, depth = _insert(tokenizer, text, needle, depth_wanted)
            num_tokens = _num_tokens(tokenizer, context + " " + key)
            if num_tokens <= length - margin:
                break
            text = _cut_to_tokens(tokenizer, text, _num_tokens(tokenizer, text) - (num_tokens - (length - margin)))
        docs.append({"context": context, "target": key, "depth": round(depth, 4), "num_tokens": num_tokens})
    return docs


def _cut_to_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` ending at a sentence end (else a word end) within `max_tokens` tokens."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    prefix = text[: offsets[max_tokens][0]]
    sentence_end = max(prefix.rfind(". "), prefix.rfind(".\n"))
    if sentence_end > len(prefix) * 0.95:
        return prefix[: sentence_end + 1]
    return prefix[: prefix.rstrip().rfind(" ")].rstrip()


def _insert(tokenizer: Any, text: str, needle: str, depth: float) -> tuple[str, float]:
    """Put `needle` at the sentence start nearest to `depth` (a fraction of the tokens); return the context and the
    depth reached."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_starts = [start for start, _ in offsets]
    starts = [0, *(match.end() for match in SENTENCE_START.finditer(text))]
    position = min(starts, key=lambda s: abs(bisect.bisect_left(token_starts, s) / len(offsets) - depth))
    reached = bisect.bisect_left(token_starts, position) / len(offsets)
    context = PASSKEY_INSTRUCTION + text[:position] + needle + " " + text[position:] + PASSKEY_QUESTION
    return context, reached


def load_tokenizer(spec: str) -> Any:
    """A tokenizer directory, or a model alias whose GGUF file carries the tokenizer (no weights are read)."""
    from transformers import AutoTokenizer

    from hybridize.sources import resolve

    source = resolve(spec)
    if source.is_gguf:
        path = Path(source.location)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(source.location)


def build(
    output_dir: Path, tokenizer: Any, *, lambada_items: int, passkey_items: int, passkey_margin: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Write every task file into `output_dir` and return per-task statistics."""
    articles = load_articles("heldout")
    tasks = {
        "wiki_ppl": wiki_ppl_docs(articles),
        "lambada_wiki": lambada_docs(articles, lambada_items),
        **{
            name: passkey_docs(
                articles, tokenizer, length=length, num_items=passkey_items, margin=passkey_margin, seed=seed
            )
            for name, length in PASSKEY_LENGTHS.items()
        },
    }
    stats: dict[str, dict[str, Any]] = {}
    for name, docs in tasks.items():
        path = output_dir / f"{name}.jsonl.gz"
        write_jsonl_gz(path, docs)
        stats[name] = {"items": len(docs), "bytes_gz": path.stat().st_size}
        if name == "wiki_ppl":
            stats[name]["tokens"] = sum(_num_tokens(tokenizer, doc["text"]) for doc in docs)
        elif name == "lambada_wiki":
            stats[name]["repeated"] = sum(doc["repeated"] for doc in docs)
            stats[name]["tokens"] = sum(_num_tokens(tokenizer, doc["context"] + " " + doc["target"]) for doc in docs)
        else:
            stats[name]["tokens_min"] = min(doc["num_tokens"] for doc in docs)
            stats[name]["tokens_max"] = max(doc["num_tokens"] for doc in docs)
            stats[name]["depths"] = sorted(doc["depth"] for doc in docs)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--tokenizer", default="llama", help="alias, .gguf file or directory whose tokenizer counts")
    parser.add_argument("--lambada-items", type=int, default=300)
    parser.add_argument("--passkey-items", type=int, default=20, help="items per passkey length")
    parser.add_argument("--passkey-margin", type=int, default=16, help="tokens left free below each length")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    args = parser.parse_args(argv)
    stats = build(
        args.output_dir,
        load_tokenizer(args.tokenizer),
        lambada_items=args.lambada_items,
        passkey_items=args.passkey_items,
        passkey_margin=args.passkey_margin,
        seed=args.seed,
    )
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
