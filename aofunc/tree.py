"""Parameter trees: the optree namespace that opens QTensors, and helpers over {name: tensor} dicts."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import optree
import torch

from aofunc.formats import QTensor

NAMESPACE = "aofunc"


def leaves(tree: Any) -> list[torch.Tensor]:
    """Every plain tensor of a (quantized) params tree, the stored tensors of each QTensor included."""
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def map_leaves(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """fn over every plain tensor (stored tensors included): for device moves and files, not dtype casts."""
    return optree.tree_map(fn, tree, namespace=NAMESPACE)


def size_in_bytes(tree: Any) -> int:
    """Bytes held by the tensors of a (quantized) params tree; a tensor shared by two names counts once."""
    seen, total = set(), 0
    for t in leaves(tree):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def check_params(params: Any, what: str = "params") -> Mapping[str, torch.Tensor]:
    """params must be a mapping {name: tensor}, as `dict(model.named_parameters())` gives."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be a mapping {{name: tensor}} such as dict(model.named_parameters()), "
                        f"got {type(params).__name__}")
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: keys must be parameter names (str), got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] must be a tensor, got {type(value).__name__}")
    return params


def is_quantized(value: Any) -> bool:
    return isinstance(value, QTensor)
