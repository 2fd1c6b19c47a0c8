"""Per-token activation quantization inside kernels: the jitted pieces shared by the quantization kernels and the
linears that quantize x themselves (W8A8's int8 GEMV, 8da4w's GEMV). Every division is IEEE-rounded fp32 and
every rounding is half to even, so each piece equals the plain-torch twins of ``w8a8`` and ``int8_int4``.
"""
from __future__ import annotations

import torch

from .tiles import load_x
from .triton_compat import tl, triton

# 8da4w's smallest activation scale: float32 machine epsilon (EPS_F32 the same, for kernel bodies).
EPS = torch.finfo(torch.float32).eps
EPS_F32: tl.constexpr = tl.constexpr(EPS)

# A per-token quantization kernel runs one program a row: the whole row in one block up to one_pass_max columns
# (ONE_PASS_MAX_K by default), wider rows in two passes (the row's extremes, then its codes) of TWO_PASS_BLOCK_K
# columns on 16 warps. On an H200 (bf16 x, 14336 columns) two passes of 2048 took 40.1 us for 2048 rows, 14.4 for
# 512 and 8.8 for 256, where one block of 16384 on 16 warps took 51.2, 16.4 and 9.7 (the same codes).
ONE_PASS_MAX_K = 8192
TWO_PASS_BLOCK_K = 2048


def per_token_block(width: int, block_k=None, minimum: int = 1, one_pass_max: int = ONE_PASS_MAX_K) -> tuple:
    """(BLOCK_K, num_warps, ONE_PASS) for a per-token quantization kernel over rows of ``width`` columns:
    ``block_k`` if given, else the whole row up to ``one_pass_max`` columns and TWO_PASS_BLOCK_K past it; at least
    ``minimum``."""
    one_pass_k = triton.next_power_of_2(max(width, 1))
    block_k = max(block_k or (one_pass_k if one_pass_k <= one_pass_max else TWO_PASS_BLOCK_K), minimum)
    one_pass = block_k >= width
    if one_pass:
        return block_k, (4 if block_k <= 2048 else 8 if block_k <= 8192 else 16), True
    return block_k, (16 if block_k >= TWO_PASS_BLOCK_K else 4), False


@triton.jit
def round_half_even(x):
    """rint(x) for fp32 |x| < 2**22: adding and removing 1.5 * 2**23 rounds to an integer, ties to even.

    IEEE adds round to nearest even, so this equals ``torch.round`` on the GPU and under Triton's interpreter,
    where libdevice is unavailable. Every caller's argument is bounded by a few hundred.
    """
    return (x + 12582912.0) - 12582912.0


@triton.jit
def asym_qparams(x_min, x_max, EPS_: tl.constexpr):
    """8da4w's per-token (s, zp) from a row's min(x, 0) and max(x, 0), in fp32 exactly as the twin rounds them:
    s = max((x_max - x_min) / 255, eps), zp = clamp(round(-128 - x_min / s), -128, 127)."""
    s = tl.maximum(tl.div_rn(x_max - x_min, tl.full(x_min.shape, 255.0, tl.float32)), EPS_)
    zp = round_half_even(-128.0 - tl.div_rn(x_min, s))
    return s, tl.minimum(tl.maximum(zp, -128.0), 127.0)


@triton.jit
def asym_quantize(x, s, zp):
    """clamp(round(x / s) + zp, -128, 127) as int8, with s and zp broadcast to x."""
    q = round_half_even(tl.div_rn(x, tl.broadcast_to(s, x.shape))) + zp
    return tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)


@triton.jit
def asym_centered(x, s, zp):
    """xq - zp for fp32 x: the centered integer activation (-255..255) in fp32; 0 stays 0."""
    return asym_quantize(x, s, zp).to(tl.float32) - zp


@triton.jit
def row_asym_qparams(x_row, K, stride_xk, EPS_: tl.constexpr, BLOCK: tl.constexpr):
    """(s, zp) of one row of x (K values from x_row), read BLOCK at a time, each block reduced as it comes."""
    offs = tl.arange(0, BLOCK)
    lo = 0.0
    hi = 0.0
    for k0 in range(0, K, BLOCK):
        x = load_x(x_row, k0 + offs, stride_xk, K, False)
        lo = tl.minimum(lo, tl.min(x, axis=0))
        hi = tl.maximum(hi, tl.max(x, axis=0))
    return asym_qparams(lo, hi, EPS_)
