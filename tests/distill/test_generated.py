"""`--data generate:N`: the teacher's pseudo-labels on a tiny model: exactly N tokens, reproducible from the seed,
resumed after an interrupt without duplicates, and trained on by `distill`."""

import json

import pytest
import torch

from hybridize.distill import DistillConfig, distill, run_dir_for
from hybridize.distill.generated import GenerateConfig, generate_samples, parse_generate_spec
from hybridize.errors import ConfigError


def _config(text_file, **overrides):
    return GenerateConfig(
        **{"tokens": 50, "prompts": str(text_file), "prompt_tokens": 4, "new_tokens": 12, "batch_size": 2, **overrides}
    )


def test_writes_exactly_n_tokens_and_is_reproducible(teacher, tokenizer, text_file, tmp_path):
    config = _config(text_file)
    first = generate_samples(teacher, tokenizer, config, tmp_path / "a.jsonl")
    assert sum(len(s["ids"]) for s in first) == 50
    assert len(first) == 5 and all(len(s["prompt_ids"]) == 4 for s in first)
    again = generate_samples(teacher, tokenizer, config, tmp_path / "b.jsonl")
    assert again == first
    other = generate_samples(teacher, tokenizer, _config(text_file, seed=1), tmp_path / "c.jsonl")
    assert [s["ids"] for s in other] != [s["ids"] for s in first]
    # the prompts are the starts of the prompt file's paragraphs
    paragraph = text_file.read_text().split("\n\n")[0]
    assert first[0]["prompt_ids"] == tokenizer(paragraph)["input_ids"][:4]


def test_resumes_after_an_interrupt_without_duplicating(teacher, tokenizer, text_file, tmp_path, monkeypatch):
    config = _config(text_file, tokens=96)
    expected = generate_samples(teacher, tokenizer, config, tmp_path / "whole.jsonl")

    cache = tmp_path / "interrupted.jsonl"
    real_generate, calls = teacher.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(teacher, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_samples(teacher, tokenizer, config, cache)
    monkeypatch.undo()
    with open(cache, "a") as f:  # and a torn line, as a kill in the middle of a write leaves
        f.write('{"prompt_ids": [1, 2')
    assert len(cache.read_text().splitlines()) == 1 + 4 + 1  # header, two whole batches, the torn line

    resumed = generate_samples(teacher, tokenizer, config, cache)
    assert resumed == expected
    lines = cache.read_text().splitlines()[1:]
    assert [json.loads(line) for line in lines] == expected  # no sample twice, none lost


def test_a_finished_cache_is_reused_and_other_settings_refused(teacher, tokenizer, text_file, tmp_path, monkeypatch):
    cache = tmp_path / "g.jsonl"
    first = generate_samples(teacher, tokenizer, _config(text_file), cache)  # 5 samples: the last batch is short
    monkeypatch.setattr(teacher, "generate", None)  # nothing is generated again
    assert generate_samples(teacher, tokenizer, _config(text_file), cache, write=False) == first
    fewer = generate_samples(teacher, tokenizer, _config(text_file, tokens=30), cache)
    assert [s["ids"] for s in fewer] == [s["ids"] for s in first[:2]] + [first[2]["ids"][:6]]
    with pytest.raises(ConfigError, match="other settings"):
        generate_samples(teacher, tokenizer, _config(text_file, temperature=0.5), cache)
    with torch.no_grad():  # another teacher is another text
        next(teacher.parameters()).add_(1.0)
    with pytest.raises(ConfigError, match="other settings"):
        generate_samples(teacher, tokenizer, _config(text_file), cache)


def test_prompts_skip_the_heldout_documents(tokenizer, text_file):
    from hybridize.distill.generated import prompt_stream
    from hybridize.io.text import is_heldout

    paragraphs = text_file.read_text().split("\n\n")
    kept = [p for p in paragraphs if not is_heldout(p, 0.3)]
    assert 0 < len(kept) < len(paragraphs)
    prompts = prompt_stream(_config(text_file), tokenizer, heldout_ratio=0.3)
    assert [next(prompts) for _ in kept] == [tokenizer(p)["input_ids"][:4] for p in kept]


def test_spec_parsing_and_errors():
    config = parse_generate_spec("generate:2K:prompts.txt")
    assert config.tokens == 2000 and config.prompts == "prompts.txt"
    assert parse_generate_spec("generate:300").prompts == "wiki"
    with pytest.raises(ConfigError):
        parse_generate_spec("generate:")
    with pytest.raises(ConfigError, match="at least 1"):
        GenerateConfig(tokens=0)


def test_distill_on_generated_text(teacher, make_student, tokenizer, text_file, tmp_path):
    output = tmp_path / "out"
    config = DistillConfig(
        stage="layerwise", data=f"generate:96:{text_file}", tokens=64, seq_len=16, batch_size=2, eval_tokens=32
    )
    before = {n: p.clone() for n, p in make_student().named_parameters()}
    result = distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=run_dir_for(output))
    (cache,) = tmp_path.glob("out.generated-*.jsonl")  # kept beside the output, for reuse
    samples = [json.loads(line) for line in cache.read_text().splitlines()[1:]]
    assert sum(len(s["ids"]) for s in samples) == 96 + 3  # 9 samples of 11 generated tokens, the last one cut to 8
    data = result.hybridize_steps[-1]["metrics"]["data"]
    assert data["train_tokens"] == 8 * 16  # 8 samples of 4 + 11 tokens + EOS, one block each, and the cut ninth
    assert data["documents"] == 9
    assert data["heldout_tokens"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in result.named_parameters())
