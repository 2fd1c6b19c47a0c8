"""The 4-bit layout the twins read: two codes a byte along the last dimension, the first in the high nibble."""
import torch


def unpack_uint4(qdata: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., 2B] from uint8 [..., B]."""
    return torch.stack((qdata >> 4, qdata & 15), dim=-1).reshape(*qdata.shape[:-1], -1)
