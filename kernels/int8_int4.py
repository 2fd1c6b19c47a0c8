"""8da4w: per-token asymmetric int8 activations times symmetric groupwise int4 weights, integer accumulation.

Math (per-token statistics in fp32, eps = float32 machine epsilon, round half to even):

    s[m]      = max((max(x[m], 0) - min(x[m], 0)) / 255, eps)
    zp[m]     = clamp(round(-128 - min(x[m], 0) / s[m]), -128, 127)
    xq[m, k]  = clamp(round(x[m, k] / s[m]) + zp[m], -128, 127)
    y[m, n]   = (s[m] * sum_g scale[n, g] * sum_{k in g} (xq[m, k] - zp[m]) * (u[n, k] - 8)).to(x.dtype) + bias[n]

The weight is ``qdata`` uint8 [N, Kp / 2] of nibbles u = q + 8 (first code in the high nibble), Kp = K rounded up
to the group size g in {32, 64, 128, 256}, and ``scale`` [N, Kp / g]. Inside a group the sum is an exact integer
(computed as xq . w - zp * sum(w), w = u - 8, on int8 tensor cores); across groups it is fp32. The paths on W4A16's
kernels (the GEMV and the GEMM tiles on the centered activations xq - zp; fp16_gemm, and wgmma on Hopper, on
exact_fp16_operands) add the bias in fp32 before their one rounding to x.dtype.

Public ops (``torch.ops.aofunc.*``; CUDA runs Triton, other devices the plain-torch twin):
``quantize_per_token_asym_int8(x) -> (xq, s, zp)`` and ``int8_int4_linear(x, qdata, scale, group_size, bias)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import autotune, w4a16
from .activations import EPS, ONE_PASS_MAX_K, asym_qparams, asym_quantize, per_token_block
from .packing import GROUP_SIZES, unpack_uint4
from .selector import Problem, default_path
from .tiles import (BLOCK_K_WGMMA, fragment_column_of, fragment_tile_fits, grouped_tile, interpreting, split_k,
                    unit_stride, wgmma_configs, wgmma_device_refusal, wgmma_runs)
from .w8a8 import check_activation, check_vector
from .triton_compat import tl, triton

# The widest row of up to 64 rows of centered activations quantized in one block.
CENTERED_ONE_PASS_MAX_K = 16384


@triton.jit
def _quantized(x, s, zp, xq_ptr, CENTERED: tl.constexpr):
    """What the quantization kernel stores for x: xq (int8), or with CENTERED xq - zp in xq_ptr's float dtype (the
    integers -255..255, exact in every float dtype)."""
    q = asym_quantize(x, s, zp)
    if CENTERED:
        return (q.to(tl.float32) - zp).to(xq_ptr.dtype.element_ty)
    else:
        return q


# The orders in which the quantization kernel may store a row's columns (its ORDER): in place, in the W4A16 tiles'
# fragment order, in each group's halves.
FRAGMENT_ORDER: tl.constexpr = tl.constexpr(1)
HALVES_ORDER: tl.constexpr = tl.constexpr(2)


@triton.jit
def _store_row_block(q_row, k0, q, KP, ORDER: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store the quantized values q of a row's columns k0 .. k0 + BLOCK_K - 1 (those below KP): in place; at their
    position in the W4A16 tiles' fragment order (an involution within every 32 columns); or in halves, each GROUP
    columns' even columns first and their odd columns after them (the high and the low nibbles of the group's bytes
    of codes), each half one contiguous run."""
    if ORDER == HALVES_ORDER:
        even, odd = tl.split(tl.reshape(q, (BLOCK_K // GROUP, GROUP // 2, 2)))
        cols = k0 + tl.arange(0, BLOCK_K // GROUP)[:, None] * GROUP + tl.arange(0, GROUP // 2)[None, :]
        tl.store(q_row + cols, even, mask=cols < KP)
        tl.store(q_row + cols + GROUP // 2, odd, mask=cols < KP)
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        if ORDER == FRAGMENT_ORDER:
            tl.store(q_row + fragment_column_of(cols), q, mask=cols < KP)
        else:
            tl.store(q_row + cols, q, mask=cols < KP)


@triton.jit
def _quantize_per_token_asym_int8_kernel(
    x_ptr, xq_ptr, s_ptr, zp_ptr,
    K, KP, stride_xm, stride_xk, stride_qm,
    EPS_: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_K: tl.constexpr, CENTERED: tl.constexpr,
    ORDER: tl.constexpr, GROUP: tl.constexpr,
):
    # Rows of xq are KP >= K columns wide, the columns past K stored as the quantized zero (centered: 0), in the
    # ORDER of _store_row_block (BLOCK_K a multiple of its GROUP).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        s, zp = asym_qparams(tl.minimum(tl.min(x, axis=0), 0.0), tl.maximum(tl.max(x, axis=0), 0.0), EPS_)
        _store_row_block(q_row, 0, _quantized(x, s, zp, xq_ptr, CENTERED), KP, ORDER, GROUP, BLOCK_K)
    else:
        lo = tl.zeros((BLOCK_K,), dtype=tl.float32)
        hi = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, x)
            hi = tl.maximum(hi, x)
        s, zp = asym_qparams(tl.min(lo, axis=0), tl.max(hi, axis=0), EPS_)
        for k0 in range(0, KP, BLOCK_K):
            cols = k0 + offs
            x = tl.load(x_row + cols * stride_xk, mask=cols < K, other=0.0).to(tl.float32)
            _store_row_block(q_row, k0, _quantized(x, s, zp, xq_ptr, CENTERED), KP, ORDER, GROUP, BLOCK_K)
    tl.store(s_ptr + row, s)
    tl.store(zp_ptr + row, zp.to(tl.int32))


@triton.jit
def _int8_int4_matmul_kernel(
    a_ptr, sx_ptr, zp_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_am, stride_ak, stride_qn, stride_qk, stride_sn, stride_sg, stride_ym, stride_yn,
    QUANTIZE_A: tl.constexpr, HAS_BIAS: tl.constexpr, EPS_: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y tile = s_x * sum_g scale_g * (A_g . W_g - zp * sum_k W_g); A is xq, or float x quantized here."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, GROUP)
    offs_b = tl.arange(0, GROUP // 2)
    a_rows = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am
    q_rows = q_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_qn
    s_rows = scale_ptr + (offs_n % N).to(tl.int64) * stride_sn
    num_groups = tl.cdiv(K, GROUP)

    if QUANTIZE_A:
        lo = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
        hi = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
        for g in range(0, num_groups):
            k_mask = g * GROUP + offs_k < K
            x = tl.load(a_rows + (g * GROUP + offs_k)[None, :] * stride_ak, mask=k_mask[None, :], other=0.0)
            lo = tl.minimum(lo, x.to(tl.float32))
            hi = tl.maximum(hi, x.to(tl.float32))
        sx, zp_f = asym_qparams(tl.min(lo, axis=1), tl.max(hi, axis=1), EPS_)
        zp = zp_f.to(tl.int32)
    else:
        sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
        zp = tl.load(zp_ptr + offs_m, mask=mask_m, other=0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, num_groups):
        k_mask = g * GROUP + offs_k < K
        a = tl.load(a_rows + (g * GROUP + offs_k)[None, :] * stride_ak, mask=k_mask[None, :], other=0)
        if QUANTIZE_A:
            a = asym_quantize(a.to(tl.float32), sx[:, None], zp_f[:, None])
        packed = tl.load(q_rows + (g * (GROUP // 2) + offs_b)[None, :] * stride_qk)
        w = tl.interleave((packed >> 4).to(tl.int8), (packed & 15).to(tl.int8)) - 8
        w = tl.where(k_mask[None, :], w, 0).to(tl.int8)
        isum = tl.dot(a, tl.trans(w), out_dtype=tl.int32) - zp[:, None] * tl.sum(w.to(tl.int32), axis=1)[None, :]
        scale = tl.load(s_rows + g * stride_sg).to(tl.float32)
        acc += isum.to(tl.float32) * scale[None, :]

    y = (acc * sx[:, None]).to(y_ptr.dtype.element_ty)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + bias[None, :]).to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, y, mask=mask_m[:, None] & mask_n[None, :])


# The fp32 bits of 1.5 * 2^23, whose float step is 1: an int32 sum t, |t| < 2^22, added to them is the float
# 1.5 * 2^23 + t, so t becomes fp32 in two full-rate additions (the integer one, then subtracting MAGIC_FLOAT)
# where a conversion instruction runs at a quarter of the rate or less.
MAGIC_BITS: tl.constexpr = tl.constexpr(0x4B400000)
MAGIC_FLOAT: tl.constexpr = tl.constexpr(12582912.0)
# Four bytes of codes to the four signed weights u - 8 of their high nibbles, or of their low ones: with u in
# 0..15, (u + 0x78) ^ 0x80 is u - 8 as a two's complement byte, and no byte carries into the next.
HIGH_NIBBLES_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; add.u32 t, t, 0x78787878; "
    "xor.b32 $0, t, 0x80808080; }")
LOW_NIBBLES_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .b32 t; and.b32 t, $1, 0x0F0F0F0F; add.u32 t, t, 0x78787878; xor.b32 $0, t, 0x80808080; }")


@triton.jit
def _nibble_weights(packed, ASM: tl.constexpr):
    """(high, low): int8 tiles of the weights u - 8 of the high and of the low nibbles of the uint8 tile ``packed``,
    four bytes an instruction sequence in inline PTX on CUDA."""
    if ASM:
        high = tl.inline_asm_elementwise(HIGH_NIBBLES_PTX, "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
        low = tl.inline_asm_elementwise(LOW_NIBBLES_PTX, "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    else:
        high = ((packed >> 4).to(tl.int32) - 8).to(tl.int8)
        low = ((packed & 15).to(tl.int32) - 8).to(tl.int8)
    return high, low


@triton.jit
def _int8_int4_halves_kernel(
    xq_ptr, sx_ptr, zp_ptr, q_ptr, scale_ptr, wsum_ptr, bias_ptr, y_ptr,
    M, N, num_groups,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y tile = s_x * sum_g scale_g * (xq_g . w_g - zp * wsum_g), xq in halves order (a group's even columns, then
    its odd ones), so each group is two int8 dots: its high nibbles' weights on the first half of xq's group, its
    low nibbles' on the second. The tile is computed as w @ xq.T, the weights the MMA's left operand, from
    registers. Each group's int32 sums start from MAGIC_BITS - zp * wsum_g and leave the MMA as the bits of an
    exact fp32 number."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    HALF: tl.constexpr = GROUP // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    # Out-of-range rows and columns wrap onto valid ones so the loop needs no masks; they are never stored.
    load_m = (offs_m % M).to(tl.int64)
    load_n = (offs_n % N).to(tl.int64)
    x_ptrs = xq_ptr + load_m[:, None] * stride_xm + offs_h[None, :]
    q_ptrs = q_ptr + load_n[:, None] * stride_qn + offs_h[None, :]
    zp = tl.load(zp_ptr + load_m)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(0, num_groups):
        high, low = _nibble_weights(tl.load(q_ptrs + g * HALF), ASM)
        even = tl.load(x_ptrs + g * GROUP)
        odd = tl.load(x_ptrs + g * GROUP + HALF)
        wsum = tl.load(wsum_ptr + load_n * stride_wn + g)
        scale = tl.load(scale_ptr + load_n * stride_sn + g * stride_sg).to(tl.float32)
        sums = tl.dot(high, tl.trans(even), MAGIC_BITS - wsum[:, None] * zp[None, :], out_dtype=tl.int32)
        sums = tl.dot(low, tl.trans(odd), sums, out_dtype=tl.int32)
        acc += (sums.to(tl.float32, bitcast=True) - MAGIC_FLOAT) * scale[:, None]
    acc = tl.trans(acc)
    y = (acc * tl.load(sx_ptr + load_m)[:, None]).to(y_ptr.dtype.element_ty)
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + bias[None, :]).to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :]
    tl.store(y_ptrs, y, mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _group_code_sums_kernel(w_ptr, out_ptr, R, WORDS: tl.constexpr, BLOCK_R: tl.constexpr):
    # out[r] = the sum of the weights u - 8 of the r-th run of WORDS int32 words (a group's 8 * WORDS codes): a word's
    # two nibbles of each byte added bytewise (at most 30 a byte), its four byte sums added by one multiply (the top
    # byte of w * 0x01010101, at most 120)
    runs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.load(w_ptr + runs.to(tl.int64)[:, None] * WORDS + tl.arange(0, WORDS)[None, :], mask=(runs < R)[:, None],
                other=0)
    bytes_ = (w & 0x0F0F0F0F) + ((w >> 4) & 0x0F0F0F0F)
    tl.store(out_ptr + runs, tl.sum((bytes_ * 0x01010101) >> 24, axis=1) - 64 * WORDS, mask=runs < R)


def group_code_sums_ref(qdata: torch.Tensor, group_size: int) -> torch.Tensor:
    """int32 [N, groups]: each group's sum of its weights u - 8 (the term the activations' zero point multiplies)."""
    w = unpack_uint4(qdata).to(torch.int32) - 8
    return w.view(qdata.shape[0], -1, group_size).sum(dim=2, dtype=torch.int32)


def group_code_sums_triton(qdata: torch.Tensor, group_size: int) -> torch.Tensor:
    """group_code_sums_ref's sums by Triton, over the codes as int32 words, a program per 256 groups."""
    n, groups = qdata.shape[0], qdata.shape[1] * 2 // group_size
    out = torch.empty(n, groups, device=qdata.device, dtype=torch.int32)
    if n and groups:
        block_r = 256
        _group_code_sums_kernel[(triton.cdiv(n * groups, block_r),)](
            qdata.contiguous().view(torch.int32), out, n * groups, WORDS=group_size // 8, BLOCK_R=block_r)
    return out


# A configuration (kernels/autotune.py's ``Config``) is the kernel's launch meta-parameters plus ``FUSED``:
# True quantizes the activations inside the GEMM, False in their own kernel first. The K step is one group.
INTERPRETER_CONFIG = {"FUSED": False, "BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
# Largest M for which a search tries quantizing the activations inside the GEMM.
FUSED_MAX_M = 32
# Largest M for which a search tries the W4A16 GEMM tile on the centered activations.
GEMM_MAX_M = 128
# A search tries the W4A16 GEMM tile in packed fp16 pairs on exact fp16 operands past this M.
FP16_GEMM_MIN_M = 32
# The rows for which a search tries the HALVES tile.
HALVES_MIN_M, HALVES_MAX_M = 65, 1024


def _config(fused, block_m, block_n, group_m, num_warps, num_stages) -> dict:
    return {"FUSED": fused, "BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_M": group_m, "num_warps": num_warps,
            "num_stages": num_stages}


# Default tiles by M bucket on Hopper: the winners of benchmarks/bench_w8a8.py's searches on an H100
# (docs/benchmarks.md), each shown correct by the tests.
_CUDA_CONFIGS = (
    (16, _config(False, 16, 32, 1, 4, 4)),
    (32, _config(False, 32, 16, 1, 4, 4)),
    (64, _config(False, 64, 16, 1, 4, 4)),
    (128, _config(False, 128, 64, 8, 4, 4)),
)
_CUDA_LARGE_M_CONFIG = _config(False, 128, 64, 8, 4, 4)


def int8_tile_default(m: int, device: torch.device) -> dict:
    """The int8 GEMM's tile for an M-row call on ``device`` (the two_pass route's default)."""
    return autotune.config_for_m(m, device, _CUDA_CONFIGS, _CUDA_LARGE_M_CONFIG, INTERPRETER_CONFIG)


def int8_tile_candidates(m: int) -> list:
    """The int8 GEMM's configurations an autotuning search tries for an M-row call on CUDA."""
    if m <= 64:
        block_m = max(16, triton.next_power_of_2(m))
        return [_config(fused, block_m, bn, 1, 4, st)
                for fused in ((True, False) if m <= FUSED_MAX_M else (False,))
                for bn, st in ((16, 4), (32, 4), (64, 4), (128, 3))]
    if m <= 256:
        return [_config(False, bm, bn, 8, w, st) for bm, bn, w in ((64, 64, 4), (64, 128, 4), (128, 64, 4),
                                                                    (128, 128, 8)) for st in (3, 4)]
    return [_config(False, *c) for c in ((128, 128, 8, 8, 3), (128, 128, 8, 8, 4), (128, 256, 8, 8, 3),
                                         (256, 128, 8, 8, 3), (128, 64, 8, 4, 4), (64, 128, 8, 4, 4))]


def int8_int4_config(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, group_size: int, run,
                     reference) -> dict:
    """The tuned (or default) configuration for this call's key; ``run``/``reference`` serve a search. The default
    follows the route table (the GEMV path for one row), and a search weighs the GEMV against the GEMMs up to 8
    rows."""
    m, k = x.shape
    n = qdata.shape[0]
    default = default_config(m, n, k, group_size, x.dtype, scale.dtype, x.device)
    if x.device.type != "cuda" or m == 0:
        return default

    key = autotune.config_key(f"int8_int4_g{group_size}", m, n, k, (x.dtype,), x.device)
    config = autotune.choose(
        key, default, lambda: candidate_configs(m, n, k, group_size, x.dtype, scale.dtype, x.device), run, reference,
        tolerance=1e-3)
    if config.get("path") == "wgmma" and wgmma_refusal(x, scale, group_size):
        # a stored choice that these scales or this Triton cannot take: the generic path, never an error
        return default
    return config


def wgmma_refusal(x, scale, group_size: int) -> Optional[str]:
    """Why the ``wgmma`` path cannot take these inputs, or None when it can: it runs W4A16's wgmma kernel on
    exact_fp16_operands, so it takes groups of 128 codes and 16-bit scales (exact in fp16 once divided by their
    row's power of two), any float x, on a Hopper GPU with Triton's Gluon."""
    if group_size != BLOCK_K_WGMMA:
        return f"the wgmma path takes groups of {BLOCK_K_WGMMA} codes, got group_size={group_size}"
    if scale.dtype not in (torch.float16, torch.bfloat16):
        return f"the wgmma path takes fp16 or bf16 scales, got {scale.dtype}"
    return wgmma_device_refusal(x.device)


def candidate_configs(m: int, n: int, k: int, group_size: int, x_dtype, scale_dtype, device) -> list:
    """Every configuration an autotuning search tries for an M-row call on CUDA: the int8 GEMM's tiles, the W4A16
    GEMV up to 8 rows (gemv_candidates of its configuration for the card), W4A16's centered tile up to 256 rows (x
    quantized into its order or gathered) and its x-ordered units, the fp16_gemm tiles from 33 rows, the HALVES
    tiles from 65 to 1024 rows, dequantization + cuBLAS past 128, and from 64 rows W4A16's wgmma kernel on the same
    operands as fp16_gemm (groups of 128 codes, 16-bit scales, a Hopper GPU)."""
    gemv = gemv_candidates([gemv_config(m, n, k, group_size, x_dtype, scale_dtype, device)], m) if m <= 8 else []
    # (also its 128-row tile from 129 to 256 rows: H200, 256 rows of 4096 x 14336 in 73.1 us against 78.4 for the
    # HALVES tile)
    tile = [gemm_config(min(m, GEMM_MAX_M), n, k, group_size, x_dtype, device)] if 2 <= m <= 2 * GEMM_MAX_M else []
    # also the x-ordered units (the form for groups under 32 codes)
    tile += [dict(c, **form) for c in tile if c["CENTERED"]
             for form in (dict(PERMUTE_X=False), dict(GATHER_X=False, CENTERED=False, PERMUTE_X=False))]
    dequant = [dict(path="dequant")] if m > GEMM_MAX_M else []
    fp16 = fp16_gemm_candidates(m, n, k, group_size, device) if m > FP16_GEMM_MIN_M else []
    wgmma = []
    if m >= 64 and group_size == BLOCK_K_WGMMA and scale_dtype != torch.float32 and wgmma_runs(torch.device(device)):
        wgmma = wgmma_configs(m, n)
    return int8_tile_candidates(m) + gemv + tile + fp16 + halves_candidates(m, group_size) + dequant + wgmma


def halves_candidates(m: int, group_size: int) -> list:
    """The HALVES tile's configurations a search tries for an M-row call on CUDA: from 65 to 1024 rows, groups of
    64 codes and up (each half of a group is one int8 MMA step of 32 codes or more). Tiles of 128 and more rows
    of x by 128 weight rows on 4 warps, or 256 by 64, spill registers on an H200 (the int32 sums and the fp32
    accumulator are both live through each group); 128 by 128 on 8 warps, 64 by 128 and 32 by 64 won none of its
    searches at 128 to 1024 rows."""
    if group_size < 64 or not HALVES_MIN_M <= m <= HALVES_MAX_M:
        return []
    # the first is the route's default: the H200 searches' winner at 256 rows of every weight narrower than 16384
    return [dict(FUSED=False, HALVES=True, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 4, 4))]


def gemv_candidates(configs: list, m: int) -> list:
    """The GEMV configurations a search tries for M rows, from W4A16 GEMV configurations: each as it is, with two
    rows a program from 2 rows (each code's unit shared by both), and each of those with the quantization inside.
    That saves a launch, but every program finds its rows' scales and quantizes them again (H200, one row, the
    W4A16 GEMV's default tiles: 12.5, 17.6, 26.1 us on 4096 x 4096, 4096 x 14336, 14336 x 4096 against 12.2,
    18.4, 22.0 with the quantization kernel first; 17.5 and 22.1 on the last two with 8192 values of x a scan
    step, 11.6 on the first with 4 splits)."""
    forms = configs + ([dict(c, TWO_ROWS=True) for c in configs] if m >= 2 else [])
    return forms + [dict(c, FUSED=True, **change) for c in forms
                    for change in ({}, dict(SCAN_BLOCK=8192), dict(SPLIT_K=4))]


def default_config(m: int, n: int, k: int, group_size: int, x_dtype, scale_dtype, device) -> dict:
    """The configuration ``int8_int4_linear`` runs an M-row call with when nothing was tuned: the default of the
    path the route table (kernels/selector.py) gives it, the W4A16 GEMV, the centered tile, the fp16 tile, the
    HALVES tile, dequantization + cuBLAS or the int8 GEMM's tile."""
    path = default_path("8da4w", Problem(m, n, k, x_dtype, torch.device(device), group_size))
    if path == "gemv":
        return gemv_config(m, n, k, group_size, x_dtype, scale_dtype, device)
    if path == "gemm":
        return gemm_config(m, n, k, group_size, x_dtype, device)
    if path == "dequant":
        return dict(path="dequant")
    if path == "fp16_gemm":
        return fp16_gemm_candidates(m, n, k, group_size, device)[0]
    if path == "halves":
        return halves_candidates(HALVES_MIN_M, group_size)[0]
    return int8_tile_default(m, device)


def _check_quantize_args(x: torch.Tensor) -> None:
    check_activation("quantize_per_token_asym_int8", x)


def _check_linear_args(x, qdata, scale, group_size, bias) -> None:
    op = "int8_int4_linear"
    check_activation(op, x)
    m, k = x.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {GROUP_SIZES}, got {group_size}")
    groups = -(-k // group_size)
    if qdata.dtype != torch.uint8 or qdata.dim() != 2 or qdata.shape[1] != groups * group_size // 2:
        raise ValueError(
            f"{op}: qdata must be uint8 [N, {groups * group_size // 2}] (K={k} padded to the group size, two codes "
            f"a byte), got {qdata.dtype} {tuple(qdata.shape)}"
        )
    if qdata.device != x.device:
        raise ValueError(f"{op}: qdata is on {qdata.device} but x is on {x.device}")
    n = qdata.shape[0]
    if not scale.is_floating_point() or tuple(scale.shape) != (n, groups):
        raise ValueError(f"{op}: scale must be a float tensor of shape ({n}, {groups}), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if scale.device != x.device:
        raise ValueError(f"{op}: scale is on {scale.device} but x is on {x.device}")
    check_vector(op, "bias", bias, n, x)


def quantize_per_token_asym_int8_ref(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """s = max((max(x,0) - min(x,0)) / 255, eps), zp = clamp(round(-128 - min(x,0)/s)), xq = clamp(round(x/s) + zp)."""
    _check_quantize_args(x)
    xf = x.float()
    x_min = xf.amin(dim=1).clamp(max=0)
    x_max = xf.amax(dim=1).clamp(min=0)
    span = x_max - x_min
    # A tensor divisor keeps the division IEEE-rounded on CUDA too (see quantize_per_token_int8_ref).
    s = (span / span.new_full((), 255.0)).clamp(min=EPS)
    zp = torch.clamp(torch.round(-128 - x_min / s), -128, 127)
    xq = torch.clamp(torch.round(xf / s[:, None]) + zp[:, None], -128, 127).to(torch.int8)
    return xq, s, zp.to(torch.int32)


def quantize_per_token_asym_int8_triton(
    x: torch.Tensor, block_k: Optional[int] = None, *, centered: bool = False,
    centered_dtype: Optional[torch.dtype] = None, fragment_width: int = 0, halves_group: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin's (xq, s, zp) by one Triton program per row; one pass over x when the row fits ``block_k``.
    ``centered``: xq - zp in ``centered_dtype`` (default x's dtype) in place of xq (the integer activations the
    GEMV, GEMM and dequant paths multiply). ``fragment_width`` (centered only; a multiple of 32, at least K): those
    activations zero-padded to that many columns and stored in the W4A16 tiles' fragment order, as
    ``tiles.fragment_ordered_x`` would copy them (the PERMUTE_X tiles' x, without the copy's launch).
    ``halves_group`` (int8 xq only; a group size): xq padded with the quantized zero (zp) to a whole number of
    groups, each group's even columns stored first and its odd ones after them, the order of the high and the low
    nibbles of the group's bytes of codes (the HALVES tile's x)."""
    _check_quantize_args(x)
    m, k = x.shape
    if fragment_width and not (centered and fragment_width % 32 == 0 and fragment_width >= k):
        raise ValueError(f"fragment_width must be a multiple of 32 of at least K={k}, with centered=True; got "
                         f"{fragment_width} (centered={centered})")
    if halves_group and (centered or fragment_width or halves_group not in GROUP_SIZES):
        raise ValueError(f"halves_group must be one of {GROUP_SIZES}, without centered or fragment_width; got "
                         f"{halves_group} (centered={centered}, fragment_width={fragment_width})")
    width = fragment_width or (-(-k // halves_group) * halves_group if halves_group else k)
    xq = torch.empty((m, width), device=x.device, dtype=(centered_dtype or x.dtype) if centered else torch.int8)
    s = torch.empty((m,), device=x.device, dtype=torch.float32)
    zp = torch.empty((m,), device=x.device, dtype=torch.int32)
    if m == 0:
        return xq, s, zp
    # The centered activations of a few rows (16-bit, in the tile's order) were faster in one block on an H200 (16
    # rows of 14336 columns: 6.4 us against 7.2 in two passes; 256 rows: 13.6 against 12.2).
    one_pass_max = CENTERED_ONE_PASS_MAX_K if centered and m <= 64 else ONE_PASS_MAX_K
    block_k, num_warps, one_pass = per_token_block(width, block_k, halves_group, one_pass_max)
    order = FRAGMENT_ORDER.value if fragment_width else (HALVES_ORDER.value if halves_group else 0)
    _quantize_per_token_asym_int8_kernel[(m,)](
        x, xq, s, zp, k, width, x.stride(0), x.stride(1), xq.stride(0),
        EPS_=EPS, ONE_PASS=one_pass, BLOCK_K=block_k, CENTERED=centered, ORDER=order,
        GROUP=halves_group or 32, num_warps=num_warps,
    )
    return xq, s, zp


@torch.library.custom_op("aofunc::quantize_per_token_asym_int8", mutates_args=())
def quantize_per_token_asym_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xq int8 [M, K], s fp32 [M], zp int32 [M]): per-token asymmetric int8, xq = clamp(round(x/s) + zp)."""
    return quantize_per_token_asym_int8_ref(x)


@quantize_per_token_asym_int8.register_kernel("cuda")
def _quantize_per_token_asym_int8_cuda(x):
    return quantize_per_token_asym_int8_triton(x)


@quantize_per_token_asym_int8.register_fake
def _quantize_per_token_asym_int8_fake(x):
    _check_quantize_args(x)
    m = x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.int32))


def int8_int4_linear_ref(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """y = (s_x * sum_g scale_g * sum_{k in g} (xq - zp)(u - 8)).to(x.dtype) + bias, integer inside each group."""
    _check_linear_args(x, qdata, scale, group_size, bias)
    m, k = x.shape
    xq, s, zp = quantize_per_token_asym_int8_ref(x)
    xi = (xq.to(torch.int32) - zp[:, None]).double()
    w = (unpack_uint4(qdata).to(torch.int32) - 8)[:, :k].double()
    acc = torch.zeros((m, qdata.shape[0]), device=x.device, dtype=torch.float32)
    for g, k0 in enumerate(range(0, k, group_size)):
        # Products are at most 255 * 8 and a group has at most 256 of them: float64 sums are exact integers.
        isum = xi[:, k0:k0 + group_size] @ w[:, k0:k0 + group_size].t()
        acc = acc + isum.float() * scale[:, g].float()[None, :]
    y = (acc * s[:, None]).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def gemv_config(m: int, n: int, k: int, group_size: int, x_dtype, scale_dtype, device) -> dict:
    """The GEMV path's configuration: the W4A16 GEMV's stored winner for the same shape and dtypes where one is
    known (the same kernel, on 16-bit integers here), else its default."""
    key = autotune.config_key(f"w4a16_g{group_size}", m, n, k, (x_dtype, scale_dtype), device)
    tuned = autotune.lookup(key) if torch.device(device).type == "cuda" else None
    if tuned is not None and tuned.get("path") == "gemv":
        return dict(tuned)
    return w4a16.gemv_config(m, n, k, group_size, device)


def gemm_config(m: int, n: int, k: int, group_size: int, x_dtype, device) -> dict:
    """The W4A16 GEMM tile's configuration on the centered activations: W4A16's default tile sizes and split, in
    a form that multiplies x by the codes' units and scales each group's sum (w4a16_tile), whose group sums of
    integer activations are exact in fp32 as the int8 GEMM's are; no 16-bit dequantized tile. From groups of 32
    codes the CENTERED form (units code - 8 in fragment order; H200, bf16 x, 5 to 64 rows: 1.00-1.73x bf16 on
    8192 x 28672 against 0.58-0.90x for the x-ordered units, 0.65-0.96x on 4096 x 4096 against 0.52-0.76x)."""
    base = w4a16.default_config(max(m, 2), n, k, group_size, x_dtype, device)
    if base["path"] != "gemm":  # past W4A16's GEMM rows, or fp32 x on CUDA: its 16-row tile all the same
        base = w4a16.default_config(16, n, k, group_size, torch.bfloat16, device)
    centered = group_size >= 32
    # the centered form reads x in its fragment order, into which the quantization kernel stores it at no extra
    # cost (H200, 14336 x 4096 at 16, 32 and 64 rows: 29.0, 29.4 and 34.6 us against 30.2, 30.8 and 39.1 with x
    # gathered 4 bytes at a time; 8192 x 28672 at 32 rows 68.8 against 75.7)
    return dict(base, FULL_DQ=False, GATHER_X=centered, PAIRS=False, CENTERED=centered, PERMUTE_X=centered)


def fp16_gemm_candidates(m: int, n: int, k: int, group_size: int, device) -> list:
    """Configurations of the fp16_gemm path, the first its default: W4A16's GEMM tile in packed fp16 pairs
    (fragment order, weights (code - 8) * scale / p exact in fp16; see exact_fp16_operands) on the centered
    activations, x copied into the tile's order or gathered, 64 to 256 rows of x and 64 or 128 rows of w a tile
    (256 rows of x on 8 warps only: on 4 warps Triton 3.6 asks an H200 for more shared memory than it has); then
    W4A16's x-ordered tile on the same operands."""
    n_groups = -(-k // group_size)
    rows = min(256, max(64, triton.next_power_of_2(m)))
    out = []
    for permute_x in (True, False):
        for block_m in [r for r in (256, 128, 64) if r <= rows]:
            for block_n, warps in ((128, 8), (128, 4), (64, 4)) if block_m < 256 else ((128, 8),):
                programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
                out.append(dict(path="fp16_gemm", BLOCK_M=block_m, BLOCK_N=block_n,
                                SPLIT_K=split_k(programs, n_groups, device), SWAP=True, GATHER_X=True,
                                PAIRS=True, CENTERED=False, PERMUTE_X=permute_x, M_FAST=m > 64, num_warps=warps,
                                num_stages=3))
    # W4A16's x-ordered tile (each step's weight dequantized in fp32, rounded to fp16 exactly, through shared
    # memory; scales a step ahead), its default from 33 to 128 rows on narrow weights
    for block_m in sorted({min(128, rows), 64}):
        for block_n, warps in ((64, 4), (128, 4), (128, 8)):
            programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            out.append(dict(path="fp16_gemm", BLOCK_M=block_m, BLOCK_N=block_n,
                            SPLIT_K=split_k(programs, n_groups, device), SWAP=True, FULL_DQ=True, PREFETCH=True,
                            M_FAST=m > 64, num_warps=warps, num_stages=3))
    return [c for c in out if fragment_tile_fits(c)]


def int8_int4_linear_triton(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
    config: Optional[dict] = None,
) -> torch.Tensor:
    """The twin's y by Triton; ``config["FUSED"]`` quantizes the activations inside the GEMM."""
    _check_linear_args(x, qdata, scale, group_size, bias)
    scale, bias = unit_stride(scale, bias)
    m, k = x.shape
    n = qdata.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if config is None:
        config = int8_int4_config(
            x, qdata, scale, group_size, lambda c: int8_int4_linear_triton(x, qdata, scale, group_size, bias, c),
            lambda: int8_int4_linear_ref(x, qdata, scale, group_size, bias),
        )
    if config.get("path") == "dequant":
        return dequant_linear(x, qdata, scale, group_size, bias)
    # tiles that read x in their fragment order (PERMUTE_X) get the activations quantized straight into it
    width = qdata.shape[1] * 2 if config.get("PERMUTE_X") else 0
    if config.get("path") == "fp16_gemm":
        xi, sx, p, scaled = exact_fp16_operands(x, scale, width)
        return w4a16.launch(xi, qdata, scaled, None, group_size, bias, dict(config, path="gemm"), row_scale=sx,
                            col_scale=p, out_dtype=x.dtype, x_fragment_ordered=bool(width))
    if config.get("path") == "wgmma":
        refusal = wgmma_refusal(x, scale, group_size)
        if refusal:
            raise ValueError(refusal)
        # the centered activations quantized straight into the kernel's column order
        xi, sx, p, scaled = exact_fp16_operands(x, scale, qdata.shape[1] * 2)
        return w4a16.launch(xi, qdata, scaled, None, group_size, bias, config, row_scale=sx, col_scale=p,
                            out_dtype=x.dtype, x_fragment_ordered=True)
    if config.get("path") == "gemv" and config.get("FUSED"):
        # one kernel: the W4A16 GEMV quantizing x itself
        params = {key: value for key, value in config.items() if key not in ("path", "FUSED")}
        return w4a16.gemv(x, qdata, scale, None, group_size, bias, params, quantize_x=True)
    if config.get("path") in ("gemv", "gemm"):
        # the W4A16 GEMV or GEMM on the centered integer activations, symmetric grid (no zero), each row's products
        # times its scale
        xi, sx, _ = quantize_per_token_asym_int8_triton(x, centered=True, fragment_width=width)
        params = {key: value for key, value in config.items() if key != "FUSED"}
        return w4a16.launch(xi, qdata, scale, None, group_size, bias, params, row_scale=sx,
                            x_fragment_ordered=bool(width))
    if config.get("HALVES"):
        return _halves_linear(x, qdata, scale, group_size, bias, config, y)
    launch = dict(config)
    fused = launch.pop("FUSED")
    if fused:
        a, sx, zp = x, y, y
    else:
        a, sx, zp = quantize_per_token_asym_int8_triton(x)
    grid = (triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"]),)
    _int8_int4_matmul_kernel[grid](
        a, sx, zp, qdata, scale, bias if bias is not None else scale, y,
        m, n, k,
        a.stride(0), a.stride(1), qdata.stride(0), qdata.stride(1), scale.stride(0), scale.stride(1),
        y.stride(0), y.stride(1),
        QUANTIZE_A=fused, HAS_BIAS=bias is not None, EPS_=EPS, GROUP=group_size, **launch,
    )
    return y


def _halves_linear(x, qdata, scale, group_size, bias, config, y):
    """y by the HALVES tile: x quantized into each group's halves, the weights' group sums, one GEMM."""
    if group_size < 64:
        raise ValueError(f"int8_int4_linear: the HALVES tile needs groups of 64 codes or more, got {group_size}")
    m, n = y.shape
    qdata = qdata.contiguous()  # (the kernel reads a row's bytes as one run)
    xq, sx, zp = quantize_per_token_asym_int8_triton(x, halves_group=group_size)
    wsum = group_code_sums_triton(qdata, group_size)
    launch = {key: value for key, value in config.items() if key not in ("FUSED", "HALVES")}
    grid = (triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"]),)
    _int8_int4_halves_kernel[grid](
        xq, sx, zp, qdata, scale, wsum, bias if bias is not None else scale, y,
        m, n, wsum.shape[1],
        xq.stride(0), qdata.stride(0), scale.stride(0), scale.stride(1), wsum.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, ASM=not interpreting(), GROUP=group_size, **launch,
    )
    return y


def exact_fp16_operands(x, scale, fragment_width: int = 0):
    """(xi, sx, p, scaled): the twin's numbers as fp16 operands whose products are exact.

    xi = xq - zp, the centered activations, integers of at most 255 in magnitude (fp16 [M, K], or with
    ``fragment_width`` [M, fragment_width] in the W4A16 tiles' fragment order), and sx their
    scales (fp32 [M]). p (fp32 [N]) is the power of two at or above each weight row's largest scale magnitude,
    and scaled = scale / p (exact), in fp16 for 16-bit scales (8 or 11 significant bits), in fp32 for fp32 ones.
    The weight (code - 8) * scaled then holds at most 11 significant bits below 8 in magnitude: exact in fp16 where
    it is a normal number (scales more than 2^14 below their row's largest lose bits), so fp32 sums of the
    products xi * w are the twin's group sums times scale / p, and y = (sum * p[n] * sx[m]).to(x.dtype) + bias."""
    xi, sx, _ = quantize_per_token_asym_int8_triton(x, centered=True, centered_dtype=torch.float16,
                                                   fragment_width=fragment_width)
    return (xi, sx) + exact_fp16_scales_triton(scale)


def exact_fp16_scales_ref(scale):
    """(p, scaled) of exact_fp16_operands in plain torch: p = 2^ceil(log2(max |scale[n]|)) (1 for a row of zeros),
    scaled = scale / p in fp16 (fp32 for fp32 scales)."""
    row_max = scale.float().abs().amax(dim=1)
    p = torch.exp2(torch.ceil(torch.log2(torch.where(row_max > 0, row_max, 1.0))))
    scaled = (scale.float() / p[:, None]).to(torch.float32 if scale.dtype == torch.float32 else torch.float16)
    return p, scaled


def exact_fp16_scales_triton(scale):
    """exact_fp16_scales_ref's (p, scaled) in one launch (a program per weight row), where the torch form takes
    seven: the paths on exact fp16 operands run it every call."""
    n, groups = scale.shape
    p = torch.empty(n, device=scale.device, dtype=torch.float32)
    scaled = torch.empty(n, groups, device=scale.device,
                         dtype=torch.float32 if scale.dtype == torch.float32 else torch.float16)
    if n:
        _exact_scales_kernel[(n,)](scale, p, scaled, groups, scale.stride(0), scale.stride(1), scaled.stride(0),
                                   BLOCK_G=triton.next_power_of_2(groups))
    return p, scaled


@triton.jit
def _exact_scales_kernel(s_ptr, p_ptr, out_ptr, G, stride_sn, stride_sg, stride_on, BLOCK_G: tl.constexpr):
    # p = the least power of two >= max |s| of the row, from its fp32 bits (exact, where log2 and exp2 round): the
    # next exponent unless the mantissa is zero; 1 for a row of zeros (a NaN scale stays NaN in scaled). A row
    # whose largest magnitude is below fp32's normal numbers (bf16 or fp32 scales under 1.2e-38) gets 2^-126, where
    # the torch form finds a smaller power
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    mask = offs < G
    s = tl.load(s_ptr + row * stride_sn + offs * stride_sg, mask=mask, other=0.0).to(tl.float32)
    top = tl.max(tl.abs(s), axis=0)
    bits = top.to(tl.int32, bitcast=True)
    up = tl.where((bits & 0x7FFFFF) == 0, bits, ((bits >> 23) + 1) << 23)
    p = tl.where(top > 0, up.to(tl.float32, bitcast=True), 1.0)
    tl.store(p_ptr + row, p)
    tl.store(out_ptr + row * stride_on + offs, tl.div_rn(s, tl.broadcast_to(p, s.shape)).to(out_ptr.dtype.element_ty),
             mask=mask)


def dequant_linear(x, qdata, scale, group_size: int, bias) -> torch.Tensor:
    """The twin's y through cuBLAS on exact_fp16_operands: the weight dequantized to fp16 once, an fp16 GEMM with
    fp32 sums, and one epilogue pass y = (acc * p[n] * s[m]).to(x.dtype) + bias. Past a few hundred rows the GEMM
    is compute-bound and cuBLAS's tiles are the fastest; writing the weight costs one pass over its 16-bit copy."""
    m, k = x.shape
    xi, sx, p, scaled = exact_fp16_operands(x, scale)
    w = w4a16.w4a16_dequantize(qdata, scaled, None, group_size, k, torch.float16)
    # (CPU: fp32 operands, the same exact products and fp32 sums)
    acc = torch.mm(xi, w.t(), out_dtype=torch.float32) if x.is_cuda else xi.float() @ w.float().t()
    y = torch.empty(m, qdata.shape[0], device=x.device, dtype=x.dtype)
    block_n = 128
    _scale_cast_kernel[(m, triton.cdiv(y.shape[1], block_n))](
        acc, sx, p, bias if bias is not None else y, y, y.shape[1], acc.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n)
    return y


@triton.jit
def _scale_cast_kernel(acc_ptr, sx_ptr, p_ptr, b_ptr, y_ptr, N, stride_am, stride_ym, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    # y[m, n] = (acc[m, n] * p[n] * sx[m]).to(y's dtype) + bias[n], the bias added after the rounding as the twin does
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    acc = tl.load(acc_ptr + row * stride_am + offs, mask=mask, other=0.0)
    y = (acc * tl.load(p_ptr + offs, mask=mask, other=1.0) * tl.load(sx_ptr + row)).to(y_ptr.dtype.element_ty)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_ym + offs, y, mask=mask)


def launch(x, qdata, scale, group_size, bias, config: dict) -> torch.Tensor:
    """Run one configuration (no tuning): y [M, N] in x.dtype."""
    return int8_int4_linear_triton(x, qdata, scale, group_size, bias, config)


@torch.library.custom_op("aofunc::int8_int4_linear", mutates_args=())
def int8_int4_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """8da4w linear: per-token asymmetric int8 x times groupwise int4 weight, integer sums inside groups."""
    return int8_int4_linear_ref(x, qdata, scale, group_size, bias)


@int8_int4_linear.register_kernel("cuda")
def _int8_int4_linear_cuda(x, qdata, scale, group_size, bias):
    return int8_int4_linear_triton(x, qdata, scale, group_size, bias)


@int8_int4_linear.register_fake
def _int8_int4_linear_fake(x, qdata, scale, group_size, bias):
    _check_linear_args(x, qdata, scale, group_size, bias)
    return x.new_empty((x.shape[0], qdata.shape[0]))
