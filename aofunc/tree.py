"""Parameter trees: the optree namespace that opens QTensors, and helpers over {name: tensor} dicts.

Trees a transform returns never hold the module's own `nn.Parameter` objects: `torch.compile` treats those as part
of the module, so a compiled `functional_call` handed such a tree could go on using their values when later called
with another tree. Entries a transform passes through are detached aliases instead (same storage, new objects).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import optree
import torch

from aofunc.formats.qtensor import keep_address_static

NAMESPACE = "aofunc"


def leaves(tree: Any) -> list[torch.Tensor]:
    """Every plain tensor of a (quantized) params tree, the stored tensors of each QTensor included."""
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def size_in_bytes(tree: Any) -> int:
    """Bytes held by the tensors of a (quantized) params tree; a tensor shared by two names counts once. Meta
    tensors count the bytes they would hold, so a tree quantized on the meta device is sized without memory."""
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


def detached_aliases(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new dict whose plain tensors are detached aliases of the given ones: the same storage (no copy) and the
    same `requires_grad`, but new objects, never an `nn.Parameter`. Names holding one tensor object (tied weights)
    get one alias, so they still hold one object. QTensors and other tensor subclasses are kept as they are.

    Like QTensors, the aliases are marked as static-address inputs, as the compiler marks a module's own
    Parameters: under `torch.compile(mode="reduce-overhead")` their CUDA graphs read them in place rather than
    copying them (an embedding table, say) on every call."""
    made: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in params.items():
        if isinstance(t, torch.nn.Parameter) or type(t) is torch.Tensor:
            if id(t) not in made:
                made[id(t)] = keep_address_static(t.detach().requires_grad_(t.requires_grad))
            out[name] = made[id(t)]
        else:
            out[name] = t
    return out


def tied_groups(params: Mapping[str, Any]) -> list[list[str]]:
    """The names that hold one object (tied weights, as `named_parameters(remove_duplicate=False)` lists them),
    in groups of two or more, each in the tree's order."""
    by_id: dict[int, list[str]] = {}
    for name, t in params.items():
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def unique_by_tensor(params: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """The first of `names` for each tensor object of `params` they hold: a transform computes each tensor once."""
    seen: set[int] = set()
    out = []
    for name in names:
        if id(params[name]) not in seen:
            seen.add(id(params[name]))
            out.append(name)
    return out


def share_tied(out: dict[str, Any], params: Mapping[str, Any], written: Iterable[str]) -> dict[str, Any]:
    """`out` (changed and returned) with each name of `written` lending its new value to every name tied to it in
    `params`, so that one tensor of the input stays one object of the output."""
    names_of: dict[int, list[str]] = {}
    for name, t in params.items():
        names_of.setdefault(id(t), []).append(name)
    for name in written:
        for other in names_of.get(id(params[name]), ()):
            out[other] = out[name]
    return out


def check_tied_values(model: Any, params: Mapping[str, torch.Tensor], what: str) -> None:
    """Names the module ties (one Parameter or buffer under several names) must hold one tensor in the tree, or
    only one of them may be given; otherwise a ValueError naming them. (functional_call would refuse such a tree
    and suggest an option that aofunc's calls do not take.) A model that is not an nn.Module is not checked."""
    if not isinstance(model, torch.nn.Module):
        return
    names_of: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(t), []).append(name)
    for names in names_of.values():
        given = [name for name in names if name in params]
        differing = [name for name in given if params[name] is not params[given[0]]]
        if differing:
            raise ValueError(f"{what}: the model ties {names} (one tensor under each of these names), but the tree "
                             f"gives {given[0]!r} and {differing[0]!r} different tensors; give every tied name the "
                             "same tensor, or give only one of them (the others follow it)")
