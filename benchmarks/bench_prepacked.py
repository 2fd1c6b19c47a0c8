"""W4A16's fragment-ordered GEMM tile with codes stored in fragment order, against the same tile gathering x.

    python benchmarks/bench_prepacked.py --shapes 4096x14336,8192x28672 --ms 2,16,32,64

The GATHER_X tile holds each packed word's codes in the registers of the thread that feeds them to the tensor
cores; with the canonical layout the kernel gathers x's columns to match (4-byte copies). ``prepack_fragments``
stores the codes in that order instead, so x is read in its own order, contiguously: this script measures what the
gather costs, before the layout is made a stored form of the weight. For every (K x N, M) and each configuration
(the default's tile sizes, with and without packed pairs, splits of K as the default chooses) it checks both
against the twin and prints ``cold_us`` (CUDA graphs, L2 cold) of bf16 cuBLAS, the gathered tile and the
prepacked one. Nothing is recorded: an experiment, not a product path.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aofunc.kernels import autotune, triton_compat, w4a16  # noqa: E402
from bench_kernels import GROUP, int4_weight  # noqa: E402
from common import card_name, cold_us, markdown_table  # noqa: E402


def configs(m: int, n: int, k: int) -> list:
    """GATHER_X configurations for M rows: the default's tile, in packed pairs and in fp32 units."""
    base = w4a16.default_config(max(m, 2), n, k, GROUP, torch.bfloat16, torch.device("cuda"))
    if base["path"] != "gemm":
        base = dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, SWAP=True, num_warps=4, num_stages=3)
    base = {key: v for key, v in base.items() if key not in ("FULL_DQ", "PREFETCH", "M_FAST")}
    return [dict(base, GATHER_X=True, PAIRS=True), dict(base, GATHER_X=True, PAIRS=False)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x14336,8192x28672")
    parser.add_argument("--ms", default="2,16,32,64")
    args = parser.parse_args(argv)
    triton_compat.load()
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        q, scale, zero = int4_weight(n, k)
        packed = w4a16.prepack_fragments(q)
        w = w4a16.w4a16_dequantize(q, scale, zero, GROUP, k, torch.bfloat16)
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = w4a16.w4a16_linear_ref(x, q, scale, zero, GROUP)
            bf16 = cold_us(lambda: F.linear(x, w))
            for config in configs(m, n, k):
                prepacked = dict(config, PREPACKED=True)
                errors = [autotune.relative_error(w4a16.launch(x, q, scale, zero, GROUP, None, config), want),
                          autotune.relative_error(w4a16.launch(x, packed, scale, zero, GROUP, None, prepacked),
                                                  want)]
                if max(errors) > w4a16.tolerance(x.dtype):
                    raise SystemExit(f"{shape} M={m} {config}: relative errors {errors} against the twin")
                gathered = cold_us(lambda: w4a16.launch(x, q, scale, zero, GROUP, None, config))
                ordered = cold_us(lambda: w4a16.launch(x, packed, scale, zero, GROUP, None, prepacked))
                form = "pairs" if config["PAIRS"] else "fp32 units"
                rows.append([shape, str(m), f"{form}, BLOCK_N {config['BLOCK_N']}, split {config['SPLIT_K']}",
                             f"{bf16:.1f}", f"{gathered:.1f}", f"{ordered:.1f}", f"{gathered / ordered:.2f}",
                             f"{bf16 / ordered:.2f}"])
                print(" | ".join(rows[-1]), flush=True)
    print(f"\nCard: {card_name()}, torch {torch.__version__}; cold_us.\n")
    print(markdown_table(["K×N", "M", "tile", "bf16 µs", "gathered x µs", "prepacked µs", "gathered/prepacked",
                          "bf16/prepacked"], rows))


if __name__ == "__main__":
    main()
