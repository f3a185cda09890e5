"""Save a copy of a model whose every permutable axis (residual channels, MLP neurons, KV groups, query heads, Mamba2
groups and heads) is randomly permuted: the same function, different weights. The fusion experiment (issue 8) fuses
a fine-tune with the permuted other fine-tune, where plain averaging must fail and optimal transport must not.

    python evals/permute_model.py out/ft-society out/ft-society-permuted --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import hybridize
from hybridize.compress.fuse import permuted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a hybrid directory (convert --ratio 0 makes one of a plain model)")
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    hybridize.check_output(args.output, overwrite=False)
    model, tokenizer = hybridize.load(args.model)
    hybridize.save(permuted(model, seed=args.seed), args.output, tokenizer=tokenizer)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
