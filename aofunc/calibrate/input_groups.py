"""Which linears read the same input, and which per-channel scale made that input, found from one run's calls.

A per-channel scale is a 1-D parameter applied last to an activation: the weight of F.layer_norm / F.rms_norm
(with the LayerNorm bias), or `w * x` (Llama's RMSNorm), optionally followed by `+ b`. Reshapes that keep the
channel dimension pass it through. When every use of such an output is a linear, and those linears read nothing
else, a smoothing vector s can be folded into it: the scale's weight (and bias) divided by s, the linears'
weights multiplied by s, the function unchanged. Nothing here knows a model family.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from aofunc.capture import linear_operands

_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride, torch.Tensor.__len__,
             torch.Tensor.is_contiguous, torch.Tensor.is_floating_point, torch.Tensor.element_size,
             torch.Tensor.data_ptr}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"}
_RESHAPES = {torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.contiguous, torch.flatten,
             torch.Tensor.flatten}


@dataclasses.dataclass(frozen=True)
class Scaler:
    """The parameters that scale an activation per channel: y = norm(x) * weight (+ bias)."""

    weight: str
    bias: str | None = None


@dataclasses.dataclass(frozen=True)
class InputGroup:
    """Linears that read one input; `scaler` is set when a smoothing vector can be folded into what made it."""

    linears: tuple[str, ...]
    scaler: Scaler | None


class _Graph(TorchFunctionMode):
    """Records per-channel scale outputs, who consumes them, and which input object each linear call read."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.by_id = {id(t): name for name, t in params.items()}
        self.made_by: dict[int, Scaler] = {}       # id of an output -> its scaler
        self.keep: list[torch.Tensor] = []          # outputs and inputs kept alive so their ids stay unique
        self.escaped: set[Scaler] = set()           # scalers whose output reached something other than a linear
        self.sources: dict[str, set] = {}          # linear name -> scalers (or None) of the inputs it read
        self.reads: dict[str, set[int]] = {}       # linear name -> ids of the input objects it read
        self.other_uses: set[str] = set()          # params used by something other than a linear or a scaler

    def _param(self, t: Any) -> str | None:
        return self.by_id.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _record(self, output: Any, scaler: Scaler) -> None:
        if isinstance(output, torch.Tensor):
            self.made_by[id(output)] = scaler
            self.keep.append(output)

    def _channel_scale(self, func, args, kwargs) -> Scaler | None:
        """The scaler when this call applies a 1-D parameter per channel to an activation (not to a parameter)."""
        if func in (F.layer_norm, F.rms_norm):
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            bias = (args[3] if len(args) > 3 else kwargs.get("bias")) if func is F.layer_norm else None
            if self._param(weight) is not None and (bias is None or self._param(bias) is not None):
                return Scaler(self._param(weight), self._param(bias) if bias is not None else None)
            return None
        if func in _MULS and len(args) == 2:
            a, b = args
            for w, x in ((a, b), (b, a)):
                name = self._param(w)
                if name is not None and w.dim() == 1 and isinstance(x, torch.Tensor) and self._param(x) is None \
                        and x.dim() >= 1 and x.shape[-1] == w.shape[0] and id(x) not in self.made_by:
                    return Scaler(name)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _reads_metadata(func):
            return out
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        found = linear_operands(func, args, kwargs)
        linear = self._param(found[0]) if found is not None else None
        if linear is not None:
            x = found[1]
            self.keep.append(x)
            self.sources.setdefault(linear, set()).add(self.made_by.get(id(x)))
            self.reads.setdefault(linear, set()).add(id(x))
            consumed = {id(x), id(found[0])}
            self._mark_others([t for t in tensors if id(t) not in consumed])
            return out
        scaler = self._channel_scale(func, args, kwargs)
        if scaler is not None:
            self._record(out, scaler)
            used = {scaler.weight, scaler.bias}
            self._mark_others([t for t in tensors if self._param(t) not in used])
            return out
        if func in _ADDS and len(args) == 2:
            for y, b in ((args[0], args[1]), (args[1], args[0])):
                made = self.made_by.get(id(y)) if isinstance(y, torch.Tensor) else None
                name = self._param(b)
                if made is not None and made.bias is None and name is not None and b.dim() == 1:
                    self._record(out, Scaler(made.weight, name))
                    return out
        if func in _RESHAPES and args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.made_by \
                and isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[-1] == args[0].shape[-1]:
            self._record(out, self.made_by[id(args[0])])
            return out
        self._mark_others(tensors)
        return out

    def _mark_others(self, tensors) -> None:
        for t in tensors:
            if id(t) in self.made_by:
                self.escaped.add(self.made_by[id(t)])
            name = self._param(t)
            if name is not None:
                self.other_uses.add(name)


def _reads_metadata(func) -> bool:
    """Calls that read a tensor's shape, dtype or layout but not its values (scaling the values changes none)."""
    if func in _METADATA:
        return True
    descriptor = getattr(func, "__self__", None)
    return getattr(func, "__name__", None) == "__get__" and getattr(descriptor, "__name__", None) in _METADATA_ATTRIBUTES


@contextlib.contextmanager
def recording_inputs(params: Mapping[str, torch.Tensor]):
    """Within the block, the calls are recorded; the yielded function returns the input groups afterwards."""
    graph = _Graph(params)
    with graph:
        yield lambda selected: input_groups(graph, selected)


def input_groups(graph: _Graph, selected) -> list[InputGroup]:
    """Selected linears grouped by the input objects they read (q, k, v share one); a group gets its scaler when
    all its linears read only that scaler's output, nothing else reads it, and its parameters have no other use."""
    selected = [name for name in selected if name in graph.reads]
    parent = {name: name for name in selected}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    reader: dict[int, str] = {}
    for name in selected:
        for x in graph.reads[name]:
            if x in reader:
                parent[root(name)] = root(reader[x])
            else:
                reader[x] = name
    members: dict[str, list[str]] = {}
    for name in selected:
        members.setdefault(root(name), []).append(name)

    consumers: dict[Scaler, set[str]] = {}
    for name, sources in graph.sources.items():
        for scaler in sources:
            if scaler is not None:
                consumers.setdefault(scaler, set()).add(name)
    groups = []
    for linears in members.values():
        sources = set().union(*(graph.sources[name] for name in linears))
        scaler = next(iter(sources)) if len(sources) == 1 else None
        if scaler is not None and (scaler in graph.escaped or consumers[scaler] != set(linears)
                                   or {scaler.weight, scaler.bias} & graph.other_uses):
            scaler = None
        groups.append(InputGroup(tuple(linears), scaler))
    return groups
