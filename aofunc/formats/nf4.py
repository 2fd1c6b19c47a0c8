"""NF4 (QLoRA): 4-bit NormalFloat codes in blocks along the flattened weight, double-quantized block scales."""
from __future__ import annotations

import torch

from aofunc import primitives as P
from aofunc.formats.scheme import Scheme, register_scheme

#: the most weights one scaler block (block_size * scaler_block_size) may hold: weights are padded to whole ones
MAX_SCALER_BLOCK = 1 << 24


@register_scheme
class NF4(Scheme):
    """w ≈ LEVELS[code] * (scaler_q / scaler_factor + scaler_mean), one scaler per block of `block_size`.

    LEVELS are the 16 NormalFloat4 values (`aofunc.kernels.packing.NF4_LEVELS`); a code is the nearest level to w / absmax
    of its block.

    The row-major [N, K] weight is flattened and zero-padded to whole scaler blocks (block_size * scaler_block_size
    elements): qdata uint8 [P/2] (first code in the high nibble), scaler_q int8 [P/block_size], scaler_factor fp32
    [P/(block_size * scaler_block_size)], scaler_mean fp32 scalar. A scaler block holds at most 2**24 weights.
    """

    short_name = "nf4"

    block_size: int = 64
    scaler_block_size: int = 256

    def __post_init__(self):
        for name in ("block_size", "scaler_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NF4: {name} must be a positive int, got {value!r}")
        if self.block_size * self.scaler_block_size % 2:
            raise ValueError("NF4: block_size * scaler_block_size must be even (two codes a byte)")
        if self.block_size * self.scaler_block_size > MAX_SCALER_BLOCK:
            raise ValueError(f"NF4: block_size * scaler_block_size = {self.block_size * self.scaler_block_size} "
                             f"weights a scaler block, more than the {MAX_SCALER_BLOCK} (2**24) allowed: every "
                             "weight is padded to whole scaler blocks, so one block would take that much memory; "
                             "QLoRA uses block_size=64, scaler_block_size=256")

    def quantize(self, w):
        qdata, scaler_q, factor, mean = P.quantize_nf4(w, self.block_size, self.scaler_block_size)
        return {"qdata": qdata, "scaler_q": scaler_q, "scaler_factor": factor, "scaler_mean": mean}

    def dequantize(self, tensors, n, k, dtype):
        return P.dequantize_nf4(tensors["qdata"], tensors["scaler_q"], tensors["scaler_factor"],
                                tensors["scaler_mean"], (n, k), dtype, self.block_size, self.scaler_block_size)

    def stored(self, n, k, dtype):
        padded = P.blocks_padded_numel(n * k, self.block_size, self.scaler_block_size)
        return {
            "qdata": ((padded // 2,), torch.uint8),
            "scaler_q": ((padded // self.block_size,), torch.int8),
            "scaler_factor": ((padded // (self.block_size * self.scaler_block_size),), torch.float32),
            "scaler_mean": ((), torch.float32),
        }
