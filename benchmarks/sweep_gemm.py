"""Search the GEMM forms of the weight-only formats and 8da4w for M > 1 on this card and write the winners as a
shipped configuration table.

    python benchmarks/sweep_gemm.py --formats w4a16,w8a16,nf4 --shapes 4096x14336,8192x28672 --ms 16,64,256,2048 \
        --out kernels/configs/<card-slug>.json

Each (format, K x N, M) key times bf16 cuBLAS, the launcher's default and a focused list of candidates (every one
checked against the reference twin first, through the tuner's own ``search``), prints one line per key, and merges
the fastest correct configuration into ``--out`` (a shipped table: ``kernels/configs/<card>.json``).

With ``--seed kernels/configs/<other card>.json`` a key times only the default and the winners that ``--out`` and
the other card's table hold for the same shape at M/2, M and 2M (and cuBLAS on the dequantized weight from 128
rows), those among the op's own search candidates: a short search that carries one card's table to another of the
same architecture.

With ``--only wgmma`` a key times only the default and the configuration ``--out`` holds for it against the op's
own search candidates on the ``wgmma`` path with the tile in registers; ``--only decoupled``, against its DECOUPLED
forms of two and three stages: searches that bring a new form of the path to keys searched before it. ``--only
mma`` likewise times the shipped configuration against the op's candidates on the ``mma`` path (up to 32 rows).
These lines also give the shipped configuration's own time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aofunc.kernels import autotune, int8_int4, nf4, w4a16, w8a16  # noqa: E402
from aofunc.kernels.tiles import split_k, wgmma_configs, wgmma_runs  # noqa: E402
from bench_kernels import int4_weight, int8_weight, nf4_weight, GROUP, NF4_BLOCK, NF4_SCALER_BLOCK  # noqa: E402
from bench_w8a8 import int4_weight as symmetric_int4_weight  # noqa: E402


def gemm_forms(m: int, fmt: str):
    """Block shapes and forms worth timing for M rows (every config also names its split of K later)."""
    if m <= 16:
        tiles = [(16, 64, 4), (16, 128, 4), (16, 128, 8)]
    elif m <= 64:
        tiles = [(m, 64, 4), (m, 128, 8)]
    elif m <= 256:
        tiles = [(64, 128, 4), (128, 128, 8), (128, 64, 4)] + ([(256, 128, 8)] if m == 256 else [])
    else:
        tiles = [(128, 128, 8), (256, 128, 8), (128, 256, 8), (64, 128, 4)]
    forms = [dict()]
    if fmt == "w4a16":
        # the per-group and SPLIT_X forms lost to FULL_DQ at every M >= 16 on an H200; GATHER_X wins up to 16 rows;
        # past 16 rows also the fragment-ordered tiles on x copied into their order (PERMUTE_X)
        forms = [dict(FULL_DQ=True), dict(GATHER_X=True, PAIRS=True)]
        if m <= 64:
            forms += [dict(GATHER_X=True), dict(GATHER_X=True, CENTERED=True)]
        if m > 16:
            forms += [dict(FULL_DQ=True, PREFETCH=True), dict(GATHER_X=True, PAIRS=True, PERMUTE_X=True),
                      dict(GATHER_X=True, CENTERED=True, PERMUTE_X=True)]
    elif fmt == "w8a16":
        forms = [dict(), dict(GATHER_X=True)] + ([dict(GATHER_X=True, PERMUTE_X=True)] if m > 16 else [])
    elif fmt == "nf4":  # levels from byte permutes won or tied the shuffled ones at 16 and 64 rows
        forms = [dict(), dict(GATHER_X=True, PAIRS=True)] + ([dict(GATHER_X=True, PAIRS=True, PERMUTE_X=True)]
                                                             if m > 16 else [])
    # the tuner's PERMUTE_X tiles (W8A16: up to 128 rows of x, on 4 warps)
    permuted = ((64, 4), (128, 4), (128, 8)) if fmt == "w4a16" else ((64, 4), (128, 4))
    for block_m, block_n, warps in tiles:
        for form in forms:
            if form.get("PERMUTE_X") and ((block_n, warps) not in permuted or (fmt == "w8a16" and block_m > 128)):
                continue
            deeper = m > 256 and (block_m, block_n) == (128, 128) and not form.get("PERMUTE_X")
            for stages in ((3, 4) if deeper else (3,)):
                yield dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, SWAP=True, M_FAST=m > 64,
                           num_warps=warps, num_stages=stages, **form)


def gemv_forms(fmt: str):
    """GEMV shapes worth timing at M = 1 (W4A16: the accumulator-per-group form with vector x and coarse units;
    W8A16: rows of outputs by words of codes, the tuner's own GEMV grid)."""
    if fmt == "w8a16":
        for block_n in (16, 32, 64, 128):
            for block_w in (32, 64):
                for form in (dict(), dict(XVEC=True), dict(XVEC=True, LOOP_STAGES=3)):
                    yield dict(path="gemv", BLOCK_N=block_n, BLOCK_W=block_w, num_warps=4, num_stages=3, **form)
        return
    for block_n in (32, 64):
        for groups in (2, 4):
            for warps in (1, 2):
                for stages in (3, 4):
                    if fmt == "w4a16":
                        for reduce_w in (True, False):
                            yield dict(path="gemv", BLOCK_N=block_n, GROUPS=groups, PREFETCH=False, REDUCE_W=reduce_w,
                                       XVEC=True, COARSE=True, LOOP_STAGES=stages, num_warps=warps, num_stages=3)
                    elif fmt == "nf4":
                        for reduce_w in (True, False) if stages == 3 else (True,):
                            yield dict(path="gemv", BLOCK_N=block_n, GROUPS=groups, REDUCE_W=reduce_w,
                                       LOOP_STAGES=stages, num_warps=warps, num_stages=3)


def candidates(fmt, m, n, k, device):
    if fmt == "8da4w":
        return int8_int4.candidate_configs(m, n, k, GROUP, torch.bfloat16, torch.bfloat16, device)
    out = []
    if m == 1:
        out = [dict(c, SPLIT_K=split) for c in gemv_forms(fmt) for split in (1, 2, 4, 8)]
        if fmt != "nf4":  # NF4's 16-row GEMM tile can beat its GEMV at one row
            return out
    if fmt == "w4a16" and m <= 8:  # the GEMV with two rows of x a program, each code's unit shared by both
        out += [dict(c, SPLIT_K=split, TWO_ROWS=True) for c in gemv_forms(fmt) for split in (1, 2, 4, 8)]
    steps = {"w4a16": k // GROUP, "w8a16": k // 128, "nf4": k // NF4_BLOCK}[fmt]
    for config in gemm_forms(m, fmt):
        programs = -(-m // config["BLOCK_M"]) * -(-n // config["BLOCK_N"])
        base = split_k(programs, steps, device)
        splits = {base, max(1, base // 2)} | ({min(8, 2 * base)} if m <= 16 else set())
        if m <= 64 and steps >= 6:
            splits.add(3)  # a third wave where powers of two leave the last one part-empty (8192 x 28672, 16 rows)
        for split in sorted(splits):
            c = dict(config, SPLIT_K=split)
            if fmt == "w8a16":
                c["BLOCK_W"] = 32
            out.append(c)
    if fmt in ("w4a16", "w8a16") and m >= 16 and wgmma_runs(device):
        # Hopper's warpgroup MMA, the tile in registers (through shared memory it lost at every W4A16 key on an H200)
        out += [c for c in wgmma_configs(m, n) if not c["A_SHARED"] and c["BLOCK_M"] >= min(128, m)]
    if m >= 128:
        out.append(dict(path="dequant"))
        if fmt == "w4a16":
            out += [dict(path="dequant", BLOCK=block, num_warps=warps) for block, warps in ((512, 4), (2048, 8))]
    return out


def tuner_candidates(fmt, m, n, k, device):
    """Every configuration the op's own search (autotune) tries for this key, and this script's."""
    own = {"w4a16": lambda: w4a16.candidate_configs(m, n, k, GROUP, torch.bfloat16, device),
           "w8a16": lambda: w8a16.candidate_configs(m, n, k, torch.bfloat16, device),
           "nf4": lambda: nf4.candidate_configs(m, n, k, NF4_BLOCK, torch.bfloat16, device),
           "8da4w": lambda: []}[fmt]()
    return own + candidates(fmt, m, n, k, device)


def seeded(key, tables, m):
    """The configurations that ``tables`` (``{card: {str(key): config}}`` each) hold for ``key``'s shape at M/2, M
    and 2M, without repeats; for 8da4w also W4A16's wgmma winners (the same kernel, on exact fp16 operands)."""
    keys = [key]
    if key.kernel.startswith("int8_int4"):
        keys.append(key._replace(kernel=f"w4a16_g{GROUP}", dtypes=("bfloat16", "bfloat16")))
    out = []
    for mb in (m // 2, m, 2 * m):
        for i, base in enumerate(keys):
            name = str(base._replace(m_bucket=autotune.m_bucket(max(1, mb))))
            for table in tables:
                for configs in table.values():
                    config = configs.get(name)
                    if config is not None and config not in out and (i == 0 or config["path"] == "wgmma"):
                        out.append(config)
    return out


def problem(fmt, n, k, m):
    """(run(config), reference output, key, default config) for a random weight of this format."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dev = x.device
    if fmt == "w4a16":
        q, s, z = int4_weight(n, k)
        run = lambda c: w4a16.w4a16_linear_triton(x, q, s, z, GROUP, config=c)  # noqa: E731
        ref = w4a16.w4a16_linear_ref(x, q, s, z, GROUP)
        key = autotune.config_key(f"w4a16_g{GROUP}", m, n, k, (x.dtype, s.dtype), dev)
        default = w4a16.default_config(m, n, k, GROUP, x.dtype, dev)
        tol = w4a16.tolerance(x.dtype)
    elif fmt == "w8a16":
        q, s = int8_weight(n, k)
        run = lambda c: w8a16.w8a16_linear_triton(x, q, s, config=c)  # noqa: E731
        ref = w8a16.w8a16_linear_ref(x, q, s)
        key = autotune.config_key("w8a16", m, n, k, (x.dtype, s.dtype), dev)
        default = w8a16.default_config(m, n, k, x.dtype, dev)
        tol = w8a16.tolerance(x.dtype)
    elif fmt == "8da4w":
        q, s = symmetric_int4_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, GROUP)
        run = lambda c: int8_int4.int8_int4_linear_triton(x, q, s, GROUP, None, config=c)  # noqa: E731
        ref = int8_int4.int8_int4_linear_ref(x, q, s, GROUP, None)
        key = autotune.config_key(f"int8_int4_g{GROUP}", m, n, k, (x.dtype,), dev)
        default = int8_int4.default_config(m, n, k, GROUP, x.dtype, s.dtype, dev)
        tol = 1e-3
    else:
        args = nf4_weight(n, k)
        run = lambda c: nf4.nf4_linear_triton(x, *args, n, k, NF4_BLOCK, NF4_SCALER_BLOCK, config=c)  # noqa: E731
        ref = nf4.nf4_linear_ref(x, *args, n, k, NF4_BLOCK, NF4_SCALER_BLOCK)
        key = autotune.config_key(f"nf4_b{NF4_BLOCK}_s{NF4_SCALER_BLOCK}", m, n, k, (x.dtype,), dev)
        default = nf4.default_config(m, n, k, NF4_BLOCK, x.dtype, dev)
        tol = nf4.tolerance(x.dtype)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bf16_us = autotune.cold_us(lambda: F.linear(x, w))
    return run, ref, key, default, tol, bf16_us


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="w4a16,w8a16,nf4")
    parser.add_argument("--shapes", default="4096x14336,8192x28672")
    parser.add_argument("--ms", default="16,64,256,2048")
    parser.add_argument("--out", required=True, help="shipped configuration table to merge the winners into")
    parser.add_argument("--seed", default="", help="another card's shipped table: time only its winners (see above)")
    parser.add_argument("--only", choices=("wgmma", "decoupled", "mma"), help="time the shipped winner against "
                        "these forms of the wgmma path, or the mma path, only (see above)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    name = autotune.device_name(device)
    table = autotune.read_table(args.out) if os.path.exists(args.out) else {}
    seed = autotune.read_table(args.seed) if args.seed else {}
    print(f"card: {name}")
    print(f"{'format':6s} {'KxN':>11s} {'M':>5s} {'bf16':>8s} {'default':>8s} {'best':>8s} {'x bf16':>6s}  best config")
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            k, n = map(int, shape.split("x"))
            for m in map(int, args.ms.split(",")):
                run, ref, key, default, tol, bf16_us = problem(fmt, n, k, m)
                if args.seed:  # (only what the tuner's search would try: the shipped tables hold nothing else)
                    allowed = tuner_candidates(fmt, m, n, k, device)
                    pool = [c for c in seeded(key, [table, seed], m) + [dict(path="dequant")] if c in allowed]
                elif args.only:
                    shipped = table.get(name, {}).get(str(key))
                    pool = ([shipped] if shipped else []) + [
                        c for c in tuner_candidates(fmt, m, n, k, device)
                        if (args.only == "mma" and c.get("path") == "mma") or (
                            c.get("path") == "wgmma" and not c["A_SHARED"] and (
                                args.only == "wgmma" or (c.get("DECOUPLED") and c["STAGES"] <= 3)))]
                    pool = [c for i, c in enumerate(pool) if c not in pool[:i]]
                else:
                    pool = candidates(fmt, m, n, k, device)
                pool = [default] + [c for c in pool if c != default]
                best, trials = autotune.search(pool, run, ref, tol)
                default_us = trials[0].us
                rejected = [t for t in trials if t.us is None]
                best_us = min(t.us for t in trials if t.us is not None) if best else None
                shipped_us = next((t.us for t in trials if t.config == shipped), None) if args.only else None
                print(f"{fmt:6s} {shape:>11s} {m:5d} {bf16_us:8.1f} {default_us or float('nan'):8.1f} "
                      f"{best_us or float('nan'):8.1f} {bf16_us / best_us if best_us else 0:6.2f}  {best}"
                      f"  ({len(rejected)} rejected{': ' + rejected[0].reason[:80] if rejected else ''})"
                      + (f"  shipped {shipped_us:.1f}" if shipped_us else ""), flush=True)
                if best is not None:
                    table.setdefault(name, {})[str(key)] = best
                autotune.write_table(autotune.Path(args.out), table)


if __name__ == "__main__":
    main()
