"""W8A8 ("int8 dynamic"): per-token int8 activation quantization and the int8 linear with a fused epilogue.

Math (all per-token statistics in fp32). With ``x' = x / act_scale`` when a SmoothQuant
``act_scale`` [K] is given, else ``x' = x``:

    s[m]     = clamp(max_k |x'[m, k]|, 1e-5) / 127
    xq[m, k] = clamp(round(x'[m, k] / s[m]), -127, 127)              (round half to even)
    y[m, n]  = (int32(xq @ q.T)[m, n] * s[m] * scale[n]).to(x.dtype) + bias[n]

Public ops (``torch.ops.aofunc.*``; CUDA runs Triton, other devices the plain-torch twin):
``quantize_per_token_int8(x, act_scale) -> (xq, s)`` and ``w8a8_linear(x, qdata, scale, bias, act_scale) -> y``.
On CUDA the linear runs a one-pass quantization kernel feeding the int8 GEMM whose epilogue applies both scales,
the cast and the bias, with a tile chosen per M bucket (kernels/autotune.py); two rows of x (up to 4 on narrow
weights) run the int8 GEMV (``int_mm.int8_gemv_triton``) on the quantized rows instead, and one row a GEMV that
quantizes it inside (one kernel). One more path is a tuning candidate for small M: one kernel that quantizes the
activation tile by tile inside the GEMM.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import autotune, int_mm
from .activations import per_token_block, round_half_even
from .int_mm import dot4_acc, gemv_sums, int8_gemv_triton, int8_matmul_triton, scaled_tile
from .selector import Problem, default_path
from .tiles import follow_previous, gemv_launch, gemv_rows, int32_words, interpreting, pdl_options, unit_stride
from .triton_compat import tl, triton


@triton.jit
def _div(x, y):
    """IEEE-rounded x / y with y broadcast to x's shape (plain ``/`` in Triton is approximate for fp32)."""
    return tl.div_rn(x, tl.broadcast_to(y, x.shape))


@triton.jit
def _load_smoothed(x_ptrs, act_ptrs, mask, k_mask, HAS_ACT: tl.constexpr):
    """x' = x / act_scale in fp32 (masked elements are 0)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ACT:
        x = _div(x, tl.load(act_ptrs, mask=k_mask, other=1.0).to(tl.float32))
    return x


@triton.jit
def _quantize_per_token_int8_kernel(
    x_ptr, act_ptr, xq_ptr, s_ptr,
    K, stride_xm, stride_xk, stride_qm,
    HAS_ACT: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = offs < K
        x = _load_smoothed(x_row + offs * stride_xk, act_ptr + offs, mask, mask, HAS_ACT)
        s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-5), 127.0)
        q = tl.minimum(tl.maximum(round_half_even(_div(x, s)), -127.0), 127.0)
        tl.store(q_row + offs, q.to(tl.int8), mask=mask)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            x = _load_smoothed(x_row + (k0 + offs) * stride_xk, act_ptr + k0 + offs, mask, mask, HAS_ACT)
            amax = tl.maximum(amax, tl.abs(x))
        s = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-5), 127.0)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            x = _load_smoothed(x_row + (k0 + offs) * stride_xk, act_ptr + k0 + offs, mask, mask, HAS_ACT)
            q = tl.minimum(tl.maximum(round_half_even(_div(x, s)), -127.0), 127.0)
            tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _w8a8_fused_kernel(
    x_ptr, act_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_ym, stride_yn,
    HAS_ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Activation quantization inside the GEMM, for small M: each program rescans its rows' amax."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_cols = q_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_qn

    amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        x = _load_smoothed(x_rows + (k0 + offs_k)[None, :] * stride_xk, (act_ptr + k0 + offs_k)[None, :],
                           mask_m[:, None] & k_mask[None, :], k_mask[None, :], HAS_ACT)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.div_rn(tl.maximum(tl.max(amax, axis=1), 1e-5), 127.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        x = _load_smoothed(x_rows + (k0 + offs_k)[None, :] * stride_xk, (act_ptr + k0 + offs_k)[None, :],
                           mask_m[:, None] & k_mask[None, :], k_mask[None, :], HAS_ACT)
        xq = tl.minimum(tl.maximum(round_half_even(_div(x, s[:, None])), -127.0), 127.0).to(tl.int8)
        w = tl.load(q_cols + (k0 + offs_k)[:, None] * stride_qk, mask=k_mask[:, None], other=0)
        acc = tl.dot(xq, w, acc, out_dtype=tl.int32)

    y = scaled_tile(acc, s, offs_n, mask_n, scale_ptr, bias_ptr, y_ptr.dtype.element_ty, HAS_BIAS)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, y, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w8a8_gemv_kernel(
    x_ptr, act_ptr, b_ptr, scale_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_words, split_k, stride_xm, stride_xk, stride_bn, stride_ym, stride_yn,
    HAS_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr, DP4A: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, LOOP_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    follow_previous(PDL)
    # int_mm's int8 GEMV with the per-token quantization inside: each program finds its ROWS rows' absolute maxima
    # over all of K (every split too), then quantizes each step's 4 * BLOCK_W values of x into BLOCK_W int32 words
    # of four codes as it multiplies them with BLOCK_N rows of the weight (b_ptr: qdata as int32 words). Scales and
    # codes are the quantization kernel's, so the sums and y are the two-kernel path's. EVEN_K: K is a whole
    # number of words of steps. Rows of x past M repeat row M - 1 and are never stored.
    offs_n, rows = gemv_rows(N, BLOCK_N)
    offs_m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    pid_k = tl.program_id(2)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    offs_k = tl.arange(0, 4 * BLOCK_W)
    amax = tl.zeros([ROWS, 4 * BLOCK_W], dtype=tl.float32)
    for k0 in range(0, K, 4 * BLOCK_W):
        cols = k0 + offs_k
        x = _load_smoothed(x_rows + cols[None, :] * stride_xk, (act_ptr + cols)[None, :], (cols < K)[None, :],
                           (cols < K)[None, :], HAS_ACT)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.div_rn(tl.maximum(tl.max(amax, axis=1), 1e-5), 127.0)

    offs_w = tl.arange(0, BLOCK_W)
    offs_byte = tl.arange(0, 4)
    n_steps = tl.cdiv(K_words, BLOCK_W)
    per_split = tl.cdiv(n_steps, split_k)
    first = pid_k * per_split
    b_rows = b_ptr + rows.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_W], dtype=tl.int32)
    for step in tl.range(first, tl.minimum(first + per_split, n_steps), num_stages=LOOP_STAGES):
        words = step * BLOCK_W + offs_w
        cols = (words[:, None] * 4 + offs_byte[None, :])[None, :, :]
        x = _load_smoothed(x_rows[:, :, None] + cols * stride_xk, act_ptr + cols, cols < K, cols < K, HAS_ACT)
        if EVEN_K:
            b = tl.load(b_rows + words[None, :])
        else:
            b = tl.load(b_rows + words[None, :], mask=(words < K_words)[None, :], other=0)
        codes = tl.minimum(tl.maximum(round_half_even(_div(x, s[:, None, None])), -127.0), 127.0).to(tl.int32)
        # four codes' bytes side by side in a word (disjoint bits: the sum is their bitwise or)
        a = tl.sum((codes & 0xFF) << (offs_byte * 8)[None, None, :], axis=2)
        shape: tl.constexpr = (ROWS, BLOCK_N, BLOCK_W)
        acc = dot4_acc(acc, tl.broadcast_to(a[:, None, :], shape), tl.broadcast_to(b[None, :, :], shape), DP4A)
    last, total = gemv_sums(acc, offs_m, offs_n, M, N, ws_ptr, cnt_ptr, split_k, SPLIT)
    if last:
        y = scaled_tile(total, s, offs_n, offs_n < N, scale_ptr, bias_ptr, y_ptr.dtype.element_ty, HAS_BIAS)
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn, y,
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_activation(op: str, x: torch.Tensor) -> None:
    """Raise a clear error unless ``x`` is a 2-D fp16/bf16/fp32 activation [M, K]."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K] (flatten leading dims), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one column (K > 0)")


def check_vector(op: str, name: str, t: Optional[torch.Tensor], length: int, x: torch.Tensor) -> None:
    """Raise a clear error unless ``t`` is None or a float vector of ``length`` on x's device."""
    if t is None:
        return
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{op}: {name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_quantize_args(x: torch.Tensor, act_scale: Optional[torch.Tensor]) -> None:
    check_activation("quantize_per_token_int8", x)
    check_vector("quantize_per_token_int8", "act_scale", act_scale, x.shape[1], x)


def _check_linear_args(x, qdata, scale, bias, act_scale) -> None:
    op = "w8a8_linear"
    check_activation(op, x)
    if qdata.dtype != torch.int8 or qdata.dim() != 2:
        raise TypeError(f"{op}: qdata must be a 2-D int8 tensor [N, K], got {qdata.dtype} {tuple(qdata.shape)}")
    if qdata.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: qdata is {tuple(qdata.shape)} but x has K={x.shape[1]} columns")
    if qdata.device != x.device:
        raise ValueError(f"{op}: qdata is on {qdata.device} but x is on {x.device}")
    n, k = qdata.shape
    check_vector(op, "scale", scale, n, x)
    check_vector(op, "bias", bias, n, x)
    check_vector(op, "act_scale", act_scale, k, x)


def quantize_per_token_int8_ref(
    x: torch.Tensor, act_scale: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """s = clamp(amax|x'|, 1e-5) / 127, xq = clamp(round(x' / s), -127, 127), x' = x / act_scale, per row in fp32.

    Every division is IEEE-rounded fp32, on every device, as the Triton kernels compute it.
    """
    _check_quantize_args(x, act_scale)
    xf = x.float()
    if act_scale is not None:
        xf = xf / act_scale.float()
    amax = xf.abs().amax(dim=1).clamp(min=1e-5)
    # A tensor divisor keeps the division IEEE-rounded on CUDA too (a Python-scalar divisor makes torch's CUDA
    # kernel multiply by the rounded reciprocal, which differs in the last bit).
    s = amax / amax.new_full((), 127.0)
    xq = torch.clamp(torch.round(xf / s[:, None]), -127, 127).to(torch.int8)
    return xq, s


def quantize_per_token_int8_triton(
    x: torch.Tensor, act_scale: Optional[torch.Tensor], block_k: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The twin's (xq, s) by one Triton program per row; one pass over x when the row fits ``block_k``."""
    _check_quantize_args(x, act_scale)
    m, k = x.shape
    xq = torch.empty((m, k), device=x.device, dtype=torch.int8)
    s = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return xq, s
    block_k, num_warps, one_pass = per_token_block(k, block_k)
    _quantize_per_token_int8_kernel[(m,)](
        x, act_scale if act_scale is not None else x, xq, s,
        k, x.stride(0), x.stride(1), xq.stride(0),
        HAS_ACT=act_scale is not None, ONE_PASS=one_pass, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return xq, s


@torch.library.custom_op("aofunc::quantize_per_token_int8", mutates_args=())
def quantize_per_token_int8(
    x: torch.Tensor, act_scale: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(xq int8 [M, K], s fp32 [M]): s = clamp(amax|x / act_scale|, 1e-5) / 127, xq = round(x / act_scale / s)."""
    return quantize_per_token_int8_ref(x, act_scale)


@quantize_per_token_int8.register_kernel("cuda")
def _quantize_per_token_int8_cuda(x, act_scale):
    return quantize_per_token_int8_triton(x, act_scale)


@quantize_per_token_int8.register_fake
def _quantize_per_token_int8_fake(x, act_scale):
    _check_quantize_args(x, act_scale)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


# A configuration (kernels/autotune.py's ``Config``) is the kernel's launch meta-parameters plus ``FUSED``:
# True runs the single small-M kernel, False the quantization kernel followed by the int8 GEMM. With
# ``path="gemv"`` the GEMV runs instead: with the quantization inside where ``FUSED`` is true, else after the
# quantization kernel.
INTERPRETER_FUSED_CONFIG = {"FUSED": True, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4,
                            "num_stages": 1}


def default_config(m: int, device: torch.device, n: int = 0, k: int = 0,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """The configuration ``w8a8_linear`` runs an M-row call of x in ``dtype`` with on ``device`` when nothing was
    tuned (N and K: see int_mm.default_config).

    Few rows (the selector's table says which): the int8 GEMV (H200, bf16/aofunc at M=1 on 4096 x 4096,
    4096 x 14336, 14336 x 4096 and 8192 x 28672 with the quantization kernel first: 1.22, 1.53, 1.36 and 1.85,
    against 1.02, 1.30, 1.15 and 1.62 for the GEMM's best tile; for one row the GEMV quantizes it inside). More rows: the quantization kernel + the int8 GEMM. On an H100 the
    fused kernel lost to it at K >= 8192 for every M measured (e.g. 317 µs against 100 µs at M=1, K=14336,
    N=4096), so it stays a tuning candidate only.
    """
    if default_path("w8a8", Problem(m, n, k, dtype, torch.device(device))) == "gemv":
        # one row quantized inside the GEMV, one launch fewer (H200, 4096 x 4096: 8.8 us against 10.0 for the two
        # kernels; 8192 x 28672: 58.9 against 61.6); from two rows each program would quantize them all again for
        # its block of outputs, and loses (8192 x 28672, 2 rows: 65.8 against 61.2)
        return dict(int_mm.gemv_config(m, n, k, device), FUSED=m == 1)
    return {"FUSED": False, **int_mm.default_config(m, device, n, k)}


def candidate_configs(m: int) -> list:
    """Configurations an autotuning search tries for an M-row call on CUDA: the int8 GEMV up to 4 rows (after the
    quantization kernel, or with the quantization inside), fused tiles for small M, then split."""
    # with the quantization inside, every split rescans its rows' maxima (fewer splits), and every program
    # quantizes all its rows again: it lost from 3 rows on (H200, 8192 x 28672: 72.8 us at best against 63.2)
    gemv = int_mm.gemv_candidates(m) if m <= 4 else []
    small = gemv + [dict(c, FUSED=True) for c in gemv if c["SPLIT_K"] <= 2 and m <= 2]
    if m <= 64:
        block_m = max(16, triton.next_power_of_2(m))
        small += [{"FUSED": True, "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": st}
                  for bn, bk, st in ((32, 256, 4), (64, 256, 4), (32, 128, 4), (64, 128, 4), (16, 256, 4),
                                     (32, 512, 3), (64, 512, 3), (128, 128, 4))]
    return small + [{"FUSED": False, **c} for c in int_mm.candidate_configs(m)]


def w8a8_config(x: torch.Tensor, qdata: torch.Tensor, run, reference) -> dict:
    """The tuned (or default) configuration for this call's key; ``run``/``reference`` serve a search."""
    m, k = x.shape
    n = qdata.shape[0]
    if x.device.type != "cuda" or m == 0:
        return default_config(m, x.device, n, k, x.dtype)
    key = autotune.config_key("w8a8_linear", m, n, k, (x.dtype,), x.device)
    default = default_config(m, x.device, n, k, x.dtype)
    return autotune.choose(key, default, lambda: candidate_configs(m), run, reference, tolerance=1e-6)


def w8a8_linear_ref(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """y = (int32(xq @ qdata.T) * s_x[:, None] * scale[None, :]).to(x.dtype) + bias, xq and s_x per token."""
    _check_linear_args(x, qdata, scale, bias, act_scale)
    xq, s = quantize_per_token_int8_ref(x, act_scale)
    acc = (xq.double() @ qdata.double().t()).to(torch.int32)
    y = (acc.float() * s[:, None] * scale.float()[None, :]).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def w8a8_linear_triton(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
    config: Optional[dict] = None,
) -> torch.Tensor:
    """The twin's y by Triton: the fused small-M kernel or quantization + int8 GEMM, as ``config`` says."""
    _check_linear_args(x, qdata, scale, bias, act_scale)
    scale, bias, act_scale = unit_stride(scale, bias, act_scale)
    if config is None:
        config = w8a8_config(
            x, qdata, lambda c: w8a8_linear_triton(x, qdata, scale, bias, act_scale, c),
            lambda: w8a8_linear_ref(x, qdata, scale, bias, act_scale),
        )
    launch = dict(config)
    m, k = x.shape
    n = qdata.shape[0]
    if launch.get("path") == "gemv":
        if launch.pop("FUSED", False):
            return _w8a8_gemv(x, qdata, scale, bias, act_scale, launch)
        xq, s = quantize_per_token_int8_triton(x, act_scale)
        return int8_gemv_triton(xq, qdata, row_scale=s, col_scale=scale, bias=bias, out_dtype=x.dtype,
                                config=launch)
    fused = launch.pop("FUSED")
    if not fused or m == 0 or n == 0:
        xq, s = quantize_per_token_int8_triton(x, act_scale)
        return int8_matmul_triton(xq, qdata.t(), row_scale=s, col_scale=scale, bias=bias, out_dtype=x.dtype,
                                  config=None if fused else launch)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, launch["BLOCK_N"]), triton.cdiv(m, launch["BLOCK_M"]))
    _w8a8_fused_kernel[grid](
        x, act_scale if act_scale is not None else x, qdata, scale, bias if bias is not None else scale, y,
        m, n, k,
        x.stride(0), x.stride(1), qdata.stride(0), qdata.stride(1), y.stride(0), y.stride(1),
        HAS_ACT=act_scale is not None, HAS_BIAS=bias is not None, **launch,
    )
    return y


def _w8a8_gemv(x, qdata, scale, bias, act_scale, config: dict) -> torch.Tensor:
    """The int8 GEMV with the quantization inside (one kernel): y [M, N] in x.dtype."""
    m, k = x.shape
    n = qdata.shape[0]
    params = dict(config)
    params.pop("path")
    rows = params.setdefault("ROWS", 1)
    y, grid, split, ws, counters = gemv_launch(x, n, params, x_rows=rows, partials=torch.int32)
    if m == 0 or n == 0:
        return y
    words = int32_words(qdata)
    k_words = words.shape[1]
    _w8a8_gemv_kernel[grid](
        x, act_scale if act_scale is not None else x, words, scale, bias if bias is not None else y, y, ws, counters,
        m, n, k, k_words, split, x.stride(0), x.stride(1), words.stride(0), y.stride(0), y.stride(1),
        HAS_ACT=act_scale is not None, HAS_BIAS=bias is not None, EVEN_K=k_words % params["BLOCK_W"] == 0,
        SPLIT=split > 1, DP4A=params.pop("DP4A", True) and not interpreting(), **pdl_options(x.device, params),
        **params,
    )
    return y


def launch(x, qdata, scale, bias, act_scale, config: dict) -> torch.Tensor:
    """Run one configuration (no tuning): y [M, N] in x.dtype."""
    return w8a8_linear_triton(x, qdata, scale, bias, act_scale, config)


@torch.library.custom_op("aofunc::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    act_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """y = (int32(xq @ qdata.T) * s_x * scale).to(x.dtype) + bias with per-token int8 xq of x / act_scale."""
    return w8a8_linear_ref(x, qdata, scale, bias, act_scale)


@w8a8_linear.register_kernel("cuda")
def _w8a8_linear_cuda(x, qdata, scale, bias, act_scale):
    return w8a8_linear_triton(x, qdata, scale, bias, act_scale)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, qdata, scale, bias, act_scale):
    _check_linear_args(x, qdata, scale, bias, act_scale)
    return x.new_empty((x.shape[0], qdata.shape[0]))
