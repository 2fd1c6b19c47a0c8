"""Which kernel runs a quantized linear: one table for every format, read top to bottom, first match wins.

A tuned configuration (the user cache, or the table shipped for the card) names its own path and overrides this
table; the table gives each format's default for a problem nobody tuned. Paths:

- ``gemv``: one program per row of x and block of outputs, fp32 multiply-adds, split along K (decode); 8da4w runs
  the W4A16 GEMV on its centered integer activations, each row scaled by its activation scale; W8A8 the int8 GEMV
  (four int8 products a ``dp4a``, int32 sums) on the rows quantized by the per-token kernel.
- ``gemm``: ``tl.dot`` on weight tiles dequantized in registers, split along K when the tiles are too few; 8da4w
  runs the W4A16 tile on its centered integer activations (exact group sums), each row scaled likewise.
- ``fp16_gemm`` (8da4w): the W4A16 tile in packed fp16 pairs on fp16 operands whose products are the twin's
  exactly (centered activations; each weight row's scales divided by a power of two), rows and columns scaled in
  its epilogue.
- ``wgmma`` (W4A16, W8A16, NF4 and 8da4w, only where a search chose it): on Hopper with Triton's Gluon, the
  warpgroup MMA with the dequantized weight tile as its left operand straight from registers and x's tiles brought
  by TMA (wgmma); 16-bit x; W4A16: scales of its dtype, groups of 128 codes; W8A16: K a multiple of 128; NF4:
  blocks of 64 codes, K a multiple of 128; 8da4w: groups of 128 codes, 16-bit scales.
- ``mma`` (W4A16, W8A16 and NF4, only where a search chose it): up to 32 rows of 16-bit x on the warp-level
  m16n8k16 MMA (compute capability 8.0 and up, Triton's Gluon), each warp running its own rows of w with the
  dequantized tile in registers, x's rows loaded into registers (8 rows a tile) or held in shared memory for the
  program (16 or 32; kernels/mma.py); groups (NF4: blocks) of 128 (64) codes over whole 128-deep steps.
- ``dequant``: one kernel writes the float weight, then cuBLAS multiplies (large M, and fp32 x on CUDA).
- ``fused``: activations quantized inside the int8 GEMM; ``two_pass``: a per-token quantization kernel, then the
  int8 GEMM (W8A8 and 8da4w).
- ``halves`` (8da4w): the activations quantized into each group's halves (its even columns, then its odd ones),
  then an int8 GEMM that multiplies the high nibbles' weights by the first half and the low ones' by the second,
  each group's integer sums scaled in fp32 inside the loop.
- ``grouped`` (stacked experts, rows of x sorted by expert as ``torch._grouped_mm`` takes them): one launch for
  every routed expert, tiles of one expert's rows each (the GEMV kernel, a program per row, up to a row an
  expert); ``per_expert``: each expert's rows through that expert's own route above.

Constraints in ``when`` are also checked in code (``fits``); a route whose constraint fails is skipped.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch


class Problem(NamedTuple):
    """What the choice depends on: rows of x, the weight's shape, x's dtype, the device, the format's block
    (int4 group size, NF4 block size; 0 where a format has none)."""

    m: int
    n: int
    k: int
    dtype: torch.dtype
    device: torch.device
    block: int = 0


class Route(NamedTuple):
    format: str
    path: str
    m_max: float  # the largest M this route takes
    when: str  # its constraint, in words
    fits: Callable[[Problem], bool]
    m_min: int = 0  # the smallest M, where it does not start at the end of the format's route before it


def _any(p: Problem) -> bool:
    return True


def _sixteen_bit_or_interpreted(p: Problem) -> bool:
    # fp32 x on CUDA would run tl.dot in tf32, or at a quarter of the rate in IEEE fp32: cuBLAS is better there
    return not (p.dtype == torch.float32 and p.device.type == "cuda")


def _wide_sixteen_bit(p: Problem) -> bool:
    # past 128 rows the GEMM with x copied into the tile's order beats dequantization + cuBLAS on wide weights
    # (H200, 256 rows: W4A16 8192 x 28672 288.8 us against 327.0, 4096 x 14336 65.4 against 85.9; W8A16 281.9 against
    # 358.8 and 78.9 against 91.1) and loses on 4096 x 4096
    return p.n >= 8192 and _sixteen_bit_or_interpreted(p)


def nf4_gemv_fits(k: int, block_size: int) -> bool:
    """Whether the NF4 GEMV can read rows directly: rows start on whole blocks of whole int32 words."""
    return k % block_size == 0 and block_size % 8 == 0


def nf4_gemm_fits(k: int, block_size: int) -> bool:
    """Whether the NF4 GEMM can take whole blocks as steps of K: rows start on whole blocks, and a block is a
    power of two of at least 16 codes (the smallest tl.dot depth)."""
    return k % block_size == 0 and block_size >= 16 and block_size & (block_size - 1) == 0


ROUTES = (
    Route("w4a16", "gemv", 1, "any x", _any),
    Route("w4a16", "gemm", 128, "16-bit x on CUDA (any x under the interpreter)", _sixteen_bit_or_interpreted),
    Route("w4a16", "gemm", 256, "wide weights (N >= 8192), 16-bit x on CUDA (any x under the interpreter)",
          _wide_sixteen_bit, m_min=129),
    Route("w4a16", "dequant", math.inf, "any x", _any),
    Route("w8a16", "gemv", 1, "any x", _any),
    Route("w8a16", "gemm", 128, "16-bit x on CUDA (any x under the interpreter)", _sixteen_bit_or_interpreted),
    Route("w8a16", "gemm", 256, "wide weights (N >= 8192), 16-bit x on CUDA (any x under the interpreter)",
          _wide_sixteen_bit, m_min=129),
    Route("w8a16", "dequant", math.inf, "any x", _any),
    Route("nf4", "gemv", 1, "K a whole number of blocks, blocks of whole words",
          lambda p: nf4_gemv_fits(p.k, p.block)),
    Route("nf4", "gemm", 128, "as gemv, blocks a power of two >= 16, 16-bit x on CUDA",
          lambda p: nf4_gemm_fits(p.k, p.block) and _sixteen_bit_or_interpreted(p)),
    Route("nf4", "dequant", math.inf, "any x", _any),
    Route("w4a16_experts", "grouped", math.inf, "16-bit x on CUDA (any x under the interpreter)",
          _sixteen_bit_or_interpreted),
    Route("w4a16_experts", "per_expert", math.inf, "any x", _any),
    Route("w8a16_experts", "grouped", math.inf, "16-bit x on CUDA (any x under the interpreter)",
          _sixteen_bit_or_interpreted),
    Route("w8a16_experts", "per_expert", math.inf, "any x", _any),
    # the int8 GEMV, all rows of x in one program (H200, 1 to 4 rows: 10.2-11.1 us on 4096 x 4096 and 23.2-24.1 on
    # 14336 x 4096 against 11.7-12.5 and 23.5-25.3 for the int8 GEMM's tuned tiles; 2 rows of 8192 x 28672 60.5
    # against 62.6, 4 rows 64.3 against 61.0)
    Route("w8a8", "gemv", 4, "up to 2 rows; 3 to 4 rows where N <= 4096", lambda p: p.m <= 2 or p.n <= 4096),
    Route("w8a8", "two_pass", math.inf, "any x (fused, or gemv up to 4 rows, only where a search chose it)", _any),
    # from 2 rows of 16-bit x the tile (H200: 1.68x bf16 at 5 rows of 8192 x 28672, one 16-row tile as for 2 to 4
    # rows, against 1.67x for the GEMV at 2 rows, two a program, and 0.74x at 4); fp32 x on CUDA keeps the GEMV
    # up to 4 rows
    Route("8da4w", "gemv", 4, "one row of any x; 2 to 4 rows of fp32 x on CUDA",
          lambda p: p.m <= 1 or not _sixteen_bit_or_interpreted(p)),
    # (to 128 rows: H200, 128 rows of 4096 x 14336, 14336 x 4096 and 8192 x 28672 in 40.1, 50.1 and 134.9 us
    # against 57.8, 64.9 and 167.6 for fp16_gemm, with x quantized into the tile's order)
    Route("8da4w", "gemm", 128, "16-bit x on CUDA (any x under the interpreter)", _sixteen_bit_or_interpreted,
          m_min=2),
    # from 129 to 512 rows of weights narrower than 16384 the int8 HALVES tile, in groups of 64 codes and up (H200,
    # the searches' winner at 256 rows on 4096 x 4096, 4096 x 14336 and 14336 x 4096: 28.9, 78.4 and 83.9 us
    # against 40.5, 88.7 and 100.3 for fp16_gemm; at 512 rows on 4096 x 4096 and 4096 x 14336, 42.5 and 128.5
    # against 54.1 and 128.6)
    Route("8da4w", "halves", 512, "groups of 64 codes and up, N < 16384, any x",
          lambda p: p.block >= 64 and p.n < 16384, m_min=129),
    # else from 65 rows (fp32 x) or 129, W4A16's tile in packed fp16 pairs (or x-ordered) on operands that hold the
    # twin's numbers exactly (H200: 8192 x 28672 at 256, 512 and 2048 rows 237.9, 460.4 and 1552.2 us against
    # 438.1, 867.8 and 3309 for the int8 GEMM, whose per-group rescale runs in its loop; the HALVES tile 257.7 and
    # 889.5 at 256 and 1024 rows against 238.2 and 807.5 in the same runs); past 256 rows on wide weights only
    Route("8da4w", "fp16_gemm", 256, "any x", _any, m_min=65),
    Route("8da4w", "fp16_gemm", math.inf, "wide weights (N >= 8192), any x", lambda p: p.n >= 8192, m_min=257),
    # the int8 GEMM: fp32 x on CUDA from 5 to 64 rows
    Route("8da4w", "two_pass", 64, "any x (fused only where a search chose it)", _any),
    # else past 256 rows cuBLAS on those operands (H200, 14336 x 4096: the searches' winner at 512 and 2048 rows,
    # 148.5 and 428.4 us)
    Route("8da4w", "dequant", math.inf, "any x", _any),
)


def default_path(fmt: str, problem: Problem) -> str:
    """The path of the first route of ``fmt`` whose M range and constraint admit ``problem``."""
    for route in ROUTES:
        if route.format == fmt and route.m_min <= problem.m <= route.m_max and route.fits(problem):
            return route.path
    raise ValueError(f"no kernel route for format {fmt!r}: expected one of {sorted({r.format for r in ROUTES})}")


def routes_table() -> str:
    """The routes as a markdown table (format, path, rows of x, constraint), for the docs. A route with its own
    m_min starts there; any other starts after the last such route of its format (rows that the routes with an
    m_min of their own decline go on to the next)."""
    lines = ["| format | path | rows of x | when |", "|---|---|---|---|"]
    low = {}
    for route in ROUTES:
        first = route.m_min or low.get(route.format, 1)
        if math.isinf(route.m_max):
            rows = f"{first} and up"
        else:
            rows = str(first) if first == route.m_max else f"{first} to {int(route.m_max)}"
        lines.append(f"| {route.format} | {route.path} | {rows} | {route.when} |")
        if not math.isinf(route.m_max) and not route.m_min:
            low[route.format] = int(route.m_max) + 1
    return "\n".join(lines)
