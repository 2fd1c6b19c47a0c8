"""QTensor: the one quantized-weight type, a tensor wrapper that carries any scheme through functional_call."""
from __future__ import annotations

from typing import Callable

import optree
import torch

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
    """(N, K) of a weight of this logical shape: [N, K], [K, N] when stored transposed, [N, K, 1, 1] for 1x1 convs."""
    if len(shape) == 4:
        return shape[0], shape[1]
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


def canonical(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A weight as [N, K] (outputs, inputs): transposed for [in, out] storage, flattened for 1x1 convs (a view)."""
    return w.t() if transposed else w.reshape(w.shape[0], -1)


class QTensor(torch.Tensor):
    """A quantized weight: a scheme, its named stored tensors, and the logical shape and dtype the model expects.

    Invariant: `dequantize()` == `scheme.dequantize(tensors, N, K, dtype)` laid out in the logical shape, where
    (N, K) is the canonical orientation (outputs, inputs): for `Int4WeightOnly`, w ≈ (q - 8) * scale + zero with
    groups along K. `transposed` marks a weight the model stores as [in, out] (GPT-2's Conv1D); a 4-D logical shape
    is a 1x1 convolution [out, in, 1, 1]. The stored tensors never depend on the orientation.
    """

    scheme: Scheme
    transposed: bool

    @staticmethod
    def __new__(cls, scheme: Scheme, tensors: dict[str, torch.Tensor], shape, dtype: torch.dtype,
                transposed: bool = False):
        first = next(iter(tensors.values()))
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=first.device, requires_grad=False)

    def __init__(self, scheme, tensors, shape, dtype, transposed=False):
        self.scheme = scheme
        self.transposed = bool(transposed)
        self._names = tuple(tensors)
        for name, tensor in tensors.items():
            setattr(self, name, tensor)
        keep_address_static(self)

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
        """The float weight in its logical shape and dtype."""
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
        return QTensor(self.scheme, tensors, self.shape, dtype or self.dtype, self.transposed)

    # ------------------------------------------------------------------------------------------ torch.compile
    def __tensor_flatten__(self):
        return list(self._names), (self.scheme, tuple(self.shape), self.dtype, self.transposed)

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
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
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
                "linear, matmul/mm/addmm, 1x1 conv2d, embedding, .to(), detach, clone and t(); call .dequantize() "
                "for anything else")
        return handler(*args, **kwargs)


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
    if w.dim() != 2:
        raise NotImplementedError(f"aofunc.QTensor: transpose of a {w.dim()}-D quantized weight")
    if {dim0 % 2, dim1 % 2} != {0, 1}:
        return _detach(w)
    return QTensor(w.scheme, w.tensors, (w.shape[1], w.shape[0]), w.dtype, not w.transposed)


DISPATCH = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.t.default: _transpose,
    aten.transpose.int: _transpose,
}


# ---------------------------------------------------------------------------------------------- pytree
optree.register_pytree_node(
    QTensor,
    lambda w: (list(w.tensors.values()), (w.scheme, tuple(w._names), tuple(w.shape), w.dtype, w.transposed),
               list(w._names)),
    lambda meta, children: QTensor(meta[0], dict(zip(meta[1], children)), meta[2], meta[3], meta[4]),
    namespace="aofunc",
)
