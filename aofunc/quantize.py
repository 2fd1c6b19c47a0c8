"""quantize and dequantize: round-to-nearest quantization as a pure function over a params tree."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from aofunc.capture import detect_transposed
from aofunc.formats import QTensor, Scheme
from aofunc.formats.qtensor import canonical
from aofunc.spec import Rule, Spec
from aofunc.tree import check_params

#: quantizing more elements than this shows a progress bar unless asked otherwise
PROGRESS_NUMEL = 1 << 27


def check_weight(name: str, w: torch.Tensor) -> None:
    """The errors DESIGN.md lists for a weight selected for quantization."""
    if not w.is_floating_point():
        raise TypeError(f"quantize: {name!r} is selected for quantization but is not floating point ({w.dtype})")
    if w.numel() == 0:
        raise ValueError(f"quantize: {name!r} is selected for quantization but is empty (shape {tuple(w.shape)})")
    if isinstance(w, QTensor):
        raise TypeError(f"quantize: {name!r} is already quantized ({w.scheme})")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"quantize: {name!r} has non-finite values (NaN or Inf); refusing to quantize it")


def quantize_weight(w: torch.Tensor, scheme: Scheme, transposed: bool = False) -> QTensor:
    """One weight to a QTensor; w keeps its logical shape ([N, K], [K, N] if transposed, [N, K, 1, 1])."""
    w = w.detach()
    return QTensor(scheme, scheme.quantize(canonical(w, transposed).contiguous()), w.shape, w.dtype, transposed)


def plan(params: Mapping[str, torch.Tensor], spec: Spec, *, model=None, example=None) -> dict[str, Rule]:
    """{name: rule (transposed resolved)} of the weights to quantize; checks them and reports what it skips."""
    params = check_params(params)
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be an aofunc.Spec, got {type(spec).__name__}")
    if (model is None) != (example is None):
        raise ValueError("quantize: give model= and example= together (one batch, to see how the model uses "
                         "each weight), or neither")
    spec.check(params)
    chosen = spec.selected(params)
    for name, rule in chosen.items():
        check_weight(name, params[name])
    if model is not None:
        used_as_in_out = detect_transposed(model, params, example, names=chosen)
        chosen = {name: Rule(rule.pattern, rule.scheme, rule.transposed or used_as_in_out.get(name, False))
                  for name, rule in chosen.items()}
    for name, rule in chosen.items():
        if rule.transposed and params[name].dim() != 2:
            raise ValueError(f"quantize: {name!r} is marked transposed but is {params[name].dim()}-D")
    return chosen


def quantize(params: Mapping[str, torch.Tensor], spec: Spec, *, model=None, example: Any = None,
             progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Round-to-nearest: a new params dict whose selected weights are QTensors; `params` is left untouched.

    The spec's first matching rule picks each weight's scheme. A weight stored [in, out] is quantized along its
    input dimension when its rule says `transposed=True`, or when running `model` once on `example` shows it used
    as x @ W. `progress` shows a bar (default: only for large trees).

    Example:
        >>> params = dict(model.named_parameters())
        >>> qparams = aofunc.quantize(params, aofunc.Spec([aofunc.Rule(r".*\\.weight", aofunc.Int8WeightOnly())]))
        >>> y = torch.func.functional_call(model, qparams, (x,))
    """
    for rule in getattr(spec, "rules", ()):
        if rule.scheme is not None and not rule.scheme.is_stored_format:
            raise TypeError(f"quantize: rule {rule.pattern!r} has {rule.scheme}, which is not a stored format; "
                            "apply it with its own transform (aofunc.prune or aofunc.wanda for Sparse)")
    chosen = plan(params, spec, model=model, example=example)
    if progress is None:
        progress = sum(params[name].numel() for name in chosen) > PROGRESS_NUMEL
    out = dict(params)
    for name in tqdm(list(chosen), desc="quantize", disable=not progress, unit="weight"):
        rule = chosen[name]
        out[name] = quantize_weight(params[name], rule.scheme, rule.transposed)
    return out


def dequantize(qparams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new params dict with every QTensor replaced by its float weight in its logical shape and dtype."""
    check_params(qparams, "qparams")
    return {name: t.dequantize() if isinstance(t, QTensor) else t for name, t in qparams.items()}
