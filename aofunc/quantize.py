"""quantize and dequantize: round-to-nearest quantization as a pure function over a params tree."""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from aofunc.capture import detect_uses
from aofunc.formats import QTensor, Scheme
from aofunc.formats.qtensor import canonical, stacked_tensors
from aofunc.progress import show_progress
from aofunc.spec import Rule, Spec, SpecWarning
from aofunc.tree import check_params, detached_aliases, share_tied, unique_by_tensor

#: quantizing more elements than this shows a progress bar unless asked otherwise
PROGRESS_NUMEL = 1 << 27


#: the weight dtypes the stored formats take (their scales and kernels are defined for these)
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: pruning keeps a weight's dtype and stores nothing, so it takes float64 as well
PRUNABLE_DTYPES = QUANTIZABLE_DTYPES + (torch.float64,)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


def check_weight(name: str, w: torch.Tensor, scheme: Scheme | None = None, what: str = "quantize") -> None:
    """The errors for a weight selected for quantization (or, with a Sparse scheme, for pruning);
    `what` names the transform in the message."""
    stored = scheme is None or scheme.is_stored_format
    verb = "quantize" if stored else "prune"
    if isinstance(w, QTensor):
        raise TypeError(f"{what}: {name!r} is already quantized ({w.scheme})")
    if not w.is_floating_point():
        raise TypeError(f"{what}: {name!r} is selected to {verb} but is not floating point ({w.dtype})")
    allowed = QUANTIZABLE_DTYPES if stored else PRUNABLE_DTYPES
    if w.dtype not in allowed:
        raise TypeError(f"{what}: {name!r} is {str(w.dtype).removeprefix('torch.')}, but {verb} takes "
                        f"{_dtype_names(allowed)} weights; cast it (e.g. to float32) or leave it out of the spec")
    if w.numel() == 0:
        raise ValueError(f"{what}: {name!r} is selected to {verb} but is empty (shape {tuple(w.shape)})")
    if not w.is_meta and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: {name!r} has non-finite values (NaN or Inf); refusing to {verb} it")


def quantize_weight(w: torch.Tensor, scheme: Scheme, transposed: bool = False, name: str | None = None) -> QTensor:
    """One weight to a QTensor; w keeps its logical shape ([N, K], [K, N] if transposed, [N, K, 1, 1]; stacked
    experts [E, N, K] or [E, K, N]: each expert quantized alone, its stored tensors stacked along a leading E).

    A weight on the meta device gives a meta QTensor: the stored tensors' shapes and dtypes without memory (what
    `size_in_bytes` needs to size a model before loading it). `name` (the parameter's) is kept for messages."""
    w = w.detach()
    nk = canonical(w, transposed)
    lead = tuple(nk.shape[:-2])  # (E,) for stacked experts
    if w.is_meta:
        n, k = nk.shape[-2:]
        tensors = {key: torch.empty(lead + tuple(shape), dtype=dtype, device="meta")
                   for key, (shape, dtype) in scheme.stored(n, k, w.dtype).items()
                   if key not in scheme.optional_names}
    elif lead:
        tensors = stacked_tensors([scheme.quantize(expert.contiguous()) for expert in nk.unbind(0)])
    else:
        tensors = scheme.quantize(nk.contiguous())
    return QTensor(scheme, tensors, w.shape, w.dtype, transposed, name)


def plan(params: Mapping[str, torch.Tensor], spec: Spec, *, model=None, example=None,
         what: str = "quantize") -> dict[str, Rule]:
    """{name: rule (transposed resolved)} of the weights to quantize; checks them (errors name `what`) and reports
    what it skips."""
    params = check_params(params)
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be an aofunc.Spec, got {type(spec).__name__}")
    if (model is None) != (example is None):
        raise ValueError("quantize: give model= and example= together (one batch, to see how the model uses "
                         "each weight), or neither")
    spec.check(params)
    chosen = spec.selected(params)
    for name, rule in chosen.items():
        check_weight(name, params[name], rule.scheme, what)
    if model is not None:
        # the calls name one of a tied weight's names; the orientation holds for all of them
        uses = detect_uses(model, params, example, names=chosen)
        used_as_in_out = {id(params[name]) for name, found in uses.items() if "in_out" in found}
        convs = {id(params[name]) for name, found in uses.items() if "conv" in found}
        if convs:
            dropped = [name for name in chosen if id(params[name]) in convs]
            message = (f"aofunc spec: {', '.join(map(repr, dropped))}: the model uses these 3-D weights in a "
                       "convolution, and schemes take 3-D weights as stacked experts only; kept in full precision")
            if spec.strict:
                raise ValueError(message)
            warnings.warn(message, SpecWarning, stacklevel=3)
            chosen = {name: rule for name, rule in chosen.items() if id(params[name]) not in convs}
        chosen = {name: Rule(rule.pattern, rule.scheme, rule.transposed or id(params[name]) in used_as_in_out)
                  for name, rule in chosen.items()}
    for name, rule in chosen.items():
        if rule.transposed and params[name].dim() not in (2, 3):
            raise ValueError(f"quantize: {name!r} is marked transposed but is {params[name].dim()}-D")
    return chosen


def quantize(params: Mapping[str, torch.Tensor], spec: Spec, *, model=None, example: Any = None,
             progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Round-to-nearest: a new params dict whose selected weights are QTensors; `params` is left untouched.

    The spec's first matching rule picks each weight's scheme. A weight stored [in, out] is quantized along its
    input dimension when its rule says `transposed=True`, or when running `model` once on `example` shows it used
    as x @ W. Names holding one tensor (tied weights) get one QTensor object. Every other entry comes back as a
    detached alias of the given tensor (same storage and requires_grad, never the module's own nn.Parameter, one
    alias per tensor). `progress`: a bar (True), none (False), or a bar for large trees when stderr is a terminal (None).

    A selected weight must be a finite fp32, fp16 or bf16 tensor (anything else is refused naming it). Weights on
    the meta device give meta QTensors, with the stored tensors' shapes and dtypes but no memory, so
    `aofunc.size_in_bytes` sizes a quantized model before any weight is loaded.

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
    once = unique_by_tensor(params, chosen)
    progress = show_progress(progress, sum(params[name].numel() for name in once) > PROGRESS_NUMEL, "quantize")
    out = detached_aliases(params)
    for name in tqdm(once, desc="quantize", disable=not progress, unit="weight"):
        rule = chosen[name]
        out[name] = quantize_weight(params[name], rule.scheme, rule.transposed, name)
    return share_tied(out, params, once)


def dequantize(qparams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new params dict with every QTensor replaced by its float weight in its logical shape and dtype (names
    holding one QTensor get one float tensor); other entries come back as detached aliases, as from `quantize`."""
    check_params(qparams, "qparams")
    out = detached_aliases(qparams)
    once = unique_by_tensor(qparams, [name for name, t in qparams.items() if isinstance(t, QTensor)])
    for name in once:
        out[name] = qparams[name].dequantize()
    return share_tied(out, qparams, once)
