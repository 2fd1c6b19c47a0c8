"""Integer matrix multiplication that is never silently wrong: int8 [M, K] @ int8 [K, N] -> int32 [M, N].

``int_mm`` is the public op (``torch.ops.aofunc.int_mm``). On CUDA it calls ``torch._int_mm`` only inside the
constraints under which cuBLAS is known to be exact (M > 16, K and N positive multiples of 8, both operands
row-major contiguous; cuBLAS has returned wrong integers for transposed operands on some CUDA releases), and
the Triton kernel below everywhere else (any M, N, K, any strides). On CPU ``torch._int_mm`` is exact for every
shape and runs there. Results are exact while every |C[m, n]| stays below 2**31, which holds for K <= 131072.

The Triton kernel also serves the W8A8 linear: with per-row and per-column scales it forms
``(C * row_scale[m] * col_scale[n])`` in fp32, casts to the output dtype and adds a bias, all in the epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import autotune
from .tiles import (follow_previous, gemv_rows, grouped_tile, hopper_or_newer, int32_words, interpreting,
                    pdl_options, split_k, splitk_buffers, splitk_total)
from .triton_compat import tensor_descriptor, tl, triton


# A configuration is a dict of the kernel's launch meta-parameters (kernels/autotune.py's ``Config``).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}


# Up to this many rows the int8 GEMM's tiles are few on common shapes, and K may be split among programs.
SPLIT_MAX_M = 64


def _config(block_m, block_n, block_k, group_m, num_warps, num_stages) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
            "num_warps": num_warps, "num_stages": num_stages}


# Default tiles by M bucket for the int8 GEMM on Hopper, each shown correct by the tests; the M <= 16 tile won the
# searches of benchmarks/bench_w8a8.py on an H100 (docs/benchmarks.md), the M > 512 tile every shape of the H200's
# at 2048 rows (8192 x 28672: 720 us, against 766 for 128 x 256 tiles).
_CUDA_CONFIGS = (
    (16, _config(16, 64, 256, 1, 4, 4)),
    (32, _config(32, 64, 256, 1, 4, 4)),
    (64, _config(64, 64, 256, 4, 4, 4)),
    (128, _config(128, 64, 128, 8, 4, 4)),
    (512, _config(128, 128, 128, 8, 8, 4)),
)
_CUDA_LARGE_M_CONFIG = _config(128, 128, 128, 8, 8, 3)


def default_config(m: int, device: torch.device, n: int = 0, k: int = 0) -> dict:
    """The tile for an M-row int8 GEMM on ``device`` (the interpreter's small tile off CUDA); given the product's N
    and K, up to 64 rows K is also split while the tiles are too few to fill the card (tiles.split_k)."""
    config = autotune.config_for_m(m, device, _CUDA_CONFIGS, _CUDA_LARGE_M_CONFIG, INTERPRETER_CONFIG)
    if n and k and m <= SPLIT_MAX_M and torch.device(device).type == "cuda":
        programs = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
        split = split_k(programs, triton.cdiv(k, config["BLOCK_K"]), torch.device(device))
        if split > 1:
            config = dict(config, SPLIT_K=split)
    return config


def candidate_configs(m: int) -> list:
    """Tiles an autotuning search tries for an M-row int8 GEMM on CUDA."""
    if m <= SPLIT_MAX_M:
        block_m = max(16, triton.next_power_of_2(m))
        return [dict(_config(block_m, bn, bk, 1, 4, stages), **({"SPLIT_K": split} if split > 1 else {}))
                for bn, bk, stages in ((32, 256, 4), (64, 256, 4), (128, 128, 4), (32, 128, 5), (64, 128, 5),
                                       (16, 256, 4), (32, 512, 3))
                for split in (1, 2, 4, 8)]
    if m <= 256:
        return [dict(_config(bm, bn, bk, 8, warps, stages), TMA=tma, **({"SPLIT_K": split} if split > 1 else {}))
                for bm, bn, bk, warps in ((64, 64, 256, 4), (64, 128, 128, 4), (128, 64, 128, 4),
                                          (128, 128, 128, 8), (64, 256, 128, 4))
                for stages in (3, 4) for tma in (False, True) for split in (1, 2)]
    tiles = ((128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4),
             (128, 128, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 128, 256, 8, 8, 3), (128, 256, 64, 8, 8, 4),
             (64, 256, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4))
    return [dict(_config(*c), TMA=tma) for tma in (False, True) for c in tiles]


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K, split_k,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # A tile of C over this program's split of K's steps (program_id(1) of split_k), finished by _finish_tile.
    follow_previous(PDL)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap onto valid ones so the main loop needs no masks; they are never stored.
    load_m = (offs_m % M).to(tl.int64)
    load_n = (offs_n % N).to(tl.int64)
    n_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_steps, split_k)
    first = tl.program_id(1) * per_split
    offs_k = first * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + load_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + load_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(first, tl.minimum(first + per_split, n_steps)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=tl.arange(0, BLOCK_K)[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=tl.arange(0, BLOCK_K)[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _finish_tile(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, row_scale_ptr, col_scale_ptr, bias_ptr,
                 ws_ptr, cnt_ptr, split_k, SCALED, HAS_BIAS, SPLIT)


@triton.jit
def _int8_matmul_tma_kernel(
    a_desc, b_desc, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K, split_k, stride_cm, stride_cn,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The same product with A [M, K] and B^T [N, K] read through tensor descriptors (Hopper's copy engine), K split
    among programs as in _int8_matmul_kernel."""
    follow_previous(PDL)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_steps, split_k)
    first = tl.program_id(1) * per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(first, tl.minimum(first + per_split, n_steps)):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _finish_tile(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, row_scale_ptr, col_scale_ptr, bias_ptr,
                 ws_ptr, cnt_ptr, split_k, SCALED, HAS_BIAS, SPLIT)


@triton.jit
def scaled_tile(acc, row_scale, offs_n, mask_n, col_scale_ptr, bias_ptr, dtype: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(acc * row_scale[:, None] * col_scale[None, :]).to(dtype), then + bias in fp32 and rounded again: an int32
    tile of sums to the linear's output (the twin's two roundings)."""
    col_scale = tl.load(col_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = (acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]).to(dtype)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + bias[None, :]).to(dtype)
    return y


@triton.jit
def _store_tile(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, row_scale_ptr, col_scale_ptr, bias_ptr,
                SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store the int32 tile, or its scaled_tile with the row scales at row_scale_ptr."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    mask = mask_m[:, None] & mask_n[None, :]
    if SCALED:
        row_scale = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        tl.store(c_ptrs, scaled_tile(acc, row_scale, offs_n, mask_n, col_scale_ptr, bias_ptr,
                                     c_ptr.dtype.element_ty, HAS_BIAS), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _finish_tile(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, row_scale_ptr, col_scale_ptr, bias_ptr,
                 ws_ptr, cnt_ptr, split_k, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """_store_tile of this program's int32 tile; with SPLIT (program_id(1) of split_k) the last split of the tile
    (program_id(0)) to finish sums the int32 partials, exactly, and stores."""
    last = True
    if SPLIT:
        offs = offs_m[:, None] * N + offs_n[None, :]
        last, acc = splitk_total(acc, offs, (offs_m < M)[:, None] & (offs_n < N)[None, :], ws_ptr, cnt_ptr,
                                 tl.program_id(0), tl.program_id(1), M * N, split_k)
    if last:
        _store_tile(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, row_scale_ptr, col_scale_ptr, bias_ptr,
                    SCALED, HAS_BIAS)


def int8_matmul_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    row_scale: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.int32,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """C = A @ B in int32, or ((A @ B) * row_scale[:, None] * col_scale[None, :]).to(out_dtype) + bias.

    A is int8 [M, K], B int8 [K, N], any strides. With scales the product is formed in fp32, cast to
    ``out_dtype``, then the bias (cast to fp32) is added and the sum cast again, exactly as the plain-torch
    expression ``(c.float() * rs[:, None] * cs[None, :]).to(out_dtype) + bias.to(out_dtype)`` rounds.
    An A whose rows are not contiguous along K is copied first: on Triton 3.6 / H100 a K-strided A with
    32-row tiles gave wrong columns, while every K-contiguous A tested exact.
    """
    if a.stride(1) != 1:
        a = a.contiguous()
    m, k = a.shape
    n = b.shape[1]
    scaled = row_scale is not None
    out, done = _output(a, n, scaled, out_dtype, bias)
    if done:
        return out
    launch = dict(config or default_config(m, a.device, n, k))
    split = launch.pop("SPLIT_K", 1)
    tma = launch.pop("TMA", False) and tma_compatible(a, b) and has_tma(a.device)
    grid = (triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"]), split)
    epilogue = (row_scale if scaled else out, col_scale if scaled else out, bias if bias is not None else out)
    ws, counters = splitk_buffers(out, split, grid[0], torch.int32)
    if tma:
        a_desc = tensor_descriptor().from_tensor(a, [launch["BLOCK_M"], launch["BLOCK_K"]])
        b_desc = tensor_descriptor().from_tensor(b.t(), [launch["BLOCK_N"], launch["BLOCK_K"]])
        _int8_matmul_tma_kernel[grid](
            a_desc, b_desc, out, *epilogue, ws, counters, m, n, k, split, out.stride(0), out.stride(1),
            SCALED=scaled, HAS_BIAS=bias is not None, SPLIT=split > 1, **pdl_options(a.device, launch), **launch,
        )
        return out
    _int8_matmul_kernel[grid](
        a, b, out, *epilogue, ws, counters, m, n, k, split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        SCALED=scaled, HAS_BIAS=bias is not None, EVEN_K=k % launch["BLOCK_K"] == 0, SPLIT=split > 1,
        **pdl_options(a.device, launch), **launch,
    )
    return out


# dp4a: four int8 products of two int32 words' bytes summed into an int32, one instruction (sm_61 and up).
DP4A_PTX: tl.constexpr = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")


@triton.jit
def dot4_acc(acc, a, b, DP4A: tl.constexpr):
    """acc + the sum of the four products of the int8 bytes of int32 words a and b (same shapes): dp4a on CUDA,
    else each signed byte moved to the top of the word and shifted back down."""
    if DP4A:
        return tl.inline_asm_elementwise(DP4A_PTX, "=r,r,r,r", [a, b, acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        for j in tl.static_range(4):
            acc += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
        return acc


@triton.jit
def gemv_sums(acc, offs_m, offs_n, M, N, ws_ptr, cnt_ptr, split_k, SPLIT: tl.constexpr):
    """(last, sums [ROWS, BLOCK_N]) of an int8 GEMV program's per-word int32 accumulator [ROWS, BLOCK_N, BLOCK_W]:
    with SPLIT the sums of all splits of K, through the int32 workspace, and last tells the one program that stores
    them; without, this program's sums, to be stored (last is always true)."""
    total = tl.sum(acc, axis=2)
    last = True
    if SPLIT:
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        last, total = splitk_total(total, offs_m[:, None] * N + offs_n[None, :],
                                   (offs_m < M)[:, None] & (offs_n < N)[None, :], ws_ptr, cnt_ptr, tile,
                                   tl.program_id(2), M * N, split_k)
    return last, total


@triton.jit
def _int8_gemv_kernel(
    a_ptr, b_ptr, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K_words, split_k, stride_am, stride_bn, stride_cm, stride_cn,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr, DP4A: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, LOOP_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    follow_previous(PDL)
    # ROWS rows of A against BLOCK_N rows of B (both as int32 words of four int8 values along K) over this program's
    # split of K's steps (program_id(2) of split_k), a step being BLOCK_W words: each word of B is loaded once for
    # all ROWS rows. Each word pair adds its four products to an int32 accumulator per word; the row sums are exact,
    # and with SPLIT the last split of a tile sums the int32 partials and stores. Rows of A past M repeat row M - 1
    # and are never stored.
    offs_n, rows = gemv_rows(N, BLOCK_N)
    offs_m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    pid_k = tl.program_id(2)
    offs_w = tl.arange(0, BLOCK_W)
    n_steps = tl.cdiv(K_words, BLOCK_W)
    per_split = tl.cdiv(n_steps, split_k)
    first = pid_k * per_split
    a_rows = a_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + rows.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_W], dtype=tl.int32)
    for step in tl.range(first, tl.minimum(first + per_split, n_steps), num_stages=LOOP_STAGES):
        words = step * BLOCK_W + offs_w
        if EVEN_K:
            a = tl.load(a_rows + words[None, :])
            b = tl.load(b_rows + words[None, :])
        else:
            a = tl.load(a_rows + words[None, :], mask=(words < K_words)[None, :], other=0)
            b = tl.load(b_rows + words[None, :], mask=(words < K_words)[None, :], other=0)
        shape: tl.constexpr = (ROWS, BLOCK_N, BLOCK_W)
        acc = dot4_acc(acc, tl.broadcast_to(a[:, None, :], shape), tl.broadcast_to(b[None, :, :], shape), DP4A)
    last, total = gemv_sums(acc, offs_m, offs_n, M, N, ws_ptr, cnt_ptr, split_k, SPLIT)
    if last:
        _store_tile(total, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, row_scale_ptr, col_scale_ptr, bias_ptr,
                    SCALED, HAS_BIAS)


def gemv_candidates(m: int) -> list:
    """The int8 GEMV's configurations for an autotuning search of an M-row call: a program per row, and for 2 to 4
    rows also a program for all of them (``ROWS``, a power of two). The H200 searches at 1 to 4 rows of four
    shapes never chose 32-word steps, 128-row programs or 8 splits (the 128-row program took 18.9 µs where 32 rows
    took 11.5 at one row of 4096 x 4096), so they are not offered."""
    configs = [dict(path="gemv", BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=split, LOOP_STAGES=stages, num_warps=warps,
                    num_stages=3)
               for bn, warps in ((16, 4), (32, 4), (64, 4), (64, 8)) for bw in (64, 128) for split in (1, 2, 4)
               for stages in (1, 3)]
    rows = triton.next_power_of_2(m)
    if 1 < rows <= 4:
        configs += [dict(c, ROWS=rows) for c in configs if c["BLOCK_N"] * c["BLOCK_W"] <= 4096]
    return configs


def gemv_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """The int8 GEMV's default configuration for M rows of A (up to 4): the H200 searches' winner on four shapes of
    K, N >= 4096 (16 rows of B a program, 128 words a step, the next steps' words copied ahead, 4 warps), every row
    of A in one program (rows rounded up to a power of two), and K split only while the programs are too few to
    fill the card."""
    rows, block_n, block_w = triton.next_power_of_2(max(m, 1)), 16, 128
    programs = triton.cdiv(m, rows) * triton.cdiv(n, block_n)
    split = split_k(programs, triton.cdiv(triton.cdiv(k, 4), block_w), torch.device(device))
    return dict(path="gemv", ROWS=rows, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split, LOOP_STAGES=3, num_warps=4,
                num_stages=3)


def int8_gemv_triton(a: torch.Tensor, b: torch.Tensor, *, row_scale: Optional[torch.Tensor] = None,
                     col_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                     out_dtype: torch.dtype = torch.int32, config: dict) -> torch.Tensor:
    """int8_matmul_triton's C for few rows of A, with B given as its transpose ``b`` [N, K]: GEMV programs on CUDA
    cores (dp4a), each for ``config["ROWS"]`` rows of A (1 if absent) and reading its rows of B once for all of
    them. Same sums, same epilogue."""
    m = a.shape[0]
    n = b.shape[0]
    scaled = row_scale is not None
    out, done = _output(a, n, scaled, out_dtype, bias)
    if done:
        return out
    params = dict(config)
    params.pop("path")
    split = params.pop("SPLIT_K")
    a_words, b_words = int32_words(a), int32_words(b)
    k_words = a_words.shape[1]
    params.setdefault("ROWS", 1)
    grid = (triton.cdiv(n, params["BLOCK_N"]), triton.cdiv(m, params["ROWS"]), split)
    ws, counters = splitk_buffers(out, split, grid[0] * grid[1], torch.int32)
    epilogue = (row_scale if scaled else out, col_scale if scaled else out, bias if bias is not None else out)
    _int8_gemv_kernel[grid](
        a_words, b_words, out, *epilogue, ws, counters, m, n, k_words, split,
        a_words.stride(0), b_words.stride(0), out.stride(0), out.stride(1),
        SCALED=scaled, HAS_BIAS=bias is not None, EVEN_K=k_words % params["BLOCK_W"] == 0, SPLIT=split > 1,
        DP4A=params.pop("DP4A", True) and not interpreting(), **pdl_options(a.device, params), **params,
    )
    return out


def has_tma(device: torch.device) -> bool:
    """Whether the device has Hopper's tensor-memory copies (compute capability 9 and up; Triton's interpreter
    emulates them on the CPU). A TMA configuration elsewhere runs the pointer-load kernel: same tiles, same sums."""
    return device.type != "cuda" or hopper_or_newer(device)


def tma_compatible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether A [M, K] and B [K, N] can be read through tensor descriptors: K-contiguous rows, 16-byte aligned."""
    return (
        a.stride(1) == 1 and b.stride(0) == 1 and a.stride(0) % 16 == 0 and b.stride(1) % 16 == 0
        and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
    )


def _output(a: torch.Tensor, n: int, scaled: bool, out_dtype: torch.dtype,
            bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(C [M, N], whether it is complete without a launch): the int32 product, or the scaled one in ``out_dtype``;
    an empty K gives zero (plus the bias when scaled), an empty M or N nothing to compute."""
    m, k = a.shape
    out = torch.empty((m, n), device=a.device, dtype=out_dtype if scaled else torch.int32)
    if m and n and not k:
        out.zero_()
        if scaled and bias is not None:
            out.add_(bias.to(out.dtype))
    return out, not (m and n and k)


def check_int_mm_args(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise a clear error unless ``a`` [M, K] and ``b`` [K, N] are int8 matrices on one device."""
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.int8:
            raise TypeError(f"int_mm: {name} must be int8, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"int_mm: {name} must be 2-D, got shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"int_mm: a is {tuple(a.shape)} and b is {tuple(b.shape)}: a.shape[1] must equal b.shape[0]")
    if a.device != b.device:
        raise ValueError(f"int_mm: a is on {a.device} and b on {b.device}; both must be on one device")


def int_mm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C = A @ B in int32, exact: the integer products summed in float64 (exact while |C| < 2**53)."""
    check_int_mm_args(a, b)
    return (a.double() @ b.double()).to(torch.int32)


def int_mm_triton(a: torch.Tensor, b: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    """C = A @ B in int32 by the Triton kernel, for any shape and strides (tuned tile unless ``config``)."""
    check_int_mm_args(a, b)
    if config is None and a.device.type == "cuda" and a.shape[0] > 0:
        m, k = a.shape
        key = autotune.config_key("int_mm", m, b.shape[1], k, (a.dtype,), a.device)
        config = autotune.choose(
            key, default_config(m, a.device, b.shape[1], k), lambda: candidate_configs(m),
            lambda c: int8_matmul_triton(a, b, config=c), lambda: int_mm_ref(a, b), tolerance=0.0,
        )
    return int8_matmul_triton(a, b, config=config)


def cublas_int_mm_is_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` on CUDA takes these operands inside the constraints where it is exact."""
    m, k = a.shape
    n = b.shape[1]
    return (
        m > 16 and k > 0 and k % 8 == 0 and n > 0 and n % 8 == 0
        and a.is_contiguous() and b.is_contiguous()
    )


@torch.library.custom_op("aofunc::int_mm", mutates_args=())
def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C = A @ B, int8 [M, K] @ int8 [K, N] -> int32 [M, N], exact on every device and shape."""
    check_int_mm_args(a, b)
    # torch's CPU _int_mm is exact except for K == 1, where it returns wrong values
    if a.device.type == "cpu" and a.shape[1] > 1:
        return torch._int_mm(a, b)
    return int_mm_ref(a, b)


@int_mm.register_kernel("cuda")
def _int_mm_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    check_int_mm_args(a, b)
    if cublas_int_mm_is_exact(a, b):
        return torch._int_mm(a, b)
    return int_mm_triton(a, b)


@int_mm.register_fake
def _int_mm_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    check_int_mm_args(a, b)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)
