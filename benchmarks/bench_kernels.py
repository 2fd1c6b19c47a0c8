"""Weight-only kernels (W4A16, W8A16, NF4) against bf16 cuBLAS, tinygemm and torchao, in one process on one card.

    python benchmarks/bench_kernels.py --formats w4a16,w8a16 --shapes 4096x4096 --ms 1,16 --tune-ms 1 --check
    python benchmarks/bench_kernels.py --peers tinygemm,torchao --json results.json
    python benchmarks/bench_kernels.py --render results.json --doc docs/benchmarks.md   # no GPU needed

Shapes are K x N (input x output features). Weights are random codes and scales built with plain torch here
(speed does not depend on the values). Times are ``cold_us``: CUDA graphs, L2 cold, launch overhead excluded.
``--tune-ms`` searches configurations for those M first (the winners go to the user kernel cache,
``$AOFUNC_KERNEL_CACHE``); ``--check`` compares every path at these sizes with the reference twins first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from common import card_name, cold_us, markdown_table, median_us, ratio, update_section
from common import fmt as cell

SHAPES = ("4096x4096", "4096x14336", "14336x4096", "8192x28672")
MS = (1, 2, 4, 8, 16, 32, 64, 128, 2048)
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


def timed(fn):
    """cold_us, or do_bench's median for what cannot be captured in a CUDA graph (None if it fails)."""
    try:
        return cold_us(fn)
    except RuntimeError as error:
        print(f"graph timing failed ({str(error)[:80]}); do_bench instead", flush=True)
        torch.cuda.synchronize()
        return median_us(fn)


def bench(fmts, shapes, ms, peers, tune_ms):
    from aofunc.kernels import autotune

    raw = []
    for shape in shapes:
        k, n = map(int, shape.split("x"))
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for fmt in fmts:
            run, _, key, extra, default = ours(fmt, n, k)
            tiny = tinygemm(*extra["tinygemm"]) if fmt == "w4a16" and "tinygemm" in peers else None
            tao = torchao_linear(fmt, n, k) if fmt in ("w4a16", "w8a16") and "torchao" in peers else None
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                start = time.time()
                if m in tune_ms:
                    with autotune.tune():
                        run(x)
                tuned = autotune.lookup(key(x))
                config = dict(tuned or default(x), tuned=tuned is not None)
                t_bf16 = timed(lambda: F.linear(x, w_bf16))
                t_ours = timed(lambda: run(x))
                t_tiny = timed(lambda: tiny(x)) if tiny is not None else None
                t_tao = timed(lambda: tao(x)) if tao is not None else None
                raw.append(dict(fmt=fmt, shape=shape, m=m, bf16=t_bf16, ours=t_ours, tinygemm=t_tiny, torchao=t_tao,
                                config=config))
                print(f"{fmt} {shape} m={m}: bf16 {t_bf16:.1f} ours {t_ours:.1f} ({t_bf16 / t_ours:.2f}x) "
                      f"tinygemm {t_tiny} torchao {t_tao} {config} [{time.time() - start:.1f}s]", flush=True)
    return raw


def rows_of(raw):
    """Table rows from raw results (dicts as written to --json)."""
    out = []
    for r in raw:
        config = r["config"]
        path = config["path"] + (" (tuned)" if config.get("tuned") else "") if isinstance(config, dict) else config
        out.append([r["fmt"], r["shape"], str(r["m"]), r["bf16"], r["ours"], cell(ratio(r["bf16"], r["ours"]), 2),
                    r["tinygemm"], cell(ratio(r["tinygemm"], r["ours"]), 2), r["torchao"],
                    cell(ratio(r["torchao"], r["ours"]), 2), path])
    return out


HEADERS = ["format", "K×N", "M", "bf16 µs", "aofunc µs", "× bf16", "tinygemm µs", "× tinygemm", "torchao µs",
           "× torchao", "path"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="w4a16,w8a16,nf4")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--peers", default="tinygemm", help="comma list of tinygemm, torchao")
    parser.add_argument("--tune-ms", default="", help="comma list of M whose keys are tuned before timing")
    parser.add_argument("--check", action="store_true", help="compare every path with its twin first")
    parser.add_argument("--doc", help="markdown file whose 'Kernels: weight-only' section gets the table")
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--render", nargs="+", help="make the table from --json files instead of measuring")
    args = parser.parse_args(argv)
    if args.render:
        runs = [json.load(open(path)) for path in args.render]
        card = ", ".join(sorted({run["card"] for run in runs}))
        version = ", ".join(sorted({run["torch"] for run in runs}))
        raw = [r for run in runs for r in run["results"]]
    else:
        raw, card, version = measure(args), card_name(), torch.__version__
    table = markdown_table(HEADERS, rows_of(raw))
    print(table)
    if args.json and not args.render:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": version, "results": raw}, f, indent=1, default=str)
    if args.doc:
        body = (f"Card: {card}; torch {version}; CUDA graphs, L2 cold (benchmarks/common.py `cold_us`), "
                f"bf16 activations. Ratios above 1 mean aofunc is faster.\n\n{table}")
        update_section(args.doc, "Kernels: weight-only", body)


def measure(args):
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
    return bench(fmts, shapes, ms, set(args.peers.split(",")) - {""}, tune_ms)


if __name__ == "__main__":
    main()
