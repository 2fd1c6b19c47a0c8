"""NF4 (QLoRA): 4-bit NormalFloat codes with double-quantized block scales; dequantize and a fused linear.

w[i] = NF4_LEVELS[code[i]] * s[i // block_size],  s[b] = scaler_q[b] / scaler_factor[b // scaler_block_size] + mean

Layout (as stored; docs/file-format.md): the row-major [n, k] weight flattened, zero-padded to P elements (a whole
number of ``block_size * scaler_block_size``); ``qdata`` uint8 [P/2], two codes a byte, first in the high nibble;
``scaler_q`` int8 [P/block_size]; ``scaler_factor`` fp32 [P/(block_size*scaler_block_size)]; ``scaler_mean``
fp32 0-d. A block may straddle rows when k % block_size != 0; padding is never read into results.

``nf4_linear`` runs, when rows start on whole blocks (k % block_size == 0), an FMA GEMV for a few rows of x
(block_size % 8 == 0), a ``tl.dot`` GEMM on dequantized tiles for medium M (block_size a power of two >= 16),
and otherwise dequantizes with the Triton kernel and calls cuBLAS; where a search chose it (blocks of 64, K a
multiple of 128, 16-bit x, Hopper), the ``wgmma`` path of kernels/wgmma.py. It has autograd
with respect to x and bias (grad_x = grad_y @ W), for LoRA fine-tuning over a frozen base weight.
"""
from __future__ import annotations

from typing import Optional

import struct

import torch

from aofunc.kernels import autotune
from aofunc.kernels.packing import NF4_LEVELS, nf4_levels, unpack_uint4
from aofunc.kernels.selector import Problem, default_path
from aofunc.kernels.selector import nf4_gemm_fits as gemm_fits
from aofunc.kernels.selector import nf4_gemv_fits as gemv_fits
from aofunc.kernels.tiles import (BLOCK_K_WGMMA, FLOAT_DTYPES, check_fragment_tile, dequantized_linear, dot_acc,
                                  dot_tile_zeros, follow_previous, fragment_columns, fragment_ordered_x,
                                  fragment_tile_fits, gemm_finish, gemm_grid, gemm_tile, gemv_accumulator,
                                  gemv_finish, gemv_rows, gemv_split_k, int32_words, interleave8, interpreting,
                                  load_x, nibble_fragments, pdl_options, pow2_at_most, split_k, splitk_buffers,
                                  tolerance, unit_stride, word_pairs_fragments, wgmma_configs, wgmma_runs,
                                  wgmma_x_refusal, MMA_ROWS, mma_configs, mma_runs, mma_x_refusal)
from aofunc.kernels.triton_compat import tl, triton


def levels_operand(like: torch.Tensor) -> torch.Tensor:
    """The kernels' table operand: the levels under the interpreter, which loads them; on CUDA the kernels read
    them from a warp shuffle (SHUFFLE_ASM), so any tensor on the device stands in and no table is copied (a
    host-to-device copy has no place in a CUDA graph)."""
    return nf4_levels(like.device) if interpreting() else like


def check_nf4(qdata, scaler_q, scaler_factor, scaler_mean, n: int, k: int, block_size: int,
              scaler_block_size: int) -> None:
    """Raise ValueError naming the argument when the tensors are not an NF4 weight of logical shape [n, k]."""
    if n < 1 or k < 1:
        raise ValueError(f"n and k must be positive, got n={n}, k={k}")
    if block_size < 2 or block_size % 2 or scaler_block_size < 1:
        raise ValueError(f"block_size must be even and >= 2 and scaler_block_size >= 1, got {block_size}, "
                         f"{scaler_block_size}")
    chunk = block_size * scaler_block_size
    padded = -(-n * k // chunk) * chunk
    expected = (("qdata", qdata, torch.uint8, (padded // 2,)),
                ("scaler_q", scaler_q, torch.int8, (padded // block_size,)),
                ("scaler_factor", scaler_factor, torch.float32, (padded // chunk,)),
                ("scaler_mean", scaler_mean, torch.float32, ()))
    for name, t, dtype, shape in expected:
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {dtype} of shape {shape} for n={n}, k={k}, block_size={block_size}, "
                             f"scaler_block_size={scaler_block_size}; got {t.dtype} of shape {tuple(t.shape)}")
        if t.device != qdata.device:
            raise ValueError(f"{name} is on {t.device} but qdata is on {qdata.device}")


def nf4_block_scales_ref(scaler_q, scaler_factor, scaler_mean, scaler_block_size: int) -> torch.Tensor:
    """s[b] = scaler_q[b] / scaler_factor[b // scaler_block_size] + scaler_mean, in fp32: [P / block_size]."""
    return scaler_q.float() / scaler_factor.repeat_interleave(scaler_block_size) + scaler_mean


def nf4_dequantize_ref(qdata, scaler_q, scaler_factor, scaler_mean, n: int, k: int, block_size: int,
                       scaler_block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """w[i] = NF4_LEVELS[code[i]] * s[i // block_size] in fp32, then cast: [n, k] in dtype (the reference twin)."""
    check_nf4(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size)
    codes = unpack_uint4(qdata)[: n * k].long()
    s = nf4_block_scales_ref(scaler_q, scaler_factor, scaler_mean, scaler_block_size)
    w = nf4_levels(qdata.device)[codes] * s.repeat_interleave(block_size)[: n * k]
    return w.reshape(n, k).to(dtype)


def nf4_linear_ref(x, qdata, scaler_q, scaler_factor, scaler_mean, n: int, k: int, block_size: int,
                   scaler_block_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ w.T + bias, all in fp32 (w dequantized in fp32), then cast to x.dtype: the reference twin."""
    _check_linear(x, n, k, bias)
    w = nf4_dequantize_ref(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size,
                           torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _check_linear(x, n, k, bias) -> None:
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES or x.shape[1] != k:
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor with {k} columns, got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in FLOAT_DTYPES or bias.device != x.device):
        raise ValueError(f"bias must be a float tensor of shape ({n},) on {x.device}, got {bias.dtype} of shape "
                         f"{tuple(bias.shape)} on {bias.device}")


@triton.jit
def block_scale(sq_ptr, f_ptr, mean, b, SCALER_BLOCK: tl.constexpr):
    """s[b] = scaler_q[b] / scaler_factor[b // SCALER_BLOCK] + mean, in fp32, for a tensor of block indices b."""
    # div_rn: an IEEE-rounded quotient (Triton's / is approximate), so the weights equal the twin's exactly
    return tl.math.div_rn(tl.load(sq_ptr + b).to(tl.float32), tl.load(f_ptr + b // SCALER_BLOCK)) + mean


def _shuffle_asm() -> str:
    """PTX for NF4_LEVELS[$1]: lane l holds level l % 16 (selected from immediates), a shuffle reads lane $1.

    The selection depends only on the lane id, so the compiler computes it once per loop step, and each
    lookup is one shuffle: no table in memory, and no tensor whose layout could carry a lane's value to
    another thread.
    """
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_LEVELS]
    lines = ["{", ".reg .u32 l;", ".reg .b32 v;", ".reg .pred p;", "mov.u32 l, %laneid;", "and.b32 l, l, 15;",
             f"mov.b32 v, 0f{bits[0]:08X};"]
    for i in range(1, 16):
        lines += [f"setp.eq.u32 p, l, {i};", f"@p mov.b32 v, 0f{bits[i]:08X};"]
    lines += ["shfl.sync.idx.b32 $0, v, $1, 0x1f, 0xffffffff;", "}"]
    return "\n".join(lines)


SHUFFLE_ASM = tl.constexpr(_shuffle_asm())


@triton.jit
def nf4_level(bits, lut_ptr, USE_SHFL: tl.constexpr):
    """NF4_LEVELS[bits & 15] for int32 ``bits`` whose low four bits are a code: a warp shuffle from the lane holding
    that level (CUDA), or a table load (interpreter). The shuffle reads only bits 0-4 of its lane index, and lanes l
    and l + 16 hold the same level, so the higher bits need no mask (one instruction a code fewer)."""
    if USE_SHFL:
        return tl.inline_asm_elementwise(SHUFFLE_ASM, "=r,r", [bits], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(lut_ptr + (bits & 15))


def level_pairs_ptx(dtype: torch.dtype, scaled: bool = False) -> str:
    """PTX from one word ($4, eight codes) to four pairs of 16-bit levels ($0..$3): $b holds the levels of code 2b
    (the high nibble of byte b) in its low half and code 2b + 1 in its high half, each NF4_LEVELS rounded to
    ``dtype`` (bfloat16 or float16), as a cast of the fp32 level rounds it.

    A level is looked up byte by byte: prmt picks, for four codes at once, one byte from a table of eight, so
    four tables (low and high bytes of levels 0-7 and 8-15) give four candidate words, and a byte mask from each
    code's bit 3 (9 where it is set, a nibble prmt reads as "the sign of byte 1", 0x80, so 0xFF) chooses between
    them. Then two prmts interleave low and high bytes into the pairs: 24 instructions for eight codes.
    ``scaled``: each pair is then multiplied by the pair of scales in $6 (one packed multiply-add with -0, rounded
    once to ``dtype``).
    """
    halves = torch.tensor(NF4_LEVELS, dtype=torch.float32).to(dtype).view(torch.int16).tolist()
    low = [h & 0xFF for h in halves]
    high = [(h >> 8) & 0xFF for h in halves]
    words = [sum(b << (8 * i) for i, b in enumerate(table[j:j + 4])) for table in (low, high) for j in (0, 4, 8, 12)]
    lines = ["{", ".reg .b32 l0, l1, l2, l3, h0, h1, h2, h3, sign, idx, sel, m, a, b, lo, hi;"]
    lines += [f"mov.b32 {name}, {w:#010x};" for name, w in zip(("l0", "l1", "l2", "l3", "h0", "h1", "h2", "h3"), words)]
    lines += ["mov.b32 sign, 0x00008000;",
              "and.b32 idx, $4, 0x77777777;",     # each code's index within its half of the table
              "shr.u32 sel, $4, 3;",
              "and.b32 sel, sel, 0x11111111;",
              "mul.lo.u32 sel, sel, 9;"]          # nibble 9 where bit 3 is set, else 0
    for half in (0, 1):
        if half:
            lines += ["shr.u32 idx, idx, 16;", "shr.u32 sel, sel, 16;"]
        lines += ["prmt.b32 m, sign, sign, sel;",  # 0xFF bytes where the code is 8 or more
                  "prmt.b32 a, l0, l1, idx;", "prmt.b32 b, l2, l3, idx;", "lop3.b32 lo, a, b, m, 0xD8;",
                  "prmt.b32 a, h0, h1, idx;", "prmt.b32 b, h2, h3, idx;", "lop3.b32 hi, a, b, m, 0xD8;",
                  # byte 1 of lo/hi is the first code (the high nibble), byte 0 the second; then bytes 3, 2
                  f"prmt.b32 ${2 * half}, lo, hi, 0x4051;", f"prmt.b32 ${2 * half + 1}, lo, hi, 0x6273;"]
    if scaled:
        fma = "fma.rn.f16x2" if dtype == torch.float16 else "fma.rn.bf16x2"
        lines += ["mov.b32 m, 0x80008000;"] + [f"{fma} ${i}, ${i}, $6, m;" for i in range(4)]
    return "\n".join(lines + ["}"])


LEVEL_PAIRS_BF16 = tl.constexpr(level_pairs_ptx(torch.bfloat16))
LEVEL_PAIRS_FP16 = tl.constexpr(level_pairs_ptx(torch.float16))


@triton.jit
def nf4_level_pairs(q, xt, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """The [ROWS, 8 * WORDS] tile of NF4 levels in xt's dtype (fp16 or bf16) in fragment order
    (tiles.nibble_fragments), from [ROWS, WORDS] int32 words, two codes a packed register (CUDA only: inline PTX;
    the same values as nf4_levels_tile's fp32 levels cast to that dtype)."""
    return word_pairs_fragments(q, xt.dtype, LEVEL_PAIRS_FP16, LEVEL_PAIRS_BF16, ROWS, WORDS)


@triton.jit
def _nf4_dequant_kernel(q_ptr, sq_ptr, f_ptr, mean_ptr, lut_ptr, w_ptr, numel,
                        BLOCK: tl.constexpr, SCALER_BLOCK: tl.constexpr, WORDS: tl.constexpr,
                        USE_SHFL: tl.constexpr):
    # WORDS int32 words of the flat codes (eight codes each, the first in the high nibble of byte 0), each to its
    # eight weights w[8v .. 8v + 7]: one 16-byte store for 16-bit w. Flat over words, so a program's loads and
    # stores are contiguous runs: on an H200 8192 x 28672 in 152.8 us, as fast as W4A16's (the bytes moved take about
    # 122 us at 4.8 TB/s; with [blocks, bytes] tiles, dequantization + cuBLAS at 512 rows took 559.5 us, now 452.5).
    # A word lies in one NF4 block when the block is a whole number of words; else each code finds its own.
    v = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    q = tl.load(q_ptr + v, mask=v < tl.cdiv(numel, 8), other=0)
    k = v[:, None] * 8 + tl.arange(0, 8)[None, :]
    mean = tl.load(mean_ptr)
    last_block = (numel - 1) // BLOCK
    if BLOCK % 8 == 0:
        s = block_scale(sq_ptr, f_ptr, mean, tl.minimum(v * 8 // BLOCK, last_block), SCALER_BLOCK)[:, None]
    else:
        s = block_scale(sq_ptr, f_ptr, mean, tl.minimum(k // BLOCK, last_block), SCALER_BLOCK)
    codes = q[:, None] >> ((tl.arange(0, 8) ^ 1) * 4)[None, :]  # nf4_level reads the low four bits only
    tl.store(w_ptr + k, (nf4_level(codes, lut_ptr, USE_SHFL) * s).to(w_ptr.dtype.element_ty), mask=k < numel)


@triton.jit
def _block_scales_kernel(sq_ptr, f_ptr, mean_ptr, s_ptr, numel, SCALER_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    # the first numel block scales, each rounded once to s's dtype
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = block_scale(sq_ptr, f_ptr, tl.load(mean_ptr), tl.minimum(b, numel - 1), SCALER_BLOCK)
    tl.store(s_ptr + b, s.to(s_ptr.dtype.element_ty), mask=b < numel)


def block_scales_triton(scaler_q, scaler_factor, scaler_mean, n: int, k: int, block_size: int,
                        scaler_block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The block scales of an [n, k] weight whose rows start on whole blocks (k % block_size == 0), [n, k /
    block_size] in ``dtype``: nf4_block_scales_ref's, rounded once."""
    numel = n * k // block_size
    s = torch.empty(n, k // block_size, dtype=dtype, device=scaler_q.device)
    if numel:
        scaler_q, scaler_factor = unit_stride(scaler_q, scaler_factor)
        _block_scales_kernel[(triton.cdiv(numel, 1024),)](scaler_q, scaler_factor, scaler_mean, s, numel,
                                                          SCALER_BLOCK=scaler_block_size, BLOCK=1024)
    return s


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, q_ptr, sq_ptr, f_ptr, mean_ptr, lut_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_xk, stride_ym, split_k,
    BLOCK: tl.constexpr, SCALER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_SHFL: tl.constexpr,
    REDUCE_W: tl.constexpr, LOOP_STAGES: tl.constexpr, PDL: tl.constexpr = False,
):
    # One row of x, BLOCK_N rows of w, a slice of the steps along K (a step is GROUPS NF4 blocks of a row).
    # REDUCE_W: each step's products are summed over the words of a block before scaling, so the accumulator
    # holds one value per (row, block) rather than per word. LOOP_STAGES > 1: the codes of the next steps are
    # copied into shared memory asynchronously by the compiler's software pipeline.
    # Rows start on whole blocks (K % BLOCK == 0), so row n holds blocks n*K/BLOCK.. and int32 words
    # n*K/8..; word w holds codes 8w..8w+7, code 8w+j in bits 4*(j^1)..+3.
    follow_previous(PDL)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WORDS: tl.constexpr = BLOCK // 8
    offs_n, rows = gemv_rows(N, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_w = tl.arange(0, WORDS)
    row_blocks = K // BLOCK
    n_steps = tl.cdiv(row_blocks, GROUPS)
    per_split = tl.cdiv(n_steps, split_k)
    mean = tl.load(mean_ptr)
    acc = gemv_accumulator(BLOCK_N, GROUPS, WORDS, REDUCE_W)
    x_row = x_ptr + pid_m * stride_xm
    for step in tl.range(pid_k * per_split, tl.minimum(pid_k * per_split + per_split, n_steps),
                         num_stages=LOOP_STAGES):
        grp = step * GROUPS + offs_g
        blocks = rows[:, None] * row_blocks + grp[None, :]
        words = blocks[:, :, None] * WORDS + offs_w[None, None, :]
        if EVEN_K:
            q = tl.load(q_ptr + words)
            s = block_scale(sq_ptr, f_ptr, mean, blocks, SCALER_BLOCK)
        else:
            g_mask = grp < row_blocks
            q = tl.load(q_ptr + words, mask=g_mask[None, :, None], other=0)
            s = block_scale(sq_ptr, f_ptr, mean, tl.where(g_mask[None, :], blocks, 0), SCALER_BLOCK)
        part = tl.zeros([BLOCK_N, GROUPS, WORDS], dtype=tl.float32)
        for j in tl.static_range(8):
            k = (grp[:, None] * WORDS + offs_w[None, :]) * 8 + j
            xj = load_x(x_row, k, stride_xk, K, EVEN_K)
            level = nf4_level(q >> ((j ^ 1) * 4), lut_ptr, USE_SHFL)
            part += level * xj[None, :, :]
        if REDUCE_W:
            acc += tl.sum(part, axis=2) * s
        else:
            acc += part * s[:, :, None]
    if REDUCE_W:
        y = tl.sum(acc, axis=1)
    else:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    gemv_finish(y, offs_n, pid_m, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT, HAS_BIAS)


@triton.jit
def nf4_levels_tile(q, lut_ptr, ROWS: tl.constexpr, WORDS: tl.constexpr, USE_SHFL: tl.constexpr,
                    GATHER_X: tl.constexpr):
    """[ROWS, 8 * WORDS] fp32 tile of NF4 levels from [ROWS, WORDS] int32 words: code 8w + j at column 8w + j, or
    with GATHER_X in fragment order (tiles.nibble_fragments; WORDS >= 4)."""
    # code j of a word sits in bits 4 * (j ^ 1) .. + 3
    c0 = nf4_level(q >> 4, lut_ptr, USE_SHFL)
    c1 = nf4_level(q, lut_ptr, USE_SHFL)
    c2 = nf4_level(q >> 12, lut_ptr, USE_SHFL)
    c3 = nf4_level(q >> 8, lut_ptr, USE_SHFL)
    c4 = nf4_level(q >> 20, lut_ptr, USE_SHFL)
    c5 = nf4_level(q >> 16, lut_ptr, USE_SHFL)
    c6 = nf4_level(q >> 28, lut_ptr, USE_SHFL)
    c7 = nf4_level(q >> 24, lut_ptr, USE_SHFL)
    if GATHER_X:
        # tl.join appends its choice as the last axis: t[r, w, j0, j1, j2]
        t = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
        return nibble_fragments(t, ROWS, WORDS)
    return interleave8(c0, c1, c2, c3, c4, c5, c6, c7, ROWS, WORDS)


@triton.jit
def _nf4_gemm_kernel(
    x_ptr, q_ptr, sq_ptr, f_ptr, mean_ptr, lut_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_xk, stride_ym, split_k,
    BLOCK: tl.constexpr, SCALER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, SWAP: tl.constexpr, USE_SHFL: tl.constexpr,
    M_FAST: tl.constexpr, GATHER_X: tl.constexpr, PAIRS: tl.constexpr, X_ORDERED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # A BLOCK_M x BLOCK_N tile of y, one NF4 block of K per step: d = dot(x, levels) in fp32, times the block's
    # scale per column. Rows start on whole blocks (K % BLOCK == 0): row n holds blocks n*K/BLOCK.. . GATHER_X
    # (with SWAP, blocks of at least 32): the levels in fragment order, x's columns gathered to match. PAIRS
    # (with GATHER_X, 16-bit x, CUDA): those levels from nf4_level_pairs, two codes a few byte permutes, in place
    # of a warp shuffle and a conversion a code; the same levels, so the same sums. X_ORDERED (with GATHER_X): x's
    # columns are already in that order (tiles.fragment_ordered_x), read as they lie.
    follow_previous(PDL)
    pid_k = tl.program_id(2)
    WORDS: tl.constexpr = BLOCK // 8
    offs_m, m_mask, offs_n, rows = gemm_tile(M, N, BLOCK_M, BLOCK_N, M_FAST)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, BLOCK)
    row_blocks = K // BLOCK
    per_split = tl.cdiv(row_blocks, split_k)
    mean = tl.load(mean_ptr)
    acc = dot_tile_zeros(BLOCK_M, BLOCK_N, SWAP)
    if GATHER_X and not X_ORDERED:
        offs_k = fragment_columns(BLOCK)
    for g in range(pid_k * per_split, tl.minimum(pid_k * per_split + per_split, row_blocks)):
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + (g * BLOCK + offs_k)[None, :] * stride_xk,
                     mask=m_mask[:, None], other=0.0)
        blocks = rows * row_blocks + g
        q = tl.load(q_ptr + blocks[:, None] * WORDS + offs_w[None, :])
        if PAIRS:
            w = nf4_level_pairs(q, xt, BLOCK_N, WORDS)
        else:
            w = nf4_levels_tile(q, lut_ptr, BLOCK_N, WORDS, USE_SHFL, GATHER_X)
        s = block_scale(sq_ptr, f_ptr, mean, blocks, SCALER_BLOCK)
        d = dot_acc(dot_tile_zeros(BLOCK_M, BLOCK_N, SWAP), w, xt, SWAP, DOT_FP32)
        if SWAP:
            acc += d * s[:, None]
        else:
            acc += d * s[None, :]
    gemm_finish(acc, offs_m, m_mask, offs_n, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT, HAS_BIAS,
                SWAP)


def nf4_dequantize_triton(qdata, scaler_q, scaler_factor, scaler_mean, n: int, k: int, block_size: int,
                          scaler_block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """w[i] = NF4_LEVELS[code[i]] * s[i // block_size] in fp32, then cast: [n, k] in dtype (Triton kernel)."""
    check_nf4(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size)
    qdata, scaler_q, scaler_factor = unit_stride(qdata, scaler_q, scaler_factor)
    w = torch.empty(n, k, dtype=dtype, device=qdata.device)
    words = 1024
    _nf4_dequant_kernel[(triton.cdiv(n * k, 8 * words),)](
        int32_words(qdata), scaler_q, scaler_factor, scaler_mean, levels_operand(qdata), w, n * k, BLOCK=block_size,
        SCALER_BLOCK=scaler_block_size, WORDS=words, USE_SHFL=not interpreting(), num_warps=4)
    return w


def default_config(m: int, n: int, k: int, block_size: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The configuration used when nothing was tuned for this key (correct on every shape, shown by the tests)."""
    path = default_path("nf4", Problem(m, n, k, dtype, device, block_size))
    if path == "gemv":
        row_blocks = k // block_size
        groups = pow2_at_most(max(1, min(256 // block_size, row_blocks)))
        block_n = 32
        split = gemv_split_k(m * triton.cdiv(n, block_n), triton.cdiv(row_blocks, groups), device)
        return dict(path="gemv", BLOCK_N=block_n, GROUPS=groups, SPLIT_K=split, REDUCE_W=True, LOOP_STAGES=3,
                    num_warps=1, num_stages=3)
    if path == "gemm":
        block_m = min(128, max(16, triton.next_power_of_2(m)))
        # up to 64 rows, 128 rows of w in fragment order, levels from byte permutes (H200, bf16 x, 16 and 64 rows
        # on the four benchmark shapes: 0.93-1.06x bf16 at 16 rows against 0.74-0.86x for 64 rows of w in x's
        # order); where neither applies (fp32 x, the interpreter, blocks under 32) the launcher drops the forms
        pairs = m <= 64 and block_size >= 32
        block_n = 128 if pairs else 64
        split = split_k(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), k // block_size, device)
        return dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, SWAP=True, num_warps=4,
                    num_stages=3, **(dict(GATHER_X=True, PAIRS=True) if pairs else {}))
    return dict(path="dequant")


def candidate_configs(m: int, n: int, k: int, block_size: int, dtype: torch.dtype, device: torch.device):
    """The search space of the tuner for one key."""
    out = [dict(path="dequant")]
    if m <= 8 and gemv_fits(k, block_size):
        row_blocks = k // block_size
        for block_n, warps in ((16, 4), (32, 4), (64, 4), (128, 4), (128, 8)):
            for groups in sorted({pow2_at_most(max(1, min(c // block_size, row_blocks))) for c in (256, 512)}):
                for split in (1, 2, 4, 8):
                    for reduce_w in (False, True):
                        out.append(dict(path="gemv", BLOCK_N=block_n, GROUPS=groups, SPLIT_K=split,
                                        REDUCE_W=reduce_w, num_warps=warps, num_stages=3))
        # the software-pipelined form (LOOP_STAGES) at few warps, where it wins; with 3 stages also without the
        # per-step sum over words (whose cross-thread shuffles compete with the lookups': sm_90, 32 rows, 4 blocks
        # a step, one warp: 1292 instructions a step against 1414)
        for block_n in (32, 64):
            for warps in (1, 2):
                for groups in sorted({pow2_at_most(max(1, min(c // block_size, row_blocks))) for c in (128, 256, 512)}):
                    for split in (1, 2, 4, 8):
                        for stages, reduce_w in ((1, True), (3, True), (4, True), (3, False)):
                            out.append(dict(path="gemv", BLOCK_N=block_n, GROUPS=groups, SPLIT_K=split,
                                            REDUCE_W=reduce_w, LOOP_STAGES=stages, num_warps=warps, num_stages=3))
    # the GEMM from one row: its 16-row tile, levels from byte permutes, can beat the GEMV's shuffled levels there
    if gemm_fits(k, block_size) and dtype != torch.float32:
        for block_m in sorted({16, min(128, max(16, triton.next_power_of_2(m)))}):
            for block_n in (32, 64, 128):
                for split in (1, 2, 3, 4, 8):  # 3: a third wave where powers of two leave the last part-empty
                    fragments = (dict(SWAP=True, GATHER_X=True), dict(SWAP=True, GATHER_X=True, PAIRS=True))
                    if m > 16:  # and on x copied into their order
                        fragments += tuple(dict(f, PERMUTE_X=True) for f in fragments)
                    for form in (dict(SWAP=False), dict(SWAP=True)) + (fragments if block_size >= 32 else ()):
                        for warps, stages in ((4, 3), (4, 4), (8, 3)):
                            for m_fast in (False, True) if m > 64 else (False,):
                                out.append(dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split,
                                                M_FAST=m_fast, num_warps=warps, num_stages=stages, **form))
    if m >= 16 and dtype != torch.float32 and wgmma_fits(k, block_size) and wgmma_runs(device):
        out += wgmma_configs(m, n)
    if m <= MMA_ROWS and dtype != torch.float32 and wgmma_fits(k, block_size) and mma_runs(device):
        out += mma_configs(m, n, k)
    return [c for c in out if fragment_tile_fits(c)]


def wgmma_fits(k: int, block_size: int) -> bool:
    """Whether the ``wgmma`` path takes this weight: blocks of 64 codes and K a multiple of its 128-deep step."""
    return block_size == 64 and k % BLOCK_K_WGMMA == 0


def wgmma_refusal(x, k: int, block_size: int) -> Optional[str]:
    """Why the ``wgmma`` path cannot take this x and weight, or None when it can: blocks of 64 codes, K a multiple
    of 128, fp16 or bf16 x, on a Hopper GPU with Triton's Gluon."""
    if not wgmma_fits(k, block_size):
        return (f"the wgmma path takes blocks of 64 codes and K a multiple of {BLOCK_K_WGMMA}, got "
                f"block_size={block_size}, K={k}")
    return wgmma_x_refusal(x)


def mma_refusal(x, k: int, block_size: int) -> Optional[str]:
    """Why the ``mma`` path cannot take this x and weight, or None when it can: the weights wgmma_fits takes, at
    most MMA_ROWS rows of fp16 or bf16 x, on a GPU of compute capability 8.0 or later with Triton's Gluon."""
    if not wgmma_fits(k, block_size):
        return (f"the mma path takes blocks of 64 codes and K a multiple of {BLOCK_K_WGMMA}, got "
                f"block_size={block_size}, K={k}")
    return mma_x_refusal(x)


def launch(x, qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size, bias,
           config: dict) -> torch.Tensor:
    """Run one path with one configuration (no checks, no tuning): y [M, n] in x.dtype."""
    params = dict(config)
    path = params.pop("path")
    if path == "dequant":
        w = nf4_dequantize_triton(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size,
                                  scaler_block_size, x.dtype)
        return dequantized_linear(x, w, bias)
    qdata, scaler_q, scaler_factor, bias = unit_stride(qdata, scaler_q, scaler_factor, bias)
    if path in ("wgmma", "mma"):
        refusal = wgmma_refusal(x, k, block_size) if path == "wgmma" else mma_refusal(x, k, block_size)
        if refusal:
            raise ValueError(refusal)
        from aofunc.kernels import mma, wgmma  # imports Triton's Gluon

        scales = block_scales_triton(scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size,
                                     x.dtype)
        return (wgmma if path == "wgmma" else mma).nf4_linear(x, qdata[: n * k // 2].view(n, k // 2), scales, bias,
                                                              params)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = params.pop("SPLIT_K")
    if path == "gemv":
        grid = (triton.cdiv(n, params["BLOCK_N"]), m, split)
        kernel = _nf4_gemv_kernel
        extra = dict(EVEN_K=(k // block_size) % params["GROUPS"] == 0, REDUCE_W=params.pop("REDUCE_W", False),
                     LOOP_STAGES=params.pop("LOOP_STAGES", 1))
    else:
        check_fragment_tile(params)
        grid = gemm_grid(m, n, params, split)
        kernel = _nf4_gemm_kernel
        if params.get("PERMUTE_X") and not params.get("GATHER_X"):
            raise ValueError("PERMUTE_X is a form of the GATHER_X tile: a configuration asks for it without GATHER_X")
        # the fragment-ordered forms where they apply (blocks of 32 codes and up; packed pairs on 16-bit x on CUDA)
        gather_x = params.pop("GATHER_X", False) and block_size >= 32
        dot_fp32 = x.dtype == torch.float32 or interpreting()
        extra = dict(DOT_FP32=dot_fp32, M_FAST=params.pop("M_FAST", False), GATHER_X=gather_x,
                     PAIRS=params.pop("PAIRS", False) and gather_x and not dot_fp32,
                     X_ORDERED=params.pop("PERMUTE_X", False) and gather_x)
        if extra["X_ORDERED"]:
            x = fragment_ordered_x(x, k)  # once, so that every program reads x contiguously (k % 32 == 0 here)
    ws, counters = splitk_buffers(y, split, grid[0] * grid[1])
    kernel[grid](
        x, qdata.view(torch.int32), scaler_q, scaler_factor, scaler_mean, levels_operand(x),
        bias if bias is not None else y, y, ws, counters, m, n, k, x.stride(0), x.stride(1), y.stride(0),
        BLOCK=block_size, SCALER_BLOCK=scaler_block_size, split_k=split, SPLIT=split > 1, HAS_BIAS=bias is not None,
        USE_SHFL=not interpreting(), **extra, **pdl_options(x.device, params), **params,
    )
    return y


def nf4_linear_triton(x, qdata, scaler_q, scaler_factor, scaler_mean, n: int, k: int, block_size: int,
                      scaler_block_size: int, bias: Optional[torch.Tensor] = None, *,
                      config: Optional[dict] = None) -> torch.Tensor:
    """y = x @ w.T + bias with Triton kernels (CUDA, or CPU tensors under the interpreter); y in x.dtype."""
    check_nf4(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size)
    _check_linear(x, n, k, bias)
    args = (x, qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size, bias)
    if config is None:
        m = x.shape[0]
        key = autotune.config_key(f"nf4_b{block_size}_s{scaler_block_size}", m, n, k, (x.dtype,), x.device)
        config = autotune.choose(
            key,
            default_config(m, n, k, block_size, x.dtype, x.device),
            candidates=lambda: candidate_configs(m, n, k, block_size, x.dtype, x.device),
            run=lambda c: launch(*args, c),
            reference=lambda: nf4_linear_ref(*args),
            tolerance=tolerance(x.dtype),
        )
        if (config["path"] == "wgmma" and wgmma_refusal(x, k, block_size)) or (
                config["path"] == "mma" and mma_refusal(x, k, block_size)):
            # a stored choice this Triton or these tensors cannot take: the generic path, never an error
            config = default_config(m, n, k, block_size, x.dtype, x.device)
    return launch(*args, config)


@torch.library.custom_op("aofunc::nf4_dequantize", mutates_args=())
def nf4_dequantize(qdata: torch.Tensor, scaler_q: torch.Tensor, scaler_factor: torch.Tensor,
                   scaler_mean: torch.Tensor, n: int, k: int, block_size: int, scaler_block_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """w[i] = NF4_LEVELS[code[i]] * s[i // block_size] in fp32, then cast: [n, k] in dtype (Triton on CUDA)."""
    if qdata.device.type == "cuda":
        return nf4_dequantize_triton(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size,
                                     scaler_block_size, dtype)
    return nf4_dequantize_ref(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size,
                              dtype)


@nf4_dequantize.register_fake
def _(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size, dtype):
    check_nf4(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size)
    return qdata.new_empty(n, k, dtype=dtype)


@torch.library.custom_op("aofunc::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, qdata: torch.Tensor, scaler_q: torch.Tensor, scaler_factor: torch.Tensor,
               scaler_mean: torch.Tensor, n: int, k: int, block_size: int, scaler_block_size: int,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ w.T + bias with w the NF4 weight [n, k]: y [M, n] in x.dtype; differentiable in x and bias.

    One opaque op for ``torch.compile``: Triton kernels on CUDA, the fp32 reference twin elsewhere.
    """
    args = (x, qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size, bias)
    if x.device.type == "cuda":
        return nf4_linear_triton(*args)
    return nf4_linear_ref(*args)


@nf4_linear.register_fake
def _(x, qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size, bias=None):
    check_nf4(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size)
    _check_linear(x, n, k, bias)
    return x.new_empty(x.shape[0], n)


def _setup_context(ctx, inputs, output):
    x, qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size, bias = inputs
    ctx.save_for_backward(qdata, scaler_q, scaler_factor, scaler_mean)
    ctx.shape = (n, k, block_size, scaler_block_size)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_y):
    # y = x @ W.T + b: grad_x = grad_y @ W, grad_b = sum of grad_y over rows; the quantized weight is frozen.
    qdata, scaler_q, scaler_factor, scaler_mean = ctx.saved_tensors
    n, k, block_size, scaler_block_size = ctx.shape
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        w = nf4_dequantize(qdata, scaler_q, scaler_factor, scaler_mean, n, k, block_size, scaler_block_size,
                           grad_y.dtype)
        grad_x = grad_y @ w
    if ctx.bias_dtype is not None and ctx.needs_input_grad[9]:
        grad_b = grad_y.sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, None, None, grad_b


nf4_linear.register_autograd(_backward, setup_context=_setup_context)
