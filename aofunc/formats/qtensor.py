"""QTensor: the one quantized-weight type, a tensor wrapper that carries any scheme through functional_call."""
from __future__ import annotations

from typing import Callable

import optree
import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._pytree import tree_map_only

from aofunc.formats.scheme import Scheme

#: {torch function: handler}; the ops layer fills it through `implements`.
HANDLERS: dict[Callable, Callable] = {}

aten = torch.ops.aten


def implements(*functions):
    """Decorator: the handler answers these torch functions when a QTensor is among their arguments."""
    def register(handler):
        for fn in functions:
            HANDLERS[fn] = handler
        return handler
    return register


def canonical_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """(N, K) of a weight of this logical shape: [N, K], [K, N] when stored transposed, [N, K, 1, 1] for 1x1 convs;
    for stacked experts ([E, N, K] or [E, K, N]) the (N, K) of one expert."""
    if len(shape) == 4:
        return shape[0], shape[1]
    if len(shape) == 3:
        shape = shape[1:]
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def keep_address_static(t: torch.Tensor) -> torch.Tensor:
    """Mark t as a tensor whose storage stays put between calls (a weight), as torch._dynamo.mark_static_address
    does, without importing the compiler: a compiled function then reads it in place. Returns t.

    Under `torch.compile(mode="reduce-overhead")` CUDA graphs copy every input not so marked into their own
    buffers on each call; a module's own Parameters are marked by the compiler itself, but the tensors of a params
    tree are not, so without this every quantized weight would be copied on every step. The mark is unguarded: a
    tree with other tensors runs correctly (CUDA graphs are re-recorded for new addresses, never reused stale).
    """
    t._dynamo_static_input_type = "unguarded"
    return t


def values_readable(t: torch.Tensor) -> bool:
    """Whether t's values may be read on the host now: not while torch.compile or export traces (they are unknown
    there, at any stage of tracing) nor during CUDA graph capture (a read would synchronize)."""
    if torch.compiler.is_compiling():
        return False
    return not is_fake(t) and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def canonical(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A weight as [N, K] (outputs, inputs): transposed for [in, out] storage, flattened for 1x1 convs (a view);
    stacked experts as [E, N, K]."""
    if w.dim() == 3:
        return w.transpose(1, 2) if transposed else w
    return w.t() if transposed else w.reshape(w.shape[0], -1)


def stacked_tensors(experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stored tensors of a stack of experts from each expert's own: every tensor gains a leading E."""
    return {key: torch.stack([parts[key].contiguous() for parts in experts]) for key in experts[0]}


class QTensor(torch.Tensor):
    """A quantized weight: a scheme, its named stored tensors, and the logical shape and dtype the model expects.

    Invariant: `dequantize()` == `scheme.dequantize(tensors, N, K, dtype)` laid out in the logical shape, where
    (N, K) is the canonical orientation (outputs, inputs): for `Int4WeightOnly`, w ≈ (q - 8) * scale + zero with
    groups along K. `transposed` marks a weight the model stores as [in, out] (GPT-2's Conv1D); a 4-D logical shape
    is a 1x1 convolution [out, in, 1, 1]. The stored tensors never depend on the orientation.

    Stacked experts: a 3-D logical shape [E, N, K] ([E, K, N] when transposed) is E weights of one scheme in one
    QTensor, each stored tensor the expert's own with a leading E (`w[e]` is expert e's 2-D QTensor, a view of the
    same storage). `param_name`, when known, is the parameter's name, used in error messages only.
    """

    scheme: Scheme
    transposed: bool

    @staticmethod
    def __new__(cls, scheme: Scheme, tensors: dict[str, torch.Tensor], shape, dtype: torch.dtype,
                transposed: bool = False, param_name: str | None = None):
        first = next(iter(tensors.values()))
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=first.device, requires_grad=False)

    def __init__(self, scheme, tensors, shape, dtype, transposed=False, param_name=None):
        self.scheme = scheme
        self.transposed = bool(transposed)
        self.param_name = param_name
        self._names = tuple(tensors)
        # what torch.compile flattens this into, built once: compiled code unwraps every QTensor input on every call
        self._flat_context = (scheme, tuple(shape), dtype, self.transposed)
        for key, tensor in tensors.items():
            setattr(self, key, tensor)
        if len(shape) == 3:
            self._check_stacked()
        keep_address_static(self)

    # ------------------------------------------------------------------------------------------ stacked experts
    @property
    def stacked(self) -> bool:
        """Whether this is a stack of experts ([E, N, K] logical, or [E, K, N] when transposed)."""
        return self.dim() == 3

    def describe(self) -> str:
        """How error messages name this weight: its parameter name when known, else its repr."""
        return repr(self.param_name) if self.param_name else repr(self)

    def _check_stacked(self) -> None:
        experts = self.shape[0]
        for key, t in self.tensors.items():
            if t.dim() == 0 or t.shape[0] != experts:
                raise ValueError(
                    f"aofunc.QTensor: {self.describe()} is a stack of {experts} experts, so each stored tensor must "
                    f"lead with {experts}, but {key!r} has shape {list(t.shape)}")

    def _check_expert(self, index: int) -> int:
        experts = self.shape[0]
        if not -experts <= index < experts:
            raise IndexError(f"aofunc.QTensor: expert index {index} is out of range for {self.describe()}, which "
                             f"holds {experts} experts")
        return index % experts

    def expert(self, index: int) -> "QTensor":
        """Expert `index` of a stack: its 2-D QTensor, whose stored tensors are views of the stack's."""
        if not self.stacked:
            raise TypeError(f"aofunc.QTensor: {self.describe()} is not a stack of experts")
        index = self._check_expert(int(index))
        return QTensor(self.scheme, {key: t.select(0, index) for key, t in self.tensors.items()}, self.shape[1:],
                       self.dtype, self.transposed, self.param_name)

    def experts(self, index: torch.Tensor) -> "QTensor":
        """The experts an index tensor names, gathered (a copy of their stored tensors): shape index.shape + [N, K]."""
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise TypeError(f"aofunc.QTensor: {self.describe()} takes integer expert indices, got {index.dtype}")
        if index.dim() > 1:
            raise NotImplementedError(f"aofunc.QTensor: {self.describe()}: indexing experts by a "
                                      f"{index.dim()}-D index tensor; use a 1-D one")
        if index.numel() and values_readable(index):
            experts = self.shape[0]
            low, high = int(index.min()), int(index.max())
            self._check_expert(low if low < -experts else high)
        return QTensor(self.scheme, {key: t[index] for key, t in self.tensors.items()},
                       tuple(index.shape) + tuple(self.shape[1:]), self.dtype, self.transposed, self.param_name)

    # ------------------------------------------------------------------------------------------ accessors
    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (qdata, scale, ...)."""
        return {name: getattr(self, name) for name in self._names}

    @property
    def nk(self) -> tuple[int, int]:
        """(N, K): output and input features."""
        return canonical_shape(tuple(self.shape), self.transposed)

    def dequantize(self) -> torch.Tensor:
        """The float weight in its logical shape and dtype (stacked experts: each expert's, stacked)."""
        if self.stacked:
            return torch.stack([self.expert(e).dequantize() for e in range(self.shape[0])])
        n, k = self.nk
        w = self.scheme.dequantize(self.tensors, n, k, self.dtype)
        if self.transposed:
            return w.t().contiguous()
        return w.reshape(self.shape)

    def __repr__(self):
        return (f"QTensor({self.scheme}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}"
                + (", transposed=True" if self.transposed else "") + ")")

    def with_tensors(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> "QTensor":
        """The same weight (scheme, shape, orientation) over other stored tensors, and optionally another dtype."""
        return QTensor(self.scheme, tensors, self.shape, dtype or self.dtype, self.transposed, self.param_name)

    # ------------------------------------------------------------------------------------------ torch.compile
    def __tensor_flatten__(self):
        return list(self._names), self._flat_context

    def _stable_hash_for_caching(self) -> str:
        """What compiled-graph caches key on: the format and the layout, not the values."""
        stored = ",".join(f"{name}:{t.dtype}{list(t.shape)}" for name, t in self.tensors.items())
        return f"QTensor({self.scheme!r},{list(self.shape)},{self.dtype},{self.transposed},{stored})"

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        scheme, shape, dtype, transposed = ctx
        return QTensor(scheme, inner_tensors, shape, dtype, transposed)

    # ------------------------------------------------------------------------------------------ dispatch
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:  # first and cheapest: compiled code asks every QTensor input for these on every call
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if _is_custom_op(func):
            # an operator registered outside torch (transformers' grouped_mm fallback, which its experts call while
            # compiling) cannot know the stored format: it runs on the dequantized weights
            args, kwargs = tree_map_only(QTensor, lambda t: t.dequantize(), (args, kwargs))
            return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = DISPATCH.get(func)
        if handler is None:
            weight = next(a for a in args if isinstance(a, QTensor))
            raise NotImplementedError(
                f"aofunc.QTensor ({type(weight.scheme).__name__}) does not support {func}: a quantized weight answers "
                "linear, matmul/mm/addmm, 1x1 conv2d, embedding, .to(), detach, clone and t() (stacked experts: "
                "indexing by expert, transposing the last two dims, bmm and grouped_mm); call .dequantize() "
                "for anything else")
        return handler(*args, **kwargs)


#: Tensor methods and properties that only read metadata: answered as for any tensor, before any other lookup.
_METADATA = frozenset([torch.Tensor.size, torch.Tensor.stride, torch.Tensor.dim, torch.Tensor.storage_offset,
                       torch.Tensor.is_contiguous, torch.Tensor.numel, torch.Tensor.shape.__get__,
                       torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.requires_grad.__get__,
                       torch.Tensor.is_cuda.__get__, torch.Tensor.ndim.__get__, torch.Tensor.layout.__get__])


def _is_custom_op(func) -> bool:
    """Whether func is an operator of a library other than torch's own (aten, prims)."""
    if isinstance(func, torch._ops.OpOverload):
        return func.namespace not in ("aten", "prims", "prim")
    if isinstance(func, torch._ops.OpOverloadPacket):
        return func._qualified_op_name.split("::")[0] not in ("aten", "prims", "prim")
    return False


# ---------------------------------------------------------------------------------------------- aten ops answered

def _detach(w: QTensor) -> QTensor:
    return w.with_tensors(w.tensors)


def _clone(w: QTensor, memory_format=None) -> QTensor:
    return w.with_tensors({name: t.clone() for name, t in w.tensors.items()})


def _to_copy(w: QTensor, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None) -> QTensor:
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"aofunc.QTensor: cannot convert a quantized weight to {dtype}; its logical dtype "
                        "must stay a floating point type")
    new_dtype = dtype or w.dtype
    tensors = {}
    for name, t in w.tensors.items():
        target = new_dtype if name in w.scheme.float_names else t.dtype
        tensors[name] = t.to(device=device, dtype=target, non_blocking=non_blocking)
    return w.with_tensors(tensors, new_dtype)


def _transpose(w: QTensor, dim0: int = 0, dim1: int = 1) -> QTensor:
    if w.stacked:
        dims = {dim0 % 3, dim1 % 3}
        if len(dims) == 1:
            return _detach(w)
        if dims != {1, 2}:
            raise NotImplementedError(f"aofunc.QTensor: {w.describe()} is a stack of experts: only its last two "
                                      f"dims can be transposed, not dims {dim0} and {dim1}")
        return QTensor(w.scheme, w.tensors, (w.shape[0], w.shape[2], w.shape[1]), w.dtype, not w.transposed, w.param_name)
    if w.dim() != 2:
        raise NotImplementedError(f"aofunc.QTensor: transpose of a {w.dim()}-D quantized weight")
    if {dim0 % 2, dim1 % 2} != {0, 1}:
        return _detach(w)
    return QTensor(w.scheme, w.tensors, (w.shape[1], w.shape[0]), w.dtype, not w.transposed, w.param_name)


def _t(w: QTensor) -> QTensor:
    if w.dim() != 2:
        raise NotImplementedError(f"aofunc.QTensor: t() of a {w.dim()}-D quantized weight; transpose(-2, -1) "
                                  "swaps the last two dims of stacked experts")
    return _transpose(w)


def _stack_only(w: QTensor, what: str) -> None:
    if not isinstance(w, QTensor) or not w.stacked:
        raise NotImplementedError(f"aofunc.QTensor: {what} of a {w.dim()}-D quantized weight; only stacked experts "
                                  "are indexed (by expert)")


def _select(w: QTensor, dim: int, index) -> QTensor:
    _stack_only(w, "indexing")
    if dim % 3 != 0:
        raise NotImplementedError(f"aofunc.QTensor: {w.describe()} is a stack of experts: index it along dim 0 "
                                  f"(by expert), not dim {dim}")
    return w.expert(index)


def _index(w: QTensor, indices) -> QTensor:
    _stack_only(w, "indexing")
    if len(indices) != 1 or not isinstance(indices[0], torch.Tensor):
        raise NotImplementedError(f"aofunc.QTensor: {w.describe()} is a stack of experts: index it by expert "
                                  "(an int or an integer tensor) only")
    index = indices[0]
    if index.dim() == 0 and values_readable(index):
        return w.expert(int(index))
    return w.experts(index)


def _slice(w: QTensor, dim: int = 0, start=None, end=None, step: int = 1) -> QTensor:
    _stack_only(w, "slicing")
    if dim % 3 != 0:
        raise NotImplementedError(f"aofunc.QTensor: {w.describe()} is a stack of experts: slice it along dim 0 "
                                  f"(by expert), not dim {dim}")
    tensors = {key: t[start:end:step] for key, t in w.tensors.items()}
    experts = next(iter(tensors.values())).shape[0]
    return QTensor(w.scheme, tensors, (experts, *w.shape[1:]), w.dtype, w.transposed, w.param_name)


def _unbind(w: QTensor, dim: int = 0) -> list:
    _stack_only(w, "unbind")
    if dim % 3 != 0:
        raise NotImplementedError(f"aofunc.QTensor: {w.describe()} is a stack of experts: unbind it along dim 0")
    return [w.expert(e) for e in range(w.shape[0])]


def _getitem(w, index):
    """w[e] and w[index tensor] of stacked experts (named errors for indices out of range); anything else as torch
    does it."""
    if isinstance(w, QTensor) and w.stacked and not isinstance(index, bool):
        if isinstance(index, int):
            return w.expert(index)
        if isinstance(index, torch.Tensor) and not isinstance(index, QTensor) and index.dim() <= 1 \
                and not (index.dtype == torch.bool or index.is_floating_point() or index.is_complex()):
            if index.dim() == 0 and values_readable(index):
                return w.expert(int(index))
            return w.experts(index)
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.__getitem__(w, index)


HANDLERS[torch.Tensor.__getitem__] = _getitem


def _dequantized(func):
    """An aten op answered on the dequantized weights (grouped and batched products of stacked experts)."""
    def run(*args, **kwargs):
        args, kwargs = tree_map_only(QTensor, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)
    return run


DISPATCH = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.t.default: _t,
    aten.transpose.int: _transpose,
    aten.select.int: _select,
    aten.index.Tensor: _index,
    aten.slice.Tensor: _slice,
    aten.unbind.int: _unbind,
    aten.bmm.default: _dequantized(aten.bmm.default),
    aten._grouped_mm.default: _dequantized(aten._grouped_mm.default),
}


# ---------------------------------------------------------------------------------------------- pytree
optree.register_pytree_node(
    QTensor,
    lambda w: (list(w.tensors.values()), (w.scheme, tuple(w._names), tuple(w.shape), w.dtype, w.transposed),
               list(w._names)),
    lambda meta, children: QTensor(meta[0], dict(zip(meta[1], children)), meta[2], meta[3], meta[4]),
    namespace="aofunc",
)
