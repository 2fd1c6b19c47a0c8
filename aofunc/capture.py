"""The capture mode: which linear-like call used which parameter, with what input, without touching the model.

A TorchFunctionMode keyed by the identity of the tensors handed to `functional_call` sees every `F.linear`,
`matmul`/`mm`/`addmm` and 1x1 `conv2d`, and reports each call to a callback by parameter name.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from aofunc.ops import is_pointwise_conv, pointwise_conv_input
from aofunc.tree import check_tied_values


class LinearCall(NamedTuple):
    """One linear-like use of a weight: its input as the linear sees it ([tokens, K]), the input's own shape,
    and how the weight was oriented ("out_in" for F.linear and 1x1 convs, "in_out" for x @ W and addmm)."""

    x: torch.Tensor
    input_shape: tuple[int, ...]
    orientation: str


def linear_operands(func, args, kwargs):
    """(weight, input rows, input shape, orientation) for a linear-like call, else None."""
    if func is F.linear and len(args) >= 2:
        x, w = args[0], args[1]
        return w, x, "out_in"
    if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm) \
            and len(args) >= 2 and isinstance(args[1], torch.Tensor) and args[1].dim() == 2:
        return args[1], args[0], "in_out"
    if func in (torch.addmm, torch.Tensor.addmm) and len(args) >= 3:
        return args[2], args[1], "in_out"
    if func is F.conv2d and len(args) >= 2:
        x, w = args[0], args[1]
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        if is_pointwise_conv(x, w, groups):
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
            return w, pointwise_conv_input(x, stride, padding), "out_in"
    return None


#: the views of stacked experts [E, ., .] that models take before their products: an expert or a gather of experts
#: (indexing), and the swap of the last two dims
_EXPERT_VIEWS = {torch.Tensor.__getitem__: False, torch.Tensor.transpose: True, torch.transpose: True,
                 torch.Tensor.swapaxes: True, torch.swapaxes: True, torch.Tensor.mT.__get__: True}


def _is_last_two(func, args, kwargs) -> bool:
    if func is torch.Tensor.mT.__get__:
        return True
    dims = list(args[1:3]) + [kwargs[key] for key in ("dim0", "dim1", "axis0", "axis1") if key in kwargs]
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 3 for d in dims} == {1, 2}


def stacked_operands(func, args, kwargs):
    """(weight, input, orientation) for a product of stacked experts: torch._grouped_mm(x, W) and bmm(x, W) use W
    as x @ W ("in_out"), bmm(W, x) as W @ x ("out_in"); a convolution of a 3-D weight is "conv". Else None."""
    if func is torch._grouped_mm and len(args) >= 2:
        return args[1], args[0], "in_out"
    if func in (torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) \
            and len(args) >= 2:
        return (args[1], args[0], "in_out"), (args[0], args[1], "out_in")
    if func in (F.conv1d, F.conv_transpose1d, torch.conv1d, torch.conv_transpose1d) and len(args) >= 2:
        return args[1], args[0], "conv"
    return None


class _CallRecorder(TorchFunctionMode):
    """Reports linear-like calls on the tracked tensors. With `stacked`, the 3-D tracked tensors are followed
    through their expert views (an expert, a gather, a swap of the last two dims) into F.linear, bmm, grouped_mm
    and convolutions, each use reported with the orientation it implies for the stored 3-D weight."""

    def __init__(self, by_id: dict[int, str], on_call: Callable[[str, LinearCall], None], stacked: bool = False):
        super().__init__()
        self.by_id = by_id
        self.on_call = on_call
        self.stacked = stacked
        # id(view) -> (weak reference to the view, parameter name, whether the view swaps the weight's last dims)
        self.views: dict[int, tuple] = {}

    def _view_of(self, t) -> tuple[str, bool] | None:
        entry = self.views.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1], entry[2]
        return None

    def _follow(self, func, args, kwargs, result) -> None:
        source = args[0] if args else None
        if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
            return
        if id(source) in self.by_id and source.dim() == 3:
            name, swapped = self.by_id[id(source)], False
        else:
            found = self._view_of(source)
            if found is None:
                return
            name, swapped = found
        if _EXPERT_VIEWS[func] and not _is_last_two(func, args, kwargs):
            return
        self.views[id(result)] = (weakref.ref(result), name, swapped ^ _EXPERT_VIEWS[func])

    def _report_stacked(self, func, args, kwargs) -> bool:
        found = stacked_operands(func, args, kwargs)
        if found is None:
            found = linear_operands(func, args, kwargs)
        if found is None:
            return False
        for weight, x, orientation in (found if isinstance(found[0], tuple) else (found,)):
            if not isinstance(weight, torch.Tensor) or not isinstance(x, torch.Tensor):
                continue
            if id(weight) in self.by_id and weight.dim() == 3:
                name, swapped = self.by_id[id(weight)], False
            else:
                view = self._view_of(weight)
                if view is None:
                    continue
                name, swapped = view
            if swapped and orientation != "conv":
                orientation = "out_in" if orientation == "in_out" else "in_out"
            self.on_call(name, LinearCall(x.detach().reshape(-1, x.shape[-1]), tuple(x.shape), orientation))
            return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stacked and self._report_stacked(func, args, kwargs):
            return func(*args, **kwargs)
        found = linear_operands(func, args, kwargs)
        if found is not None:
            weight, x, orientation = found
            name = self.by_id.get(id(weight))
            if name is not None and isinstance(x, torch.Tensor):
                rows = x.detach().reshape(-1, x.shape[-1])
                self.on_call(name, LinearCall(rows, tuple(x.shape), orientation))
        result = func(*args, **kwargs)
        if self.stacked and func in _EXPERT_VIEWS:
            self._follow(func, args, kwargs, result)
        return result


@contextlib.contextmanager
def linear_calls(params: Mapping[str, torch.Tensor], on_call: Callable[[str, LinearCall], None],
                 names: Iterable[str] | None = None, stacked: bool = False):
    """Within the block, every linear-like call on one of `params`' tensors (those in `names`, if given) is
    reported as on_call(name, LinearCall). The tensors are recognised by identity, so pass the very objects
    handed to functional_call. With `stacked`, 3-D tensors (stacked experts) are followed through indexing and
    transposes into F.linear, bmm, grouped_mm and 1-D convolutions ("conv")."""
    wanted = set(params) if names is None else set(names)
    by_id = {id(t): name for name, t in params.items() if name in wanted}
    with _CallRecorder(by_id, on_call, stacked):
        yield


def batch_args(batch: Any) -> tuple[tuple, dict]:
    """A batch is what the forward takes: a tensor, a tuple/list of positional args, or a dict of kwargs."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def run_model(model, params: Mapping[str, torch.Tensor], batch: Any):
    """model(params, batch): an nn.Module through functional_call, or a pure function f(params, batch)."""
    if isinstance(model, torch.nn.Module):
        check_tied_values(model, params, "aofunc")
        args, kwargs = batch_args(batch)
        return torch.func.functional_call(model, dict(params), args, kwargs, tie_weights=True, strict=False)
    if callable(model):
        return model(params, batch)
    raise TypeError(f"model must be an nn.Module or a function f(params, batch), got {type(model).__name__}")


def _run_args(model, params, args, kwargs):
    if isinstance(model, torch.nn.Module):
        check_tied_values(model, params, "aofunc")
        return torch.func.functional_call(model, dict(params), args, kwargs, tie_weights=True, strict=False)
    return model(params, *args, **kwargs)


def record_calls(model, params: Mapping[str, torch.Tensor], args: tuple, kwargs: dict) -> dict[str, list]:
    """{param name: [LinearCall, ...]} for one run of model(*args, **kwargs) with params."""
    calls: dict[str, list] = {}
    with torch.no_grad(), linear_calls(params, lambda name, call: calls.setdefault(name, []).append(call)):
        _run_args(model, params, args, kwargs)
    return calls


def record_shapes(model, params: Mapping[str, torch.Tensor], *args, **kwargs) -> dict[str, list[tuple]]:
    """{param name: [input shape of each linear-like call]} for one run of model(*args, **kwargs) with params.

    Example:
        >>> aofunc.record_shapes(torch.nn.Linear(4, 3), {"weight": torch.randn(3, 4)}, torch.randn(2, 5, 4))
        {'weight': [(2, 5, 4)]}
    """
    calls = record_calls(model, params, args, kwargs)
    return {name: [call.input_shape for call in name_calls] for name, name_calls in calls.items()}


def capture_inputs(model, params: Mapping[str, torch.Tensor], batch: Any, names=None) -> dict[str, list]:
    """{param name: [input of each linear-like call, as [tokens, K]]} for one run of the model on `batch`.

    `model` is an nn.Module (run through functional_call with `params`) or a function f(params, batch); a batch is a
    tensor, a tuple of positional arguments or a dict of keyword arguments. `names` limits the capture to those
    parameters (default: all of `params`).

    Example:
        >>> fc = torch.nn.Linear(4, 2)
        >>> seen = aofunc.capture_inputs(fc, dict(fc.named_parameters()), torch.randn(3, 5, 4))
        >>> [x.shape for x in seen["weight"]]
        [torch.Size([15, 4])]
    """
    captured: dict[str, list] = {}
    with torch.no_grad(), linear_calls(params, lambda name, call: captured.setdefault(name, []).append(call.x),
                                       names):
        run_model(model, params, batch)
    return captured


def detect_uses(model, params: Mapping[str, torch.Tensor], example: Any, names=None) -> dict[str, set[str]]:
    """{param name: the orientations of its uses ("out_in", "in_out", "conv")} from one run on `example`; 3-D
    weights (stacked experts) are followed through indexing and transposes."""
    uses: dict[str, set[str]] = {}
    with torch.no_grad(), linear_calls(params, lambda name, call: uses.setdefault(name, set()).add(call.orientation),
                                       names, stacked=True):
        run_model(model, params, example)
    return uses


def detect_transposed(model, params: Mapping[str, torch.Tensor], example: Any, names=None) -> dict[str, bool]:
    """{param name: True when the model uses the weight as x @ W (stored [in, out])}, from one run on `example`;
    3-D weights (stacked experts [E, ., .]) are followed through indexing and transposes into their products."""
    return {name: "in_out" in found for name, found in detect_uses(model, params, example, names).items()}
