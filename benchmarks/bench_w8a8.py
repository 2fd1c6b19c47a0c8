"""Benchmark: W8A8 (int8 dynamic) and 8da4w linears against bf16 cuBLAS, torch._int_mm and torchao, one card.

    python benchmarks/bench_w8a8.py --search --torchao-m 1,16,128,2048 --json out.json --markdown out.md

Every time is the median of ``triton.testing.do_bench`` with L2 flushed (benchmarks/common.py), in µs,
activation quantization included for every int8 path. Columns:
- ``bf16``: ``F.linear(x, w)`` with bf16 weights (cuBLAS);
- ``int_mm``: ``torch._int_mm(xq, q.t())`` alone (cuBLAS int8, M > 16 only), and ``torch path``: the same after an
  eager per-token quantization, with the scales applied by eager torch;
- ``ours``: ``aofunc.kernels.w8a8.w8a8_linear`` with its default configuration, and ``ours tuned``: the fastest
  configuration an autotuning search found (every candidate checked against the twin first);
- ``torchao``: torchao 0.17 ``Int8DynamicActivationInt8WeightConfig`` applied by ``quantize_`` to an ``nn.Linear``,
  compiled with ``torch.compile``;
- ``8da4w``: ``int8_int4_linear`` at group size 128, default and tuned.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import card_name, markdown_table, median_us, ratio  # noqa: E402

from aofunc.kernels import autotune  # noqa: E402
from aofunc.kernels.int8_int4 import (  # noqa: E402
    int8_int4_candidates,
    int8_int4_linear,
    int8_int4_linear_ref,
    int8_int4_linear_triton,
)
from aofunc.kernels.int_mm import int_mm_ref  # noqa: E402
from aofunc.kernels.w8a8 import (  # noqa: E402
    quantize_per_token_int8_ref,
    w8a8_candidates,
    w8a8_linear,
    w8a8_linear_ref,
    w8a8_linear_triton,
)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # K x N
MS = [1, 2, 4, 8, 16, 32, 64, 128, 2048]
GROUP_SIZE = 128


def int8_weight(w):
    """Per output channel symmetric int8 (FEATURES.md): scale = max(amax / 127.5, eps), q = round(w / scale)."""
    amax = w.float().abs().amax(dim=1)
    scale = (amax / 127.5).clamp(min=torch.finfo(torch.float32).eps).to(w.dtype)
    q = torch.clamp(torch.round(w.float() / scale.float()[:, None]), -128, 127).to(torch.int8)
    return q, scale


def int4_weight(w, group_size):
    """Symmetric groupwise int4 (FEATURES.md 8da4w) packed as nibbles u = q + 8, first code in the high nibble."""
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


def quick_us(fn):
    return median_us(fn, warmup_ms=5, rep_ms=20)


def tuned(candidates, run, reference, tolerance):
    """(best µs, best config, number of rejected candidates) of a checked search."""
    best, trials = autotune.search(candidates, run, reference, tolerance, timer=quick_us)
    rejected = [t for t in trials if t.us is None]
    for t in rejected:
        print(f"    rejected {t.config}: {t.reason}", flush=True)
    if best is None:
        return None, None, len(rejected)
    return median_us(lambda: run(best)), best, len(rejected)


def attempt(row, names, measure):
    """Store measure() under names in row; a failure is printed and stored as an error, the rest goes on."""
    try:
        value = measure()
    except Exception as error:  # one failing path must not lose the other measurements of the run
        row.setdefault("errors", []).append(f"{names}: {type(error).__name__}: {str(error)[:300]}")
        print(f"  {names} failed: {type(error).__name__}: {str(error)[:2000]}", flush=True)
        return
    if isinstance(names, tuple):
        row.update(zip(names, value))
    else:
        row[names] = value


def bench_shape(k, n, ms, search, torchao_ms, int4):
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    q, scale = int8_weight(w)
    q4, scale4 = int4_weight(w, GROUP_SIZE) if int4 else (None, None)
    ao = None
    if torchao_ms:
        try:
            ao = torchao_linear(w)
        except Exception as error:  # torchao missing or failing on this card: its column stays empty
            print(f"  torchao unavailable: {type(error).__name__}: {error}", flush=True)
    rows = []
    for m in ms:
        t0 = time.time()
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        r = {"k": k, "n": n, "m": m}
        attempt(r, "bf16", lambda: median_us(lambda: F.linear(x, w)))
        want = w8a8_linear_ref(x, q, scale, None, None)
        attempt(r, "exact", lambda: bool(torch.equal(w8a8_linear(x, q, scale, None, None), want)))
        attempt(r, "ours", lambda: median_us(lambda: w8a8_linear(x, q, scale, None, None)))
        if m > 16:
            xq, _ = quantize_per_token_int8_ref(x, None)
            attempt(r, "int_mm", lambda: median_us(lambda: torch._int_mm(xq, q.t())))
            attempt(r, "int_mm_exact_tn", lambda: bool(torch.equal(torch._int_mm(xq, q.t()), int_mm_ref(xq, q.t()))))
            attempt(r, "torch_path", lambda: median_us(lambda: torch_w8a8(x, q, scale)))
        if search:
            attempt(r, ("ours_tuned", "config", "rejected"), lambda: tuned(
                w8a8_candidates(m), lambda c: w8a8_linear_triton(x, q, scale, None, None, c), want, 1e-6))
        if ao is not None and m in torchao_ms:
            attempt(r, "torchao", lambda: (ao(x), median_us(lambda: ao(x)))[1])
        if int4:
            want4 = int8_int4_linear_ref(x, q4, scale4, GROUP_SIZE, None)
            attempt(r, "int4_err", lambda: float(
                (int8_int4_linear(x, q4, scale4, GROUP_SIZE, None).double() - want4.double()).norm()
                / want4.double().norm()))
            attempt(r, "int4", lambda: median_us(lambda: int8_int4_linear(x, q4, scale4, GROUP_SIZE, None)))
            if search:
                attempt(r, ("int4_tuned", "int4_config", "int4_rejected"), lambda: tuned(
                    int8_int4_candidates(m),
                    lambda c: int8_int4_linear_triton(x, q4, scale4, GROUP_SIZE, None, c), want4, 1e-3))
        print(f"  {json.dumps(r)}  ({time.time() - t0:.1f} s)", flush=True)
        rows.append(r)
    return rows


def best_of(r, *names):
    values = [r.get(name) for name in names if r.get(name) is not None]
    return min(values) if values else None


def markdown(rows, card):
    """The results table: µs, and ratios ``baseline / ours`` (> 1: ours is faster)."""
    headers = ["K×N", "M", "bf16 µs", "W8A8 default µs", "W8A8 best µs", "×bf16", "int_mm alone µs",
               "torch path µs", "×torch path", "torchao µs", "×torchao", "8da4w best µs", "8da4w ×bf16"]
    body = []
    for r in rows:
        ours = best_of(r, "ours", "ours_tuned")
        int4 = best_of(r, "int4", "int4_tuned")
        torchao_failed = any(e.startswith("torchao") for e in r.get("errors", []))
        body.append([f"{r['k']}×{r['n']}", str(r["m"]), r.get("bf16"), r.get("ours"), ours,
                     ratio(r.get("bf16"), ours), r.get("int_mm"), r.get("torch_path"),
                     ratio(r.get("torch_path"), ours), "fails" if torchao_failed else r.get("torchao"),
                     ratio(r.get("torchao"), ours), int4, ratio(r.get("bf16"), int4)])
    for row in body:
        for i in (5, 8, 10, 12):
            row[i] = "—" if row[i] is None else f"{row[i]:.2f}"
    return f"Card: {card}.\n\n" + markdown_table(headers, body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--search", action="store_true", help="time every candidate configuration")
    parser.add_argument("--torchao-m", default="", help="M values at which to time torchao (compiles per M)")
    parser.add_argument("--no-int4", action="store_true", help="skip the 8da4w kernel")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--markdown", help="write the results table here")
    parser.add_argument("--table-from", help="only print the table of an earlier --json file")
    args = parser.parse_args()
    if args.table_from:
        with open(args.table_from) as f:
            data = json.load(f)
        print(markdown(data["rows"], data["card"]))
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    torchao_ms = {int(v) for v in args.torchao_m.split(",") if v}
    card = card_name()
    print(f"card: {card}", flush=True)
    rows = []
    for k, n in shapes:
        print(f"K={k} N={n}", flush=True)
        rows += bench_shape(k, n, ms, args.search, torchao_ms, not args.no_int4)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"card": card, "rows": rows}, f, indent=1)
    text = markdown(rows, card)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
