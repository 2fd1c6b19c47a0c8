"""Which weights a calibrated transform takes: the spec's choice, or by default every 2-D weight the model uses in a
linear-like call (embeddings excluded) and every stack of experts it uses in one, with the orientation the model
uses it in."""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from aofunc.calibrate.fold import no_linear_call, run_batch
from aofunc.capture import linear_calls
from aofunc.formats import Scheme
from aofunc.quantize import plan
from aofunc.spec import Rule, Spec, SpecWarning, is_conv_name


def input_key(x: torch.Tensor) -> tuple:
    """Identifies the memory a call read (q, k and v reading one activation share it); only meaningful while
    the tensors compared are alive, since freed memory is reused."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


@dataclasses.dataclass
class Usage:
    """How one run of the model used its params: linear-like calls in execution order, and embedding lookups."""

    order: list[str] = dataclasses.field(default_factory=list)        # names, by their first linear call
    transposed: dict[str, bool] = dataclasses.field(default_factory=dict)
    first_input: dict[str, int] = dataclasses.field(default_factory=dict)  # calls in a row on one input share it
    contexts: dict[str, set] = dataclasses.field(default_factory=dict)  # where each name was called
    embedded: set[str] = dataclasses.field(default_factory=set)
    convolved: set[str] = dataclasses.field(default_factory=set)        # names some convolution used


class _EmbeddingRecorder(TorchFunctionMode):
    def __init__(self, by_id: dict[int, str], usage: Usage):
        super().__init__()
        self.by_id, self.usage = by_id, usage

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = None
        if func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
        elif func is torch.embedding:
            weight = args[0] if args else kwargs.get("weight")
        if weight is not None and id(weight) in self.by_id:
            self.usage.embedded.add(self.by_id[id(weight)])
        return func(*args, **kwargs)


@contextlib.contextmanager
def recording_usage(params: Mapping[str, torch.Tensor], context: Callable[[], Any] = lambda: None):
    """Within the block, the model's uses of `params` are recorded into the yielded Usage; `context()` tells
    where the model is when a call happens (e.g. which block)."""
    usage = Usage()
    # the previous call's input stays referenced, so a new input cannot reuse its memory and look the same
    previous = {"x": None, "input": -1}

    def on_call(name, call):
        if call.orientation == "conv":
            usage.convolved.add(name)
            return
        if previous["x"] is None or input_key(previous["x"]) != input_key(call.x):
            previous["input"] += 1
        previous["x"] = call.x
        if name not in usage.transposed:
            usage.order.append(name)
            usage.first_input[name] = previous["input"]
        usage.contexts.setdefault(name, set()).add(context())
        usage.transposed[name] = usage.transposed.get(name, False) or call.orientation == "in_out"

    by_id = {id(t): name for name, t in params.items()}
    with linear_calls(params, on_call, stacked=True), _EmbeddingRecorder(by_id, usage):
        yield usage


def default_spec(params: Mapping[str, torch.Tensor], usage: Usage, scheme: Scheme) -> Spec:
    """`scheme` on every 2-D weight used in a linear-like call and in no embedding lookup, and on every stack of
    experts (3-D) used in one, unless a convolution used it or it is named like a convolution's kernel. Routers
    (2-D [E, H]) are decided as every other 2-D weight is."""
    def taken(name):
        w = params[name]
        if w.dim() == 3:
            return name not in usage.convolved and not is_conv_name(name)
        return w.dim() == 2 and name not in usage.embedded

    names = [name for name in usage.order if taken(name)]
    return Spec([Rule(re.escape(name), scheme) for name in names])


def select(params: Mapping[str, torch.Tensor], spec: Spec | None, default: Scheme, usage: Usage, what: str,
           allowed: tuple[type, ...]) -> dict[str, Rule]:
    """{name: rule} the transform takes, in execution order, orientation resolved from the model's calls.

    Weights the spec selects but the model never uses in a linear-like call are left as given (SpecWarning);
    a spec that leaves nothing to do is an error. Of names holding one tensor (tied weights) only the one the
    model's calls name is returned; the transform shares its result with the others (`aofunc.tree.share_tied`).
    """
    if spec is None:
        spec = default_spec(params, usage, default)
    chosen = plan(params, spec, what=what)
    for name, rule in chosen.items():
        if not isinstance(rule.scheme, allowed):
            raise TypeError(f"{what}: {name!r} is selected with {rule.scheme}, but {what} takes "
                            f"{' or '.join(cls.__name__ for cls in allowed)} weights")
    used = {id(params[name]) for name in usage.transposed}
    unused = [name for name in chosen if id(params[name]) not in used]
    if unused:
        warnings.warn(f"{what}: the model never uses {unused[:5]} in a linear-like call on the first batch, so "
                      "there is nothing to calibrate them with; they are left as given", SpecWarning, stacklevel=3)
    ordered = [name for name in usage.order if name in chosen]
    if not ordered:
        raise ValueError(f"{what}: the spec selects no weight that the model uses in a linear-like call; "
                         "nothing to calibrate")
    return {name: Rule(chosen[name].pattern, chosen[name].scheme,
                       chosen[name].transposed or usage.transposed[name]) for name in ordered}


def from_canonical(w: torch.Tensor, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Back from [N, K] to the layout of `like`, as a new contiguous tensor of its dtype."""
    out = w.t() if transposed else w.reshape(like.shape)
    return out.to(like.dtype).contiguous()


def first_use(model, params: Mapping[str, torch.Tensor], batch: Any, what: str) -> Usage:
    """The Usage of one run of the model on `batch` (errors from the model name the batch)."""
    with torch.no_grad(), recording_usage(params) as usage:
        run_batch(model, params, batch, 0, what)
    if not usage.transposed:
        raise no_linear_call(what)
    return usage
