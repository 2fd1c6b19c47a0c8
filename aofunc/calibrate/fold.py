"""The calibration fold: run the model over batches under the capture mode and fold what each linear saw into a state.

    state = init(params); for batch: state = update(state, captured(batch)); all-reduce; finalize(state, params)

Statistics are sums and maxima in fp32 whose size does not depend on the number of batches, so data-parallel
calibration is an all-reduce of the state (each leaf with its own reduction) before `finalize`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from aofunc.capture import ExpertRows, linear_calls, run_model
from aofunc.progress import show_progress
from aofunc.tree import check_params, check_tied_values

Params = Mapping[str, torch.Tensor]
Captured = dict  # {param name: [input of each linear-like call in one batch, as [tokens, K] or ExpertRows]}

REDUCTIONS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def no_linear_call(what: str) -> ValueError:
    """The error for a first batch on which the model used none of the given params in a linear-like call."""
    return ValueError(f"{what}: the model's forward made no linear-like call (F.linear, matmul, addmm, 1x1 conv2d) "
                      "with any of the given params on batch 0; pass the very tensors the model should use, under "
                      "the names it gives them")


class Calibration(NamedTuple):
    """A calibrated transform in the optax shape: pure functions over a small state.

    `init(params) -> state`, `update(state, captured) -> state` once per batch, `finalize(state, params) -> params`.
    The state is a tree (dicts, tuples, NamedTuples) of tensors. `reduce` names, per state path, the all-reduce
    used in data-parallel calibration: "sum" (the default) or "max". A path is the leaf's keys and field names
    joined by "."; a key covers every leaf at or below it, the longest matching key wins.

    Example:
        >>> absmax = aofunc.Calibration(
        ...     init=lambda params: torch.zeros(4),
        ...     update=lambda state, seen: torch.maximum(state, torch.cat(seen["weight"]).abs().amax(dim=0)),
        ...     finalize=lambda state, params: state,
        ...     reduce={"": "max"})
        >>> fc = torch.nn.Linear(4, 2)
        >>> batches = [torch.tensor([[1., -5., 2., 0.]]), torch.tensor([[-3., 1., 0., 4.]])]
        >>> aofunc.fold(absmax, dict(fc.named_parameters()), batches, model=fc, progress=False)
        tensor([3., 5., 2., 4.])
    """

    init: Callable[[Params], Any]
    update: Callable[[Any, Captured], Any]
    finalize: Callable[[Any, Params], Any]
    reduce: Mapping[str, str] = {}


def check_reduce(reduce: Mapping[str, str]) -> None:
    if not isinstance(reduce, Mapping):
        raise TypeError(f"Calibration.reduce must be a mapping {{state path: 'sum' | 'max'}}, got {reduce!r}")
    for path, op in reduce.items():
        if not isinstance(path, str) or op not in REDUCTIONS:
            raise ValueError(f"Calibration.reduce[{path!r}] must be one of {sorted(REDUCTIONS)}, got {op!r}")


def leaves_with_paths(state: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """[(path, leaf)] of a state tree; paths join mapping keys, NamedTuple fields and sequence indices with '.'."""
    def join(key) -> str:
        return f"{prefix}.{key}" if prefix else str(key)

    if isinstance(state, Mapping):
        return [item for key, value in state.items() for item in leaves_with_paths(value, join(key))]
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return [item for key, value in zip(state._fields, state) for item in leaves_with_paths(value, join(key))]
    if isinstance(state, (tuple, list)):
        return [item for i, value in enumerate(state) for item in leaves_with_paths(value, join(i))]
    return [(prefix, state)]


def reduction_for(path: str, reduce: Mapping[str, str]) -> str:
    """The reduction of the longest key of `reduce` equal to `path` or a '.'-prefix of it; "sum" when none."""
    best, op = -1, "sum"
    for key, key_op in reduce.items():
        if (path == key or path.startswith(key + ".")) and len(key) > best:
            best, op = len(key), key_op
    return op


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_state(state: Any, reduce: Mapping[str, str]) -> Any:
    """Each tensor leaf of the state all-reduced across ranks in place with its own reduction; returns the state."""
    for path, leaf in leaves_with_paths(state):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"fold: data-parallel calibration all-reduces every state leaf, but {path!r} is a "
                            f"{type(leaf).__name__}; keep the state's leaves tensors")
        dist.all_reduce(leaf, op=REDUCTIONS[reduction_for(path, reduce)])
    return state


def check_model_uses(model, params: Params, what: str) -> None:
    """An nn.Module must own at least one of the given names (functional_call silently ignores unknown keys), and
    names it ties must not be given different tensors."""
    if isinstance(model, torch.nn.Module):
        check_tied_values(model, params, what)
        own = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        own |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
        if not own & set(params):
            raise ValueError(f"{what}: the model's forward does not use the given params: none of their names "
                             f"(e.g. {next(iter(params), None)!r}) is a parameter of the model "
                             f"(e.g. {next(iter(own), None)!r})")
    elif not callable(model):
        raise TypeError(f"{what}: model must be an nn.Module or a function f(params, batch), "
                        f"got {type(model).__name__}")


def run_batch(model, params: Params, batch: Any, index: int, what: str):
    """model on one batch; an exception from the model is re-raised naming the batch."""
    try:
        return run_model(model, params, batch)
    except Exception as e:
        raise ValueError(f"{what}: the model failed on batch {index} ({type(e).__name__}: {e}); "
                         "a batch is what the forward takes: a tensor, a tuple of args, or a dict of kwargs") from e


def check_finite_inputs(captured: Captured, index: int, what: str) -> None:
    """Refuses calibration inputs holding NaN or Inf, naming the first parameter (in call order) whose input shows
    them and the batch: a statistic folded over them would be non-finite, or silently wrong where NaN compares
    false. One check (one device synchronization) per batch."""
    seen = [(name, x.x if isinstance(x, ExpertRows) else x) for name, xs in captured.items() for x in xs]
    if not seen:
        return
    finite = torch.stack([torch.isfinite(x).all() for _, x in seen])
    if bool(finite.all()):
        return
    name, x = seen[int((~finite).nonzero()[0, 0])]
    kinds = " and ".join(kind for kind, present in (("NaN", bool(x.isnan().any())), ("Inf", bool(x.isinf().any())))
                         if present)
    raise ValueError(f"{what}: the calibration input of {name!r} on batch {index} holds {kinds}; statistics folded "
                     "over it would be meaningless. Give finite batches (check that batch, and that the model's "
                     "layers before this weight do not overflow in its dtype)")


def capture_batch(model, params: Params, batch: Any, index: int, names: Iterable[str]) -> Captured:
    """{name: [inputs of its linear-like calls]} for one batch: [tokens, K] tensors for a 2-D weight, `ExpertRows`
    for a stacked-experts weight (3-D) whose calls tell each row's expert; a 3-D weight's calls that do not (a
    convolution, a product the capture cannot route) are left out."""
    captured: Captured = {}

    def on_call(name, call):
        if call.expert is not None:
            captured.setdefault(name, []).append(ExpertRows(call.x, call.expert))
        elif params[name].dim() != 3:
            captured.setdefault(name, []).append(call.x)

    with torch.no_grad(), linear_calls(params, on_call, names, stacked=True):
        run_batch(model, params, batch, index, "fold")
    return captured


def fold(calibration: Calibration, params: Params, batches: Iterable, *, model, names: Iterable[str] | None = None,
         progress: bool | None = None, desc: str = "calibrate"):
    """finalize(all_reduce(update(... update(init(params), captured(batch_0)) ...)), params).

    Runs `model` (an nn.Module through functional_call, or f(params, batch)) on every batch under the capture mode;
    `update` gets {param name: [inputs of its linear-like calls in this batch]} for the params in `names` (default:
    all): each a [tokens, K] tensor, or for stacked experts (a 3-D weight [E, ., .]) an `aofunc.ExpertRows` (the
    rows and the expert each went through, followed through grouped_mm's offsets, indexed experts and bmm). When torch.distributed is initialized, every rank folds its own batches and the state is all-reduced
    before `finalize`, so every rank returns the same result. `batches` may be any iterable; it is read once.
    `progress` shows a bar labelled `desc`, and errors name `desc`. An input holding NaN or Inf is refused with a
    ValueError naming the parameter it feeds and the batch (counted from 0) where it first appears.

    Example:
        >>> count = aofunc.Calibration(init=lambda params: torch.zeros(()),
        ...                            update=lambda state, seen: state + sum(len(x) for x in seen["weight"]),
        ...                            finalize=lambda state, params: int(state))
        >>> fc = torch.nn.Linear(4, 2)
        >>> aofunc.fold(count, dict(fc.named_parameters()), [torch.randn(3, 4), torch.randn(2, 5, 4)], model=fc,
        ...             progress=False)
        13
    """
    params = check_params(params)
    if not isinstance(calibration, Calibration):
        raise TypeError(f"fold: calibration must be an aofunc.Calibration, got {type(calibration).__name__}")
    check_reduce(calibration.reduce)
    check_model_uses(model, params, "fold")
    wanted = list(params) if names is None else list(names)
    unknown = [name for name in wanted if name not in params]
    if unknown:
        raise KeyError(f"fold: names not in params: {unknown[:5]}")
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"fold: batches must be an iterable of batches, got {type(batches).__name__}") from None

    state = calibration.init(params)
    seen_batches = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = show_progress(progress, True, desc)
    for index, batch in enumerate(tqdm(iterator, desc=desc, total=total, disable=not bar, unit="batch")):
        captured = capture_batch(model, params, batch, index, wanted)
        if index == 0 and not captured:
            raise no_linear_call("fold")
        check_finite_inputs(captured, index, desc)
        state = calibration.update(state, captured)
        seen_batches += 1
    if seen_batches == 0:
        raise ValueError("fold: batches is empty; calibration needs at least one batch")
    if is_distributed():
        state = all_reduce_state(state, calibration.reduce)
    return calibration.finalize(state, params)
