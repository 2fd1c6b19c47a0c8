"""int4 weight-only (W4A16), groups along K on one of three grids: the tinygemm convention (a float zero, the
default), integer zero points (GPTQ, compressed-tensors), or symmetric."""
from __future__ import annotations

import torch

from aofunc import primitives as P
from aofunc.formats.scheme import GroupQuantizer, Scheme, check_group_size, register_scheme

#: Int4WeightOnly's grids: "float" (tinygemm's), "int" (integer zero points 0..15), "none" (symmetric)
ZERO_POINTS = ("float", "int", "none")


def padded_k(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def unpermute_columns(w_stored: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The weight in the original column order from its act-order columns: w[:, perm] = w_stored."""
    return torch.empty_like(w_stored).index_copy_(-1, perm.to(device=w_stored.device, dtype=torch.long), w_stored)


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


class IntegerZeroGroups(GroupQuantizer):
    """Int4WeightOnly(zero_point="int") groups: scale = clamp(hi - lo, 1e-6)/15 (rounded to the weight's dtype) over
    the range [lo, hi] holding the group and 0, integer z = clamp(round(-lo/scale), 0, 15), code = clamp(round((w -
    base)/scale), 0, 15) with base = -z·scale, w ≈ (code - z)·scale."""

    lowest, highest = 0, 15

    def choose(self, g):
        scale, z = P.choose_qparams_int4_integer(g, self.dtype)
        return scale.float(), z.float()

    def base(self, scale, zero):
        return -zero * scale

    def stored(self, codes, scale, zero):
        return {"qdata": P.pack_uint4(codes.to(torch.uint8)), "scale": scale.to(self.dtype),
                "zero": zero.to(torch.uint8)}


class SymmetricGroups(GroupQuantizer):
    """Symmetric groups (Int8DynamicInt4, Int4WeightOnly(zero_point="none")): scale = max(amax/7.5, eps) (rounded to
    the weight's dtype), q = clamp(round(w/scale), -8, 7), w ≈ q·scale; stored as q + 8."""

    lowest, highest = -8, 7

    def choose(self, g):
        scale = P.choose_scale_symmetric_per_row(g, -8, 7).to(self.dtype).float()
        return scale, torch.zeros_like(scale)

    def base(self, scale, zero):
        return zero

    def stored(self, codes, scale, zero):
        return {"qdata": P.pack_uint4((codes + 8).to(torch.uint8)), "scale": scale.to(self.dtype)}


@register_scheme
class Int4WeightOnly(Scheme):
    """4-bit codes q in groups of `group_size` along K on the grid `zero_point` names:

    - "float" (default, tinygemm's): w ≈ (q - 8) * scale + zero, zero a float [N, Kp/g] in the weight's dtype;
    - "int" (GPTQ, compressed-tensors): w ≈ (q - zero) * scale, zero an integer zero point, uint8 [N, Kp/g] in 0..15;
    - "none" (symmetric): w ≈ (q - 8) * scale, scale = amax / 7.5; no zero is stored.

    qdata uint8 [N, Kp/2] (codes 0..15, first in the high nibble), scale [N, Kp/g] in the weight's dtype,
    Kp = K zero-padded to a multiple of the group.

    Act-order: a weight may carry `perm`, int32 [K], the input columns' order. The codes and groups then run along
    the permuted columns (w_stored = w[:, perm], what the grids above describe) and the layer computes
    y = x[..., perm] @ w_stored.T; `dequantize` returns the weight in the original column order (w[:, perm] =
    w_stored). GPTQ checkpoints quantized with act-order (`desc_act`) import so (`aofunc.load_pretrained`).
    """

    short_name = "int4"
    optional_names = ("perm",)

    group_size: int = 128
    zero_point: str = "float"

    def __post_init__(self):
        check_group_size(self, self.group_size)
        if not isinstance(self.zero_point, str) or self.zero_point not in ZERO_POINTS:
            raise ValueError(f"Int4WeightOnly: zero_point must be one of {', '.join(map(repr, ZERO_POINTS))}, "
                             f"got {self.zero_point!r}")

    def __repr__(self):
        # the default grid reads as it always has (files, messages and docs name it so)
        extra = "" if self.zero_point == "float" else f", zero_point={self.zero_point!r}"
        return f"Int4WeightOnly(group_size={self.group_size}{extra})"

    @property
    def float_names(self):
        return ("scale", "zero") if self.zero_point == "float" else ("scale",)

    def to_dict(self):
        d = super().to_dict()
        if self.zero_point == "float":
            del d["zero_point"]  # the default grid is named as before file version 3
        return d

    def quantize(self, w):
        if self.zero_point == "int":
            q, scale, zero = P.quantize_int4_integer(w, self.group_size)
            return {"qdata": P.pack_uint4(q), "scale": scale, "zero": zero}
        if self.zero_point == "none":
            q, scale = P.quantize_int4_symmetric(w, self.group_size)
            return {"qdata": P.pack_uint4((q + 8).to(torch.uint8)), "scale": scale}
        q, scale, zero = P.quantize_int4_asymmetric(w, self.group_size)
        return {"qdata": P.pack_uint4(q), "scale": scale, "zero": zero}

    def dequantize(self, tensors, n, k, dtype):
        w = self.dequantize_stored(tensors, k, dtype)
        perm = tensors.get("perm")
        return w if perm is None else unpermute_columns(w, perm)

    def dequantize_stored(self, tensors, k, dtype):
        """The weight in the stored column order: w_stored = w[:, perm] for an act-order weight, else w."""
        q = P.unpack_uint4(tensors["qdata"])
        if self.zero_point == "int":
            return P.dequantize_int4_integer(q, tensors["scale"], tensors["zero"], k, dtype)
        if self.zero_point == "none":
            return P.dequantize_int4_symmetric(q.to(torch.int8) - 8, tensors["scale"], k, dtype)
        return P.dequantize_int4_asymmetric(q, tensors["scale"], tensors["zero"], k, dtype)

    def kernel_zero(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float zero [N, Kp/g] of the tinygemm grid that torch's CPU int4 kernel takes, w = (q - 8) * scale + zero:
        the stored zero for "float"; (8 - z) * scale in float32 for "int" and 0 for "none". For scales in bf16 or
        fp16 both products are exact in float32, so (q - 8) * scale + zero is exactly (q - z) * scale."""
        if self.zero_point == "float":
            return tensors["zero"]
        scale = tensors["scale"]
        if self.zero_point == "none":
            return torch.zeros(scale.shape, dtype=torch.float32, device=scale.device)
        return (8 - tensors["zero"].float()) * scale.float()

    def rows(self, tensors, index, n, k, dtype):
        perm = tensors.get("perm")
        if perm is None:
            return self.gathered_rows(tensors, index, k, dtype)
        picked = {name: t[index.reshape(-1)] for name, t in tensors.items() if name != "perm"}
        w = unpermute_columns(self.dequantize_stored(picked, k, dtype), perm)
        return w.reshape(*index.shape, k)

    def group_quantizer(self, dtype):
        grids = {"float": AsymmetricGroups, "int": IntegerZeroGroups, "none": SymmetricGroups}
        return grids[self.zero_point](dtype)

    def stored(self, n, k, dtype):
        kp = padded_k(k, self.group_size)
        groups = kp // self.group_size
        layout = {"qdata": ((n, kp // 2), torch.uint8), "scale": ((n, groups), dtype)}
        if self.zero_point == "float":
            layout["zero"] = ((n, groups), dtype)
        elif self.zero_point == "int":
            layout["zero"] = ((n, groups), torch.uint8)
        layout["perm"] = ((k,), torch.int32)  # optional: act-order's input column order
        return layout
