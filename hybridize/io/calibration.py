"""One calibration runner, shared by the steps that measure a model on sample text before changing it (`analyze`,
`convert`, pruning, factorization and fusion).

`calibrate` runs the decoder (not the LM head, whose vocabulary projection nothing here needs) over each calibration
block in inference mode, with forward pre-hooks on chosen modules. A hook measures what it needs from a module's
inputs and keeps only that (a few numbers per layer), so memory holds one layer's activations at a time, never the
whole model's. `calibration_blocks` cuts the calibration text: the `train` split of the packaged Wikipedia corpus
(never the held-out one that perplexity is reported on), or any data spec `hybridize distill --data` accepts.
"""

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from .corpus import load_corpus, token_blocks
from .text import load_data

logger = logging.getLogger(__name__)

# hook(block_index, module, args, kwargs): called before `module` runs on block `block_index`
CalibrationHook = Callable[[int, nn.Module, tuple, dict], None]


def calibration_blocks(tokenizer: Any, data: str = "wiki", *, num_blocks: int, seq_len: int) -> torch.Tensor:
    """`num_blocks` blocks of `seq_len` tokens of calibration text (documents packed, each followed by EOS).

    Args:
        tokenizer: the model's tokenizer.
        data (`str`, *optional*, defaults to `"wiki"`): `"wiki"` (the packaged corpus' train split) or a local file,
            folder or Hub dataset as `hybridize distill --data` takes it.
        num_blocks (`int`): blocks wanted; fewer are returned (with a warning) when the text runs out.
        seq_len (`int`): tokens per block.

    Returns:
        `torch.LongTensor` of shape `(num_blocks, seq_len)`.

    Example: `blocks = calibration_blocks(tokenizer, num_blocks=8, seq_len=2048)`
    """
    if num_blocks < 1 or seq_len < 2:
        raise ConfigError(f"need num_blocks >= 1 and seq_len >= 2 for calibration, got {num_blocks} and {seq_len}")
    if data == "wiki":
        blocks = token_blocks(tokenizer, load_corpus("train"), seq_len=seq_len, max_tokens=num_blocks * seq_len)
    else:
        blocks = load_data(
            data, tokenizer, seq_len=seq_len, max_train_tokens=num_blocks * seq_len, heldout_tokens=0
        ).train
    if blocks.shape[0] < num_blocks:
        logger.warning(
            "calibration data %r gives %d blocks of %d tokens, not %d", data, len(blocks), seq_len, num_blocks
        )
    return blocks[:num_blocks]


@torch.inference_mode()
def calibrate(
    model: nn.Module, blocks: torch.Tensor, hooks: Mapping[nn.Module, CalibrationHook], *, progress: bool = False
) -> None:
    """Run `model`'s decoder over each block (one at a time, no cache) with `hooks` as forward pre-hooks.

    Args:
        model (`nn.Module`): a transformers causal LM (its `base_model` is run) or a decoder.
        blocks (`torch.LongTensor` of shape `(num_blocks, seq_len)`): token ids, e.g. from `calibration_blocks`.
        hooks (`Mapping[nn.Module, CalibrationHook]`): module -> `hook(block_index, module, args, kwargs)`, called
            with the module's inputs each time it runs.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar over blocks.

    Example: `calibrate(model, blocks, {layer.self_attn: measure for layer in model.model.layers})`
    """
    decoder = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    current = [0]
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs, hook=hook: hook(current[0], m, args, kwargs), with_kwargs=True
        )
        for module, hook in hooks.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for current[0], block in enumerate(tqdm(blocks, desc="calibrate", unit="block", disable=not progress)):
            decoder(input_ids=block[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


__all__ = ["CalibrationHook", "calibrate", "calibration_blocks"]
