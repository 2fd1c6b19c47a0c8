"""int8 per-channel weights: weight-only (W8A16) and dynamic activations (W8A8)."""
from __future__ import annotations

import torch

from aofunc import primitives as P
from aofunc.formats.scheme import Scheme, register_scheme


class _Int8PerRow(Scheme):
    """w ≈ qdata * scale[n]: qdata int8 [N, K], scale [N] in the weight's dtype (symmetric, scale = amax / 127.5)."""

    float_names = ("scale", "act_scale")

    def quantize(self, w):
        q, scale = P.quantize_int8_per_row(w)
        return {"qdata": q, "scale": scale}

    def dequantize(self, tensors, n, k, dtype):
        return P.dequantize_int8_per_row(tensors["qdata"], tensors["scale"], dtype)

    def stored(self, n, k, dtype):
        return {"qdata": ((n, k), torch.int8), "scale": ((n,), dtype)}

    def rows(self, tensors, index, n, k, dtype):
        return (tensors["qdata"][index].float() * tensors["scale"][index].float()[..., None]).to(dtype)


@register_scheme
class Int8WeightOnly(_Int8PerRow):
    """int8 weights, float activations (W8A16): w ≈ qdata * scale[n], y = (x @ qdata.T) * scale + bias.

    Stores qdata int8 [N, K] and scale [N] in the weight's dtype: symmetric per output row, scale = amax / 127.5.
    """

    short_name = "int8wo"


@register_scheme
class Int8Dynamic(_Int8PerRow):
    """int8 weights and per-token int8 activations (W8A8): y = int32(xq @ qdata.T) * s_x * scale + bias.

    Stores qdata int8 [N, K] and scale [N] as Int8WeightOnly does (w ≈ qdata * scale[n]); each token x is quantized
    when the layer runs, s_x = max(amax|x|, 1e-5) / 127, xq = round(x / s_x).

    A SmoothQuant weight carries `act_scale` [K]: the layer computes with x / act_scale (the smoothing the
    preceding op could not absorb), and w ≈ qdata * scale[n] is the smoothed weight W * act_scale.
    """

    short_name = "int8dq"

    optional_names = ("act_scale",)

    def dequantize(self, tensors, n, k, dtype):
        w = P.dequantize_int8_per_row(tensors["qdata"], tensors["scale"], torch.float32)
        if "act_scale" in tensors:
            w = w / tensors["act_scale"].float()
        return w.to(dtype)

    def rows(self, tensors, index, n, k, dtype):
        return self.dequantize(tensors, n, k, dtype)[index]

    def stored(self, n, k, dtype):
        return {**super().stored(n, k, dtype), "act_scale": ((k,), dtype)}
