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
    and how the weight was oriented ("out_in" for F.linear and 1x1 convs, "in_out" for x @ W and addmm). For a
    product of stacked experts whose routing the capture could follow, `expert` gives, per row of `x`, the expert
    (int64 [tokens]) that row went through; else None."""

    x: torch.Tensor
    input_shape: tuple[int, ...]
    orientation: str
    expert: torch.Tensor | None = None


class ExpertRows(NamedTuple):
    """The input rows a stacked-experts weight [E, ., .] received in one call: x [tokens, K] and, per row, the expert
    it went through (int64 [tokens], on x's device). What `fold` hands `update` for a 3-D weight."""

    x: torch.Tensor
    expert: torch.Tensor

    def of(self, e: int) -> torch.Tensor:
        """The rows expert e received, [tokens_e, K]."""
        return self.x[self.expert == e]


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


_GROUPED_MM = {torch._grouped_mm} | ({F.grouped_mm} if hasattr(F, "grouped_mm") else set())


def _gathered_experts(experts: torch.Tensor | None, args) -> torch.Tensor | None:
    """The experts a view W[index] of a stack holds, from the source's experts (1-D: expert of each leading
    index); a 0-d result is one expert's 2-D weight. None when the index does not select along the experts only."""
    if experts is None or experts.dim() != 1 or len(args) < 2:
        return None
    index = args[1]
    if isinstance(index, tuple):
        if not index or not all(i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index[1:]):
            return None
        index = index[0]
    if isinstance(index, torch.Tensor):
        index = index.to(experts.device)
    try:
        return experts[index]
    except (IndexError, TypeError, RuntimeError):
        return None


def _expert_rows(func, args, kwargs, weight, x, experts, orientation):
    """(rows [tokens, K], expert of each row) for a product of stacked experts whose experts are known, else None.
    `experts` says which expert each leading index of `weight` is (1-D), or which single expert it is (0-d)."""
    if experts is None or orientation == "conv":
        return None
    if experts.dim() == 0:  # one expert's 2-D weight: F.linear(x, W[e]), x @ W[e].T, ...
        if weight.dim() != 2:
            return None
        rows = x.reshape(-1, x.shape[-1])
        return rows, experts.to(rows.device).expand(rows.shape[0])
    if weight.dim() != 3:
        return None
    if func in _GROUPED_MM:
        offs = args[2] if len(args) > 2 else kwargs.get("offs")
        if offs is None or x.dim() != 2 or offs.numel() != experts.numel():
            return None
        ends = offs.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1)).to(experts.device)
        rows = x[:int(ends[-1])] if ends.numel() else x[:0]
        return rows, experts.repeat_interleave(counts).to(rows.device)
    if x.dim() != 3 or x.shape[0] != weight.shape[0]:
        return None
    rows = x if orientation == "in_out" else x.transpose(-2, -1)  # x @ W reads x's rows, W @ x its columns
    return rows.reshape(-1, rows.shape[-1]), experts.to(x.device).repeat_interleave(rows.shape[1])


def _is_last_two(func, args, kwargs) -> bool:
    if func is torch.Tensor.mT.__get__:
        return True
    dims = list(args[1:3]) + [kwargs[key] for key in ("dim0", "dim1", "axis0", "axis1") if key in kwargs]
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 3 for d in dims} == {1, 2}


def stacked_operands(func, args, kwargs):
    """(weight, input, orientation) for a product of stacked experts: torch._grouped_mm(x, W) and bmm(x, W) use W
    as x @ W ("in_out"), bmm(W, x) as W @ x ("out_in"); a convolution of a 3-D weight is "conv". Else None."""
    if func in _GROUPED_MM and len(args) >= 2:
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
        # id(view) -> (weak reference to the view, parameter name, whether the view swaps the weight's last dims,
        # the experts it holds: 1-D per leading index, 0-d for one expert's 2-D weight, None when unknown)
        self.views: dict[int, tuple] = {}

    def _view_of(self, t) -> tuple[str, bool, torch.Tensor | None] | None:
        entry = self.views.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1], entry[2], entry[3]
        return None

    def _stack(self, t) -> tuple[str, bool, torch.Tensor | None] | None:
        """(name, swapped, experts) for a tracked 3-D tensor or a view of one, else None."""
        if id(t) in self.by_id and t.dim() == 3:
            return self.by_id[id(t)], False, torch.arange(t.shape[0])
        return self._view_of(t)

    def _follow(self, func, args, kwargs, result) -> None:
        source = args[0] if args else None
        if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
            return
        found = self._stack(source)
        if found is None:
            return
        name, swapped, experts = found
        if _EXPERT_VIEWS[func] and not _is_last_two(func, args, kwargs):
            return
        if not _EXPERT_VIEWS[func]:
            experts = _gathered_experts(experts, args)
        self.views[id(result)] = (weakref.ref(result), name, swapped ^ _EXPERT_VIEWS[func], experts)

    def _report_stacked(self, func, args, kwargs) -> bool:
        found = stacked_operands(func, args, kwargs)
        if found is None:
            found = linear_operands(func, args, kwargs)
        if found is None:
            return False
        for weight, x, orientation in (found if isinstance(found[0], tuple) else (found,)):
            if not isinstance(weight, torch.Tensor) or not isinstance(x, torch.Tensor):
                continue
            view = self._stack(weight)
            if view is None:
                continue
            name, swapped, experts = view
            routed = _expert_rows(func, args, kwargs, weight, x.detach(), experts, orientation)
            if swapped and orientation != "conv":
                orientation = "out_in" if orientation == "in_out" else "in_out"
            if routed is None:
                self.on_call(name, LinearCall(x.detach().reshape(-1, x.shape[-1]), tuple(x.shape), orientation))
            else:
                self.on_call(name, LinearCall(routed[0], tuple(x.shape), orientation, routed[1]))
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
    transposes into F.linear, bmm, grouped_mm and 1-D convolutions ("conv"), and where the experts each product
    used can be told (an indexed expert, a gather by an id tensor, grouped_mm's offsets, bmm over the stack) the call
    carries each input row's expert."""
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
