"""Calibration (`hybridize.io.calibration`): the calibration blocks of each data spec, and the hooked decoder pass."""

import logging

import pytest
import torch
from tiny import make_tiny

from hybridize.errors import ConfigError
from hybridize.io.calibration import calibrate, calibration_blocks
from hybridize.io.corpus import load_corpus, token_blocks
from hybridize.io.text import pack, tokenize


def test_wiki_blocks_are_the_first_blocks_of_the_train_split(char_tokenizer, make_char_tokenizer):
    blocks = calibration_blocks(char_tokenizer, num_blocks=3, seq_len=64)
    expected = token_blocks(make_char_tokenizer(), load_corpus("train"), seq_len=64, max_tokens=3 * 64)
    assert blocks.shape == (3, 64)
    torch.testing.assert_close(blocks, expected)


def test_file_blocks_pack_every_document_in_order(tokenizer, text_file):
    blocks = calibration_blocks(tokenizer, str(text_file), num_blocks=2, seq_len=16)
    documents = tokenize(tokenizer, text_file.read_text().split("\n\n"), special_tokens=True)
    torch.testing.assert_close(blocks, pack(documents, 16, max_tokens=2 * 16))  # nothing held out


def test_short_text_gives_fewer_blocks_with_a_warning(tokenizer, tmp_path, caplog):
    path = tmp_path / "short.txt"
    path.write_text(" ".join(f"w{i}" for i in range(2, 42)))  # 40 words and EOS: two blocks of 16
    with caplog.at_level(logging.WARNING, logger="hybridize.io.calibration"):
        blocks = calibration_blocks(tokenizer, str(path), num_blocks=8, seq_len=16)
    assert blocks.shape == (2, 16)
    assert "gives 2 blocks of 16 tokens, not 8" in caplog.text


@pytest.mark.parametrize(("num_blocks", "seq_len"), [(0, 16), (4, 1)])
def test_bad_sizes_are_refused(char_tokenizer, num_blocks, seq_len):
    with pytest.raises(ConfigError, match=f"got {num_blocks} and {seq_len}"):
        calibration_blocks(char_tokenizer, num_blocks=num_blocks, seq_len=seq_len)


def test_calibrate_calls_each_hook_once_per_block_and_cleans_up():
    model = make_tiny("llama").train()
    blocks = torch.randint(0, 128, (3, 8))
    calls = []

    def hook(block_index, module, args, kwargs):
        assert torch.is_inference_mode_enabled() and not module.training
        calls.append((block_index, layer_of[module], kwargs["hidden_states"].shape))

    layer_of = {layer.self_attn: i for i, layer in enumerate(model.model.layers)}
    hooks = {module: hook for module in layer_of}
    hooks[model.lm_head] = lambda *args: pytest.fail("the LM head ran")
    calibrate(model, blocks, hooks)
    assert calls == [(b, i, (1, 8, 64)) for b in range(3) for i in range(4)]
    assert model.training  # the mode it came in with
    assert not any(module._forward_pre_hooks for module in model.modules())
