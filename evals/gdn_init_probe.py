"""Probes of the Gated DeltaNet initialisation (README "Gated DeltaNet"): `python evals/gdn_init_probe.py MODE`, with
the first version's calibration (the gate, then one write strength for every head, then each head's decay; no
per-head `fit_beta`). MODE is one of

- a beta: the write strength of every head, set as the gate is: every row of b_proj = logit(beta) m / |m|^2 (m the
  inputs' mean direction), so that b averages logit(beta); 0.5 is the first version itself (b_proj zero);
- `random-calibrated`: q/k/v/o drawn at random (as `--init random`), then that calibration with beta 1/2.

Otherwise the calibrated conversion of `hybridize convert llama --mixer gdn --ratio 0.5` (the 15 even layers, 8 x
2,048 calibration tokens), then held-out perplexity on 4,096 tokens, single-threaded.
"""

import importlib
import math
import sys

import torch

import hybridize
from hybridize.convert import ConvertConfig
from hybridize.convert.calibrated import mean_direction
from hybridize.convert.registry import INITIALIZERS, Initializer
from hybridize.evaluate import EvalConfig, evaluate
from hybridize.sources import load

gdn_init = importlib.import_module("hybridize.convert.gdn")  # `hybridize.convert` the attribute is the function


def main(mode: str) -> None:
    torch.set_num_threads(1)
    beta = 0.5 if mode == "random-calibrated" else float(mode)

    def build(attn, config, layer_idx, convert_config, generator):
        if mode == "random-calibrated":
            convert_config = ConvertConfig(mixer="gdn", mixer_init="random", seed=convert_config.seed)
        return gdn_init.init_gdn_from_attention(attn, config, layer_idx, convert_config, generator)

    @torch.no_grad()
    def calibrate(mixer, inputs, head_outputs, position_embeddings):
        mean, positive = mean_direction(inputs)
        report = gdn_init.fit_gate(mixer, mean, positive)
        if positive >= gdn_init.MIN_POSITIVE:
            w = mixer.b_proj.weight
            w.copy_((math.log(beta / (1 - beta)) * mean / mean.dot(mean)).to(w.dtype).expand_as(w))
        report.update(gdn_init.fit_decay(mixer, inputs, head_outputs, position_embeddings))
        return report

    INITIALIZERS["gdn"] = Initializer(build=build, calibrate=calibrate)
    source, tokenizer = load("llama")
    hybrid = hybridize.convert(source, ConvertConfig(mixer="gdn", ratio=0.5), tokenizer=tokenizer)
    result = evaluate(hybrid, EvalConfig(max_tokens=4096), tokenizer=tokenizer)
    print(f"{mode}: perplexity {result['perplexity']:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
