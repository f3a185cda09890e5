"""prune() on the real embedded SmolLM2-135M (slow): full size is the identity on real weights, and a group-aware
ratio-0.5 hybrid prune gives the shape, parameter count and group structure it states, on real calibration text."""

import pytest
import torch

import hybridize
from hybridize.compress.prune import PruneConfig, count_params, model_shape, prune
from hybridize.evaluate import load_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return hybridize.load("llama")


@pytest.fixture(scope="module")
def hybrid50(smollm2):
    return hybridize.convert(smollm2[0], hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))


@pytest.fixture(scope="module")
def text_ids(smollm2):
    return smollm2[1](load_corpus("heldout")[0][:2000], return_tensors="pt").input_ids[:, :128]


CALIBRATION = {"num_blocks": 2, "seq_len": 64}


@torch.inference_mode()
def test_full_size_is_the_identity(hybrid50, smollm2, text_ids):
    full = {"hidden": 576, "ffn": 1536, "attn_heads": 9, "ssm_heads": 9, "ssm_head_dim": 64}
    pruned = prune(hybrid50, PruneConfig(**full, **CALIBRATION), tokenizer=smollm2[1])
    torch.testing.assert_close(pruned(text_ids).logits, hybrid50(text_ids).logits, rtol=0, atol=0)


@torch.inference_mode()
def test_group_aware_ssm_and_ffn(hybrid50, smollm2, text_ids):
    pruned = prune(hybrid50, PruneConfig(ssm_heads=6, ffn=1024, **CALIBRATION), tokenizer=smollm2[1])
    config = pruned.config
    assert config.mixers["mamba2"] == {"num_heads": 6, "num_groups": 3, "head_dim": 64, "state_size": 64}
    assert config.intermediate_size == 1024 and config.num_attention_heads == 9
    params = sum(p.numel() for p in pruned.parameters())
    assert params == count_params(config, model_shape(config), config.mixer_types)
    assert pruned.hybridize_steps[-1]["metrics"]["params_after"] == params
    assert torch.isfinite(pruned(text_ids).logits).all()
    assert pruned.generate(text_ids[:, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
