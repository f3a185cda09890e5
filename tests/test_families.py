"""check_supported: which configs pass, what each family's biases are, the messages of the refusals; head_dim."""

import pytest
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
)

from hybridize.errors import UnsupportedModelError
from hybridize.families import FAMILIES, check_supported, head_dim

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}

ACCEPTED = {
    "llama": LlamaConfig(**TINY),
    "llama_bias": LlamaConfig(**TINY, attention_bias=True),
    "llama_head_dim": LlamaConfig(**TINY, head_dim=32),
    "llama_linear_rope": LlamaConfig(
        **TINY, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    ),
    "mistral": MistralConfig(**TINY, sliding_window=None),
    "mistral_window_covers_context": MistralConfig(**TINY, sliding_window=256),
    "qwen2": Qwen2Config(**TINY),
    "qwen2_window_in_no_layer": Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64, max_window_layers=2),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_and_biases_match_the_modules(name):
    config = ACCEPTED[name]
    family = check_supported(config)
    assert family.name == config.model_type
    attention = AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    assert family.qkv_bias == (attention.q_proj.bias is not None) == (attention.v_proj.bias is not None)
    assert family.o_bias == (attention.o_proj.bias is not None)
    assert head_dim(config) == attention.head_dim


def test_family_facts():
    assert not check_supported(ACCEPTED["llama"]).qkv_bias
    assert check_supported(ACCEPTED["llama_bias"]).o_bias
    assert (FAMILIES["qwen2"].qkv_bias, FAMILIES["qwen2"].o_bias) == (True, False)
    assert not FAMILIES["mistral"].qkv_bias
    assert head_dim(ACCEPTED["llama"]) == 16 and head_dim(ACCEPTED["llama_head_dim"]) == 32


@pytest.mark.parametrize(
    "config, match",
    [
        (GPT2Config(n_layer=2), r"model_type 'gpt2' is not supported \(supported: llama, mistral, qwen2\)"),
        (BertConfig(num_hidden_layers=2), r"model_type 'bert' is not supported \(supported: llama, mistral, qwen2\)"),
        (MixtralConfig(**TINY), r"'mixtral' is a mixture of experts \(num_local_experts=8\).*supported: llama"),
        (Qwen2MoeConfig(**TINY, num_experts=4), r"'qwen2_moe' is a mixture of experts \(num_experts=4\)"),
        (MistralConfig(**TINY, sliding_window=64), r"sliding_window=64 is shorter than max_position_embeddings=256"),
        (Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64, max_window_layers=1), r"sliding_window=64"),
        (LlamaConfig(**TINY, mlp_bias=True), r"mlp_bias=True is not supported"),
        (LlamaConfig(**TINY, hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    ],
    ids=["gpt2", "bert", "mixtral", "qwen2_moe", "mistral_window", "qwen2_window", "mlp_bias", "gelu"],
)
def test_rejected(config, match):
    with pytest.raises(UnsupportedModelError, match=match):
        check_supported(config)


def test_unknown_rope_type_rejected():
    config = LlamaConfig(**TINY)
    config.rope_parameters = {"rope_type": "spiral", "rope_theta": 1e4}
    with pytest.raises(UnsupportedModelError, match=r"rope_type 'spiral' is not one transformers knows"):
        check_supported(config)
