"""W4A16: int4 groupwise weights (tinygemm convention) times fp16/bf16/fp32 activations.

y = x @ w[:, :K].T + bias, on one of three grids, by what ``zero`` is:

- a float tensor (tinygemm's grid): w[n, k] = (code[n, k] - 8) * scale[n, k // g] + zero[n, k // g];
- a uint8 tensor of integer zero points (GPTQ's): w[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g];
- None (symmetric): w[n, k] = (code[n, k] - 8) * scale[n, k // g].

Layout (as stored; docs/file-format.md): ``qdata`` uint8 [N, Kp/2], byte j of row n = (code[2j] << 4) | code[2j+1];
``scale`` (and ``zero``) [N, Kp/g]; Kp = K rounded up to the group ``g`` in {32, 64, 128, 256}. The kernels see
every grid as tinygemm's: the integer grid's float zero is (8 - zero) * scale, exact in fp32 for 16-bit scales,
derived inside the kernels (nothing is built per call), and the symmetric grid is the integer one with zero 8.

Three paths, picked per shape by ``w4a16_linear_triton`` (the selector's table, or a tuned choice):
``gemv`` for a few rows of x (fp32 FMA per element, split-K; ``REDUCE_W`` keeps one accumulator per row and
group), ``gemm`` (``tl.dot`` on dequantized tiles, split-K; ``GATHER_X`` builds the tile in the tensor cores'
register order and gathers x's columns to match, ``SPLIT_X`` makes eight dots, one per code position of the packed
words) for medium M, and ``dequant`` (one dequantization kernel, then cuBLAS) for large M. On Hopper a fourth,
``wgmma`` (kernels/wgmma.py: Gluon, the warpgroup MMA fed from registers and TMA), runs where a search chose it.
"""
from __future__ import annotations

from typing import Optional

import torch

from aofunc.kernels import autotune
from aofunc.kernels.activations import EPS_F32, asym_centered, row_asym_qparams
from aofunc.kernels.packing import GROUP_SIZES, pack_uint4, unpack_uint4
from aofunc.kernels.selector import Problem, default_path
from aofunc.kernels.tiles import (BLOCK_K_WGMMA, FLOAT_DTYPES, check_fragment_tile, check_offsets, dequantized_linear,
                                  dot_acc, dot_tile_zeros, expert_rows, fragment_column_of, fragment_columns,
                                  follow_previous, fragment_tile_fits, gemm_finish, gemm_grid, gemm_tile,
                                  gemv_accumulator, gemv_finish, gemv_launch, gemv_rows, gemv_split_k,
                                  grouped_by_rows, grouped_grid, grouped_split_k, int32_words, interleave8,
                                  interpreting, load_x, nibble_fragments, fragment_ordered_x, pdl_options,
                                  pow2_at_most, row_expert, scaled_rows, split_by_code, split_k, splitk_buffers,
                                  tolerance, unit_stride, wgmma_configs, wgmma_runs, wgmma_x_refusal, MMA_ROWS,
                                  mma_configs, mma_runs, mma_x_refusal, word_pairs_fragments)
from aofunc.kernels.triton_compat import tl, triton

# The smallest group whose eighth is a whole tl.dot depth (16): the GEMM's SPLIT_X form needs it.
SPLIT_X_MIN_GROUP = 128
# Rows of w at least this long take the GEMV's long-row default (fewer codes a step, one warp).
LONG_ROW_K = 8192


def check_w4a16(x, qdata, scale, zero, group_size, bias) -> None:
    """Raise ValueError naming the argument when the inputs are not a valid W4A16 problem."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    k = x.shape[1]
    kp = -(-k // group_size) * group_size
    if qdata.dtype != torch.uint8 or qdata.dim() != 2 or qdata.shape[1] != kp // 2:
        raise ValueError(f"qdata must be uint8 [N, {kp // 2}] for K={k}, g={group_size}; got "
                         f"{qdata.dtype} of shape {tuple(qdata.shape)}")
    n = qdata.shape[0]
    groups = (n, kp // group_size)
    if scale.shape != groups or scale.dtype not in FLOAT_DTYPES:
        raise ValueError(f"scale must be a float tensor of shape {groups}, got {scale.dtype} of shape "
                         f"{tuple(scale.shape)}")
    if zero is not None and (zero.shape != groups or zero.dtype not in FLOAT_DTYPES + (torch.uint8,)):
        raise ValueError(f"zero must be a float or uint8 tensor of shape {groups} (or None), got {zero.dtype} "
                         f"of shape {tuple(zero.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in FLOAT_DTYPES):
        raise ValueError(f"bias must be a float tensor of shape ({n},), got {bias.dtype} of shape {tuple(bias.shape)}")
    for name, t in (("qdata", qdata), ("scale", scale), ("zero", zero), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def w4a16_dequantize_ref(qdata, scale, zero, group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """w on the grid ``zero`` names (see the module), computed in fp32, then cast: [N, k] in dtype."""
    codes = unpack_uint4(qdata).float()
    s = scale.float().repeat_interleave(group_size, dim=1)
    if zero is None:
        w = (codes - 8) * s
    elif zero.dtype == torch.uint8:
        w = (codes - zero.float().repeat_interleave(group_size, dim=1)) * s
    else:
        w = (codes - 8) * s + zero.float().repeat_interleave(group_size, dim=1)
    return w[:, :k].to(dtype)


def w4a16_linear_ref(x, qdata, scale, zero, group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ w.T + bias, all in fp32 (w dequantized in fp32), then cast to x.dtype: the kernels' reference twin."""
    check_w4a16(x, qdata, scale, zero, group_size, bias)
    w = w4a16_dequantize_ref(qdata, scale, zero, group_size, x.shape[1], torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# The bits of fp32 1.0. The GEMV takes them as an argument: the compiler then emits (t & mask) | one_bits as one
# lop3 instruction, against an and and an or when both operands are constants. The GEMM uses the constant: its
# dequantized tiles ran slower with the operand (H100).
ONE_BITS: tl.constexpr = tl.constexpr(0x3F800000)


@triton.jit
def unit_plus_code(q, J: tl.constexpr, one_bits):
    """1 + code/16, exactly, for code J (0..7) of int32 words of packed codes (as fp32); one_bits = ONE_BITS.

    Code J of a word sits in bits 4*(J^1)..+3 (bytes little-endian, first code of a byte in its high nibble);
    one shift and one mask-or move it into mantissa bits 19..22 of 1.0, which no int-to-float conversion does
    as cheaply. Callers recover sum(x * code) as 16 * (sum(x * (1 + code/16)) - sum(x)).
    """
    P: tl.constexpr = 4 * (J ^ 1)
    if P <= 19:
        t = q << (19 - P)
    else:
        t = q >> (P - 19)
    return ((t & 0x00780000) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def coarse_unit(q, J: tl.constexpr, one_bits):
    """Code J (0..7) of int32 words q as fp32, exactly: 1 + code/2**11 for even J, 1 + code/2**7 for odd J.

    Three shifts of a word (left 8, right 8, rotate 16) put every code in bits 12..15 or 16..19, so the eight
    codes of a word cost three shifts and eight mask-ors, against eight shifts for unit_plus_code. The coarser
    steps cost precision in sum(x * unit) - sum(x): enough for 16-bit activations, not for fp32.
    """
    u = q.to(tl.uint32, bitcast=True)
    if J == 2 or J == 5:
        t = u
    elif J == 0 or J == 3:
        t = u << 8
    elif J == 4 or J == 7:
        t = u >> 8
    else:
        t = (u << 16) | (u >> 16)
    if J % 2 == 0:
        bits = (t.to(tl.int32, bitcast=True) & 0xF000) | one_bits
    else:
        bits = (t.to(tl.int32, bitcast=True) & 0xF0000) | one_bits
    return bits.to(tl.float32, bitcast=True)



# How a kernel reads ``zero``: float zeros, integer zero points, or none stored (the integer grid with zero 8).
FLOAT_ZERO: tl.constexpr = tl.constexpr(0)
INT_ZERO: tl.constexpr = tl.constexpr(1)
NO_ZERO: tl.constexpr = tl.constexpr(2)


def zero_kind(zero: Optional[torch.Tensor]) -> int:
    """The kernels' ZERO argument for a ``zero`` tensor: FLOAT_ZERO, INT_ZERO (uint8) or NO_ZERO (None)."""
    if zero is None:
        return NO_ZERO.value
    return INT_ZERO.value if zero.dtype == torch.uint8 else FLOAT_ZERO.value


@triton.jit
def load_zero(z_ptr, offsets, mask, ZERO: tl.constexpr):
    """The stored zeros at z_ptr + offsets as loaded (float, or uint8 zero points), 8 where none are stored."""
    if ZERO == NO_ZERO:
        return tl.full(offsets.shape, 8, tl.uint8)
    elif mask is None:
        return tl.load(z_ptr + offsets)
    else:
        return tl.load(z_ptr + offsets, mask=mask, other=0)


@triton.jit
def float_zero(z, s, ZERO: tl.constexpr):
    """The fp32 zero of tinygemm's grid, w = (code - 8) * s + zero, from load_zero's z and fp32 scales s."""
    if ZERO == FLOAT_ZERO:
        return z.to(tl.float32)
    else:
        return (8.0 - z.to(tl.float32)) * s


@triton.jit
def _gemv_step_loads(q_rows, s_rows, z_rows, step, offs_g, offs_w, n_groups, GROUPS: tl.constexpr,
                     WORDS: tl.constexpr, EVEN_K: tl.constexpr, ZERO: tl.constexpr):
    # The codes [BLOCK_N, GROUPS, WORDS], fp32 scales and float zeros [BLOCK_N, GROUPS] of one step.
    grp = step * GROUPS + offs_g
    words = grp[:, None] * WORDS + offs_w[None, :]
    if EVEN_K:
        q = tl.load(q_rows + words[None, :, :])
        s = tl.load(s_rows + grp[None, :]).to(tl.float32)
        z = load_zero(z_rows, grp[None, :], None, ZERO)
    else:
        g_mask = grp < n_groups
        q = tl.load(q_rows + words[None, :, :], mask=g_mask[None, :, None], other=0)
        s = tl.load(s_rows + grp[None, :], mask=g_mask[None, :], other=0.0).to(tl.float32)
        z = load_zero(z_rows, grp[None, :], g_mask[None, :], ZERO)
    return q, s, float_zero(z, s, ZERO)


@triton.jit
def x_columns(positions, PREPACKED: tl.constexpr):
    """The columns of x that the codes at these stored positions of a row multiply (positions within a group, or
    any: the map keeps every 32 columns in place)."""
    if PREPACKED:
        return fragment_column_of(positions)
    else:
        return positions


@triton.jit
def _gemv_load_x(x_row, cols, stride_xk, K, EVEN_K: tl.constexpr, s_x, zp_x, QUANT_X: tl.constexpr):
    """x_row at these columns in fp32 (0 past K); with QUANT_X its centered per-token int8 codes xq - zp."""
    x = load_x(x_row, cols, stride_xk, K, EVEN_K)
    if QUANT_X:
        x = asym_centered(x, s_x, zp_x)
    return x


@triton.jit
def _gemv_step_x(x_row, step_cols, x_local, stride_xk, K, EVEN_K: tl.constexpr, GROUPS: tl.constexpr,
                 WORDS: tl.constexpr, XVEC: tl.constexpr, s_x, zp_x, QUANT_X: tl.constexpr):
    """With XVEC, one row of x's values for the step loaded once as contiguous vectors and split by code position
    (eight [GROUPS, WORDS] tiles); else x_local, a placeholder nothing reads (_gemv_x_of_code loads them code by code;
    a jitted function cannot return None)."""
    if XVEC:
        return split_by_code(_gemv_load_x(x_row, step_cols + x_local[None, :], stride_xk, K, EVEN_K, s_x, zp_x,
                                          QUANT_X), GROUPS, WORDS)
    else:
        return x_local


@triton.jit
def _gemv_x_of_code(x_row, x_codes, step_cols, offs_w, J: tl.constexpr, stride_xk, K, EVEN_K: tl.constexpr,
                    XVEC: tl.constexpr, PREPACKED: tl.constexpr, s_x, zp_x, QUANT_X: tl.constexpr):
    """The [GROUPS, WORDS] values of one row of x that code J of each word of the step multiplies."""
    if XVEC:
        return x_codes[J]
    else:
        return _gemv_load_x(x_row, step_cols + x_columns(offs_w * 8 + J, PREPACKED)[None, :], stride_xk, K, EVEN_K,
                            s_x, zp_x, QUANT_X)


@triton.jit
def _coarse_x(xj, J: tl.constexpr):
    """x weighted for coarse_unit's code J: 16 x for even codes (units of 2**-11 against 2**-7 for odd ones)."""
    if J % 2 == 0:
        return 16.0 * xj
    else:
        return xj


@triton.jit
def _gemv_fold(acc, acc_zero, part, xu_sum, x_sum, s, z, unit, REDUCE_W: tl.constexpr):
    """One step's products of one row of x folded into its accumulators: sum over the step of x * (code - 8) * s +
    x * z = unit s (part - sum(xu)) + (z - 8 s) sum(x)."""
    x_group = tl.sum(x_sum, axis=1)
    if REDUCE_W:
        acc += (tl.sum(part, axis=2) - tl.sum(xu_sum, axis=1)[None, :]) * (unit * s)
    else:
        acc += (part - xu_sum[None, :, :]) * (unit * s)[:, :, None]
    acc_zero += (z - 8.0 * s) * x_group[None, :]
    return acc, acc_zero


@triton.jit
def _gemv_total(acc, acc_zero, REDUCE_W: tl.constexpr):
    """A row of x's [BLOCK_N] outputs from its accumulators."""
    if REDUCE_W:
        return tl.sum(acc + acc_zero, axis=1)
    else:
        return tl.sum(tl.sum(acc, axis=2), axis=1) + tl.sum(acc_zero, axis=1)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym, split_k, one_bits,
    offs_ptr, E, stride_qe, stride_se, stride_ze, rs_ptr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, REDUCE_W: tl.constexpr,
    COARSE: tl.constexpr, XVEC: tl.constexpr, LOOP_STAGES: tl.constexpr, ZERO: tl.constexpr,
    GROUPED: tl.constexpr, ROW_SCALE: tl.constexpr, PREPACKED: tl.constexpr, TWO_ROWS: tl.constexpr,
    QUANT_X: tl.constexpr, SCAN_BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    # One row of x (two with TWO_ROWS), BLOCK_N rows of w, a slice of the steps along K (a step is GROUPS groups).
    # q_ptr is qdata viewed as int32 words: word w of a row holds codes 8w..8w+7. EVEN_K: K is a whole number of
    # steps. PREFETCH: the next step's codes are loaded before this step's arithmetic. REDUCE_W: each step's
    # products are summed over the words of a group before scaling, so the accumulator holds one value per (row,
    # group) rather than per word (fewer registers, a reduction a step). COARSE (16-bit x only): codes through
    # coarse_unit, fewer integer operations. XVEC: x loaded once a step as contiguous vectors and split by code
    # position, in place of eight strided loads. LOOP_STAGES > 1: the compiler's software pipeline copies the
    # codes of the next steps into shared memory asynchronously (more bytes in flight, fewer registers).
    # GROUPED: q, s and z are stacks of experts (strides *_e) and x's rows are sorted by expert (end offsets
    # offs_ptr[E]): each row goes through its own expert's weights; rows past the last end come out zero.
    # ROW_SCALE: each row's products are multiplied by rs_ptr[row] (fp32) before the bias is added (8da4w's
    # activation scale, x being its centered integer codes). PREPACKED: codes stored in fragment order
    # (prepack_fragments): the code at stored position p multiplies x's column fragment_column_of(p).
    # TWO_ROWS (not with GROUPED): rows 2p and 2p + 1 of x share each code's unit, so the weight is read and
    # turned into floats once for both; a second row past M is computed on row M - 1 and not stored.
    # QUANT_X (8da4w in one kernel, not with GROUPED): each program first finds its rows' per-token asymmetric int8
    # scale and zero point over all of K (SCAN_BLOCK columns at a time; every split does), then multiplies the
    # centered codes xq - zp in place of x, and scales each row's products by its scale as ROW_SCALE does: the
    # quantization kernel's numbers, so y is the two-kernel path's bit for bit.
    follow_previous(PDL)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WORDS: tl.constexpr = GROUP // 8
    offs_n, rows = gemv_rows(N, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, GROUP)
    x_local = x_columns(offs_k, PREPACKED)  # x's column, within its group, of each stored position
    n_groups = tl.cdiv(K, GROUP)
    n_steps = tl.cdiv(n_groups, GROUPS)
    per_split = tl.cdiv(n_steps, split_k)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, n_steps) - 1
    if GROUPED:
        expert, has_expert = row_expert(offs_ptr, E, M, pid_m)
        e = expert.to(tl.int64)
        q_ptr += e * stride_qe
        s_ptr += e * stride_se
        z_ptr += e * stride_ze
        last = tl.where(has_expert, last, first - 1)
    if TWO_ROWS:
        row = 2 * pid_m
        row_b = tl.minimum(row + 1, M - 1)
        x_row_b = x_ptr + row_b * stride_xm
        acc_b = gemv_accumulator(BLOCK_N, GROUPS, WORDS, REDUCE_W)
        acc_zero_b = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    else:
        row = pid_m
    acc = gemv_accumulator(BLOCK_N, GROUPS, WORDS, REDUCE_W)
    acc_zero = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    x_row = x_ptr + row * stride_xm
    q_rows = q_ptr + rows[:, None, None] * stride_qn
    s_rows = s_ptr + rows[:, None] * stride_sn
    z_rows = z_ptr + rows[:, None] * stride_zn
    if PREFETCH:
        q_next, s_next, z_next = _gemv_step_loads(q_rows, s_rows, z_rows, tl.minimum(first, n_steps - 1), offs_g,
                                                  offs_w, n_groups, GROUPS, WORDS, EVEN_K, ZERO)
    # (after the first step's codes are requested with PREFETCH, so that they arrive during the scan)
    s_x = 1.0
    zp_x = 0.0
    if QUANT_X:
        s_x, zp_x = row_asym_qparams(x_row, K, stride_xk, EPS_F32, SCAN_BLOCK)
    if TWO_ROWS:
        s_x_b = 1.0
        zp_x_b = 0.0
        if QUANT_X:
            s_x_b, zp_x_b = row_asym_qparams(x_row_b, K, stride_xk, EPS_F32, SCAN_BLOCK)
    for step in tl.range(first, last + 1, num_stages=LOOP_STAGES):
        if PREFETCH:
            q, s, z = q_next, s_next, z_next
            q_next, s_next, z_next = _gemv_step_loads(q_rows, s_rows, z_rows, tl.minimum(step + 1, last), offs_g,
                                                      offs_w, n_groups, GROUPS, WORDS, EVEN_K, ZERO)
        else:
            q, s, z = _gemv_step_loads(q_rows, s_rows, z_rows, step, offs_g, offs_w, n_groups, GROUPS, WORDS, EVEN_K,
                                       ZERO)
        step_cols = (step * GROUPS + offs_g)[:, None] * GROUP
        part = tl.zeros([BLOCK_N, GROUPS, WORDS], dtype=tl.float32)
        x_sum = tl.zeros([GROUPS, WORDS], dtype=tl.float32)
        if COARSE:
            xu_sum = tl.zeros([GROUPS, WORDS], dtype=tl.float32)
        x_codes = _gemv_step_x(x_row, step_cols, x_local, stride_xk, K, EVEN_K, GROUPS, WORDS, XVEC, s_x, zp_x,
                               QUANT_X)
        if TWO_ROWS:
            part_b = tl.zeros([BLOCK_N, GROUPS, WORDS], dtype=tl.float32)
            x_sum_b = tl.zeros([GROUPS, WORDS], dtype=tl.float32)
            if COARSE:
                xu_sum_b = tl.zeros([GROUPS, WORDS], dtype=tl.float32)
            x_codes_b = _gemv_step_x(x_row_b, step_cols, x_local, stride_xk, K, EVEN_K, GROUPS, WORDS, XVEC, s_x_b,
                                     zp_x_b, QUANT_X)
        for j in tl.static_range(8):
            xj = _gemv_x_of_code(x_row, x_codes, step_cols, offs_w, j, stride_xk, K, EVEN_K, XVEC, PREPACKED, s_x,
                                 zp_x, QUANT_X)
            if TWO_ROWS:
                xj_b = _gemv_x_of_code(x_row_b, x_codes_b, step_cols, offs_w, j, stride_xk, K, EVEN_K, XVEC,
                                       PREPACKED, s_x_b, zp_x_b, QUANT_X)
            if COARSE:
                # part = sum(xu * unit) with xu = 16 x for even codes: sum(x * code) = 128 (part - sum(xu))
                xu = _coarse_x(xj, j)
                code_unit = coarse_unit(q, j, one_bits)
                part += code_unit * xu[None, :, :]
                xu_sum += xu
                if TWO_ROWS:
                    xu_b = _coarse_x(xj_b, j)
                    part_b += code_unit * xu_b[None, :, :]
                    xu_sum_b += xu_b
            else:
                # sum(x * code) = 16 (part - sum(x))
                code_unit = unit_plus_code(q, j, one_bits)
                part += code_unit * xj[None, :, :]
                if TWO_ROWS:
                    part_b += code_unit * xj_b[None, :, :]
            x_sum += xj
            if TWO_ROWS:
                x_sum_b += xj_b
        if COARSE:
            unit = 128.0
        else:
            unit = 16.0
            xu_sum = x_sum  # the fine units need no weighting of x
            if TWO_ROWS:
                xu_sum_b = x_sum_b
        acc, acc_zero = _gemv_fold(acc, acc_zero, part, xu_sum, x_sum, s, z, unit, REDUCE_W)
        if TWO_ROWS:
            acc_b, acc_zero_b = _gemv_fold(acc_b, acc_zero_b, part_b, xu_sum_b, x_sum_b, s, z, unit, REDUCE_W)
    y = _gemv_total(acc, acc_zero, REDUCE_W)
    if QUANT_X:
        y = y * s_x
    elif ROW_SCALE:
        y = y * tl.load(rs_ptr + row)
    gemv_finish(y, offs_n, row, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT, HAS_BIAS)
    if TWO_ROWS:
        y_b = _gemv_total(acc_b, acc_zero_b, REDUCE_W)
        if QUANT_X:
            y_b = y_b * s_x_b
        elif ROW_SCALE:
            y_b = y_b * tl.load(rs_ptr + row_b)
        if row + 1 < M:
            gemv_finish(y_b, offs_n, row + 1, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT,
                        HAS_BIAS)


@triton.jit
def units_plus_codes(q, ROWS: tl.constexpr, WORDS: tl.constexpr, one_bits):
    """[ROWS, 8 * WORDS] fp32 tile of 1 + code/16 from [ROWS, WORDS] int32 words (code 8w + j at column 8w + j)."""
    return interleave8(unit_plus_code(q, 0, one_bits), unit_plus_code(q, 1, one_bits),
                       unit_plus_code(q, 2, one_bits), unit_plus_code(q, 3, one_bits),
                       unit_plus_code(q, 4, one_bits), unit_plus_code(q, 5, one_bits),
                       unit_plus_code(q, 6, one_bits), unit_plus_code(q, 7, one_bits), ROWS, WORDS)


@triton.jit
def fragment_tile(q, s16, z24, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """The dequantized [ROWS, 8 * WORDS] tile of one group, 16 s u + (z - 24 s) with u = 1 + code/16, its columns in
    fragment order (nibble_fragments)."""
    c0 = unit_plus_code(q, 0, ONE_BITS) * s16 + z24
    c1 = unit_plus_code(q, 1, ONE_BITS) * s16 + z24
    c2 = unit_plus_code(q, 2, ONE_BITS) * s16 + z24
    c3 = unit_plus_code(q, 3, ONE_BITS) * s16 + z24
    c4 = unit_plus_code(q, 4, ONE_BITS) * s16 + z24
    c5 = unit_plus_code(q, 5, ONE_BITS) * s16 + z24
    c6 = unit_plus_code(q, 6, ONE_BITS) * s16 + z24
    c7 = unit_plus_code(q, 7, ONE_BITS) * s16 + z24
    # tl.join appends its choice as the last axis: t[r, w, j0, j1, j2]
    t = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
    return nibble_fragments(t, ROWS, WORDS)


# Four bytes of a word a call: both codes of byte b as a pair of 16-bit floats, magic + code (magic = 128 in bf16,
# 1024 in fp16, where the float's step is 1, so the code lands in the low mantissa bits exactly). prmt puts byte b
# of (word >> 4) in the low half and byte b of the word in the high half, so one lop3, (t & 0x000F000F) | magic,
# leaves code 2b (the byte's high nibble) in the low half and code 2b + 1 in the high half: the order of k. The
# magic sits in a register: lop3 takes one immediate, and with two ptxas emits an and and an or (sm_90 SASS of the
# 16-row tile: 284 instructions a step against 318). Then two packed fused multiply-adds: (magic + code) + off,
# exact, then times scale plus zero, rounded once (pair_offsets gives off and zero: -(magic + 8) and the float
# zero, or -(magic + zero point) and 0). The constants of each 16-bit dtype, as pairs: 1.0, the magic and
# -(magic + 8) (off), and its packed type.
_HALF_CONSTANTS = {"bf16": dict(ONE="0x3F803F80", MAGIC="0x43004300", OFF="0xC308C308", TYPE="bf16x2"),
                   "fp16": dict(ONE="0x3C003C00", MAGIC="0x64006400", OFF="0xE408E408", TYPE="f16x2")}


def _code_pairs_ptx(tail: str, half: str, off: bool = False) -> str:
    """PTX over one word ($4): for each byte b, t = magic + its two codes as a pair of 16-bit floats (the prmt and
    the lop3 above), then ``tail`` (formatted with b) writes output $b, with registers one, magic and, with
    ``off``, off; the constants of ``half`` ("bf16" or "fp16")."""
    text = (f"{{\n.reg .b32 h, t, one, magic{', off' if off else ''};\nmov.b32 one, ONE;\nmov.b32 magic, MAGIC;\n"
            + ("mov.b32 off, OFF;\n" if off else "") + "shr.u32 h, $4, 4;\n"
            + "".join(f"prmt.b32 t, $4, h, {(b << 8) | (4 + b):#06x};\nlop3.b32 t, t, 0x000F000F, magic, 0xEA;\n"
                      + tail.format(b=b) for b in range(4)) + "}")
    for name, value in _HALF_CONSTANTS[half].items():
        text = text.replace(name, value)
    return text


_PAIRS_TAIL = "fma.rn.TYPE t, t, one, $8;\nfma.rn.TYPE ${b}, t, $6, $7;\n"


def pairs_ptx(half: str) -> str:
    """The PTX of fragment_tile_pairs for "bf16" or "fp16": per word ($4), four registers $0..$3 of two 16-bit
    weights each, (code + magic + off) * scale + zero with scale $6, zero $7 and off $8 as pairs."""
    return _code_pairs_ptx(_PAIRS_TAIL, half)


def magic_pairs_ptx(half: str) -> str:
    """The PTX of the pairs before any arithmetic, for "bf16" or "fp16": per word ($4), four registers $0..$3 of
    two 16-bit floats magic + code each (kernels/mma.py multiplies those and takes magic + 8 times x's sums off
    after the MMA)."""
    return _code_pairs_ptx("mov.b32 ${b}, t;\n", half)


PAIRS_BF16: tl.constexpr = tl.constexpr(pairs_ptx("bf16"))
PAIRS_FP16: tl.constexpr = tl.constexpr(pairs_ptx("fp16"))


@triton.jit
def pair_offsets(s, z, ZERO: tl.constexpr):
    """(off, zero) for fragment_tile_pairs from the [ROWS, 1] scales s (fp16 or bf16) and load_zero's z: with
    magic the 16-bit float whose step is 1 (1024 in fp16, 128 in bf16), -(magic + 8) and the float zero on
    tinygemm's grid, -(magic + zero point) and 0 on the integer grid; each exact in s's dtype."""
    if s.dtype == tl.float16:
        magic = 1024.0
    else:
        magic = 128.0
    if ZERO == FLOAT_ZERO:
        return (s.to(tl.float32) * 0.0 - (magic + 8.0)).to(s.dtype), z
    else:
        return (-magic - z.to(tl.float32)).to(s.dtype), (s.to(tl.float32) * 0.0).to(s.dtype)


@triton.jit
def fragment_tile_pairs(q, s, z, off, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """fragment_tile's tile computed in 16-bit pairs, w = (code + magic + off) * s + z rounded once to s's dtype
    (fp16 or bf16; z's, off's and x's too; see pair_offsets): two codes per packed multiply-add instead of one
    fp32 multiply-add and half a conversion per code (CUDA only: inline PTX; s, z and off are [ROWS, 1])."""
    q2 = tl.join(q, q)
    s2 = tl.broadcast_to(tl.join(s, s), (ROWS, WORDS, 2))
    z2 = tl.broadcast_to(tl.join(z, z), (ROWS, WORDS, 2))
    off2 = tl.broadcast_to(tl.join(off, off), (ROWS, WORDS, 2))
    if s.dtype == tl.float16:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(PAIRS_FP16, "=r,=r,=r,=r,r,r,r,r,r", [q2, s2, z2, off2],
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=2)
    else:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(PAIRS_BF16, "=r,=r,=r,=r,r,r,r,r,r", [q2, s2, z2, off2],
                                                   dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                                   is_pure=True, pack=2)
    # bj[r, w, j0] = code 2j + j0 of word w; tl.join appends its choice as the last axis: t[r, w, j0, j1, j2]
    return nibble_fragments(tl.join(tl.join(b0, b1), tl.join(b2, b3)), ROWS, WORDS)


# fragment_tile_pairs' first half alone: magic + code, then + off = -(magic + 8), exact, leaves code - 8 in 16 bits
# (the centered unit of CENTERED tiles, whose scales and zeros multiply each group's dot instead).
_CENTERED_TAIL = "fma.rn.TYPE ${b}, t, one, off;\n"
CENTERED_BF16: tl.constexpr = tl.constexpr(_code_pairs_ptx(_CENTERED_TAIL, "bf16", off=True))
CENTERED_FP16: tl.constexpr = tl.constexpr(_code_pairs_ptx(_CENTERED_TAIL, "fp16", off=True))


@triton.jit
def centered_tile(q, xt, ROWS: tl.constexpr, WORDS: tl.constexpr, DOT_FP32: tl.constexpr):
    """The [ROWS, 8 * WORDS] tile of code - 8 (exact) in fragment order: in packed 16-bit pairs of xt's dtype from
    inline PTX (two codes a prmt, a lop3 and an add), or in fp32 with DOT_FP32 (fp32 x, the interpreter)."""
    # one return for both forms: Triton 3.6 refuses a function whose returns differ in dtype, constexpr branch or not
    if DOT_FP32:
        tile = fragment_tile(q, 16.0, -24.0, ROWS, WORDS)  # 16 (1 + code/16) - 24
    else:
        tile = word_pairs_fragments(q, xt.dtype, CENTERED_FP16, CENTERED_BF16, ROWS, WORDS)
    return tile


@triton.jit
def w4a16_tile(x_ptr, q_ptr, s_ptr, z_ptr, xs_ptr, offs_m, m_mask, rows, K, first, last, stride_xm, stride_xk,
               stride_qn, stride_sn, stride_zn, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_FP32: tl.constexpr, SWAP: tl.constexpr, SPLIT_X: tl.constexpr, FULL_DQ: tl.constexpr,
               GATHER_X: tl.constexpr, PREFETCH: tl.constexpr, PAIRS: tl.constexpr, EVEN_K: tl.constexpr,
               ZERO: tl.constexpr, PREPACKED: tl.constexpr, CENTERED: tl.constexpr):
    """The fp32 accumulator of one tile of y over groups first..last of K: rows offs_m of x (m_mask: which are
    real), rows ``rows`` of w; [BLOCK_N, BLOCK_M] with SWAP, else [BLOCK_M, BLOCK_N]. The forms:

    With units u = 1 + code/16 (exact in bf16 and fp16), w = 16 s u + (z - 24 s). FULL_DQ: the weight tile is
    dequantized that way (one FMA an element) and every step's dot accumulates straight into the tile. Otherwise
    d = dot(x, u) per step and sum(x * w) = 16 s d + (z - 24 s) sum(x) per column. SPLIT_X: eight dots of depth
    GROUP/8, codes j of every word against x's columns 8w + j, in place of one dot over the interleaved weight tile.
    SWAP: the tile is computed as w @ x.T, in that orientation to the end. GATHER_X (with SWAP): the dequantized
    tile in fragment order (fragment_tile), x's columns gathered in the same order. PREFETCH: each step loads the
    next step's scales and zeros, whose latency the step's work then hides (the compiler's software pipeline copies
    the codes and x ahead, but not these: two bytes a row are too few for its asynchronous copies). PAIRS (with
    GATHER_X, CUDA, scales, float zeros and x of one 16-bit dtype): the tile from fragment_tile_pairs. EVEN_K: K is
    a whole number of groups, so x's loads need no mask along K. ZERO: the grid (FLOAT_ZERO, INT_ZERO, NO_ZERO).
    PREPACKED (with GATHER_X): the codes are stored in fragment order (prepack_fragments), so the tile's column c
    holds column c's code and x is read in its own order, contiguously, with no gather. CENTERED (with GATHER_X):
    d = dot(x, code - 8) per step from centered_tile, then sum(x * w) = s d + zero sum(x) per column (zero: the
    float zero; no sum of x when none is stored): exact weights and exact group sums of integer x (8da4w). The sums
    of x over each group come from xs_ptr (group_sums, fp32 [M, groups]), computed once for all programs: summing
    the x tile in the loop costs 371 sm_90 instructions a step against 284 for packed pairs (16 rows of x, 64 of
    w, 4 warps).
    """
    WORDS: tl.constexpr = GROUP // 8
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, GROUP)
    n_groups = tl.cdiv(K, GROUP)
    acc = dot_tile_zeros(BLOCK_M, BLOCK_N, SWAP)
    if GATHER_X and not PREPACKED:
        offs_k = fragment_columns(GROUP)
    if PREFETCH:
        s_next = tl.load(s_ptr + rows[:, None] * stride_sn + tl.minimum(first, n_groups - 1))
        z_next = load_zero(z_ptr, rows[:, None] * stride_zn + tl.minimum(first, n_groups - 1), None, ZERO)
    for g in range(first, last + 1):
        k = g * GROUP + offs_k
        if EVEN_K:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_mask[:, None],
                         other=0.0)
        else:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qn + g * WORDS + offs_w[None, :])
        if PREFETCH:
            s_row = s_next
            z_row = z_next
            s_next = tl.load(s_ptr + rows[:, None] * stride_sn + tl.minimum(g + 1, last))
            z_next = load_zero(z_ptr, rows[:, None] * stride_zn + tl.minimum(g + 1, last), None, ZERO)
        else:
            s_row = tl.load(s_ptr + rows[:, None] * stride_sn + g)
            z_row = load_zero(z_ptr, rows[:, None] * stride_zn + g, None, ZERO)
        # [BLOCK_N, 1] columns: the weight tile's row factors
        s = s_row.to(tl.float32)
        s16 = 16.0 * s
        z24 = float_zero(z_row, s, ZERO) - 24.0 * s
        if CENTERED:
            d = dot_acc(dot_tile_zeros(BLOCK_M, BLOCK_N, SWAP), centered_tile(q, xt, BLOCK_N, WORDS, DOT_FP32), xt,
                        SWAP, DOT_FP32)
            if SWAP:
                acc += d * s
            else:
                acc += d * tl.trans(s)
            if ZERO != NO_ZERO:
                xs = tl.load(xs_ptr + offs_m * n_groups + g, mask=m_mask, other=0.0)
                if SWAP:
                    acc += float_zero(z_row, s, ZERO) * xs[None, :]
                else:
                    acc += xs[:, None] * tl.trans(float_zero(z_row, s, ZERO))
        elif PAIRS:
            off, z_pair = pair_offsets(s_row, z_row, ZERO)
            acc = dot_acc(acc, fragment_tile_pairs(q, s_row, z_pair, off, BLOCK_N, WORDS), xt, SWAP, DOT_FP32)
        elif GATHER_X:
            acc = dot_acc(acc, fragment_tile(q, s16, z24, BLOCK_N, WORDS), xt, SWAP, DOT_FP32)
        elif FULL_DQ:
            if SPLIT_X:
                x0, x1, x2, x3, x4, x5, x6, x7 = split_by_code(xt, BLOCK_M, WORDS)
                acc = dot_acc(acc, unit_plus_code(q, 0, ONE_BITS) * s16 + z24, x0, SWAP, DOT_FP32)
                acc = dot_acc(acc, unit_plus_code(q, 1, ONE_BITS) * s16 + z24, x1, SWAP, DOT_FP32)
                acc = dot_acc(acc, unit_plus_code(q, 2, ONE_BITS) * s16 + z24, x2, SWAP, DOT_FP32)
                acc = dot_acc(acc, unit_plus_code(q, 3, ONE_BITS) * s16 + z24, x3, SWAP, DOT_FP32)
                acc = dot_acc(acc, unit_plus_code(q, 4, ONE_BITS) * s16 + z24, x4, SWAP, DOT_FP32)
                acc = dot_acc(acc, unit_plus_code(q, 5, ONE_BITS) * s16 + z24, x5, SWAP, DOT_FP32)
                acc = dot_acc(acc, unit_plus_code(q, 6, ONE_BITS) * s16 + z24, x6, SWAP, DOT_FP32)
                acc = dot_acc(acc, unit_plus_code(q, 7, ONE_BITS) * s16 + z24, x7, SWAP, DOT_FP32)
            else:
                acc = dot_acc(acc, units_plus_codes(q, BLOCK_N, WORDS, ONE_BITS) * s16 + z24,
                              xt, SWAP, DOT_FP32)
        else:
            xs = tl.sum(xt.to(tl.float32), axis=1)
            d = dot_tile_zeros(BLOCK_M, BLOCK_N, SWAP)
            if SPLIT_X:
                x0, x1, x2, x3, x4, x5, x6, x7 = split_by_code(xt, BLOCK_M, WORDS)
                d = dot_acc(d, unit_plus_code(q, 0, ONE_BITS), x0, SWAP, DOT_FP32)
                d = dot_acc(d, unit_plus_code(q, 1, ONE_BITS), x1, SWAP, DOT_FP32)
                d = dot_acc(d, unit_plus_code(q, 2, ONE_BITS), x2, SWAP, DOT_FP32)
                d = dot_acc(d, unit_plus_code(q, 3, ONE_BITS), x3, SWAP, DOT_FP32)
                d = dot_acc(d, unit_plus_code(q, 4, ONE_BITS), x4, SWAP, DOT_FP32)
                d = dot_acc(d, unit_plus_code(q, 5, ONE_BITS), x5, SWAP, DOT_FP32)
                d = dot_acc(d, unit_plus_code(q, 6, ONE_BITS), x6, SWAP, DOT_FP32)
                d = dot_acc(d, unit_plus_code(q, 7, ONE_BITS), x7, SWAP, DOT_FP32)
            else:
                d = dot_acc(d, units_plus_codes(q, BLOCK_N, WORDS, ONE_BITS), xt, SWAP, DOT_FP32)
            if SWAP:
                acc += d * s16 + z24 * xs[None, :]
            else:
                acc += d * tl.trans(s16) + xs[:, None] * tl.trans(z24)
    return acc


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym, split_k, rs_ptr, cs_ptr, xs_ptr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, SWAP: tl.constexpr, SPLIT_X: tl.constexpr,
    FULL_DQ: tl.constexpr, M_FAST: tl.constexpr, GATHER_X: tl.constexpr, PREFETCH: tl.constexpr,
    PAIRS: tl.constexpr, EVEN_K: tl.constexpr, ZERO: tl.constexpr, PREPACKED: tl.constexpr,
    ROW_SCALE: tl.constexpr, COL_SCALE: tl.constexpr, CENTERED: tl.constexpr, PDL: tl.constexpr = False,
):
    # A BLOCK_M x BLOCK_N tile of y over this program's split of K (w4a16_tile says what the forms do). ROW_SCALE:
    # each row's products times rs_ptr[row] (fp32) before the bias (8da4w's activation scales; a split's partial
    # sums are scaled alike, so their total is); COL_SCALE: each column's times cs_ptr[column] (fp32) likewise.
    follow_previous(PDL)
    offs_m, m_mask, offs_n, rows = gemm_tile(M, N, BLOCK_M, BLOCK_N, M_FAST)
    n_groups = tl.cdiv(K, GROUP)
    per_split = tl.cdiv(n_groups, split_k)
    first = tl.program_id(2) * per_split
    last = tl.minimum(first + per_split, n_groups) - 1
    acc = w4a16_tile(x_ptr, q_ptr, s_ptr, z_ptr, xs_ptr, offs_m, m_mask, rows, K, first, last, stride_xm,
                     stride_xk, stride_qn, stride_sn, stride_zn, GROUP, BLOCK_M, BLOCK_N, DOT_FP32, SWAP, SPLIT_X,
                     FULL_DQ, GATHER_X, PREFETCH, PAIRS, EVEN_K, ZERO, PREPACKED, CENTERED)
    if ROW_SCALE:
        rs = tl.load(rs_ptr + offs_m, mask=m_mask, other=0.0)
        if SWAP:
            acc = acc * rs[None, :]
        else:
            acc = acc * rs[:, None]
    if COL_SCALE:
        acc = scaled_rows(acc, cs_ptr, rows, SWAP)
    gemm_finish(acc, offs_m, m_mask, offs_n, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT, HAS_BIAS,
                SWAP)


@triton.jit
def _w4a16_grouped_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, xs_ptr, offs_ptr, y_ptr, ws_ptr, cnt_ptr,
    S, N, K, E, stride_xm, stride_xk, stride_qe, stride_qn, stride_se, stride_sn, stride_ze, stride_zn, stride_ym,
    split_k,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    SWAP: tl.constexpr, SPLIT_X: tl.constexpr, FULL_DQ: tl.constexpr, GATHER_X: tl.constexpr, PREFETCH: tl.constexpr,
    PAIRS: tl.constexpr, EVEN_K: tl.constexpr, ZERO: tl.constexpr, PREPACKED: tl.constexpr, CENTERED: tl.constexpr,
):
    # A BLOCK_M x BLOCK_N tile of y for the rows of one expert (expert_rows), over this program's split of K,
    # through that expert's weights: every routed expert of a layer in one launch.
    expert, offs_m, m_mask, valid = expert_rows(offs_ptr, E, S, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    e = expert.to(tl.int64)
    n_groups = tl.cdiv(K, GROUP)
    per_split = tl.cdiv(n_groups, split_k)
    first = tl.program_id(2) * per_split
    last = tl.where(valid, tl.minimum(first + per_split, n_groups) - 1, -1)  # a program with no rows runs no step
    acc = w4a16_tile(x_ptr, q_ptr + e * stride_qe, s_ptr + e * stride_se, z_ptr + e * stride_ze, xs_ptr, offs_m,
                     m_mask, rows, K, first, last, stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, GROUP,
                     BLOCK_M, BLOCK_N, DOT_FP32, SWAP, SPLIT_X, FULL_DQ, GATHER_X, PREFETCH, PAIRS, EVEN_K, ZERO,
                     PREPACKED, CENTERED)
    gemm_finish(acc, offs_m, m_mask, offs_n, S, N, stride_ym, y_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT, False,
                SWAP)


@triton.jit
def _w4a16_dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, row_words, stride_sn, stride_zn,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr, ZERO: tl.constexpr, PREPACKED: tl.constexpr):
    # BLOCK int32 words of qdata in row-major order, each to its eight columns w[n, 8v .. 8v + 7] (one 16-byte store
    # for 16-bit w when K is a multiple of 8). Flat over words, so the loads and stores of a program are contiguous
    # runs whatever N and K are: on an H200 this runs 8192 x 28672 in 162 us against 301 us for [rows, words]
    # tiles (the bytes moved take 122 us at 4.8 TB/s).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N * row_words
    q = tl.load(q_ptr + offs, mask=mask, other=0)
    n = offs // row_words
    v = offs % row_words
    grp = v // (GROUP // 8)
    s = tl.load(s_ptr + n * stride_sn + grp, mask=mask, other=0.0).to(tl.float32)
    z = float_zero(load_zero(z_ptr, n * stride_zn + grp, mask, ZERO), s, ZERO)
    shifts = (tl.arange(0, 8) ^ 1) * 4
    codes = (((q[:, None] >> shifts[None, :]) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    w = codes * s[:, None] + z[:, None]
    k = x_columns(v[:, None] * 8 + tl.arange(0, 8)[None, :], PREPACKED)  # PREPACKED: codes in fragment order
    tl.store(w_ptr + n[:, None] * K + k, w.to(w_ptr.dtype.element_ty), mask=mask[:, None] & (k < K))


def fragment_order(columns: int) -> torch.Tensor:
    """tiles.fragment_columns on the host: the column of x that each column of a fragment-ordered tile multiplies
    (a permutation within every 32 columns, its own inverse)."""
    c = torch.arange(columns)
    return 32 * (c // 32) + 8 * ((c // 2) % 4) + 4 * ((c // 16) % 2) + 2 * ((c // 8) % 2) + c % 2


def prepack_fragments(qdata: torch.Tensor) -> torch.Tensor:
    """The codes of qdata (uint8 [..., Kp/2], two a byte) reordered within every 32 columns so that the GATHER_X
    tile built from them holds column c's code in its column c (stored position fragment_order[c] takes code c):
    the GEMM then reads x in its own order (config PREPACKED). The same bytes, permuted; Kp is a multiple of 32."""
    codes = unpack_uint4(qdata)
    # the order is its own inverse: position fragment_order[c] takes code c, so position p takes code order[p]
    return pack_uint4(codes[..., fragment_order(codes.shape[-1]).to(codes.device)])


def w4a16_dequantize(qdata, scale, zero, group_size: int, k: int, dtype: torch.dtype, *, block: int = 1024,
                     num_warps: int = 4, prepacked: bool = False) -> torch.Tensor:
    """w on the grid ``zero`` names (see the module) in fp32, then cast: [N, k] in dtype (Triton).

    Each program dequantizes ``block`` int32 words (8 * block codes); ``prepacked``: the codes are in fragment
    order (prepack_fragments), w comes out in column order all the same."""
    n = qdata.shape[0]
    row_words = qdata.shape[1] // 4
    scale, zero = unit_stride(scale, zero)
    w = torch.empty(n, k, dtype=dtype, device=qdata.device)
    _w4a16_dequant_kernel[(triton.cdiv(n * row_words, block),)](
        int32_words(qdata), scale, scale if zero is None else zero, w, n, k, row_words, scale.stride(0),
        scale.stride(0) if zero is None else zero.stride(0), GROUP=group_size, BLOCK=block, ZERO=zero_kind(zero),
        PREPACKED=prepacked, num_warps=num_warps)
    return w


def default_config(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The configuration used when nothing was tuned for this key (correct on every shape, shown by the tests)."""
    n_groups = -(-k // group_size)
    path = default_path("w4a16", Problem(m, n, k, dtype, device, group_size))
    if path == "gemv":
        return gemv_config(m, n, k, group_size, device)
    if path == "gemm":
        # the H200 searches' winners: one dequantized tile a step; up to 32 rows of x the fragment-ordered tile in
        # packed 16-bit pairs (64 rows of w on 4 warps, 128 on 8 past 16 rows of x), from 33 rows the x-ordered
        # tile with its scales prefetched (x's gathered columns then cost more than the shared-memory round trip of
        # the x-ordered tile); programs along M first past 64
        block_m = min(128, max(16, triton.next_power_of_2(m)))
        if m <= 32:
            block_n, warps = (64, 4) if m <= 16 else (128, 8)
            form = dict(GATHER_X=True, PAIRS=True)
        elif n >= 8192 and (m <= 64 or m > 128):
            # wide weights: the fragment-ordered tile on x copied into its order, up to 256 rows of x a tile (H200,
            # 64 rows: 8192 x 28672 108.0 us against 117.6 for the x-ordered tile, 4096 x 14336 31.0 against 40.5;
            # at 128 rows the x-ordered tile won on 8192 x 28672, 177.4 against 193.2)
            block_m = min(256, triton.next_power_of_2(m))
            block_n, warps, form = 128, 8, dict(GATHER_X=True, PAIRS=True, PERMUTE_X=True)
        else:
            block_n, warps, form = 64, 4, dict(FULL_DQ=True, PREFETCH=True)
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        return dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k(programs, n_groups, device),
                    SWAP=True, M_FAST=m > 64, num_warps=warps, num_stages=3, **form)
    return dict(path="dequant")


def gemv_config(rows: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """The GEMV kernel's default configuration for ``rows`` rows of x (one program per row and BLOCK_N outputs)."""
    # The winners of the H100 and H200 searches: 512 codes a row a step on two warps, halved (one warp, 256
    # codes) for long rows (K >= 8192), where more programs in flight hide more of the memory latency.
    n_groups = -(-k // group_size)
    block_n, long_rows = 32, k >= LONG_ROW_K
    groups = pow2_at_most(max(1, min((256 if long_rows else 512) // group_size, n_groups)))
    return dict(path="gemv", BLOCK_N=block_n, GROUPS=groups,
                SPLIT_K=gemv_split_k(rows * triton.cdiv(n, block_n), triton.cdiv(n_groups, groups), device),
                PREFETCH=False, REDUCE_W=True, XVEC=True, COARSE=True, LOOP_STAGES=3,
                num_warps=1 if long_rows else 2, num_stages=3)


def candidate_configs(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device):
    """The search space of the tuner for one key: every path and its block sizes, warps, stages, splits."""
    n_groups = -(-k // group_size)
    out = [dict(path="dequant")] + [dict(path="dequant", BLOCK=block, num_warps=warps)
                                     for block, warps in ((512, 4), (2048, 8))]
    if m <= 8:
        for block_n, warps in ((16, 4), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8)):
            for groups in sorted({pow2_at_most(max(1, min(c // group_size, n_groups))) for c in (128, 256, 512)}):
                for split in (1, 2, 4, 8):
                    for prefetch, reduce_w, xvec in ((False, False, False), (True, False, False),
                                                     (False, True, False), (True, True, False),
                                                     (False, True, True), (True, True, True)):
                        out.append(dict(path="gemv", BLOCK_N=block_n, GROUPS=groups, SPLIT_K=split,
                                        PREFETCH=prefetch, REDUCE_W=reduce_w, XVEC=xvec, COARSE=True,
                                        num_warps=warps, num_stages=3))
        # the software-pipelined form (LOOP_STAGES) at few warps, where it wins, also without the per-step sum over
        # words (whose cross-thread shuffles the decode tile spends 138 of its 1206 sm_90 instructions a step on;
        # 1050 without); from two rows of x also with two rows a program (each code's unit shared by both)
        for block_n in (32, 64):
            for warps in (1, 2):
                for groups in sorted({pow2_at_most(max(1, min(c // group_size, n_groups))) for c in (256, 512)}):
                    for split in (1, 2, 4, 8):
                        for stages in (3, 4):
                            for reduce_w in (True, False):
                                config = dict(path="gemv", BLOCK_N=block_n, GROUPS=groups, SPLIT_K=split,
                                              PREFETCH=False, REDUCE_W=reduce_w, XVEC=True, COARSE=True,
                                              LOOP_STAGES=stages, num_warps=warps, num_stages=3)
                                out += [config, dict(config, TWO_ROWS=True)] if m >= 2 else [config]
    if m >= 2 and dtype != torch.float32:
        forms = [dict(SWAP=False), dict(SWAP=True), dict(SWAP=True, FULL_DQ=True), dict(SWAP=True, GATHER_X=True),
                 dict(SWAP=True, GATHER_X=True, PAIRS=True), dict(SWAP=True, FULL_DQ=True, PREFETCH=True),
                 dict(SWAP=True, GATHER_X=True, CENTERED=True)]
        if group_size >= SPLIT_X_MIN_GROUP:
            forms += [dict(SWAP=swap, SPLIT_X=True, FULL_DQ=full) for swap, full in ((False, False), (True, False),
                                                                                    (True, True))]
        for block_m in sorted({16, min(128, max(16, triton.next_power_of_2(m)))}):
            for block_n in (32, 64, 128):
                for split in (1, 2, 4, 8):
                    for form in forms:
                        for warps, stages in ((4, 3), (4, 4), (8, 3)):
                            for m_fast in (False, True) if m > 64 else (False,):
                                out.append(dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split,
                                                M_FAST=m_fast, num_warps=warps, num_stages=stages, **form))
        # splits of three and six for the fragment-ordered 16-bit tiles: with 4 warps and 64 rows of w the sm_90
        # build holds 96 registers a thread, 5 programs a multiprocessor, and splits of powers of two leave a
        # partial last wave on common shapes (8192 x 28672 at 16 rows: 896 programs for 660 places; 3 splits: 1344)
        for block_n in (64, 128):
            for split in (3, 6):
                for form in (dict(PAIRS=True), dict(CENTERED=True)):
                    for warps in (4, 8):
                        out.append(dict(path="gemm", BLOCK_M=16 if m <= 16 else min(128, triton.next_power_of_2(m)),
                                        BLOCK_N=block_n, SPLIT_K=split, SWAP=True, GATHER_X=True, M_FAST=False,
                                        num_warps=warps, num_stages=3, **form))
        # past 16 rows, x copied into the fragment order once (PERMUTE_X), then read in 16-byte copies by tiles of
        # up to 256 rows of x (H200, 4096 x 14336 at 64, 128 and 256 rows: 31.0, 40.8 and 65.4 us with the copy,
        # against 40.5 and 45.5 for the x-ordered tile and 85.9 for dequantization + cuBLAS)
        if m > 16:
            rows = triton.next_power_of_2(m)
            for block_m in sorted({min(128, rows), min(256, rows)} | ({64} if m > 64 else set())):
                for block_n, warps in ((64, 4), (128, 4), (128, 8)):
                    for split in (1, 2, 3, 4, 8):
                        for form in (dict(PAIRS=True), dict(CENTERED=True)):
                            out.append(dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, SWAP=True,
                                            GATHER_X=True, PERMUTE_X=True, M_FAST=m > 64, num_warps=warps,
                                            num_stages=3, **form))
    if m >= 16 and dtype != torch.float32 and group_size == BLOCK_K_WGMMA and wgmma_runs(device):
        out += wgmma_configs(m, n)
    if m <= MMA_ROWS and dtype != torch.float32 and group_size == BLOCK_K_WGMMA and mma_runs(device):
        out += mma_configs(m, n, k)
    return [c for c in out if fragment_tile_fits(c)]


def tile_forms(params: dict, x, scale, zero, group_size: int) -> dict:
    """The w4a16_tile flags of a GEMM configuration, popped from ``params``, and those the inputs decide."""
    check_fragment_tile(params)
    forms = dict(DOT_FP32=x.dtype == torch.float32 or interpreting(), SPLIT_X=params.pop("SPLIT_X", False),
                 FULL_DQ=params.pop("FULL_DQ", False), GATHER_X=params.pop("GATHER_X", False),
                 PREFETCH=params.pop("PREFETCH", False))
    # the packed 16-bit form needs inline PTX (not the interpreter) and one 16-bit dtype for x, scale and a float zero
    float_zero_dtype = x.dtype if zero is None or zero.dtype == torch.uint8 else zero.dtype
    pairs = params.pop("PAIRS", False)
    forms["PAIRS"] = (pairs and forms["GATHER_X"] and not forms["DOT_FP32"]
                      and x.dtype == scale.dtype == float_zero_dtype)
    forms["EVEN_K"] = x.shape[1] % group_size == 0
    forms["ZERO"] = zero_kind(zero)
    forms["PREPACKED"] = params.pop("PREPACKED", False)
    if forms["PREPACKED"] and not forms["GATHER_X"]:
        raise ValueError("PREPACKED codes are read by the GATHER_X form only")
    centered = params.pop("CENTERED", None)
    if centered and (pairs or forms["FULL_DQ"] or not forms["GATHER_X"]):
        raise ValueError("CENTERED is a form of the GATHER_X tile, without PAIRS or FULL_DQ")
    if centered is None and forms["PAIRS"] and zero is None and params["BLOCK_M"] <= 64:
        # no zeros to add: the centered tile, exact and cheaper (H200, bf16 x, symmetric grid, the same tiles at 16
        # and 64 rows: faster on 7 of 8 shapes, 1.57-1.69x bf16 against 1.38-1.52x at 16 rows); CENTERED=False in
        # the configuration keeps the packed pairs. Not past 64 rows of x: rescaling every group's sums of a 256-row
        # tile made 8192 x 28672 at 256 rows 734.9 us against 288.5 for the pairs
        forms["PAIRS"], centered = False, True
    forms["CENTERED"] = bool(centered)
    return forms


def launch(x, qdata, scale, zero, group_size, bias, config: dict, row_scale=None, col_scale=None,
           out_dtype=None, x_fragment_ordered: bool = False) -> torch.Tensor:
    """Run one path with one configuration (no checks, no tuning): y [M, N] in ``out_dtype`` (default x.dtype).
    ``row_scale`` (fp32 [M], the GEMV, the GEMM and wgmma) multiplies each row's products before the bias;
    ``col_scale`` (fp32 [N], the GEMM and wgmma) each column's. ``x_fragment_ordered`` (PERMUTE_X configurations
    and wgmma): x is already what tiles.fragment_ordered_x would make of it, padded to the codes' width."""
    m, k = x.shape
    n = qdata.shape[0]
    params = dict(config)
    path = params.pop("path")
    if (row_scale is not None or out_dtype not in (None, x.dtype)) and path == "dequant":
        raise ValueError("row_scale and out_dtype are taken by the gemv and gemm paths, not 'dequant'")
    if (col_scale is not None or out_dtype not in (None, x.dtype)) and path == "gemv":
        raise ValueError("col_scale and out_dtype are taken by the gemm path only")
    if path == "dequant":
        w = w4a16_dequantize(qdata, scale, zero, group_size, k, x.dtype, block=params.get("BLOCK", 1024),
                             num_warps=params.get("num_warps", 4), prepacked=params.get("PREPACKED", False))
        return dequantized_linear(x, w, bias)
    if path == "gemv":
        return gemv(x, qdata, scale, zero, group_size, bias, params, row_scale=row_scale)
    if path == "mma":
        refusal = mma_refusal(x, qdata, group_size)
        if refusal:
            raise ValueError(refusal)
        if row_scale is not None or col_scale is not None or out_dtype not in (None, x.dtype):
            raise ValueError("row_scale, col_scale and out_dtype are not taken by the 'mma' path")
        from aofunc.kernels import mma  # imports Triton's Gluon

        return mma.w4a16_linear(x, qdata, scale, zero, bias, params)
    if path == "wgmma":
        refusal = wgmma_refusal(x, scale, zero, group_size)
        if refusal:
            raise ValueError(refusal)
        from aofunc.kernels import wgmma  # imports Triton's Gluon

        return wgmma.w4a16_linear(x, qdata, scale, zero, bias, params, row_scale=row_scale, col_scale=col_scale,
                                  out_dtype=out_dtype, x_fragment_ordered=x_fragment_ordered)
    scale, zero, bias, row_scale, col_scale = unit_stride(scale, zero, bias, row_scale, col_scale)
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    split = params.pop("SPLIT_K")
    grid = gemm_grid(m, n, params, split)
    permute_x = params.pop("PERMUTE_X", False)
    if x_fragment_ordered and not permute_x:
        raise ValueError("x in fragment order is read by PERMUTE_X configurations only")
    forms = dict(tile_forms(params, x, scale, zero, group_size), M_FAST=params.pop("M_FAST", False))
    if permute_x:
        if forms["PREPACKED"] or not forms["GATHER_X"]:
            raise ValueError("PERMUTE_X is a form of the GATHER_X tile over codes in column order, not PREPACKED")
        # x copied once into the tile's column order, so that every program reads it contiguously
        if not x_fragment_ordered:
            x = fragment_ordered_x(x, qdata.shape[1] * 2)
        elif x.shape[1] != qdata.shape[1] * 2:
            raise ValueError(f"x in fragment order must be {qdata.shape[1] * 2} columns wide, got {x.shape[1]}")
        k = x.shape[1]
        forms.update(PREPACKED=True, EVEN_K=True)
    ws, counters = splitk_buffers(y, split, grid[0] * grid[1])
    z = scale if zero is None else zero  # no zero stored: the scales stand in as a pointer the kernel never reads
    _w4a16_gemm_kernel[grid](
        x, int32_words(qdata), scale, z, bias if bias is not None else y, y, ws, counters,
        m, n, k, x.stride(0), x.stride(1), qdata.shape[1] // 4, scale.stride(0), z.stride(0), y.stride(0),
        split, y if row_scale is None else row_scale, y if col_scale is None else col_scale,
        zero_sums(x, zero, group_size, forms), GROUP=group_size, SPLIT=split > 1, HAS_BIAS=bias is not None,
        ROW_SCALE=row_scale is not None, COL_SCALE=col_scale is not None, **forms, **pdl_options(x.device, params),
        **params,
    )
    return y


def zero_sums(x: torch.Tensor, zero, group_size: int, forms: dict) -> torch.Tensor:
    """What the tile's xs_ptr reads: group_sums of x where a CENTERED tile adds zeros, else x (never read)."""
    if forms["CENTERED"] and zero is not None:
        return group_sums(x, group_size)
    return x


def group_sums(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 [M, ceil(K / group_size)]: each row's sum over each group of columns (columns past K count 0)."""
    m, k = x.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(x, (0, groups * group_size - k)) if k % group_size else x
    return padded.reshape(m, groups, group_size).sum(-1, dtype=torch.float32)


def gemv(x, qdata, scale, zero, group_size: int, bias, params: dict, *, row_scale=None,
         offs=None, quantize_x: bool = False) -> torch.Tensor:
    """The GEMV kernel with a configuration's parameters (``path`` taken out): one weight, or with ``offs`` a stack
    of experts whose rows of x are sorted by expert (end offsets [E]); ``row_scale`` (fp32 [M]) multiplies each
    row's products before the bias. ``quantize_x`` (8da4w): x is quantized per token inside the kernel (asymmetric
    int8, see int8_int4), its centered codes multiplied and each row's products scaled by its activation scale.
    y [M, N] in x.dtype."""
    params = dict(params)
    m, k = x.shape
    n = qdata.shape[-2]
    scale, zero, bias, row_scale, offs = unit_stride(scale, zero, bias, row_scale, offs)
    two_rows = params.pop("TWO_ROWS", False)
    if two_rows and offs is not None:
        raise ValueError("TWO_ROWS GEMV programs take rows of one weight, not of a stack of experts")
    if quantize_x and (offs is not None or row_scale is not None):
        raise ValueError("quantize_x takes one weight and makes its own row scales")
    y, grid, split, ws, counters = gemv_launch(x, n, params, x_rows=2 if two_rows else 1)
    words = int32_words(qdata)
    z = scale if zero is None else zero  # no zero stored: the scales stand in as a pointer the kernel never reads
    stacked = offs is not None
    _w4a16_gemv_kernel[grid](
        x, words, scale, z, bias if bias is not None else y, y, ws, counters, m, n, k, x.stride(0), x.stride(1),
        words.stride(-2), scale.stride(-2), z.stride(-2), y.stride(0), split,
        offs_ptr=offs if stacked else scale, E=qdata.shape[0] if stacked else 1,
        stride_qe=words.stride(0) if stacked else 0, stride_se=scale.stride(0) if stacked else 0,
        stride_ze=z.stride(0) if stacked else 0, rs_ptr=scale if row_scale is None else row_scale,
        GROUP=group_size, SPLIT=split > 1, HAS_BIAS=bias is not None, GROUPED=stacked, ROW_SCALE=row_scale is not None,
        TWO_ROWS=two_rows, QUANT_X=quantize_x,
        SCAN_BLOCK=params.pop("SCAN_BLOCK", min(triton.next_power_of_2(k), 1024 * params.get("num_warps", 4))),
        **gemv_forms(params, k, group_size, x, zero), **pdl_options(x.device, params), **params)
    return y


def gemv_forms(params: dict, k: int, group_size: int, x: torch.Tensor, zero) -> dict:
    """The GEMV kernel's forms from a configuration (taken out of ``params``) and the problem."""
    return dict(EVEN_K=k % (group_size * params["GROUPS"]) == 0, PREFETCH=params.pop("PREFETCH", False),
                REDUCE_W=params.pop("REDUCE_W", False),
                COARSE=params.pop("COARSE", False) and x.dtype != torch.float32, XVEC=params.pop("XVEC", False),
                PREPACKED=params.pop("PREPACKED", False),
                LOOP_STAGES=params.pop("LOOP_STAGES", 1), one_bits=ONE_BITS.value, ZERO=zero_kind(zero))


def w4a16_linear_triton(x, qdata, scale, zero, group_size: int, bias: Optional[torch.Tensor] = None, *,
                        config: Optional[dict] = None) -> torch.Tensor:
    """y = x @ w.T + bias with Triton kernels (CUDA, or CPU tensors under the interpreter); y in x.dtype.

    ``config`` forces a path and its meta-parameters; otherwise the tuned or default one for the shape is used.
    """
    check_w4a16(x, qdata, scale, zero, group_size, bias)
    if config is None:
        m, k = x.shape
        n = qdata.shape[0]
        key = autotune.config_key(f"w4a16_g{group_size}", m, n, k, (x.dtype, scale.dtype), x.device)
        config = autotune.choose(
            key,
            default_config(m, n, k, group_size, x.dtype, x.device),
            candidates=lambda: candidate_configs(m, n, k, group_size, x.dtype, x.device),
            run=lambda c: launch(x, qdata, scale, zero, group_size, bias, c),
            reference=lambda: w4a16_linear_ref(x, qdata, scale, zero, group_size, bias),
            tolerance=tolerance(x.dtype),
        )
        if (config["path"] == "wgmma" and wgmma_refusal(x, scale, zero, group_size)) or (
                config["path"] == "mma" and mma_refusal(x, qdata, group_size)):
            # a stored choice this Triton or these tensors cannot take: the generic path, never an error
            config = default_config(m, n, k, group_size, x.dtype, x.device)
    return launch(x, qdata, scale, zero, group_size, bias, config)


def mma_refusal(x, qdata, group_size: int) -> Optional[str]:
    """Why the ``mma`` path cannot take these inputs, or None when it can: at most MMA_ROWS rows of fp16 or bf16 x,
    groups of 128 codes over a whole number of them a row, on a GPU of compute capability 8.0 or later with Triton's
    Gluon. Scales and zeros of any float dtype, integer zero points or none."""
    if group_size != BLOCK_K_WGMMA:
        return f"the mma path takes groups of {BLOCK_K_WGMMA} codes, got group_size={group_size}"
    if qdata.shape[1] * 2 % BLOCK_K_WGMMA:
        return f"the mma path takes rows of whole groups of codes, got {qdata.shape[1] * 2} codes a row"
    return mma_x_refusal(x)


def wgmma_refusal(x, scale, zero, group_size: int) -> Optional[str]:
    """Why the ``wgmma`` path cannot take these inputs, or None when it can: it takes groups of 128 codes, fp16 or
    bf16 x with scales and float zeros of the same dtype, on a Hopper GPU with Triton's Gluon."""
    if group_size != BLOCK_K_WGMMA:
        return f"the wgmma path takes groups of {BLOCK_K_WGMMA} codes, got group_size={group_size}"
    if x.dtype in (torch.float16, torch.bfloat16) and (
            scale.dtype != x.dtype or (zero is not None and zero.dtype not in (torch.uint8, x.dtype))):
        return (f"the wgmma path takes scales and float zeros of x's dtype {x.dtype}, got scale {scale.dtype} and "
                f"zero {None if zero is None else zero.dtype}")
    return wgmma_x_refusal(x)


@torch.library.custom_op("aofunc::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                 group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ w.T + bias, w on the grid ``zero`` names (see the module): y [M, N] in x.dtype.

    One opaque op for ``torch.compile``: Triton kernels on CUDA, the fp32 reference twin elsewhere.
    """
    if x.device.type == "cuda":
        return w4a16_linear_triton(x, qdata, scale, zero, group_size, bias)
    return w4a16_linear_ref(x, qdata, scale, zero, group_size, bias)


@w4a16_linear.register_fake
def _(x, qdata, scale, zero, group_size, bias=None):
    check_w4a16(x, qdata, scale, zero, group_size, bias)
    return x.new_empty(x.shape[0], qdata.shape[0])


# ---------------------------------------------------------------------------------------------- stacked experts

def check_w4a16_grouped(x, qdata, scale, zero, offs, group_size) -> None:
    """Raise ValueError naming the argument when the inputs are not a valid grouped W4A16 problem: x [S, K] with
    its rows sorted by expert, stacked weights (qdata [E, N, Kp/2], scale and zero [E, N, Kp/g]) and offs [E]."""
    if qdata.dim() != 3:
        raise ValueError(f"qdata must be a stack of experts [E, N, Kp/2], got shape {tuple(qdata.shape)}")
    experts = qdata.shape[0]
    for name, t in (("scale", scale), ("zero", zero)):
        if t is not None and (t.dim() != 3 or t.shape[0] != experts):
            raise ValueError(f"{name} must be [E, N, Kp/g] with E = {experts}, got shape {tuple(t.shape)}")
    check_w4a16(x, qdata[0], scale[0], None if zero is None else zero[0], group_size, None)
    check_offsets(offs, experts, x)


def w4a16_grouped_linear_ref(x, qdata, scale, zero, offs, group_size: int) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x through expert e (w4a16_linear_ref), rows past offs[-1] zero: the grouped
    kernel's twin."""
    check_w4a16_grouped(x, qdata, scale, zero, offs, group_size)
    y = x.new_zeros(x.shape[0], qdata.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            y[start:end] = w4a16_linear_ref(x[start:end], qdata[e], scale[e], None if zero is None else zero[e],
                                            group_size)
        start = end
    return y


def grouped_config(s: int, experts: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """The grouped product's configuration for s rows over `experts` experts of [n, k]. Up to a row an expert on
    average (decode) the GEMV kernel, a program per row through its expert, rather than tiles of 16 rows that are
    mostly padding; else tiles of about the rows an expert gets (at least 16),
    the GEMM forms the single-weight GEMM uses for that many rows, K split while the busy tiles cannot fill the
    card."""
    if grouped_by_rows(s, experts):
        return gemv_config(s, n, k, group_size, device)
    block_m = min(64, max(16, triton.next_power_of_2(max(1, s // max(experts, 1)))))
    form = dict(GATHER_X=True, PAIRS=True) if block_m <= 32 else dict(FULL_DQ=True, PREFETCH=True)
    split = grouped_split_k(s, experts, triton.cdiv(n, 64), block_m, -(-k // group_size), device)
    return dict(path="grouped", BLOCK_M=block_m, BLOCK_N=64, SPLIT_K=split, SWAP=True, num_warps=4, num_stages=3,
                **form)


def w4a16_grouped_linear_triton(x, qdata, scale, zero, offs, group_size: int, *,
                                config: Optional[dict] = None) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x [S, K] through expert e of the stack, every expert in one launch (Triton: CUDA,
    or CPU tensors under the interpreter); rows past offs[-1] come back as zeros. y [S, N] in x.dtype."""
    check_w4a16_grouped(x, qdata, scale, zero, offs, group_size)
    s, k = x.shape
    experts, n = qdata.shape[0], qdata.shape[1]
    params = dict(config or grouped_config(s, experts, n, k, group_size, x.device))
    if params.pop("path", "grouped") == "gemv":
        return gemv(x, qdata, scale, zero, group_size, None, params, offs=offs)
    scale, zero, offs = unit_stride(scale, zero, offs)
    forms = tile_forms(params, x, scale, zero, group_size)
    y = torch.zeros(s, n, dtype=x.dtype, device=x.device)
    words = qdata.contiguous().view(torch.int32)
    z = scale if zero is None else zero
    split = params.pop("SPLIT_K", 1)
    grid = grouped_grid(s, experts, n, params, split)
    ws, counters = splitk_buffers(y, split, grid[0] * grid[1])
    _w4a16_grouped_kernel[grid](
        x, words, scale, z, zero_sums(x, zero, group_size, forms), offs, y, ws, counters, s, n, k, experts,
        x.stride(0), x.stride(1), words.stride(0), words.stride(1), scale.stride(0), scale.stride(1), z.stride(0),
        z.stride(1), y.stride(0), split,
        GROUP=group_size, SPLIT=split > 1, **forms, **params)
    return y


@torch.library.custom_op("aofunc::w4a16_grouped_linear", mutates_args=())
def w4a16_grouped_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                         offs: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x through expert e of a stacked W4A16 weight (see the module for the grids), rows
    past offs[-1] zero: one opaque op for ``torch.compile``; the grouped kernel on CUDA, the twin elsewhere."""
    if x.device.type == "cuda":
        return w4a16_grouped_linear_triton(x, qdata, scale, zero, offs, group_size)
    return w4a16_grouped_linear_ref(x, qdata, scale, zero, offs, group_size)


@w4a16_grouped_linear.register_fake
def _(x, qdata, scale, zero, offs, group_size):
    check_w4a16(x, qdata[0], scale[0], None if zero is None else zero[0], group_size, None)
    return x.new_empty(x.shape[0], qdata.shape[1])
