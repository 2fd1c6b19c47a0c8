"""The capture mode: which linear-like call used which parameter, with what input, without touching the model.

A TorchFunctionMode keyed by the identity of the tensors handed to `functional_call` sees every `F.linear`,
`matmul`/`mm`/`addmm` and 1x1 `conv2d`, and reports each call to a callback by parameter name.
"""
from __future__ import annotations

import contextlib
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


class _CallRecorder(TorchFunctionMode):
    def __init__(self, by_id: dict[int, str], on_call: Callable[[str, LinearCall], None]):
        super().__init__()
        self.by_id = by_id
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = linear_operands(func, args, kwargs)
        if found is not None:
            weight, x, orientation = found
            name = self.by_id.get(id(weight))
            if name is not None and isinstance(x, torch.Tensor):
                rows = x.detach().reshape(-1, x.shape[-1])
                self.on_call(name, LinearCall(rows, tuple(x.shape), orientation))
        return func(*args, **kwargs)


@contextlib.contextmanager
def linear_calls(params: Mapping[str, torch.Tensor], on_call: Callable[[str, LinearCall], None],
                 names: Iterable[str] | None = None):
    """Within the block, every linear-like call on one of `params`' tensors (those in `names`, if given) is
    reported as on_call(name, LinearCall). The tensors are recognised by identity, so pass the very objects
    handed to functional_call."""
    wanted = set(params) if names is None else set(names)
    by_id = {id(t): name for name, t in params.items() if name in wanted}
    with _CallRecorder(by_id, on_call):
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


def detect_transposed(model, params: Mapping[str, torch.Tensor], example: Any, names=None) -> dict[str, bool]:
    """{param name: True when the model uses the weight as x @ W (stored [in, out])}, from one run on `example`."""
    transposed: dict[str, bool] = {}

    def on_call(name, call):
        transposed[name] = transposed.get(name, False) or call.orientation == "in_out"

    with torch.no_grad(), linear_calls(params, on_call, names):
        run_model(model, params, example)
    return transposed
