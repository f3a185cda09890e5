"""Distillation on the real SmolLM2-135M-Instruct (slow): a few layerwise and e2e steps on the packaged Wikipedia
text lower their losses, train only the new mixers and leave the held-out split alone."""

import pytest
import torch

import hybridize
from hybridize.distill import DistillConfig, distill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return hybridize.load("llama")


@pytest.mark.parametrize("stage", ["layerwise", "e2e"])
def test_a_few_steps_on_smollm2(smollm2, stage):
    teacher, tokenizer = smollm2
    student = hybridize.convert(teacher, hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    records = []
    config = DistillConfig(stage=stage, tokens=4 * 128, seq_len=128, batch_size=1, eval_tokens=256, warmup_ratio=0)
    result = distill(student, config, teacher=teacher, tokenizer=tokenizer, on_step=records.append)
    assert records[-1]["loss"] < records[0]["loss"]
    changed = {name for name, p in result.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".mixer." in name and int(name.split(".")[2]) % 2 == 0 for name in changed)
    metrics = result.hybridize_steps[-1]["metrics"]
    assert metrics["end"]["kl"] < metrics["start"]["kl"]
    assert 10 < metrics["teacher_perplexity"] < 100  # SmolLM2 on 256 Wikipedia tokens in 128-token blocks: 62
