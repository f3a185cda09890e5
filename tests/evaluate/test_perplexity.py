"""Perplexity, KL and top-1 agreement against hand computations on a tiny random Llama."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY, make_tiny
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert import ConvertConfig, convert
from hybridize.errors import ConfigError
from hybridize.evaluate import EvalConfig, compare_logits, evaluate, load_corpus, perplexity, token_blocks
from hybridize.evaluate.perplexity import CONTINUATION_CHUNK
from hybridize.modeling import HybridForCausalLM


def _hand_logits(model, blocks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=blocks).logits.double()


def test_perplexity_is_exp_of_mean_cross_entropy(tiny_llama, blocks):
    logits = _hand_logits(tiny_llama, blocks)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    # 3 blocks in batches of 2: the last batch is short.
    assert perplexity(tiny_llama, blocks, batch_size=2) == pytest.approx(math.exp(nll.item()), rel=1e-6)


def test_perplexity_does_not_depend_on_batch_size(tiny_llama, blocks):
    one = perplexity(tiny_llama, blocks, batch_size=1)
    assert perplexity(tiny_llama, blocks, batch_size=3) == pytest.approx(one, rel=1e-5)
    assert perplexity(tiny_llama, blocks, batch_size=1, progress=True) == one


def test_perplexity_of_a_random_model_is_near_the_vocabulary_size(tiny_llama, blocks):
    # An untrained model predicts nearly uniformly over its 128 tokens.
    assert 64 < perplexity(tiny_llama, blocks) < 256


def test_model_against_itself_has_zero_kl_and_full_agreement(tiny_llama, blocks):
    result = compare_logits(tiny_llama, tiny_llama, blocks, batch_size=2)
    assert result["kl"] == pytest.approx(0.0, abs=1e-9)
    assert result["top1_agreement"] == 1.0
    assert result["perplexity"] == result["baseline_perplexity"]
    assert result["perplexity"] == pytest.approx(perplexity(tiny_llama, blocks), rel=1e-6)


def test_kl_against_another_model_matches_a_hand_computation(tiny_llama, other_llama, blocks):
    block = blocks[:1]
    result = compare_logits(tiny_llama, other_llama, block)
    log_q = F.log_softmax(_hand_logits(tiny_llama, block), dim=-1)  # model
    log_p = F.log_softmax(_hand_logits(other_llama, block), dim=-1)  # baseline
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    reverse_kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()
    agreement = (log_p.argmax(-1) == log_q.argmax(-1)).double().mean().item()
    assert result["kl"] > 0
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["kl"] != pytest.approx(reverse_kl, rel=1e-3)  # the direction is KL(baseline || model)
    assert result["top1_agreement"] == pytest.approx(agreement)
    assert result["perplexity"] == pytest.approx(perplexity(tiny_llama, block), rel=1e-6)
    assert result["baseline_perplexity"] == pytest.approx(perplexity(other_llama, block), rel=1e-6)


def test_kl_over_several_batches_is_the_mean_over_all_positions(tiny_llama, other_llama, blocks):
    per_block = [compare_logits(tiny_llama, other_llama, blocks[i : i + 1])["kl"] for i in range(blocks.shape[0])]
    result = compare_logits(tiny_llama, other_llama, blocks, batch_size=2)
    assert result["kl"] == pytest.approx(sum(per_block) / len(per_block), rel=1e-5)


def test_training_flag_is_restored(tiny_llama, other_llama, blocks):
    tiny_llama.train()
    perplexity(tiny_llama, blocks)
    compare_logits(tiny_llama, other_llama, blocks)
    assert tiny_llama.training and not other_llama.training


def test_compare_logits_refuses_different_vocabularies(tiny_llama, blocks):
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(ConfigError, match="share a vocabulary"):
        compare_logits(tiny_llama, LlamaForCausalLM(config), blocks)


@pytest.mark.parametrize("bad", [torch.zeros(4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)])
def test_bad_blocks_are_refused(tiny_llama, bad):
    with pytest.raises(ConfigError, match=r"blocks of shape"):
        perplexity(tiny_llama, bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 1}, "seq_len=1"),
        ({"seq_len": 512, "max_tokens": 100}, "max_tokens=100"),
        ({"split": "test"}, "split='test'"),
        ({"prompt_len": 15, "seq_len": 16}, r"prompt_len=15 must be in \[0, seq_len - 1\)"),
        ({"prompt_len": 8, "tasks": ("wiki_ppl",)}, "lm-eval tasks bring their own text"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_eval_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**kwargs)


def test_eval_config_is_frozen_and_keyword_only():
    config = EvalConfig()
    assert (config.split, config.seq_len, config.max_tokens, config.batch_size) == ("heldout", 512, 16384, 1)
    with pytest.raises(AttributeError):
        config.seq_len = 3
    with pytest.raises(TypeError):
        EvalConfig("heldout")


def test_evaluate_on_the_heldout_corpus(tiny_llama, other_llama, char_tokenizer):
    config = EvalConfig(seq_len=32, max_tokens=200, batch_size=2)
    result = evaluate(tiny_llama, config, tokenizer=char_tokenizer)
    blocks = token_blocks(char_tokenizer, load_corpus("heldout"), seq_len=32, max_tokens=200)
    assert result["num_blocks"] == 6 and result["num_tokens"] == 192
    assert result["perplexity"] == pytest.approx(perplexity(tiny_llama, blocks), rel=1e-6)
    assert "kl" not in result

    compared = evaluate(tiny_llama, config, tokenizer=char_tokenizer, baseline=other_llama)
    assert compared["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
    assert compared["kl"] > 0 and 0 <= compared["top1_agreement"] <= 1
    assert math.isfinite(compared["baseline_perplexity"])


def _continuation_perplexity_by_hand(model, blocks, prompt_len):
    logits = _hand_logits(model, blocks)[:, prompt_len - 1 : -1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, prompt_len:].reshape(-1))
    return math.exp(nll.item())


@pytest.mark.parametrize(
    "mixer, settings",
    [
        ("source", {}),
        ("mamba2", {}),
        ("streaming", {"sinks": 2, "window": 8}),
        ("nha", {"slots": 4, "window": 8}),
    ],
)
def test_prompt_then_cached_chunks_equal_one_forward(mixer, settings):
    """Scoring through the cache (a prefill, then chunks spanning several CONTINUATION_CHUNKs) changes nothing for
    a model whose cached decoding equals its full forward: every mixer's."""
    model = make_tiny("llama").double()
    if mixer != "source":
        model = convert(model, ConvertConfig(mixer_init="attention", mixer=mixer, ratio=0.5, mixer_settings=settings))
    prompt_len = 20
    blocks = torch.randint(
        0, 128, (2, prompt_len + 2 * CONTINUATION_CHUNK + 5), generator=torch.Generator().manual_seed(0)
    )
    expected = _continuation_perplexity_by_hand(model, blocks, prompt_len)
    assert perplexity(model, blocks, prompt_len=prompt_len, batch_size=2) == pytest.approx(expected, rel=1e-6)
    result = compare_logits(model, model, blocks, prompt_len=prompt_len)
    assert result["kl"] == pytest.approx(0.0, abs=1e-12) and result["perplexity"] == pytest.approx(expected, rel=1e-6)


def test_prompt_scoring_sees_what_dynamic_selection_decided():
    """LightTransfer-Test attends fully at prefill, so one forward cannot tell it from the source; after a prompt,
    its truncated caches show. With every layer kept full it is the source again."""
    source = make_tiny("llama").double()
    blocks = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))

    static = convert(
        source,
        ConvertConfig(mixer_init="attention", mixer="streaming", ratio=1.0, mixer_settings={"sinks": 2, "window": 8}),
    )

    def dynamic(full_layers):
        config = copy.deepcopy(static.config)
        config.mixers["streaming"].update(w_last=4, dynamic_full_layers=full_layers)
        model = HybridForCausalLM(config).double().eval()
        model.load_state_dict(static.state_dict())
        return model

    everything_full = dynamic(full_layers=TINY["num_hidden_layers"])
    truncated = dynamic(full_layers=0)
    expected = _continuation_perplexity_by_hand(source, blocks, 40)
    assert perplexity(everything_full, blocks, prompt_len=40) == pytest.approx(expected, rel=1e-6)
    assert perplexity(truncated, blocks) == pytest.approx(perplexity(source, blocks), rel=1e-6)
    assert perplexity(truncated, blocks, prompt_len=40) != pytest.approx(expected, rel=1e-3)


def test_evaluate_on_a_data_file(tiny_llama, char_tokenizer, tmp_path):
    texts = ["the first document " * 20, "and a second one " * 20]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    config = EvalConfig(data=str(tmp_path / "docs.jsonl"), seq_len=32, max_tokens=256)
    result = evaluate(tiny_llama, config, tokenizer=char_tokenizer)
    expected = perplexity(tiny_llama, token_blocks(char_tokenizer, texts, seq_len=32, max_tokens=256))
    assert result["data"] == str(tmp_path / "docs.jsonl") and "split" not in result
    assert result["perplexity"] == pytest.approx(expected, rel=1e-6)
