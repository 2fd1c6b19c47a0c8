"""The quantization math: choose quantization parameters, quantize, dequantize, pack 4-bit codes.

Pure functions on plain tensors. Statistics and quotients are computed in float32; scales and zeros are
rounded to the weight's dtype before the integer codes are computed from them, so dequantizing the stored
values gives exactly what a kernel sees.
"""
from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044006, 0.5626170039176941, 0.7229568362236023, 1.0,
)


# ---------------------------------------------------------------------------------------------- int8 per channel

def choose_scale_symmetric_per_row(w: torch.Tensor, qmin: int = -128, qmax: int = 127) -> torch.Tensor:
    """scale[n] = max(max(|min(w[n],0)|, max(w[n],0)) / ((qmax - qmin) / 2), eps), stored in w's dtype."""
    w32 = w.float()
    amax = torch.maximum(-w32.amin(dim=-1).clamp(max=0), w32.amax(dim=-1).clamp(min=0))
    return (amax / ((qmax - qmin) / 2)).clamp(min=EPS32).to(w.dtype)


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """q = clamp(round(w / scale), qmin, qmax) as int8, with scale broadcast along the last dimension."""
    q = torch.round(w.float() / scale.float())
    return q.clamp_(qmin, qmax).to(torch.int8)


def quantize_int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: returns (q int8 [N, K], scale [N])."""
    scale = choose_scale_symmetric_per_row(w)
    return quantize_symmetric(w, scale[:, None], -128, 127), scale


def dequantize_int8_per_row(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w = q * scale[n]."""
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
    """Per row of g [..., group]: scale = clamp(max - min, 1e-6) / 15, zero = min + 8 * scale, stored in dtype."""
    g = g.float()
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(dtype)
    return scale, (lo + 8 * scale.float()).to(dtype)


def quantize_int4_asymmetric(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric groupwise int4, the tinygemm convention: w ≈ (q - 8) * scale + zero.

    Per group: scale = clamp(max - min, 1e-6) / 15, zero = min + 8 * scale (both stored in w's dtype),
    q = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15) from the stored scale and zero.
    Returns codes uint8 [N, Kp], scale and zero [N, Kp/g], where Kp is K padded to a multiple of g.
    """
    g = grouped(w.float(), group_size)
    scale, zero = choose_qparams_int4_asymmetric(g, w.dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((g - (z - 8 * s)) / s).clamp_(0, 15).to(torch.uint8)
    return q.reshape(w.shape[0], -1), scale, zero


def dequantize_int4_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int,
                               dtype: torch.dtype) -> torch.Tensor:
    """w = (q - 8) * scale + zero, groups along K, cut back to the logical K."""
    n, groups = scale.shape
    g = q.float().reshape(n, groups, -1)
    w = (g - 8) * scale.float()[..., None] + zero.float()[..., None]
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


# ---------------------------------------------------------------------------------------------- activations

def quantize_per_token_symmetric_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x: s = clamp(amax|x|, 1e-5) / 127, xq = clamp(round(x / s), -127, 127). Returns (xq int8, s fp32)."""
    x32 = x.float()
    s = x32.abs().amax(dim=-1).clamp(min=1e-5) / 127
    return torch.round(x32 / s[..., None]).clamp_(-127, 127).to(torch.int8), s


def quantize_per_token_asymmetric_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of x: s = max((max(x,0) - min(x,0)) / 255, eps), zp = clamp(round(-128 - min(x,0) / s), -128, 127),
    xq = clamp(round(x / s) + zp, -128, 127). Returns (xq int8, s fp32, zp int32)."""
    x32 = x.float()
    lo, hi = x32.amin(dim=-1).clamp(max=0), x32.amax(dim=-1).clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=EPS32)
    zp = torch.round(-128 - lo / s).clamp_(-128, 127)
    xq = (torch.round(x32 / s[..., None]) + zp[..., None]).clamp_(-128, 127)
    return xq.to(torch.int8), s, zp.to(torch.int32)


def choose_qparams_per_tensor_affine(x: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s = max((max(x,0) - min(x,0)) / (qmax - qmin), eps), zp = clamp(qmin - round(min(x,0) / s), qmin, qmax)."""
    x32 = x.float()
    lo, hi = x32.min().clamp(max=0), x32.max().clamp(min=0)
    s = ((hi - lo) / (qmax - qmin)).clamp(min=EPS32)
    zp = (qmin - torch.round(lo / s)).clamp(qmin, qmax).to(torch.int32)
    return s, zp


def choose_scale_per_tensor_symmetric(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """s = max(amax|x| / ((qmax - qmin) / 2), eps)."""
    return (x.float().abs().max() / ((qmax - qmin) / 2)).clamp(min=EPS32)


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero_point, qmin, qmax)."""
    q = torch.round(x.float() / scale.float()) + zero_point
    return q.clamp_(qmin, qmax).to(dtype)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x = (q - zero_point) * scale."""
    return ((q.float() - zero_point.float()) * scale.float()).to(dtype)


# ---------------------------------------------------------------------------------------------- 4-bit packing

def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes 0..15 a byte along the last dimension, the first in the high nibble: [..., 2k] -> [..., k] uint8."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_uint4: the last dimension must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_uint4: [..., k] uint8 -> [..., 2k] codes uint8."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(*packed.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------- NF4

def nf4_levels(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


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
    centred = torch.nn.functional.pad(s1 - mean, (0, n_all_blocks - n_blocks)).reshape(-1, scaler_block_size)
    absmax = centred.abs().amax(dim=1)
    factor = 256 / (2 * torch.where(absmax > 0, absmax, 1))
    scaler_q = torch.round(centred * factor[:, None]).clamp_(-128, 127).to(torch.int8).reshape(-1)
    return pack_uint4(codes), scaler_q, factor, mean


def dequantize_nf4(packed: torch.Tensor, scaler_q: torch.Tensor, scaler_factor: torch.Tensor,
                   scaler_mean: torch.Tensor, shape, dtype: torch.dtype, block_size: int = 64,
                   scaler_block_size: int = 256) -> torch.Tensor:
    """s = scaler_q / f + mu per block, w = LUT[code] * s (fp32, then cast), cut to the logical shape."""
    numel = 1
    for d in shape:
        numel *= d
    s = scaler_q.float().reshape(-1, scaler_block_size) / scaler_factor.float()[:, None] + scaler_mean.float()
    codes = unpack_uint4(packed).reshape(-1, block_size).long()
    w = nf4_levels(packed.device)[codes] * s.reshape(-1, 1)
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
