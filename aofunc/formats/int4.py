"""int4 weight-only (W4A16), asymmetric groups along K in the tinygemm convention."""
from __future__ import annotations

import torch

from aofunc import primitives as P
from aofunc.formats.scheme import GroupQuantizer, Scheme, check_group_size, register_scheme


def padded_k(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


class AsymmetricGroups(GroupQuantizer):
    """Int4WeightOnly groups: scale = clamp(max - min, 1e-6)/15, zero = min + 8·scale (both rounded to the weight's
    dtype), code = clamp(round((w - base)/scale), 0, 15) with base = zero - 8·scale, w ≈ code·scale + base."""

    lowest, highest = 0, 15

    def choose(self, g):
        scale, zero = P.choose_qparams_int4_asymmetric(g, self.dtype)
        return scale.float(), zero.float()

    def base(self, scale, zero):
        return zero - 8 * scale

    def stored(self, codes, scale, zero):
        return {"qdata": P.pack_uint4(codes.to(torch.uint8)), "scale": scale.to(self.dtype),
                "zero": zero.to(self.dtype)}


@register_scheme
class Int4WeightOnly(Scheme):
    """w ≈ (q - 8) * scale + zero per group of `group_size` along K.

    qdata uint8 [N, Kp/2] (codes 0..15, first in the high nibble), scale and zero [N, Kp/g] in the weight's dtype,
    Kp = K zero-padded to a multiple of the group.
    """

    short_name = "int4"

    group_size: int = 128
    float_names = ("scale", "zero")

    def __post_init__(self):
        check_group_size(self, self.group_size)

    def quantize(self, w):
        q, scale, zero = P.quantize_int4_asymmetric(w, self.group_size)
        return {"qdata": P.pack_uint4(q), "scale": scale, "zero": zero}

    def dequantize(self, tensors, n, k, dtype):
        q = P.unpack_uint4(tensors["qdata"])
        return P.dequantize_int4_asymmetric(q, tensors["scale"], tensors["zero"], k, dtype)

    def rows(self, tensors, index, n, k, dtype):
        return self.gathered_rows(tensors, index, k, dtype)

    def group_quantizer(self, dtype):
        return AsymmetricGroups(dtype)

    def stored(self, n, k, dtype):
        kp = padded_k(k, self.group_size)
        groups = kp // self.group_size
        return {"qdata": ((n, kp // 2), torch.uint8), "scale": ((n, groups), dtype), "zero": ((n, groups), dtype)}
