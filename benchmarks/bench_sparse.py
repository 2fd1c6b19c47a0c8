"""2:4 semi-structured weights against dense ones in F.linear on the GPU (fp16/bf16), one process, one card.

    python benchmarks/bench_sparse.py [--dtype bf16] [--doc docs/benchmarks.md]

Weights are pruned 2:4 by `aofunc.prune`, converted by `aofunc.semi_structured`, and timed with
`triton.testing.do_bench` (median, L2 flushed) against the same pruned weights kept dense.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aofunc  # noqa: E402
from common import card_name, markdown_table, median_us, update_section  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
MS = [1, 16, 128, 2048]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--doc", default=None)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    spec = aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(pattern="2:4"))])
    rows = []
    for k, n in SHAPES:
        pruned = aofunc.prune({"w": torch.randn(n, k, device="cuda", dtype=dtype)}, spec)
        sparse = aofunc.semi_structured(pruned, names=["w"])["w"]
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            dense_us = median_us(lambda: F.linear(x, pruned["w"]))
            try:
                sparse_us = median_us(lambda: F.linear(x, sparse))
            except RuntimeError as e:  # shapes the sparse kernels refuse are reported
                print(f"{k}x{n} M={m}: {e}")
                sparse_us = None
            rows.append([f"{k}×{n}", m, dense_us, sparse_us, dense_us / sparse_us if sparse_us else None])
            print(rows[-1], flush=True)
    text = (f"Card: {card_name()}. 2:4-pruned {args.dtype} weights, `F.linear` on the dense tensor against the "
            "`aofunc.semi_structured` one (`python benchmarks/bench_sparse.py`).\n\n"
            + markdown_table(["K×N", "M", "dense µs", "2:4 µs", "× dense"], rows))
    print(text)
    if args.doc:
        update_section(args.doc, "2:4 semi-structured sparsity", text)


if __name__ == "__main__":
    main()
