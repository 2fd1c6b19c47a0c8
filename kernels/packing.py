"""Facts of the stored layouts that every layer reads from here: the 4-bit packing, the int4 group sizes, the
16 NF4 levels, and where stored tensors start in memory.

Packing: two 4-bit codes a byte along the last dimension, the first in the high nibble.
"""
import torch

#: group sizes (along K) of the int4 formats: the kernels read whole groups of 8-code words
GROUP_SIZES = (32, 64, 128, 256)

#: NormalFloat4's levels (QLoRA): code c stands for NF4_LEVELS[c] times its block's scale
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044006, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_levels(device=None) -> torch.Tensor:
    """The 16 NF4 levels as a new fp32 tensor on ``device``."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes 0..15 a byte along the last dimension, the first in the high nibble: [..., 2k] -> [..., k] uint8."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_uint4: the last dimension must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_uint4(qdata: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., 2B] from uint8 [..., B]."""
    return torch.stack((qdata >> 4, qdata & 15), dim=-1).reshape(*qdata.shape[:-1], -1)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it where its data does not start on a 64-byte boundary (a fresh allocation does):
    torch's packed CPU kernels crash on codes off that boundary, as tensors memory-mapped from a file or sliced
    from a larger one may be."""
    return t if t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)
