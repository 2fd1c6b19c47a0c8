"""2:4 semi-structured weights against dense ones in F.linear on the GPU (fp16/bf16), one process, one card.

    python benchmarks/bench_sparse.py [--dtype bf16] [--doc docs/benchmarks.md]

Weights are pruned 2:4 by `aofunc.prune`, converted by `aofunc.semi_structured`, and timed against the same
pruned weights kept dense, two ways: eager calls (`triton.testing.do_bench` median, L2 flushed, host time of the
sparse tensor's Python dispatch included) and `cold_us` (CUDA graphs, L2 cold: the GPU work alone).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aofunc  # noqa: E402
from common import card_name, cold_us, fmt, markdown_table, median_us, ratio, update_section  # noqa: E402

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
            dense = F.linear(x, pruned["w"])
            try:
                err = ((F.linear(x, sparse).float() - dense.float()).norm() / dense.float().norm()).item()
                times = [median_us(lambda: F.linear(x, w)) for w in (pruned["w"], sparse)]
                times += [cold_us(lambda: F.linear(x, w)) for w in (pruned["w"], sparse)]
            except RuntimeError as e:  # shapes the sparse kernels refuse are reported
                print(f"{k}x{n} M={m}: {e}")
                continue
            rows.append([f"{k}×{n}", m, times[0], times[1], fmt(ratio(times[0], times[1]), 2), times[2], times[3],
                         fmt(ratio(times[2], times[3]), 2), f"{err:.1e}"])
            print(rows[-1], flush=True)
    text = (f"Card: {card_name()}. 2:4-pruned {args.dtype} weights, `F.linear` on the dense tensor against the "
            "`aofunc.semi_structured` one (`python benchmarks/bench_sparse.py`).\n\n"
            + markdown_table(["K×N", "M", "dense eager µs", "2:4 eager µs", "× dense", "dense graph µs",
                              "2:4 graph µs", "× dense", "rel. difference"], rows))
    print(text)
    if args.doc:
        update_section(args.doc, "2:4 semi-structured sparsity", text)


if __name__ == "__main__":
    main()
