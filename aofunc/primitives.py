"""The quantization math: choose quantization parameters, quantize, dequantize, pack 4-bit codes.

Pure functions on plain tensors. Statistics and quotients are computed in float32; scales and zeros are
rounded to the weight's dtype before the integer codes are computed from them, so dequantizing the stored
values gives exactly what a kernel sees.

Finite weights always dequantize to finite values. Rows, groups and blocks whose values come near the largest
number of the weight's dtype (where float32 intermediates or the grid's ends could overflow) take a careful path:
their scales and zeros are computed in float64 and kept inside the dtype's range, and a code whose value would
not be finite in the dtype moves one step toward the middle of the grid. Every other weight is quantized by the
formulas above, bit for bit.
"""
from __future__ import annotations

import torch

# the stored layouts' facts have one home, beside the kernels that read them: the 16 NF4 levels and the 4-bit unpack
from aofunc.kernels.packing import NF4_LEVELS, nf4_levels, pack_uint4, unpack_uint4  # noqa: F401  (re-exported)

EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------- range limits

def near_range_limit(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """True where a magnitude exceeds a quarter of the largest finite value of `dtype`: there, float32
    intermediates of the formulas (max - min, 8 * scale) or the ends of a quantization grid may overflow."""
    return amax.float() > torch.finfo(dtype).max / 4


def finite_codes(q: torch.Tensor, values, dtype: torch.dtype, lowest: int, highest: int) -> torch.Tensor:
    """Codes q (a float tensor) moved one step at a time toward the middle of [lowest, highest] wherever
    `values(q)`, the dequantized value computed as `dequantize` computes it, is not finite in `dtype`."""
    for _ in range(highest - lowest):
        v = values(q).to(dtype)
        bad = ~torch.isfinite(v)
        if not bool(bad.any()):
            break
        q = torch.where(bad, (q - torch.where(v > 0, 1.0, -1.0)).clamp(lowest, highest), q)
    return q


# ---------------------------------------------------------------------------------------------- int8 per channel

def choose_scale_symmetric_per_row(w: torch.Tensor, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """scale[n] = max(max(|min(w[n],0)|, max(w[n],0)) / ((qmax - qmin) / 2), eps), stored in w's dtype."""
    w32 = w.float()
    amax = torch.maximum(-w32.amin(dim=-1).clamp(max=0), w32.amax(dim=-1).clamp(min=0))
    return (amax / ((qmax - qmin) / 2)).clamp(min=EPS32).to(w.dtype)


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """q = clamp(round(w / scale), qmin, qmax) as int8, with scale broadcast along the last dimension.

    Where w's magnitude nears the largest value of its dtype (`near_range_limit`), a code whose value q * scale
    would overflow the dtype (qmin * scale is a little beyond the largest |w|) takes the next code inward."""
    q = torch.round(w.float() / scale.float()).clamp_(qmin, qmax)
    near = near_range_limit(w.abs().amax(dim=-1), w.dtype)
    if bool(near.any()):
        s = scale.float().expand(*w.shape[:-1], 1)[near]
        q[near] = finite_codes(q[near], lambda codes: codes * s, w.dtype, qmin, qmax)
    return q.to(torch.int8)


def quantize_int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: returns (q int8 [N, K], scale [N])."""
    scale = choose_scale_symmetric_per_row(w)
    return quantize_symmetric(w, scale[:, None], -128, 127), scale


def dequantize_int8_per_row(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w = q * scale[n], the product exact in float32 and rounded once to dtype.

    With a 16-bit scale already in dtype the product is taken in dtype: torch multiplies 16-bit floats in float32
    and rounds once, and q (int8) is exact there, so the values are the same with no float32 copy of the weight
    (4096 x 4096 in bf16 on two CPU cores: 34 ms against 70 ms)."""
    if dtype in (torch.bfloat16, torch.float16) and scale.dtype == dtype:
        return q.to(dtype) * scale[:, None]
    return (q.float() * scale.float()[:, None]).to(dtype)


# ---------------------------------------------------------------------------------------------- groups along K

def pad_to_multiple(w: torch.Tensor, multiple: int) -> torch.Tensor:
    """w with its last dimension zero-padded to a multiple of `multiple` (w itself when it already is one)."""
    k = w.shape[-1]
    padded = -(-k // multiple) * multiple
    return w if padded == k else torch.nn.functional.pad(w, (0, padded - k))


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, K/g, g] after zero-padding K to a multiple of g."""
    w = pad_to_multiple(w, group_size)
    return w.reshape(w.shape[0], -1, group_size)


def choose_qparams_int4_asymmetric(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of g [..., group]: scale = clamp(max - min, 1e-6) / 15, zero = min + 8 * scale, stored in dtype.

    Rows near the dtype's largest value M (`near_range_limit`) are computed in float64 and kept in range:
    scale = min(clamp(max - min, 1e-6) / 15, M / 8), and zero centres the grid [zero - 8 scale, zero + 7 scale]
    on [min, max] inside [-M, M], so that every grid value, and (q - 8) * scale on its own, is finite in the
    dtype. Every value stays within half a step of the grid, up to the rounding of zero to the dtype."""
    g = g.float()
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    near = near_range_limit(torch.maximum(lo.abs(), hi.abs()), dtype)
    if bool(near.any()):
        top = torch.finfo(dtype).max
        lo64, hi64 = lo[near].double(), hi[near].double()
        s = ((hi64 - lo64).clamp(min=1e-6) / 15).clamp(max=top / 8).to(dtype)
        s64 = s.double()
        z = ((lo64 + hi64 + s64) / 2).clamp(min=-top + 8 * s64, max=top - 7 * s64).to(dtype)
        # rounding zero to the dtype may carry a grid end past the largest value: one unit back
        z = torch.where(z.double() + 7 * s64 > top, torch.nextafter(z, torch.full_like(z, -torch.inf)), z)
        z = torch.where(z.double() - 8 * s64 < -top, torch.nextafter(z, torch.full_like(z, torch.inf)), z)
        scale[near], zero[near] = s, z
    return scale, zero


def int4_asymmetric_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - 8) * scale + zero in float32, scale and zero broadcast over the codes of each group."""
    return (q.float() - 8) * scale.float() + zero.float()


def quantize_int4_asymmetric(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric groupwise int4, the tinygemm convention: w ≈ (q - 8) * scale + zero.

    Per group: scale = clamp(max - min, 1e-6) / 15, zero = min + 8 * scale (both stored in w's dtype),
    q = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15) from the stored scale and zero.
    Returns codes uint8 [N, Kp], scale and zero [N, Kp/g], where Kp is K padded to a multiple of g.
    Groups near the dtype's largest value take the careful path of `choose_qparams_int4_asymmetric`, with their
    codes computed in float64 and kept finite.
    """
    g = grouped(w.float(), group_size)
    scale, zero = choose_qparams_int4_asymmetric(g, w.dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((g - (z - 8 * s)) / s).clamp_(0, 15)
    near = near_range_limit(g.abs().amax(dim=-1), w.dtype)
    if bool(near.any()):
        s_near, z_near = scale[near][:, None], zero[near][:, None]
        s64, z64 = s_near.double(), z_near.double()
        codes = torch.round((g[near].double() - (z64 - 8 * s64)) / s64).clamp_(0, 15).float()
        q[near] = finite_codes(codes, lambda c: int4_asymmetric_values(c, s_near, z_near), w.dtype, 0, 15)
    return q.to(torch.uint8).reshape(w.shape[0], -1), scale, zero


def dequantize_int4_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int,
                               dtype: torch.dtype) -> torch.Tensor:
    """w = (q - 8) * scale + zero, groups along K, cut back to the logical K."""
    n, groups = scale.shape
    w = int4_asymmetric_values(q.reshape(n, groups, -1), scale[..., None], zero[..., None])
    return w.reshape(n, -1)[:, :k].to(dtype)


def choose_qparams_int4_integer(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of g [..., group], GPTQ's asymmetric grid with an integer zero point (as compressed-tensors stores it):
    lo = min(min(g), 0), hi = max(max(g), 0), scale = clamp(hi - lo, 1e-6) / 15 stored in dtype, and
    z = clamp(round(-lo / scale), 0, 15) from the stored scale, as uint8. Computed in float64 (the range always
    holds 0, so code z stands for 0 exactly, and hi - lo cannot overflow)."""
    g64 = g.double()
    lo, hi = g64.amin(dim=-1).clamp(max=0), g64.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(dtype)
    z = torch.round(-lo / scale.double()).clamp_(0, 15)
    return scale, z.to(torch.uint8)


def int4_integer_values(q: torch.Tensor, scale: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(q - z) * scale in float32, scale and z broadcast over the codes of each group."""
    return (q.float() - z.float()) * scale.float()


def quantize_int4_integer(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric groupwise int4 with integer zero points (GPTQ, compressed-tensors): w ≈ (q - z) * scale.

    Per group: scale and z from `choose_qparams_int4_integer`, then q = clamp(round((w - base) / scale), 0, 15) in
    float32 with base = -z * scale, the value of code 0 (in exact arithmetic round(w / scale) + z, GPTQ's rule).
    Returns codes uint8 [N, Kp], scale [N, Kp/g] in w's dtype and z uint8 [N, Kp/g]. Groups near the dtype's
    largest value take their codes in float64, a code whose value would not be finite in the dtype moving one
    step inward: their error stays within one step (an integer zero point cannot centre the grid on the range).
    """
    g = grouped(w.float(), group_size)
    scale, z = choose_qparams_int4_integer(g, w.dtype)
    s, zf = scale.float()[..., None], z.float()[..., None]
    q = torch.round((g - (-zf * s)) / s).clamp_(0, 15)
    near = near_range_limit(g.abs().amax(dim=-1), w.dtype)
    if bool(near.any()):
        s_near, z_near = scale[near][:, None], z[near][:, None]
        s64 = s_near.double()
        codes = torch.round(g[near].double() / s64 + z_near.double()).clamp_(0, 15).float()
        q[near] = finite_codes(codes, lambda c: int4_integer_values(c, s_near, z_near), w.dtype, 0, 15)
    return q.to(torch.uint8).reshape(w.shape[0], -1), scale, z


def dequantize_int4_integer(q: torch.Tensor, scale: torch.Tensor, z: torch.Tensor, k: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """w = (q - z) * scale, groups along K, cut back to the logical K."""
    n, groups = scale.shape
    w = int4_integer_values(q.reshape(n, groups, -1), scale[..., None], z[..., None])
    return w.reshape(n, -1)[:, :k].to(dtype)


def quantize_int4_symmetric(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric groupwise int4 (8da4w weights): scale = max(amax / 7.5, eps), q = clamp(round(w / scale), -8, 7).

    Returns q int8 [N, Kp] and scale [N, Kp/g] in w's dtype.
    """
    g = grouped(w, group_size)
    scale = choose_scale_symmetric_per_row(g, -8, 7)
    q = quantize_symmetric(g, scale[..., None], -8, 7)
    return q.reshape(w.shape[0], -1), scale


def dequantize_int4_symmetric(q: torch.Tensor, scale: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """w = q * scale, groups along K, cut back to the logical K."""
    n, groups = scale.shape
    w = q.float().reshape(n, groups, -1) * scale.float()[..., None]
    return w.reshape(n, -1)[:, :k].to(dtype)


# ---------------------------------------------------------------------------------------------- NF4

def encode_nf4(x: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Index of the nearest NF4 level to each element of x (fp32 in [-1, 1]); ties go to the lower level.

    Equal to a first-minimum argmin of |x - level| over the 16 levels, without a numel x 16 temporary:
    a bucketize against the midpoints proposes a level, and its two neighbours settle float ties.
    """
    levels = nf4_levels(x.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    flat = x.reshape(-1).float()
    out = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    for start in range(0, flat.numel(), chunk):
        v = flat[start:start + chunk]
        guess = torch.bucketize(v, midpoints)
        candidates = (guess[:, None] + torch.arange(-1, 2, device=x.device)).clamp_(0, 15)
        distance = (v[:, None] - levels[candidates]).abs()
        out[start:start + chunk] = candidates.gather(1, distance.argmin(dim=1, keepdim=True))[:, 0]
    return out.reshape(x.shape)


def blocks_padded_numel(numel: int, block_size: int, scaler_block_size: int) -> int:
    """numel rounded up to a whole number of scaler blocks (block_size * scaler_block_size elements)."""
    whole = block_size * scaler_block_size
    return max(1, -(-numel // whole)) * whole


def quantize_nf4(w: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256):
    """NF4 with double-quantized block scales (QLoRA).

    w is flattened row-major and zero-padded to whole blocks; per block s1 = absmax, code = nearest NF4 level to
    w / s1. Scalers: mu = mean(s1) over the real blocks, per scaler block f = 256 / (2 * absmax(s1 - mu)),
    scaler_q = int8(clamp(round((s1 - mu) * f), -128, 127)). Codes are zero-padded to whole scaler blocks.
    Returns (packed codes uint8 [P/2], scaler_q int8 [P/block_size], scaler_factor fp32, scaler_mean fp32 0-d).
    """
    numel = w.numel()
    n_blocks = -(-numel // block_size)
    padded = blocks_padded_numel(numel, block_size, scaler_block_size)
    n_all_blocks = padded // block_size
    flat = torch.nn.functional.pad(w.reshape(-1).float(), (0, n_blocks * block_size - numel))
    blocks = flat.reshape(n_blocks, block_size)
    s1 = blocks.abs().amax(dim=1)
    codes = encode_nf4(blocks / torch.where(s1 > 0, s1, 1)[:, None])
    codes = torch.nn.functional.pad(codes.reshape(-1), (0, padded - n_blocks * block_size))

    mean = s1.mean()
    # a sum of block maxima near float32's largest value overflows; their mean does not
    mean = torch.where(torch.isfinite(mean), mean, s1.double().mean().float())
    centred = torch.nn.functional.pad(s1 - mean, (0, n_all_blocks - n_blocks)).reshape(-1, scaler_block_size)
    absmax = centred.abs().amax(dim=1)
    factor = 128 / torch.where(absmax > 0, absmax, 1)  # = 256 / (2 absmax), without overflowing 2 absmax
    scaler_q = torch.round(centred * factor[:, None]).clamp_(-128, 127)
    if bool(near_range_limit(s1.amax(), w.dtype)):
        # a block scale rounded up past the dtype's largest value takes the next scaler code down
        top = torch.finfo(w.dtype).max
        for _ in range(256):
            too_big = ~torch.isfinite(nf4_block_scales(scaler_q, factor, mean).to(w.dtype)) \
                | (nf4_block_scales(scaler_q, factor, mean) > top)
            if not bool(too_big.any()):
                break
            scaler_q = torch.where(too_big, (scaler_q - 1).clamp(min=-128), scaler_q)
    return pack_uint4(codes), scaler_q.to(torch.int8).reshape(-1), factor, mean


def nf4_block_scales(scaler_q: torch.Tensor, scaler_factor: torch.Tensor, scaler_mean: torch.Tensor) -> torch.Tensor:
    """s = scaler_q / f + mu (float32 [scaler blocks, scaler_block_size]): each block's dequantized absmax."""
    return scaler_q.float() / scaler_factor.float()[:, None] + scaler_mean.float()


def dequantize_nf4(packed: torch.Tensor, scaler_q: torch.Tensor, scaler_factor: torch.Tensor,
                   scaler_mean: torch.Tensor, shape, dtype: torch.dtype, block_size: int = 64,
                   scaler_block_size: int = 256) -> torch.Tensor:
    """s = scaler_q / f + mu per block, w = LUT[code] * s (fp32, then cast), cut to the logical shape."""
    numel = 1
    for d in shape:
        numel *= d
    s = nf4_block_scales(scaler_q.reshape(-1, scaler_block_size), scaler_factor, scaler_mean)
    # one lookup per byte gives both of its levels (first code in the high nibble): half the lookups of one a code,
    # and no unpacked codes in memory (2.3x faster on a CPU)
    levels = nf4_levels(packed.device)
    pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=-1)  # [256, 2]
    w = pairs.index_select(0, packed.reshape(-1).int()).reshape(-1, block_size).mul_(s.reshape(-1, 1))
    return w.reshape(-1)[:numel].reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------- error

def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal to quantization noise ratio in dB: 20 log10(‖x‖ / ‖x - y‖) (inf when y == x)."""
    if x.shape != y.shape:
        raise ValueError(f"sqnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    x64, y64 = x.detach().double(), y.detach().double()
    noise = torch.linalg.vector_norm(x64 - y64)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(x64) / noise))
