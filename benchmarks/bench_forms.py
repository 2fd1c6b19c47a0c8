"""Tile forms side by side: the same tile sizes, one process, one card, bf16 cuBLAS timed alongside.

    python benchmarks/bench_forms.py                      # every comparison, the four Llama shapes
    python benchmarks/bench_forms.py --only 8da4w --ms 16

The comparisons (each line: µs, × bf16, relative error against the format's reference twin):
- ``w8a16``: the W8A16 GEMM tile of the configuration the op runs (table, else default), with its int8 bytes made
  floats by shifts and masks or by one prmt a byte (``BYTE_PRMT``), its loads masked along K or not (``EVEN_K``);
- ``8da4w``: the W4A16 tile on 8da4w's centered integer activations, x-ordered units against the ``CENTERED``
  form in fragment order (both exact group sums);
- ``w4a16-sym``: W4A16 weights without zeros (the symmetric grid), the packed-pairs tile against the centered one.

Times are ``cold_us`` (CUDA graphs, L2 cold). Nothing is recorded: these are forms of one format, not rows of
``benchmarks/results``; the winners become defaults and table entries in ``kernels/``.
"""
from __future__ import annotations

import argparse

import torch

from bench_kernels import int4_weight as w4a16_weight
from bench_kernels import int8_weight
from bench_w8a8 import int4_weight as symmetric_int4_weight
from common import card_name, cold_us

from aofunc.kernels import autotune, triton_compat

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))


def timed(name, run, ref, bf16_us) -> str:
    y = run()
    err = float((y.float() - ref).norm() / ref.norm())
    us = cold_us(run)
    return f"{name} {us:.1f} ({bf16_us / us:.2f}x, err {err:.0e})"


def compare_w8a16(x, k, n, bf16_us) -> list[str]:
    from aofunc.kernels import w8a16
    q, scale = int8_weight(n, k)
    m = x.shape[0]
    key = autotune.config_key("w8a16", m, n, k, (x.dtype, scale.dtype), x.device)
    config = autotune.lookup(key) or w8a16.default_config(m, n, k, x.dtype, x.device)
    if config["path"] != "gemm":
        return [f"(the op runs {config['path']} here)"]
    ref = w8a16.w8a16_linear_ref(x, q, scale).float()
    return [timed(f"even_k={even} prmt={prmt}",
                  lambda c=dict(config, EVEN_K=even, BYTE_PRMT=prmt): w8a16.launch(x, q, scale, None, c), ref, bf16_us)
            for even, prmt in ((False, False), (True, False), (False, True), (True, True))]


def compare_8da4w(x, w, bf16_us) -> list[str]:
    from aofunc.kernels.int8_int4 import gemm_config, int8_int4_linear_ref, int8_int4_linear_triton
    q, scale = symmetric_int4_weight(w, 128)
    m, k = x.shape
    tile = gemm_config(m, w.shape[0], k, 128, x.dtype, x.device)
    ref = int8_int4_linear_ref(x, q, scale, 128, None).float()
    forms = (("x-ordered units", dict(tile, GATHER_X=False, CENTERED=False, PERMUTE_X=False)),
             ("centered, x gathered", dict(tile, PERMUTE_X=False)), ("centered, x quantized into its order", tile))
    return [timed(name, lambda c=c: int8_int4_linear_triton(x, q, scale, 128, None, c), ref, bf16_us)
            for name, c in forms]


def compare_w4a16_symmetric(x, k, n, bf16_us) -> list[str]:
    from aofunc.kernels import w4a16
    q, scale, _ = w4a16_weight(n, k)
    m = x.shape[0]
    key = autotune.config_key("w4a16_g128", m, n, k, (x.dtype, scale.dtype), x.device)
    config = autotune.lookup(key) or w4a16.default_config(m, n, k, 128, x.dtype, x.device)
    if config["path"] != "gemm":
        return [f"(the op runs {config['path']} here)"]
    pairs = dict(config, GATHER_X=True, PAIRS=True, FULL_DQ=False, PREFETCH=False)
    ref = w4a16.w4a16_linear_ref(x, q, scale, None, 128).float()
    # with no zeros stored the launcher runs packed pairs as the centered tile unless told CENTERED=False
    return [timed(name, lambda c=c: w4a16.launch(x, q, scale, None, 128, None, c), ref, bf16_us)
            for name, c in (("packed pairs", dict(pairs, CENTERED=False)), ("centered", dict(pairs, CENTERED=True)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="w8a16,8da4w,w4a16-sym")
    parser.add_argument("--ms", default="2,16,32,64")
    args = parser.parse_args(argv)
    triton_compat.load()
    only = set(args.only.split(","))
    print(f"card: {card_name()}, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    for k, n in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_us = cold_us(lambda: torch.nn.functional.linear(x, w))
            for name, compare in (("w8a16", lambda: compare_w8a16(x, k, n, bf16_us)),
                                  ("8da4w", lambda: compare_8da4w(x, w, bf16_us)),
                                  ("w4a16-sym", lambda: compare_w4a16_symmetric(x, k, n, bf16_us))):
                if name in only:
                    print(f"{name} {k}x{n} m={m} bf16 {bf16_us:.1f} | " + " | ".join(compare()), flush=True)


if __name__ == "__main__":
    main()
