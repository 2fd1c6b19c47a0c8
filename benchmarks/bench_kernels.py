"""Weight-only kernels (W4A16, W8A16, NF4) against bf16 cuBLAS, tinygemm and torchao, in one process on one card.

    python benchmarks/bench_kernels.py --formats w4a16,w8a16 --shapes 4096x4096 --ms 1,16 --tune-ms 1 --check
    python benchmarks/bench_kernels.py --peers tinygemm,torchao
    python benchmarks/render.py            # the tables of docs/benchmarks.md from benchmarks/results/; no GPU needed

Shapes are K x N (input x output features). Weights are random codes and scales built with plain torch here
(speed does not depend on the values). Times are ``cold_us``: CUDA graphs, L2 cold, launch overhead excluded.
Every measurement is a ``linear`` row recorded with ``common.record_rows`` into
``benchmarks/results/<card>.json`` as soon as its (format, shape) is done (``--results`` names another file,
``--no-record`` keeps it to stdout). ``peer`` is tinygemm for W4A16 (torchao where only it ran) and torchao for
W8A16 when ``--peers`` includes it. ``--tune-ms`` searches configurations for those M first (the winners go to the
user kernel cache, ``$AOFUNC_KERNEL_CACHE``); ``--check`` compares every path at these sizes with the reference twins
first.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from common import (add_record_options, card_name, git_commit, markdown_table, ratio, recorder, timed_us, timing_of,
                    torchao_name)
from common import fmt as cell

SHAPES = ("4096x4096", "4096x14336", "14336x4096", "8192x28672")
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048)
GROUP = 128
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def int4_weight(n, k, dtype=torch.bfloat16):
    """Random W4A16 tensors (qdata, scale, zero) for g = GROUP."""
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scale = (torch.rand(n, k // GROUP, device="cuda") * 0.01 + 1e-3).to(dtype)
    zero = (torch.randn(n, k // GROUP, device="cuda") * 0.01).to(dtype)
    return q, scale, zero


def int8_weight(n, k, dtype=torch.bfloat16):
    """Random W8A16 tensors (qdata, scale)."""
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    return q, (torch.rand(n, device="cuda") * 1e-3 + 1e-4).to(dtype)


def nf4_weight(n, k):
    """Random NF4 tensors (qdata, scaler_q, scaler_factor, scaler_mean)."""
    chunk = NF4_BLOCK * NF4_SCALER_BLOCK
    padded = -(-n * k // chunk) * chunk
    q = torch.randint(0, 256, (padded // 2,), dtype=torch.uint8, device="cuda")
    scaler_q = torch.randint(-128, 128, (padded // NF4_BLOCK,), dtype=torch.int8, device="cuda")
    factor = torch.rand(padded // chunk, device="cuda") * 1e4 + 1e3
    return q, scaler_q, factor, torch.tensor(0.02, device="cuda")


def ours(fmt, n, k):
    """(run(x, config=None), reference(x), key(x), peers' tensors, default config(x)) for a random [n, k] weight."""
    from aofunc.kernels import autotune, nf4, w4a16, w8a16

    if fmt == "w4a16":
        q, s, z = int4_weight(n, k)
        return (lambda x, c=None: w4a16.w4a16_linear_triton(x, q, s, z, GROUP, None, config=c),
                lambda x: w4a16.w4a16_linear_ref(x, q, s, z, GROUP, None),
                lambda x: autotune.config_key(f"w4a16_g{GROUP}", x.shape[0], n, k, (x.dtype, s.dtype), x.device),
                {"tinygemm": (q, s, z)},
                lambda x: w4a16.default_config(x.shape[0], n, k, GROUP, x.dtype, x.device))
    if fmt == "w8a16":
        q, s = int8_weight(n, k)
        return (lambda x, c=None: w8a16.w8a16_linear_triton(x, q, s, None, config=c),
                lambda x: w8a16.w8a16_linear_ref(x, q, s, None),
                lambda x: autotune.config_key("w8a16", x.shape[0], n, k, (x.dtype, s.dtype), x.device), {},
                lambda x: w8a16.default_config(x.shape[0], n, k, x.dtype, x.device))
    tensors = nf4_weight(n, k)
    return (lambda x, c=None: nf4.nf4_linear_triton(x, *tensors, n, k, NF4_BLOCK, NF4_SCALER_BLOCK, None, config=c),
            lambda x: nf4.nf4_linear_ref(x, *tensors, n, k, NF4_BLOCK, NF4_SCALER_BLOCK, None),
            lambda x: autotune.config_key(f"nf4_b{NF4_BLOCK}_s{NF4_SCALER_BLOCK}", x.shape[0], n, k, (x.dtype,),
                                          x.device), {},
            lambda x: nf4.default_config(x.shape[0], n, k, NF4_BLOCK, x.dtype, x.device))


def forced_configs(fmt, m, n, k):
    """Each path of a format with its default blocks and a few splits, for the --check pass."""
    from aofunc.kernels import nf4, w4a16, w8a16

    dev = torch.device("cuda")
    if fmt == "w4a16":
        gemv = dict(path="gemv", BLOCK_N=64, GROUPS=2, PREFETCH=True, num_warps=4, num_stages=3)
        gemm = dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SWAP=False, num_warps=4, num_stages=3)
        base = [w4a16.default_config(m, n, k, GROUP, torch.bfloat16, dev)]
    elif fmt == "w8a16":
        gemv = dict(path="gemv", BLOCK_N=64, BLOCK_W=64, num_warps=4, num_stages=3)
        gemm = dict(path="gemm", BLOCK_M=16, BLOCK_N=64, BLOCK_W=32, SWAP=False, num_warps=4, num_stages=3)
        base = [w8a16.default_config(m, n, k, torch.bfloat16, dev)]
    else:
        gemv = dict(path="gemv", BLOCK_N=64, GROUPS=4, num_warps=4, num_stages=3)
        gemm = dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SWAP=False, num_warps=4, num_stages=3)
        base = [nf4.default_config(m, n, k, NF4_BLOCK, torch.bfloat16, dev)]
    out = base + [dict(path="dequant")]
    for split in (1, 3, 8):
        if m <= 8:
            out.append(dict(gemv, SPLIT_K=split))
        if gemm is not None and m >= 2:
            out.append(dict(gemm, SPLIT_K=split))
    return out


def check(fmts, shapes, dtypes=(torch.bfloat16, torch.float16)):
    """Every path against the twin at real sizes, fresh random data each time; returns the number of failures."""
    from aofunc.kernels import autotune
    from aofunc.kernels.w4a16 import tolerance

    failures = 0
    for fmt in fmts:
        for shape in shapes:
            k, n = map(int, shape.split("x"))
            run, ref, _, _, _ = ours(fmt, n, k)
            for dtype in dtypes:
                for m in (1, 3, 16, 67):
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    want = ref(x)
                    for config in forced_configs(fmt, m, n, k):
                        for _ in range(2):  # twice: the split-K counters must be left zeroed
                            err = autotune.relative_error(run(x, config), want)
                        ok = err <= tolerance(dtype)
                        failures += not ok
                        if not ok or m == 1:
                            print(f"check {fmt} {shape} {dtype} m={m} {config}: rel err {err:.2e} "
                                  f"{'ok' if ok else 'FAIL'}", flush=True)
    return failures


def tinygemm(q, s, z):
    """aten._weight_int4pack_mm on the same codes (inner_k_tiles 8), or None where this torch lacks it."""
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        scales_zeros = torch.stack([s.t(), z.t()], dim=-1).contiguous()
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scales_zeros)
    except (RuntimeError, AttributeError) as error:
        print(f"tinygemm unavailable: {error}", flush=True)
        return None


def torchao_linear(fmt, n, k):
    """A compiled nn.Linear quantized by torchao's int4 (tinygemm packing) or int8 weight-only config."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    if fmt == "w4a16":
        quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"))
    else:
        quantize_(lin, Int8WeightOnlyConfig())
    return torch.compile(lin)


#: the peer a format's row names, in order of preference, among those measured
PEERS = {"w4a16": ("tinygemm", "torchao"), "w8a16": ("torchao",), "nf4": ()}


def linear_row(fmt, k, n, m, times, config, x_dtype="bfloat16"):
    """The ``linear`` results row (benchmarks/common.py) of one measurement.

    ``times``: {"bf16" | "aofunc" | "tinygemm" | "torchao": (µs, how) or None}; ``config``: the configuration the
    kernel ran, with ``tuned`` set when it was a stored winner.
    """
    peer = next((p for p in PEERS.get(fmt, ()) if times.get(p) is not None), None)
    peer_time = times[peer] if peer else None
    methods = {"bf16": times["bf16"][1], "aofunc": times["aofunc"][1], "peer": peer_time[1] if peer_time else None}
    return {"kind": "linear", "format": fmt, "K": k, "N": n, "M": m, "x_dtype": x_dtype,
            "bf16_us": round(times["bf16"][0], 2), "aofunc_us": round(times["aofunc"][0], 2),
            "path": config.get("path"), "tuned": bool(config.get("tuned")),
            "peer": (torchao_name() if peer == "torchao" else peer) if peer else None,
            "peer_us": round(peer_time[0], 2) if peer_time else None,
            "timing": timing_of(**methods), "commit": git_commit()}


def bench(fmts, shapes, ms, peers, tune_ms, record=None):
    """Time every (format, shape, M); returns the rows, each (format, shape) passed to ``record`` when done."""
    from aofunc.kernels import autotune

    rows = []
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for fmt in fmts:
            run, _, key, extra, default = ours(fmt, n, k)
            tiny = tinygemm(*extra["tinygemm"]) if fmt == "w4a16" and "tinygemm" in peers else None
            tao = torchao_linear(fmt, n, k) if fmt in ("w4a16", "w8a16") and "torchao" in peers else None
            done = []
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                start = time.time()
                if m in tune_ms:
                    with autotune.tuning():
                        run(x)
                tuned = autotune.lookup(key(x))
                config = dict(tuned or default(x), tuned=tuned is not None)
                times = {"bf16": timed_us(lambda: F.linear(x, w_bf16)), "aofunc": timed_us(lambda: run(x)),
                         "tinygemm": timed_us(lambda: tiny(x)) if tiny is not None else None,
                         "torchao": timed_us(lambda: tao(x)) if tao is not None else None}
                done.append(linear_row(fmt, k, n, m, times, config))
                r = done[-1]
                print(f"{fmt} {shape} m={m}: bf16 {r['bf16_us']:.1f} ours {r['aofunc_us']:.1f} "
                      f"({r['bf16_us'] / r['aofunc_us']:.2f}x) {r['peer']} {r['peer_us']} {config} "
                      f"[{time.time() - start:.1f}s]", flush=True)
            if record is not None:
                record(done)
            rows += done
    return rows


def table(rows):
    """A markdown table of linear rows, for the terminal (docs/benchmarks.md is made by benchmarks/render.py)."""
    body = [[r["format"], f"{r['K']}×{r['N']}", str(r["M"]), r["bf16_us"], r["aofunc_us"],
             cell(ratio(r["bf16_us"], r["aofunc_us"]), 2), r["path"] + (" (tuned)" if r.get("tuned") else ""),
             r["peer"] or "—", r["peer_us"], cell(ratio(r["peer_us"], r["aofunc_us"]), 2)] for r in rows]
    return markdown_table(["format", "K×N", "M", "bf16 µs", "aofunc µs", "bf16/aofunc", "path", "peer", "peer µs",
                           "peer/aofunc"], body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="w4a16,w8a16,nf4")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--peers", default="tinygemm", help="comma list of tinygemm, torchao")
    parser.add_argument("--tune-ms", default="", help="comma list of M whose keys are tuned before timing")
    parser.add_argument("--check", action="store_true", help="compare every path with its twin first")
    add_record_options(parser)
    args = parser.parse_args(argv)
    record = recorder(args)
    rows = measure(args, record)
    print(table(rows))


def measure(args, record=None):
    fmts, shapes = args.formats.split(","), args.shapes.split(",")
    ms = [int(m) for m in args.ms.split(",")]
    torch.manual_seed(0)
    print(f"card: {card_name()}, torch {torch.__version__}", flush=True)
    if args.check:
        failures = check(fmts, shapes)
        print(f"check: {failures} failures", flush=True)
        if failures:
            sys.exit(1)
    tune_ms = {int(m) for m in args.tune_ms.split(",") if m}
    return bench(fmts, shapes, ms, set(args.peers.split(",")) - {""}, tune_ms, record)


if __name__ == "__main__":
    main()
