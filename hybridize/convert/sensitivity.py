"""Sensitivity-chosen layers: convert each layer alone and measure how far the model moves from its source.

Even spacing (MambaInLlama) ignores that layers differ: some attention layers are nearly local and cost little to
replace, others carry the long-range retrieval that a recurrent mixer cannot hold. fla-org's hybrid-distillation
chooses which layers keep softmax attention by measured KL (research/recovery-and-runtimes.md §1). Here the score
of layer i is the KL(source || model with only layer i converted) per token on calibration text, with the mixer, the
settings and the initialisation the conversion will use (a calibrated readout is fitted for that layer alone, on the
source's own input to it). `select="sensitivity"` then converts the layers that hurt least.

One pass, layer by layer: the source's residual stream at layer i is held for the calibration blocks (one layer's
activations); layer i's mixer is built, its readout calibrated on the calibration blocks, and the first two of them
(so in-sample for the readout, alike for every layer) run from layer i to the head with that one layer replaced; the
KL is read at every `SCORE_STRIDE`-th position against the source's logits computed once (the vocabulary-wide head
and softmax were two thirds of the cost). Cost: about N/2 forwards of the scoring blocks plus one forward of the
fitting blocks. The scores are cached under `$HYBRIDIZE_CACHE/sensitivity/`, keyed by the source's weights and every setting
that changes them, so choosing another ratio costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configs.convert import ConvertConfig
from ..evaluate.perplexity import token_kl
from ..fingerprint import blocks_fingerprint, weights_fingerprint
from ..io.calibration import calibration_blocks
from ..sources import cache_root
from .calibrated import calibrate_mixer, causal_mask, heldout_blocks, source_attention, zero_readout
from .registry import INITIALIZERS, hybrid_config_for

logger = logging.getLogger(__name__)

SCORE_BLOCKS = 2  # calibration blocks the KL is measured on (the readout is fitted on all of them)
SCORE_STRIDE = 4  # the KL is read at every 4th position of them (all positions still run through every layer)
# raised when every calibrated initialisation changes (the readout fit); one mixer's has its `Initializer.version`
INIT_VERSION = 3


def _logits(hidden: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Logits at the scored positions from a final (un-normed) residual stream (1, l, d)."""
    return model.lm_head(model.model.norm(hidden[:, SCORE_STRIDE - 1 :: SCORE_STRIDE]))


def cache_key(source: nn.Module, config: ConvertConfig, blocks: torch.Tensor) -> str:
    """What the scores depend on: the source's weights (`weights_fingerprint`), the mixer, its settings and init, the
    seed and the calibration tokens themselves."""
    settings = {
        "weights": weights_fingerprint(source),
        "mixer": config.mixer,
        "mixer_settings": config.mixer_settings,
        "mixer_init": config.mixer_init,
        "init_version": INIT_VERSION,
        "conv_init": config.conv_init,
        "seed": config.seed,
        "score_blocks": SCORE_BLOCKS,
        "score_stride": SCORE_STRIDE,
        "calibration": blocks_fingerprint(blocks),
        "shape": list(blocks.shape),
    }
    version = INITIALIZERS[config.mixer].version
    if version != 1:  # only then, so that the keys of mixers at their first version stay those cached before
        settings["mixer_init_version"] = version
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _cache_path(key: str) -> Path:
    return cache_root() / "sensitivity" / f"{key}.json"


def _read_cache(key: str) -> list[float] | None:
    try:
        scores = json.loads(_cache_path(key).read_text())["kl"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [float(s) for s in scores] if isinstance(scores, list) else None


def _write_cache(key: str, scores: list[float]) -> None:
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            json.dump({"kl": scores}, f)
        os.replace(f.name, path)
    except OSError as error:  # a read-only cache only costs the next call the measurement
        logger.warning("could not cache sensitivity scores in %s: %s", path, error)


@torch.no_grad()
def measure_sensitivity(
    source: nn.Module, config: ConvertConfig, blocks: torch.Tensor, *, progress: bool = False
) -> list[float]:
    """KL(source || source with only layer i converted) per token, for each layer i, on calibration `blocks` (n, l).
    `source` is not modified."""
    layers = source.model.layers
    num_layers = len(layers)
    hybrid_config = hybrid_config_for(source, [config.mixer] * num_layers, config)
    device = next(source.parameters()).device
    blocks = blocks.to(device)
    was_training = source.training
    source.eval()
    h = [source.model.embed_tokens(block[None]) for block in blocks]
    pe = source.model.rotary_emb(h[0], position_ids=torch.arange(blocks.shape[1], device=device)[None])
    mask = causal_mask(blocks.shape[1], h[0].dtype, device)

    def run(layer, x):
        out = layer(x, position_embeddings=pe, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    scored = range(min(SCORE_BLOCKS, len(blocks)))
    final = [h[b] for b in scored]
    for layer in layers:  # the source's final residual stream on the scoring blocks
        final = [run(layer, x) for x in final]
    final = [_logits(x, source) for x in final]
    heldout = heldout_blocks(len(blocks))
    generator = torch.Generator().manual_seed(config.seed)
    initializer = INITIALIZERS[config.mixer]
    scores = []
    try:
        for i in tqdm(range(num_layers), desc="sensitivity", unit="layer", disable=not progress):
            src = layers[i]
            mixer = initializer.build(src.self_attn, hybrid_config, i, config, generator).to(device).eval()
            x = [src.input_layernorm(hs) for hs in h]
            if config.mixer_init == "calibrated":
                targets, heads = zip(*(source_attention(src, xs, pe, mask) for xs in x))
                calibrate_mixer(mixer, x, list(targets), list(heads), pe, heldout, calibrate=initializer.calibrate)
            elif config.mixer_init == "zero":
                zero_readout(mixer)
            kl = 0.0
            for b in scored:
                hs = h[b] + mixer(x[b], position_embeddings=pe, attention_mask=None)
                hs = hs + src.mlp(src.post_attention_layernorm(hs))
                for later in layers[i + 1 :]:
                    hs = run(later, hs)
                kl += float(token_kl(_logits(hs, source), final[b], kind="forward_kl").mean()) / len(scored)
            scores.append(kl)
            h = [run(src, hs) for hs in h]
    finally:
        source.train(was_training)
    return scores


def layer_sensitivity(
    source: nn.Module, config: ConvertConfig, tokenizer, *, blocks: torch.Tensor | None = None, progress: bool = False
) -> list[float]:
    """`measure_sensitivity` on `config`'s calibration text (or the given `blocks`), read from the cache when it was
    measured before."""
    if blocks is None:
        blocks = calibration_blocks(
            tokenizer, config.calibration, num_blocks=config.calibration_docs, seq_len=config.calibration_len
        )
    key = cache_key(source, config, blocks)
    cached = _read_cache(key)
    if cached is not None and len(cached) == source.config.num_hidden_layers:
        logger.info("sensitivity scores from the cache (%s)", _cache_path(key))
        return cached
    scores = measure_sensitivity(source, config, blocks, progress=progress)
    _write_cache(key, scores)
    return scores


def least_sensitive_layers(scores: list[float], k: int) -> list[int]:
    """The `k` layers whose conversion alone moves the model least (ties: the earlier layer)."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])


__all__ = [
    "SCORE_BLOCKS",
    "SCORE_STRIDE",
    "cache_key",
    "layer_sensitivity",
    "least_sensitive_layers",
    "measure_sensitivity",
]
