"""Teacher-generated training text (`--data generate:N[:PROMPTS]`): MambaInLlama's pseudo-labels (arXiv 2408.15237).

The packaged corpus holds ~120K training tokens, so a longer distillation re-reads it. A teacher can write more: it
continues prompts cut from a prompt source (the packaged corpus' train split by default, or any data spec: a local
file or folder, a chat JSONL whose `messages` are rendered by the chat template, a Hub dataset), sampled with a seed.
The student then learns the teacher's distribution on text the teacher itself finds likely, which is what logit
distillation needs, rather than on a corpus it has already read once.

- **Batched**: `batch_size` prompts of the same length are continued together (one `generate` call, no padding),
  several times faster than one by one on a CPU, where a decode step is bound by reading the weights.
- **Exactly N tokens**: every sample continues its prompt by `new_tokens` tokens (EOS is not sampled early, so the
  count is known), and the last batch is cut so that the generated tokens add up to N. Prompt tokens are kept in the
  samples but not counted.
- **Reproducible and resumable**: batch b is sampled under the seed (seed, b), and is appended to the JSONL cache in
  one write; a run that was interrupted keeps its whole batches, drops a torn one and goes on from there, and produces
  what an uninterrupted run would have.
- Cached beside the output as `<output>.generated-<id>.jsonl` (one sample a line: `prompt_ids`, `ids`, `text`; the
  first line says what made it: the settings and the teacher's weights fingerprint, whose hash is `<id>`), kept after
  the run: another run with the same teacher and settings reuses it, and `--data` reads it like any JSONL.
- Prompts never come from the prompt source's held-out documents, on which the run is evaluated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..configs.distill import GenerateConfig, is_generate_spec, parse_generate_spec
from ..errors import ConfigError
from ..fingerprint import blocks_fingerprint
from ..io.corpus import load_corpus
from ..io.text import DistillData, is_heldout, load_data, pack, read_documents, tokenize

logger = logging.getLogger(__name__)


def prompt_stream(config: GenerateConfig, tokenizer: Any, heldout_ratio: float = 0.0) -> Iterator[list[int]]:
    """Prompts of exactly `prompt_tokens` tokens, one per training document long enough (documents held out at
    `heldout_ratio` are skipped; `wiki`'s train split has none), in the source's order, cycling over the source when it
    has fewer documents than samples wanted."""
    if config.prompts == "wiki":

        def documents():
            return iter(load_corpus("train")), False
    else:

        def documents():
            return read_documents(config.prompts, tokenizer=tokenizer)

    while True:
        found = False
        texts, chat = documents()
        for text in texts:
            if config.prompts != "wiki" and is_heldout(text, heldout_ratio):
                continue
            ids = tokenize(tokenizer, [text], special_tokens=not chat)[0]
            if len(ids) > config.prompt_tokens:
                found = True
                yield ids[: config.prompt_tokens]
        if not found:
            raise ConfigError(
                f"no document of {config.prompts!r} has more than prompt_tokens={config.prompt_tokens} tokens; pass "
                "longer prompts or a smaller prompt length"
            )


def _read_cache(path: Path, identity: dict, config: GenerateConfig) -> list[dict]:
    """The samples of whole batches already generated into `path` (a torn batch is dropped; the plan's last batch may
    be short), or [] for a new file."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        header = None
    if not header or header.get("generate") != json.loads(json.dumps(identity)):
        raise ConfigError(f"{path} holds text generated with other settings; remove it, or restore those settings")
    samples = []
    for line in lines[1:]:
        try:
            samples.append(json.loads(line))
        except ValueError:  # a line cut by an interrupt: it and what follows are regenerated
            break
    if len(samples) >= config.num_samples:
        return samples
    return samples[: len(samples) // config.batch_size * config.batch_size]


def generate_samples(
    teacher: torch.nn.Module,
    tokenizer: Any,
    config: GenerateConfig,
    cache: str | Path,
    *,
    heldout_ratio: float = 0.0,
    write: bool = True,
    progress: bool = False,
) -> list[dict]:
    """Generate (or read back, or finish) the samples of `config` into the JSONL `cache`; returns every sample. With
    `write=False` (the other processes of a multi-process run) the cache must already be complete."""
    cache = Path(cache)
    identity = config.identity(teacher)
    samples = _read_cache(cache, identity, config)
    if len(samples) >= config.num_samples:
        return _trim(samples, config)
    if not write:
        raise ConfigError(f"{cache} is incomplete: the main process writes it first")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "w") as f:  # the header and the whole batches kept
        f.write(json.dumps({"generate": identity}) + "\n")
        f.writelines(json.dumps(s) + "\n" for s in samples)
    prompts = prompt_stream(config, tokenizer, heldout_ratio)
    for _ in range(len(samples)):  # the prompts already used
        next(prompts)
    device = next(teacher.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    was_training = teacher.training
    teacher.eval()
    done = min(len(samples) * config.new_tokens, config.tokens)
    bar = tqdm(
        total=config.tokens, initial=done, unit="tok", desc="teacher generates", disable=not progress, unit_scale=True
    )
    try:
        with open(cache, "a") as f:
            while len(samples) < config.num_samples:
                batch_index = len(samples) // config.batch_size
                size = min(config.batch_size, config.num_samples - len(samples))
                batch = torch.tensor([next(prompts) for _ in range(size)], device=device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                    torch.manual_seed(config.seed * 1_000_003 + batch_index)
                    out = teacher.generate(
                        batch,
                        attention_mask=torch.ones_like(batch),
                        do_sample=True,
                        temperature=config.temperature,
                        top_k=config.top_k,
                        top_p=1.0,
                        max_new_tokens=config.new_tokens,
                        min_new_tokens=config.new_tokens,
                        pad_token_id=eos,
                    )
                new = [
                    {"prompt_ids": row[: config.prompt_tokens].tolist(), "ids": row[config.prompt_tokens :].tolist()}
                    for row in out
                ]
                for sample in new:
                    sample["text"] = tokenizer.decode(sample["prompt_ids"] + sample["ids"])
                f.write("".join(json.dumps(s) + "\n" for s in new))  # one write per batch
                f.flush()
                os.fsync(f.fileno())
                samples.extend(new)
                bar.update(min(len(samples) * config.new_tokens, config.tokens) - bar.n)
    finally:
        bar.close()
        teacher.train(was_training)
    return _trim(samples, config)


def cache_path(output: str | Path | None, config: GenerateConfig, teacher: torch.nn.Module) -> Path:
    """`<output>.generated-<id>.jsonl` beside the output, `<id>` a hash of what made the text; a temporary file when
    there is no output."""
    import hashlib
    import tempfile

    key = hashlib.sha256(json.dumps(config.identity(teacher), sort_keys=True).encode()).hexdigest()[:10]
    if output is None:
        return Path(tempfile.gettempdir()) / f"hybridize-generated-{key}.jsonl"
    output = Path(output)
    return output.with_name(f"{output.name}.generated-{key}.jsonl")


def _trim(samples: list[dict], config: GenerateConfig) -> list[dict]:
    """The first samples, the last one cut, so that the generated tokens add up to exactly `config.tokens`."""
    kept, left = [], config.tokens
    for sample in samples:
        if left <= 0:
            break
        kept.append({**sample, "ids": sample["ids"][:left]})
        left -= len(kept[-1]["ids"])
    return kept


def generated_data(
    teacher: torch.nn.Module,
    tokenizer: Any,
    spec: str,
    output: str | Path | None,
    *,
    seq_len: int,
    seed: int,
    heldout_ratio: float,
    heldout_tokens: int,
    text_column_name: str | None = None,
    write: bool = True,
    progress: bool = False,
):
    """`DistillData` for a `generate:N[:PROMPTS]` spec: the teacher's samples (prompt + continuation + EOS) packed into
    blocks of `seq_len`, and the held-out blocks of the prompt source (never prompted from). The samples are cached
    beside `output` (`cache_path`)."""
    prompt_tokens = min(32, max(1, seq_len // 4))  # prompt + continuation + EOS is one block
    config = parse_generate_spec(spec, prompt_tokens=prompt_tokens, new_tokens=seq_len - prompt_tokens - 1, seed=seed)
    samples = generate_samples(
        teacher,
        tokenizer,
        config,
        cache_path(output, config, teacher),
        heldout_ratio=heldout_ratio,
        write=write,
        progress=progress,
    )
    eos = getattr(tokenizer, "eos_token_id", None)
    train = pack(([*s["prompt_ids"], *s["ids"], *([eos] if eos is not None else [])] for s in samples), seq_len)
    if train.shape[0] == 0:
        raise ConfigError(f"{spec} gives fewer tokens than one block of seq_len={seq_len}; generate more")
    source = load_data(
        config.prompts,
        tokenizer,
        seq_len=seq_len,
        max_train_tokens=seq_len,
        heldout_ratio=heldout_ratio,
        heldout_tokens=heldout_tokens,
        text_column_name=text_column_name,
    )
    return DistillData(
        train=train,
        heldout=source.heldout,
        num_documents=len(samples),
        num_heldout_documents=source.num_heldout_documents,
        fingerprint=blocks_fingerprint(train),
    )


__all__ = [
    "GenerateConfig",
    "cache_path",
    "generate_samples",
    "generated_data",
    "is_generate_spec",
    "parse_generate_spec",
]
