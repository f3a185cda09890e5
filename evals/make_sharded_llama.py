"""Write a random ~1B-parameter Llama in safetensors shards, tensor by tensor (the script itself holds one tensor at a
time), to measure lazy conversion on a model larger than SmolLM2: its weights are random (a memory and speed figure,
not a quality one), its tokenizer a real one so that calibration runs.

The defaults are TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 query / 4 KV heads, untied head)
with the tokenizer's vocabulary (49,152 for SmolLM2's: 1.17B parameters, 4.7 GB in fp32, three shards of at most 2 GB).

    python evals/make_sharded_llama.py out/llama-1b --tokenizer smollm2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig

from hybridize.io.shards import ShardWriter
from hybridize.saving import atomic_output, copy_tokenizer
from hybridize.sources import load_lazy


def layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The weight shapes of one Llama decoder layer, keyed as in its state dict."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def random_weight(shape: tuple[int, ...], generator: torch.Generator, std: float) -> torch.Tensor:
    """Norm weights are ones; matrices are N(0, std²), as transformers initialises a Llama."""
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--tokenizer", default="smollm2", help="model spec whose tokenizer is copied (and sets vocab)")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-layers", type=int, default=22)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--max-shard-bytes", type=int, default=2 * 10**9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    _, tokenizer, _ = load_lazy(args.tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    generator = torch.Generator().manual_seed(args.seed)
    std = config.initializer_range
    with atomic_output(args.output, overwrite=args.overwrite) as tmp:
        with ShardWriter(tmp, max_shard_bytes=args.max_shard_bytes) as writer:
            writer.add(
                "model.embed_tokens.weight", random_weight((config.vocab_size, config.hidden_size), generator, std)
            )
            for layer in range(config.num_hidden_layers):
                for name, shape in layer_shapes(config).items():
                    writer.add(f"model.layers.{layer}.{name}", random_weight(shape, generator, std))
            writer.add("model.norm.weight", random_weight((config.hidden_size,), generator, std))
            writer.add("lm_head.weight", random_weight((config.vocab_size, config.hidden_size), generator, std))
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        copy_tokenizer(tokenizer, tmp)
    print(
        f"wrote {args.output}: {writer.total_parameters / 1e9:.2f}B parameters, {writer.total_bytes / 1e9:.2f} GB "
        f"in {len(writer.shards)} shard(s)"
    )


if __name__ == "__main__":
    main()
