"""Stacked experts: one MoE layer's grouped product, quantized, against bf16 ``torch._grouped_mm``, on one card.

    python benchmarks/bench_moe.py --formats w4a16,w8a16 --tokens 1,8,32,128,512
    python benchmarks/render.py            # the tables of docs/benchmarks.md from benchmarks/results/

The layer is Mixtral-8x7B's (8 experts, top 2, hidden 4096, intermediate 14336): ``gate_up`` multiplies the routed
rows by [E, 2·14336, 4096], ``down`` by [E, 4096, 14336]. A batch of T tokens routes 2·T rows, sorted by expert as
transformers' ``grouped_mm`` experts sort them; the routing is random and balanced in expectation (seeded). bf16 is
``torch._grouped_mm`` on the bf16 stack, what transformers runs unquantized; aofunc is the same call on the
quantized stack (the grouped kernel); ``loop_us`` times one ``aofunc.qlinear`` call per expert that received rows
(the alternative to a grouped kernel). Times are ``cold_us`` (CUDA graphs, L2 cold). Each measurement is a ``moe``
row recorded with ``common.record_rows`` into ``benchmarks/results/<card>.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (add_record_options, card_name, git_commit, markdown_table, ratio, recorder, timed_us,  # noqa: E402
                    timing_of)
from common import fmt as cell  # noqa: E402

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 8, 2, 4096, 14336
#: variant -> (N, K) of one expert
VARIANTS = {"gate_up": (2 * INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}
SCHEMES = {"w4a16": lambda aofunc: aofunc.Int4WeightOnly(128), "w8a16": lambda aofunc: aofunc.Int8WeightOnly()}


def routed_offsets(tokens: int, experts: int = EXPERTS, top_k: int = TOP_K, seed: int = 0) -> torch.Tensor:
    """End offsets [E] (int32) of the rows each expert receives when `tokens` tokens pick `top_k` distinct experts
    at random (the rows of x sorted by expert, as transformers' grouped_mm experts sort them)."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(tokens, experts, generator=g).topk(top_k, dim=1).indices.reshape(-1)
    return torch.bincount(picks, minlength=experts).cumsum(0).to(torch.int32)


def grouped_path(tokens: int, experts: int = EXPERTS, top_k: int = TOP_K) -> str:
    """The kernel the grouped product takes for this many routed rows: "gemv" (a program per row) or "grouped"
    (tiles of each expert's rows)."""
    from aofunc.kernels.tiles import grouped_by_rows
    return "gemv" if grouped_by_rows(tokens * top_k, experts) else "grouped"


def moe_row(fmt, variant, tokens, n, k, times, x_dtype="bfloat16"):
    """The ``moe`` results row (benchmarks/common.py) of one measurement; times: {"bf16" | "aofunc": (µs, how)}."""
    return {"kind": "moe", "format": fmt, "variant": variant, "experts": EXPERTS, "top_k": TOP_K, "K": k, "N": n,
            "M": tokens * TOP_K, "batch": tokens, "x_dtype": x_dtype, "bf16_us": round(times["bf16"][0], 2),
            "aofunc_us": round(times["aofunc"][0], 2),
            "loop_us": round(times["loop"][0], 2) if "loop" in times else None, "path": grouped_path(tokens),
            "peer": None, "peer_us": None, "timing": timing_of(**{name: how for name, (_, how) in times.items()}),
            "commit": git_commit()}


def bench(fmts, tokens_list, record=lambda rows: None):
    """Time every (variant, format, tokens); returns the rows, each (variant, format) passed to ``record`` when done."""
    import aofunc

    rows = []
    for variant, (n, k) in VARIANTS.items():
        w = torch.randn(EXPERTS, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for name in fmts:
            q = aofunc.quantize({"experts.w": w}, aofunc.Spec([aofunc.Rule("experts.w", SCHEMES[name](aofunc))]))
            q = q["experts.w"]
            done = []
            for tokens in tokens_list:
                offs = routed_offsets(tokens).cuda()
                x = torch.randn(tokens * TOP_K, k, device="cuda", dtype=torch.bfloat16)
                ends = offs.tolist()
                spans = [(e, start, end) for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)) if end > start]
                experts = [q[e] for e, _, _ in spans]  # indexed once, as a per-expert loop would hold them

                def loop():
                    return [aofunc.qlinear(x[start:end], qe) for qe, (_, start, end) in zip(experts, spans)]

                times = {"bf16": timed_us(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)),
                         "aofunc": timed_us(lambda: torch._grouped_mm(x, q.transpose(-2, -1), offs=offs)),
                         "loop": timed_us(loop)}
                done.append(moe_row(name, variant, tokens, n, k, times))
                print(f"{name} {variant} tokens={tokens}: bf16 {done[-1]['bf16_us']:.1f} aofunc "
                      f"{done[-1]['aofunc_us']:.1f} loop of qlinear {done[-1]['loop_us']:.1f}", flush=True)
            record(done)
            rows += done
    return rows


def table(rows):
    body = [[r["format"], r["variant"], str(r["batch"]), str(r["M"]), r["bf16_us"], r["aofunc_us"], r["loop_us"],
             cell(ratio(r["bf16_us"], r["aofunc_us"]), 2)] for r in rows]
    return markdown_table(["format", "variant", "tokens", "rows", "bf16 µs", "aofunc µs", "qlinear loop µs",
                           "bf16/aofunc"], body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="w4a16,w8a16")
    parser.add_argument("--tokens", default="1,8,32,128,512")
    add_record_options(parser)
    args = parser.parse_args(argv)
    record = recorder(args)
    torch.manual_seed(0)
    print(f"card: {card_name()}, torch {torch.__version__}", flush=True)
    rows = bench(args.formats.split(","), [int(t) for t in args.tokens.split(",")], record)
    print(table(rows))


if __name__ == "__main__":
    main()
