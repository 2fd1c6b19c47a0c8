"""8da4w: int8 dynamic per-token asymmetric activations with symmetric groupwise int4 weights."""
from __future__ import annotations

import torch

from aofunc import primitives as P
from aofunc.formats.int4 import SymmetricGroups, padded_k
from aofunc.formats.scheme import Scheme, check_group_size, register_scheme


@register_scheme
class Int8DynamicInt4(Scheme):
    """w ≈ (qdata_code - 8) * scale per group of `group_size` along K, with q = code - 8 in -8..7.

    qdata uint8 [N, Kp/2] holds q + 8 (first in the high nibble); scale [N, Kp/g] in the weight's dtype.
    Activations are quantized per token to asymmetric int8 when the layer runs.
    """

    short_name = "8da4w"

    group_size: int = 32
    float_names = ("scale",)

    def __post_init__(self):
        check_group_size(self, self.group_size)

    def quantize(self, w):
        q, scale = P.quantize_int4_symmetric(w, self.group_size)
        return {"qdata": P.pack_uint4((q + 8).to(torch.uint8)), "scale": scale}

    def dequantize(self, tensors, n, k, dtype):
        q = P.unpack_uint4(tensors["qdata"]).to(torch.int8) - 8
        return P.dequantize_int4_symmetric(q, tensors["scale"], k, dtype)

    def rows(self, tensors, index, n, k, dtype):
        return self.gathered_rows(tensors, index, k, dtype)

    def group_quantizer(self, dtype):
        return SymmetricGroups(dtype)

    def stored(self, n, k, dtype):
        kp = padded_k(k, self.group_size)
        return {"qdata": ((n, kp // 2), torch.uint8), "scale": ((n, kp // self.group_size), dtype)}
