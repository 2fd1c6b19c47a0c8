"""Benchmark: W8A8 (int8 dynamic) and 8da4w linears against bf16 cuBLAS, torch._int_mm and torchao, one card.

    python benchmarks/bench_w8a8.py --search --torchao-m 16,2048 [--shapes 4096x4096 --ms 1,2048 --formats 8da4w]
    python benchmarks/render.py            # the tables of docs/benchmarks.md from benchmarks/results/; no GPU needed

Every measurement is a ``linear`` row (benchmarks/common.py) recorded with ``common.record_rows`` into
``benchmarks/results/<card>.json`` after each shape (``--results`` names another file, ``--no-record`` keeps it to
stdout): format ``w8a8`` (``aofunc.kernels.w8a8.w8a8_linear``: per-token int8 quantization of x and the int8 GEMM
with both scales in its epilogue) and ``8da4w`` (``int8_int4_linear`` at group size 128), against
- ``bf16``: ``F.linear(x, w)`` with bf16 weights (cuBLAS);
- the peer of w8a8 rows: ``torch._int_mm``, that is an eager per-token quantization, ``torch._int_mm(xq, q.t())``
  (cuBLAS int8, M > 16 only) and the scales applied by eager torch; where it does not run, torchao
  ``Int8DynamicActivationInt8WeightConfig`` on an ``nn.Linear``, compiled, at the M of ``--torchao-m``. 8da4w rows
  have no peer.
Times are ``cold_us`` (CUDA graphs, L2 cold, launch overhead excluded; ``--timer do_bench`` for eager
``triton.testing.do_bench`` medians), activation quantization included for every int8 path. ``aofunc_us`` is the
op as it runs (a stored configuration, else the default); ``--search`` first searches configurations for every
(shape, M), each candidate checked against the twin, and stores the winners in the user kernel cache
(``$AOFUNC_KERNEL_CACHE``), so the op then runs them.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_record_options, card_name, git_commit, markdown_table, median_us, ratio, recorder, timed_us, timing_of,
    torchao_name,
)
from common import fmt as cell  # noqa: E402

from aofunc.kernels import autotune  # noqa: E402
from aofunc.kernels.int8_int4 import default_config as default_int8_int4_config  # noqa: E402
from aofunc.kernels.int8_int4 import int8_int4_linear, int8_int4_linear_ref  # noqa: E402
from aofunc.kernels.w8a8 import (  # noqa: E402
    default_config as default_w8a8_config,
    quantize_per_token_int8_ref,
    w8a8_linear,
    w8a8_linear_ref,
)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # K x N
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048]
GROUP_SIZE = 128


def int8_weight(w):
    """Per output channel symmetric int8: scale = max(amax / 127.5, eps), q = round(w / scale)."""
    amax = w.float().abs().amax(dim=1)
    scale = (amax / 127.5).clamp(min=torch.finfo(torch.float32).eps).to(w.dtype)
    q = torch.clamp(torch.round(w.float() / scale.float()[:, None]), -128, 127).to(torch.int8)
    return q, scale


def int4_weight(w, group_size):
    """Symmetric groupwise int4 (the 8da4w format) packed as nibbles u = q + 8, first code in the high nibble."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    scale = (wg.abs().amax(dim=2) / 7.5).clamp(min=torch.finfo(torch.float32).eps).to(w.dtype)
    q = torch.clamp(torch.round(wg / scale.float()[..., None]), -8, 7).reshape(n, k).to(torch.int16) + 8
    qdata = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
    return qdata, scale


def torch_w8a8(x, q, scale):
    """The peer built from torch ops: eager per-token quantization, cuBLAS int8 GEMM, eager scaling."""
    xq, s = quantize_per_token_int8_ref(x, None)
    return (torch._int_mm(xq, q.t()).float() * s[:, None] * scale.float()).to(x.dtype)


def torchao_linear(w):
    """An nn.Linear with weight w under torchao's Int8DynamicActivationInt8WeightConfig, compiled."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    quantize_(lin, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(lin, dynamic=False)


def timer(name):
    """``fn -> (µs, how)``: ``timed_us`` (cold_us, do_bench where capture fails), or eager do_bench medians."""
    if name == "do_bench":
        return lambda fn: (median_us(fn), "do_bench")
    return timed_us


def attempt(errors, name, measure):
    """measure(), or None with the failure printed and kept in ``errors``: one failing path must not lose the rest."""
    try:
        return measure()
    except Exception as error:
        errors.append(f"{name}: {type(error).__name__}: {str(error)[:300]}")
        print(f"  {name} failed: {type(error).__name__}: {str(error)[:2000]}", flush=True)
        return None


def configured(kernel, m, n, k, x, default):
    """The configuration the op runs for this call (a stored winner, else ``default``), ``tuned`` set, and its path."""
    stored = autotune.lookup(autotune.config_key(kernel, m, n, k, (x.dtype,), x.device))
    config = dict(stored or default, tuned=stored is not None)
    if config.get("path") in ("gemv", "dequant", "fp16_gemm", "wgmma"):
        return config, ("fused " if config.get("FUSED") else "quantize+") + config["path"]
    if config.get("HALVES"):
        return config, "quantize+halves"
    return config, "fused" if config.get("FUSED") else "quantize+gemm"


def linear_row(fmt, k, n, m, bf16, ours, config_path, peer=None, peer_time=None):
    """The ``linear`` results row; times are (µs, how) pairs, ``config_path`` is ``configured``'s answer."""
    config, path = config_path
    return {"kind": "linear", "format": fmt, "K": k, "N": n, "M": m, "x_dtype": "bfloat16",
            "bf16_us": round(bf16[0], 2) if bf16 else None, "aofunc_us": round(ours[0], 2), "path": path,
            "tuned": config["tuned"], "peer": peer if peer_time else None,
            "peer_us": round(peer_time[0], 2) if peer_time else None,
            "timing": timing_of(bf16=bf16[1] if bf16 else None, aofunc=ours[1],
                                peer=peer_time[1] if peer_time else None),
            "commit": git_commit()}


def bench_shape(k, n, ms, search, torchao_ms, formats, time_us):
    """The rows of one (K, N): a row of each of ``formats`` (``w8a8``, ``8da4w``) for every M."""
    int4 = "8da4w" in formats
    int8 = "w8a8" in formats
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    q, scale = int8_weight(w) if int8 else (None, None)
    q4, scale4 = int4_weight(w, GROUP_SIZE) if int4 else (None, None)
    dev = w.device
    ao = None
    if torchao_ms:
        try:
            ao = torchao_linear(w)
        except Exception as error:  # torchao missing or failing on this card: no torchao peer
            print(f"  torchao unavailable: {type(error).__name__}: {error}", flush=True)
    rows = []
    for m in ms:
        t0 = time.time()
        errors = []
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        if search:
            with autotune.tuning():
                if int8:
                    attempt(errors, "w8a8 search", lambda: w8a8_linear(x, q, scale, None, None))
                if int4:
                    attempt(errors, "8da4w search", lambda: int8_int4_linear(x, q4, scale4, GROUP_SIZE, None))
        bf16 = attempt(errors, "bf16", lambda: time_us(lambda: F.linear(x, w)))
        exact, ours, peer, peer_time = None, None, None, None
        if int8:
            want = w8a8_linear_ref(x, q, scale, None, None)
            exact = attempt(errors, "exact", lambda: bool(torch.equal(w8a8_linear(x, q, scale, None, None), want)))
            ours = attempt(errors, "w8a8", lambda: time_us(lambda: w8a8_linear(x, q, scale, None, None)))
            if m > 16:
                peer, peer_time = "torch._int_mm", attempt(errors, "torch._int_mm",
                                                           lambda: time_us(lambda: torch_w8a8(x, q, scale)))
            if peer_time is None and ao is not None and m in torchao_ms:
                peer, peer_time = torchao_name(), attempt(errors, "torchao",
                                                          lambda: (ao(x), time_us(lambda: ao(x)))[1])
        if ours is not None:
            rows.append(linear_row("w8a8", k, n, m, bf16, ours,
                                   configured("w8a8_linear", m, n, k, x, default_w8a8_config(m, dev, n, k, x.dtype)),
                                   peer, peer_time))
        if int4:
            want4 = int8_int4_linear_ref(x, q4, scale4, GROUP_SIZE, None)
            err4 = attempt(errors, "8da4w error", lambda: float(
                (int8_int4_linear(x, q4, scale4, GROUP_SIZE, None).double() - want4.double()).norm()
                / want4.double().norm()))
            ours4 = attempt(errors, "8da4w", lambda: time_us(lambda: int8_int4_linear(x, q4, scale4, GROUP_SIZE, None)))
            if ours4 is not None:
                default4 = default_int8_int4_config(m, n, k, GROUP_SIZE, x.dtype, scale4.dtype, dev)
                rows.append(linear_row("8da4w", k, n, m, bf16, ours4, configured(
                    f"int8_int4_g{GROUP_SIZE}", m, n, k, x, default4)))
            print(f"  8da4w rel. error {err4}", flush=True)
        print(f"  M={m}: w8a8 exact {exact}; " + "; ".join(
            f"{r['format']} {r['aofunc_us']} µs ({r['path']}{', tuned' if r['tuned'] else ''}), bf16 {r['bf16_us']}, "
            f"{r['peer']} {r['peer_us']}" for r in rows if r["M"] == m) + f" ({time.time() - t0:.1f} s)", flush=True)
    return rows


def table(rows):
    """A markdown table of the rows for the terminal (docs/benchmarks.md is made by benchmarks/render.py)."""
    body = [[r["format"], f"{r['K']}×{r['N']}", str(r["M"]), r["bf16_us"], r["aofunc_us"],
             cell(ratio(r["bf16_us"], r["aofunc_us"]), 2), r["path"] + (" (tuned)" if r["tuned"] else ""),
             r["peer"] or "—", r["peer_us"], cell(ratio(r["peer_us"], r["aofunc_us"]), 2)] for r in rows]
    return markdown_table(["format", "K×N", "M", "bf16 µs", "aofunc µs", "bf16/aofunc", "path", "peer", "peer µs",
                           "peer/aofunc"], body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--search", action="store_true",
                        help="search configurations for every (shape, M) first, into the user kernel cache")
    parser.add_argument("--torchao-m", default="", help="M values at which to time torchao (compiles per M)")
    parser.add_argument("--formats", default="w8a8,8da4w", help="which of w8a8 and 8da4w to run")
    parser.add_argument("--timer", choices=["cold_us", "do_bench"], default="cold_us")
    add_record_options(parser)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    torchao_ms = {int(v) for v in args.torchao_m.split(",") if v}
    print(f"card: {card_name()}", flush=True)
    rows = []
    for k, n in shapes:
        print(f"K={k} N={n}", flush=True)
        done = bench_shape(k, n, ms, args.search, torchao_ms, set(args.formats.split(",")), timer(args.timer))
        recorder(args)(done)
        rows += done
    print(table(rows))


if __name__ == "__main__":
    main()
