"""W8A16: int8 per-output-channel weights times fp16/bf16/fp32 activations.

y = (x @ q.T) * scale + bias,  q int8 [N, K], scale [N] in the weight's dtype.

Three paths, picked per shape by ``w8a16_linear_triton`` (default thresholds, or a tuned choice): ``gemv``
(fp32 FMA per element, split-K) for a few rows of x, ``gemm`` (``tl.dot`` on int8 tiles made exact floats,
split-K) for medium M, and ``dequant`` (q * scale in x.dtype, then cuBLAS) for large M. On Hopper a fourth,
``wgmma`` (kernels/wgmma.py: Gluon, the warpgroup MMA fed from registers and TMA), runs where a search chose it.
"""
from __future__ import annotations

from typing import Optional

import torch

from aofunc.kernels import autotune
from aofunc.kernels.selector import Problem, default_path
from aofunc.kernels.tiles import (BLOCK_K_WGMMA, FLOAT_DTYPES, check_fragment_tile, check_offsets, dequantized_linear,
                                  dot_acc, dot_tile_zeros, expert_rows, follow_previous, fragment_tile_fits,
                                  gemm_finish, gemm_grid, gemm_tile, gemv_finish, gemv_launch, gemv_rows,
                                  grouped_by_rows, grouped_grid, grouped_split_k, int32_words, interpreting, load_x,
                                  pairs_transposed, pdl_options, row_expert, scaled_rows, split_k, splitk_buffers,
                                  tolerance, unit_stride, wgmma_configs, wgmma_runs, wgmma_x_refusal, MMA_ROWS,
                                  mma_configs, mma_runs, mma_x_refusal)
from aofunc.kernels.triton_compat import tl, triton


def check_w8a16(x, qdata, scale, bias) -> None:
    """Raise ValueError naming the argument when the inputs are not a valid W8A16 problem."""
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if qdata.dtype != torch.int8 or qdata.dim() != 2 or qdata.shape[1] != x.shape[1]:
        raise ValueError(f"qdata must be int8 [N, {x.shape[1]}], got {qdata.dtype} of shape {tuple(qdata.shape)}")
    n = qdata.shape[0]
    if scale.shape != (n,) or scale.dtype not in FLOAT_DTYPES:
        raise ValueError(f"scale must be a float tensor of shape ({n},), got {scale.dtype} of shape "
                         f"{tuple(scale.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in FLOAT_DTYPES):
        raise ValueError(f"bias must be a float tensor of shape ({n},), got {bias.dtype} of shape {tuple(bias.shape)}")
    for name, t in (("qdata", qdata), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def w8a16_linear_ref(x, qdata, scale, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (x @ q.T) * scale + bias, all in fp32, then cast to x.dtype: the kernels' reference twin."""
    check_w8a16(x, qdata, scale, bias)
    y = (x.float() @ qdata.float().T) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def unit_plus_byte(q, J: tl.constexpr):
    """1 + (b + 128)/256, exactly, for int8 b = byte J (0..3) of int32 words (as fp32).

    One shift and one mask-xor-or move the byte into mantissa bits 15..22 of 1.0 with its sign bit flipped
    (b + 128 as unsigned). Callers recover sum(x * b) as 256 * sum(x * (1 + (b + 128)/256)) - 384 * sum(x).
    """
    P: tl.constexpr = 8 * J
    if P <= 15:
        t = q << (15 - P)
    else:
        t = q >> (P - 15)
    return (((t & 0x007F8000) ^ 0x00400000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def byte_value(q, J: tl.constexpr):
    """The int8 byte J (0..3) of int32 words as an exact fp32 value: (b + 128) in the mantissa of 2**23, minus."""
    return ((((q >> (8 * J)) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


# The four int8 bytes of a word as exact fp32 values, on CUDA: one xor flips every byte's sign bit (b + 128 as
# unsigned), then a prmt a byte writes it under the exponent bytes of 2**23 (2**23 + b + 128) and one subtraction
# leaves b. sm_90 SASS of the 16-row GEMM tile: 349 instructions a step against 402 for byte_value, whose shifts,
# masks and ors the compiler does not merge (310 against 357 with EVEN_K).
WORD_BYTES_PTX: tl.constexpr = tl.constexpr(
    "{\n.reg .b32 t, m;\nmov.b32 m, 0x4B000000;\nxor.b32 t, $4, 0x80808080;\n"
    + "".join(f"prmt.b32 ${j}, t, m, {0x7650 | j:#06x};\nsub.f32 ${j}, ${j}, 0f4B000080;\n" for j in range(4)) + "}")


@triton.jit
def word_bytes(q, BYTE_PRMT: tl.constexpr):
    """byte_value(q, j) for j = 0..3: through WORD_BYTES_PTX with BYTE_PRMT (CUDA), else byte_value."""
    if BYTE_PRMT:
        return tl.inline_asm_elementwise(WORD_BYTES_PTX, "=r,=r,=r,=r,r", [q],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
                                         pack=1)
    return byte_value(q, 0), byte_value(q, 1), byte_value(q, 2), byte_value(q, 3)


@triton.jit
def byte_fragment_columns(COLUMNS: tl.constexpr):
    """The column of x that each column c of a byte_fragment_tile multiplies: 4w + j for byte j = (c3 c0) of word
    w = (c >> 4, c2 c1) in binary (pairs of consecutive columns, which the software pipeline copies 4 bytes at a
    time)."""
    c = tl.arange(0, COLUMNS)
    return 16 * (c // 16) + 4 * ((c // 2) % 4) + 2 * ((c // 8) % 2) + c % 2


@triton.jit
def byte_fragment_tile(q, ROWS: tl.constexpr, WORDS: tl.constexpr, BYTE_PRMT: tl.constexpr):
    """The [ROWS, 4 * WORDS] tile of byte values of int32 words q, its columns in fragment order (see
    byte_fragment_columns): column bits 0 and 3 are register bits of Hopper's MMA left operand and bits 1 and 2 lane
    bits, so each word's four bytes stay in the thread that feeds them to the MMA, with no pass through shared
    memory (tiles.nibble_fragments does the same for eight codes a word)."""
    # tl.join appends its choice as the last axis: t[r, w >> 2, w & 3, j0, j1]
    b0, b1, b2, b3 = word_bytes(q, BYTE_PRMT)
    t = tl.reshape(tl.join(tl.join(b0, b1), tl.join(b2, b3)), (ROWS, WORDS // 4, 4, 2, 2))
    return tl.reshape(tl.permute(t, (0, 1, 4, 2, 3)), (ROWS, 4 * WORDS))


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_xk, stride_qn, stride_ym, split_k, offs_ptr, E, stride_qe, stride_se,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, GROUPED: tl.constexpr, XVEC: tl.constexpr, LOOP_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # One row of x, BLOCK_N rows of q, a slice of the steps along K (a step is BLOCK_W int32 words = 4 * BLOCK_W
    # values of a row). q_ptr is qdata viewed as int32 words when K % 4 == 0 (the launcher pads otherwise).
    # GROUPED: q and s are stacks of experts (strides *_e) and x's rows are sorted by expert (end offsets
    # offs_ptr[E]): each row goes through its own expert's weights; rows past the last end come out zero.
    # XVEC: x loaded once a step as contiguous vectors and split by byte position, in place of four strided
    # loads. LOOP_STAGES > 1: the compiler's software pipeline copies the next steps' words into shared memory
    # asynchronously.
    follow_previous(PDL)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n, rows = gemv_rows(N, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    n_words = tl.cdiv(K, 4)
    n_steps = tl.cdiv(n_words, BLOCK_W)
    per_split = tl.cdiv(n_steps, split_k)
    end = tl.minimum(pid_k * per_split + per_split, n_steps)
    if GROUPED:
        expert, has_expert = row_expert(offs_ptr, E, M, pid_m)
        e = expert.to(tl.int64)
        q_ptr += e * stride_qe
        s_ptr += e * stride_se
        end = tl.where(has_expert, end, 0)
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_W], dtype=tl.float32)
    x_row = x_ptr + pid_m * stride_xm
    q_rows = q_ptr + rows[:, None] * stride_qn
    for step in tl.range(pid_k * per_split, end, num_stages=LOOP_STAGES):
        words = step * BLOCK_W + offs_w
        if EVEN_K:
            q = tl.load(q_rows + words[None, :])
        else:
            q = tl.load(q_rows + words[None, :], mask=(words < n_words)[None, :], other=0)
        if XVEC:
            # [BLOCK_W, 4] values of x, then its four columns (byte j of word w multiplies x[4w + j])
            xt = load_x(x_row, (words * 4)[:, None] + tl.arange(0, 4)[None, :], stride_xk, K, EVEN_K)
            x02, x13 = tl.split(tl.reshape(xt, (BLOCK_W, 2, 2)))
            x0, x2 = tl.split(x02)
            x1, x3 = tl.split(x13)
            x_bytes = (x0, x1, x2, x3)
        for j in tl.static_range(4):
            if XVEC:
                xj = x_bytes[j]
            else:
                xj = load_x(x_row, words * 4 + j, stride_xk, K, EVEN_K)
            acc += unit_plus_byte(q, j) * xj[None, :]
            acc_x += xj
    s = tl.load(s_ptr + rows).to(tl.float32)
    y = s * (256.0 * tl.sum(acc, axis=1) - 384.0 * tl.sum(acc_x, axis=0))
    gemv_finish(y, offs_n, pid_m, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT, HAS_BIAS)


@triton.jit
def w8a16_tile(x_ptr, q_ptr, offs_m, m_mask, rows, K, first, last, stride_xm, stride_xk, stride_qn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, DOT_FP32: tl.constexpr,
               SWAP: tl.constexpr, GATHER_X: tl.constexpr, EVEN_K: tl.constexpr, BYTE_PRMT: tl.constexpr,
               X_ORDERED: tl.constexpr):
    """The fp32 accumulator of one tile of x @ q.T (unscaled) over steps first..last of K (a step is BLOCK_W int32
    words, 4 * BLOCK_W columns): rows offs_m of x (m_mask: which are real), rows ``rows`` of q; [BLOCK_N, BLOCK_M]
    with SWAP (computed as dot(q, x.T), the converted weight tile in registers as the left operand, in that
    orientation to the end), else [BLOCK_M, BLOCK_N]. Each step dots x with the bytes of q as exact floats.
    GATHER_X (with SWAP): the tile in fragment order (byte_fragment_tile), x's columns gathered to match. EVEN_K: K
    is a whole number of steps, so no load needs a mask along K. BYTE_PRMT: bytes made floats by word_bytes' PTX.
    X_ORDERED (with GATHER_X): x's columns are already in the tile's order (byte_fragment_ordered_x), read as they
    lie."""
    offs_w = tl.arange(0, BLOCK_W)
    offs_k = tl.arange(0, 4 * BLOCK_W)
    n_words = tl.cdiv(K, 4)
    acc = dot_tile_zeros(BLOCK_M, BLOCK_N, SWAP)
    if GATHER_X and not X_ORDERED:
        offs_k = byte_fragment_columns(4 * BLOCK_W)
    for step in range(first, last + 1):
        k = step * 4 * BLOCK_W + offs_k
        words = step * BLOCK_W + offs_w
        if EVEN_K:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_mask[:, None],
                         other=0.0)
            q = tl.load(q_ptr + rows[:, None] * stride_qn + words[None, :])
        else:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
            q = tl.load(q_ptr + rows[:, None] * stride_qn + words[None, :], mask=(words < n_words)[None, :],
                        other=0)
        if GATHER_X:
            w = byte_fragment_tile(q, BLOCK_N, BLOCK_W, BYTE_PRMT)
        else:
            # tl.join appends its choice as the last axis: t[..., a, b] = byte 2a + b.
            b0, b1, b2, b3 = word_bytes(q, BYTE_PRMT)
            w = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BLOCK_N, 4 * BLOCK_W))
        acc = dot_acc(acc, w, xt, SWAP, DOT_FP32)
    return acc


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_xk, stride_qn, stride_ym, split_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, SWAP: tl.constexpr, M_FAST: tl.constexpr,
    GATHER_X: tl.constexpr, EVEN_K: tl.constexpr, BYTE_PRMT: tl.constexpr, X_ORDERED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # A BLOCK_M x BLOCK_N tile of y over this program's split of K (w8a16_tile); the per-row scale is applied once
    # at the end.
    follow_previous(PDL)
    offs_m, m_mask, offs_n, rows = gemm_tile(M, N, BLOCK_M, BLOCK_N, M_FAST)
    n_steps = tl.cdiv(tl.cdiv(K, 4), BLOCK_W)
    per_split = tl.cdiv(n_steps, split_k)
    first = tl.program_id(2) * per_split
    acc = w8a16_tile(x_ptr, q_ptr, offs_m, m_mask, rows, K, first, tl.minimum(first + per_split, n_steps) - 1,
                     stride_xm, stride_xk, stride_qn, BLOCK_M, BLOCK_N, BLOCK_W, DOT_FP32, SWAP, GATHER_X, EVEN_K,
                     BYTE_PRMT, X_ORDERED)
    gemm_finish(scaled_rows(acc, s_ptr, rows, SWAP), offs_m, m_mask, offs_n, M, N, stride_ym, b_ptr, y_ptr, ws_ptr,
                cnt_ptr, split_k, SPLIT, HAS_BIAS, SWAP)


@triton.jit
def _w8a16_grouped_kernel(
    x_ptr, q_ptr, s_ptr, offs_ptr, y_ptr, ws_ptr, cnt_ptr,
    S, N, K, E, stride_xm, stride_xk, stride_qe, stride_qn, stride_se, stride_ym, split_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
    DOT_FP32: tl.constexpr, SWAP: tl.constexpr, GATHER_X: tl.constexpr, EVEN_K: tl.constexpr,
    BYTE_PRMT: tl.constexpr,
):
    # A BLOCK_M x BLOCK_N tile of y for the rows of one expert (expert_rows), over this program's split of K,
    # through that expert's weights: every routed expert of a layer in one launch.
    expert, offs_m, m_mask, valid = expert_rows(offs_ptr, E, S, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    e = expert.to(tl.int64)
    n_steps = tl.cdiv(tl.cdiv(K, 4), BLOCK_W)
    per_split = tl.cdiv(n_steps, split_k)
    first = tl.program_id(2) * per_split
    last = tl.where(valid, tl.minimum(first + per_split, n_steps) - 1, -1)  # a program with no rows runs no step
    acc = w8a16_tile(x_ptr, q_ptr + e * stride_qe, offs_m, m_mask, rows, K, first, last, stride_xm, stride_xk,
                     stride_qn, BLOCK_M, BLOCK_N, BLOCK_W, DOT_FP32, SWAP, GATHER_X, EVEN_K, BYTE_PRMT, False)
    gemm_finish(scaled_rows(acc, s_ptr + e * stride_se, rows, SWAP), offs_m, m_mask, offs_n, S, N, stride_ym, y_ptr,
                y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT, False, SWAP)


@triton.jit
def _w8a16_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # w[n, k] = q[n, k] * scale[n] in fp32, then cast, for a BLOCK_N x BLOCK_K tile.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    q = tl.load(q_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], (q.to(tl.float32) * s[:, None]).to(w_ptr.dtype.element_ty),
             mask=mask)


def w8a16_dequantize(qdata, scale, dtype: torch.dtype) -> torch.Tensor:
    """w = q * scale[:, None] in fp32, then cast: [N, K] in dtype (Triton kernel)."""
    n, k = qdata.shape
    w = torch.empty(n, k, dtype=dtype, device=qdata.device)
    grid = (triton.cdiv(n, 16), triton.cdiv(k, 256))
    _w8a16_dequant_kernel[grid](qdata.contiguous(), scale.contiguous(), w, n, k, BLOCK_N=16, BLOCK_K=256, num_warps=4)
    return w


def default_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The configuration used when nothing was tuned for this key (correct on every shape, shown by the tests)."""
    n_words = -(-k // 4)
    path = default_path("w8a16", Problem(m, n, k, dtype, device))
    if path == "gemv":
        return gemv_config(m, n, k, device)
    if path == "gemm":
        block_m = min(128, max(16, triton.next_power_of_2(m)))
        block_w = 32
        if m > 64 and n >= 8192 and k % 16 == 0:
            # wide weights past 64 rows: the fragment-ordered tile on x copied into its order (H200, 8192 x 28672
            # at 128 and 256 rows: 147.0 and 281.9 us against 186.2 for 128 rows of w on 8 warps in x's order and
            # 358.8 for dequantization + cuBLAS)
            programs = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
            return dict(path="gemm", BLOCK_M=block_m, BLOCK_N=64, BLOCK_W=block_w,
                        SPLIT_K=split_k(programs, triton.cdiv(n_words, block_w), device), SWAP=True, GATHER_X=True,
                        PERMUTE_X=True, M_FAST=True, num_warps=4, num_stages=3)
        # past 64 rows of x, 128 rows of w on 8 warps for wide weights (H200, 128 rows of x: 8192 x 28672 in 186.6
        # us against 290.5 with 64 rows of w on 4 warps; 4096 x 14336 in 50.3 against 74.6)
        block_n, warps = (128, 8) if m > 64 and n >= 8192 else (64, 4)
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        split = split_k(programs, triton.cdiv(n_words, block_w), device)
        # up to 32 rows of x the fragment-ordered tile (H200: 1.15x bf16 at 16 rows of 8192 x 28672, from 0.84x)
        return dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split, SWAP=True,
                    GATHER_X=m <= 32, num_warps=warps, num_stages=3)
    return dict(path="dequant")


def gemv_config(rows: int, n: int, k: int, device: torch.device) -> dict:
    """The GEMV kernel's default configuration for ``rows`` rows of x (one program per row and BLOCK_N outputs)."""
    # x as byte-split vectors in the software-pipelined loop: on an H200, at one row 1.22-1.99x bf16 against
    # 1.16-1.81x for four strided loads (8192 x 28672: 61.2 against 67.4 us), at two rows 0.95-1.03x against 0.65-0.90x
    block_n, block_w = 64, 64
    split = split_k(rows * triton.cdiv(n, block_n), triton.cdiv(triton.cdiv(k, 4), block_w), device)
    return dict(path="gemv", BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split, XVEC=True, LOOP_STAGES=3,
                num_warps=4, num_stages=3)


def candidate_configs(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device):
    """The search space of the tuner for one key: every path and its block sizes, warps, stages, splits."""
    out = [dict(path="dequant")]
    if m <= 8:
        # 16 rows of w on 2 warps too (H200, one row of 8192 x 28672: 58.8 us against 59.6 on 4)
        for block_n, warps in ((16, 2), (16, 4), (32, 4), (64, 4), (128, 4)):
            for block_w in (32, 64):
                for split in (1, 2, 4, 8):
                    config = dict(path="gemv", BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split, num_warps=warps,
                                  num_stages=3)
                    # x as vectors split by byte (fewer instructions a code on sm_90), then also pipelined, 3 or 8
                    # steps deep (8: H200, one row of 4096 x 4096, 8.0 us against 8.6 with 3)
                    out += [config, dict(config, XVEC=True)] + [dict(config, XVEC=True, LOOP_STAGES=stages)
                                                                for stages in (3, 8)]
    if m >= 2 and dtype != torch.float32:
        block_m = min(128, max(16, triton.next_power_of_2(m)))
        # also half the rows of x a tile (more tiles: H200, 128 rows of 4096 x 4096, 64-row tiles won)
        for block_m in sorted({16, block_m, max(16, block_m // 2)}):
            for block_n, warps in ((32, 4), (64, 4), (128, 4), (128, 8)):
                for split in (1, 2, 4, 8):
                    # past 64 rows also the tiles walked along M first (M_FAST), the order sweep_gemm times there
                    forms = [dict(SWAP=False), dict(SWAP=True), dict(SWAP=True, GATHER_X=True)]
                    for form in forms + ([dict(SWAP=True, M_FAST=True)] if m > 64 else []):
                        for stages in (3, 4):
                            out.append(dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=32,
                                            SPLIT_K=split, num_warps=warps, num_stages=stages, **form))
        # past 16 rows, x copied into the fragment order once (PERMUTE_X) for tiles of up to 128 rows of x (256
        # rows take more shared memory than an H200 has at three stages), read in 16-byte copies rather than
        # gathered 4 bytes at a time (H200, 128 and 256 rows of 8192 x 28672: 147.0 and 281.9 us against 186.2 and
        # 358.8 for the gathered tile); on up to 4 warps, see launch
        if m > 16 and k % 16 == 0:
            for block_m in sorted({min(128, triton.next_power_of_2(m))} | ({64} if m > 64 else set())):
                for block_n, warps in ((64, 4), (128, 4)):
                    for split in (1, 2, 3, 4, 8):
                        out.append(dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=32, SPLIT_K=split,
                                        SWAP=True, GATHER_X=True, PERMUTE_X=True, M_FAST=m > 64, num_warps=warps,
                                        num_stages=3))
    if m >= 16 and dtype != torch.float32 and k % BLOCK_K_WGMMA == 0 and wgmma_runs(device):
        out += wgmma_configs(m, n)
    if m <= MMA_ROWS and dtype != torch.float32 and k % BLOCK_K_WGMMA == 0 and mma_runs(device):
        out += mma_configs(m, n, k)
    return [c for c in out if fragment_tile_fits(c)]


def wgmma_refusal(x) -> Optional[str]:
    """Why the ``wgmma`` path cannot take this x, or None when it can: fp16 or bf16 x whose K is a multiple of 128,
    on a Hopper GPU with Triton's Gluon."""
    if x.shape[1] % BLOCK_K_WGMMA:
        return f"the wgmma path takes K a multiple of {BLOCK_K_WGMMA}, got K={x.shape[1]}"
    return wgmma_x_refusal(x)


def mma_refusal(x) -> Optional[str]:
    """Why the ``mma`` path cannot take this x, or None when it can: at most MMA_ROWS rows of fp16 or bf16 x whose K
    is a multiple of 128, on a GPU of compute capability 8.0 or later with Triton's Gluon."""
    if x.shape[1] % BLOCK_K_WGMMA:
        return f"the mma path takes K a multiple of {BLOCK_K_WGMMA}, got K={x.shape[1]}"
    return mma_x_refusal(x)


def launch(x, qdata, scale, bias, config: dict) -> torch.Tensor:
    """Run one path with one configuration (no checks, no tuning): y [M, N] in x.dtype. The GEMM takes its loads
    unmasked along K where K allows (EVEN_K) and its bytes made floats by prmt on CUDA (BYTE_PRMT); a configuration
    may set either to False (the slower forms, for comparisons)."""
    m, k = x.shape
    n = qdata.shape[0]
    params = dict(config)
    path = params.pop("path")
    if path == "dequant":
        return dequantized_linear(x, w8a16_dequantize(qdata, scale, x.dtype), bias)
    if path == "gemv":
        return gemv(x, qdata, scale, bias, params)
    if path in ("wgmma", "mma"):
        refusal = wgmma_refusal(x) if path == "wgmma" else mma_refusal(x)
        if refusal:
            raise ValueError(refusal)
        from aofunc.kernels import mma, wgmma  # imports Triton's Gluon

        return (wgmma if path == "wgmma" else mma).w8a16_linear(x, qdata, scale, bias, params)
    scale, bias = unit_stride(scale, bias)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = params.pop("SPLIT_K")
    words = int32_words(qdata)
    grid = gemm_grid(m, n, params, split)
    ws, counters = splitk_buffers(y, split, grid[0] * grid[1])
    check_fragment_tile(params)
    gather_x, permute_x = params.pop("GATHER_X", False), params.pop("PERMUTE_X", False)
    if permute_x:
        if not gather_x or k % 16:
            raise ValueError(f"PERMUTE_X is a form of the GATHER_X tile for K a multiple of 16 (K={k})")
        if params["num_warps"] > 4 and not interpreting():
            # on an H200 (Triton 3.6) 64 x 128 tiles on 8 warps summed wrong values on wide weights
            raise ValueError(f"W8A16's PERMUTE_X tile runs on at most 4 warps, got {params['num_warps']}")
        x = byte_fragment_ordered_x(x)  # once, so that every program reads x contiguously
    _w8a16_gemm_kernel[grid](
        x, words, scale, bias if bias is not None else y, y, ws, counters,
        m, n, k, x.stride(0), x.stride(1), words.stride(0), y.stride(0),
        split_k=split, SPLIT=split > 1, HAS_BIAS=bias is not None, DOT_FP32=x.dtype == torch.float32 or interpreting(),
        M_FAST=params.pop("M_FAST", False), GATHER_X=gather_x, X_ORDERED=permute_x,
        EVEN_K=params.pop("EVEN_K", True) and k % (4 * params["BLOCK_W"]) == 0,
        BYTE_PRMT=params.pop("BYTE_PRMT", True) and not interpreting(), **pdl_options(x.device, params), **params,
    )
    return y


def byte_fragment_ordered_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 16) with its columns in byte_fragment_columns' order, a copy: pairs of columns
    as a 4 x 2 transpose within every 16 columns."""
    return pairs_transposed(x, x.shape[1], 4, 2)


def gemv(x, qdata, scale, bias, params: dict, *, offs=None) -> torch.Tensor:
    """The GEMV kernel with a configuration's parameters (``path`` taken out): one weight, or with ``offs`` a stack
    of experts whose rows of x are sorted by expert (end offsets [E]). y [M, N] in x.dtype."""
    params = dict(params)
    m, k = x.shape
    n = qdata.shape[-2]
    scale, bias, offs = unit_stride(scale, bias, offs)
    y, grid, split, ws, counters = gemv_launch(x, n, params)
    words = int32_words(qdata)
    stacked = offs is not None
    _w8a16_gemv_kernel[grid](
        x, words, scale, bias if bias is not None else y, y, ws, counters, m, n, k, x.stride(0), x.stride(1),
        words.stride(-2), y.stride(0), split, offs if stacked else scale, qdata.shape[0] if stacked else 1,
        words.stride(0) if stacked else 0, scale.stride(0) if stacked else 0, SPLIT=split > 1,
        HAS_BIAS=bias is not None, EVEN_K=k % (4 * params["BLOCK_W"]) == 0, GROUPED=stacked,
        XVEC=params.pop("XVEC", False), LOOP_STAGES=params.pop("LOOP_STAGES", None), **pdl_options(x.device, params),
        **params)
    return y


def w8a16_linear_triton(x, qdata, scale, bias: Optional[torch.Tensor] = None, *,
                        config: Optional[dict] = None) -> torch.Tensor:
    """y = (x @ q.T) * scale + bias with Triton kernels (CUDA, or CPU tensors under the interpreter).

    ``config`` forces a path and its meta-parameters; otherwise the tuned or default one for the shape is used.
    """
    check_w8a16(x, qdata, scale, bias)
    if config is None:
        m, k = x.shape
        n = qdata.shape[0]
        key = autotune.config_key("w8a16", m, n, k, (x.dtype, scale.dtype), x.device)
        config = autotune.choose(
            key,
            default_config(m, n, k, x.dtype, x.device),
            candidates=lambda: candidate_configs(m, n, k, x.dtype, x.device),
            run=lambda c: launch(x, qdata, scale, bias, c),
            reference=lambda: w8a16_linear_ref(x, qdata, scale, bias),
            tolerance=tolerance(x.dtype),
        )
        if (config["path"] == "wgmma" and wgmma_refusal(x)) or (config["path"] == "mma" and mma_refusal(x)):
            # a stored choice this Triton or these tensors cannot take: the generic path, never an error
            config = default_config(m, n, k, x.dtype, x.device)
    return launch(x, qdata, scale, bias, config)


@torch.library.custom_op("aofunc::w8a16_linear", mutates_args=())
def w8a16_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (x @ q.T) * scale + bias: y [M, N] in x.dtype.

    One opaque op for ``torch.compile``: Triton kernels on CUDA, the fp32 reference twin elsewhere.
    """
    if x.device.type == "cuda":
        return w8a16_linear_triton(x, qdata, scale, bias)
    return w8a16_linear_ref(x, qdata, scale, bias)


@w8a16_linear.register_fake
def _(x, qdata, scale, bias=None):
    check_w8a16(x, qdata, scale, bias)
    return x.new_empty(x.shape[0], qdata.shape[0])


# ---------------------------------------------------------------------------------------------- stacked experts

def check_w8a16_grouped(x, qdata, scale, offs) -> None:
    """Raise ValueError naming the argument when the inputs are not a valid grouped W8A16 problem: x [S, K] with its
    rows sorted by expert, stacked weights (qdata int8 [E, N, K], scale [E, N]) and offs [E]."""
    if qdata.dim() != 3:
        raise ValueError(f"qdata must be a stack of experts [E, N, K], got shape {tuple(qdata.shape)}")
    if scale.dim() != 2 or scale.shape[0] != qdata.shape[0]:
        raise ValueError(f"scale must be [E, N] with E = {qdata.shape[0]}, got shape {tuple(scale.shape)}")
    check_w8a16(x, qdata[0], scale[0], None)
    check_offsets(offs, qdata.shape[0], x)


def w8a16_grouped_linear_ref(x, qdata, scale, offs) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x through expert e (w8a16_linear_ref), rows past offs[-1] zero: the grouped
    kernel's twin."""
    check_w8a16_grouped(x, qdata, scale, offs)
    y = x.new_zeros(x.shape[0], qdata.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            y[start:end] = w8a16_linear_ref(x[start:end], qdata[e], scale[e])
        start = end
    return y


def grouped_config(s: int, experts: int, n: int, k: int, device: torch.device) -> dict:
    """The grouped product's configuration for s rows over `experts` experts of [n, k]. Up to a row an expert on
    average (decode) the GEMV kernel, a program per row through its expert, rather than tiles of 16 rows that are
    mostly padding; else tiles of about the rows an expert gets (at least 16), the fragment-ordered tile up to 32
    rows as for a single weight, K split while the busy tiles cannot fill the card."""
    if grouped_by_rows(s, experts):
        return gemv_config(s, n, k, device)
    block_m = min(64, max(16, triton.next_power_of_2(max(1, s // max(experts, 1)))))
    split = grouped_split_k(s, experts, triton.cdiv(n, 64), block_m, triton.cdiv(triton.cdiv(k, 4), 32), device)
    return dict(path="grouped", BLOCK_M=block_m, BLOCK_N=64, BLOCK_W=32, SPLIT_K=split, SWAP=True,
                GATHER_X=block_m <= 32, num_warps=4, num_stages=3)


def w8a16_grouped_linear_triton(x, qdata, scale, offs, *, config: Optional[dict] = None) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x [S, K] through expert e of the stack, every expert in one launch (Triton: CUDA,
    or CPU tensors under the interpreter); rows past offs[-1] come back as zeros. y [S, N] in x.dtype."""
    check_w8a16_grouped(x, qdata, scale, offs)
    s, k = x.shape
    experts, n = qdata.shape[0], qdata.shape[1]
    params = dict(config or grouped_config(s, experts, n, k, x.device))
    if params.pop("path", "grouped") == "gemv":
        return gemv(x, qdata, scale, None, params, offs=offs)
    scale, offs = unit_stride(scale, offs)
    check_fragment_tile(params)
    words = int32_words(qdata)
    split = params.pop("SPLIT_K", 1)
    y = torch.zeros(s, n, dtype=x.dtype, device=x.device)
    grid = grouped_grid(s, experts, n, params, split)
    ws, counters = splitk_buffers(y, split, grid[0] * grid[1])
    _w8a16_grouped_kernel[grid](
        x, words, scale, offs, y, ws, counters, s, n, k, experts, x.stride(0), x.stride(1), words.stride(0),
        words.stride(1), scale.stride(0), y.stride(0), split, SPLIT=split > 1,
        DOT_FP32=x.dtype == torch.float32 or interpreting(), EVEN_K=k % (4 * params["BLOCK_W"]) == 0,
        BYTE_PRMT=not interpreting(), **params)
    return y


@torch.library.custom_op("aofunc::w8a16_grouped_linear", mutates_args=())
def w8a16_grouped_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                         offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x through expert e of a stacked int8 weight (y = x @ q_e.T * scale_e), rows past
    offs[-1] zero: one opaque op for ``torch.compile``; the grouped kernel on CUDA, the twin elsewhere."""
    if x.device.type == "cuda":
        return w8a16_grouped_linear_triton(x, qdata, scale, offs)
    return w8a16_grouped_linear_ref(x, qdata, scale, offs)


@w8a16_grouped_linear.register_fake
def _(x, qdata, scale, offs):
    check_w8a16(x, qdata[0], scale[0], None)
    return x.new_empty(x.shape[0], qdata.shape[1])
