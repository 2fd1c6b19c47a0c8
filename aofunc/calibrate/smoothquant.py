"""SmoothQuant: move activation outliers into the weights before W8A8, per input channel k:

    s_k = max|X_k|^α / max|W_:,k|^(1-α),   X' = X / s,   W' = W * s

The activation maxima are folded over the calibration batches (a "max" all-reduce in data-parallel calibration).
Linears reading one input share one s (their weights' column maxima taken together). s is folded into the
per-channel scale that made the input (a LayerNorm/RMSNorm weight, and a LayerNorm's bias) when the calls show one
feeds exactly those linears; otherwise it is carried in each Int8Dynamic weight as `act_scale`.

Stacked experts ([E, N, K]) are smoothed expert by expert, each with the maxima of the rows routed to it:
s_e = max|X_e|^α / max|W_e|^(1-α). No norm can absorb a per-expert scale (the norm feeds every expert and the
router), so the stack carries them as its `act_scale` [E, K]; an expert that received no token gets s_e = 1.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch

from aofunc.calibrate.batches import peek
from aofunc.calibrate.channel_stats import (
    fold_per_input_channel,
    zeros_per_input_channel,
)
from aofunc.calibrate.fold import Calibration, check_model_uses, fold, no_linear_call, run_batch
from aofunc.calibrate.input_groups import InputGroup, recording_inputs
from aofunc.calibrate.selection import from_canonical, recording_usage, select
from aofunc.formats import Int8Dynamic, QTensor
from aofunc.formats.qtensor import canonical
from aofunc.quantize import quantize_weight
from aofunc.progress import show_progress
from aofunc.spec import Rule, Spec
from aofunc.tree import check_params, detached_aliases, share_tied


class SmoothQuantState(NamedTuple):
    """Per selected weight, the running max over calibration inputs of |x_k| per input channel (fp32 [K])."""

    absmax: dict


def smoothquant_calibration(rules: Mapping[str, Rule]) -> Calibration:
    r"""SmoothQuant's fold: per selected weight, the running max of |x| per input channel; `finalize` returns the
    state itself (`smoothquant` turns it into smoothing vectors and quantized weights).

    Example:
        >>> model, x = torch.nn.Sequential(torch.nn.Linear(64, 32)), torch.randn(8, 64)
        >>> rules = {"0.weight": aofunc.Rule(r"0\.weight", aofunc.Int8Dynamic())}
        >>> state = aofunc.fold(aofunc.smoothquant_calibration(rules), dict(model.named_parameters()),
        ...                     [x, 2 * x], model=model, progress=False)
        >>> torch.equal(state.absmax["0.weight"], (2 * x).abs().amax(dim=0))
        True
    """
    def init(params):
        return SmoothQuantState(zeros_per_input_channel(params, rules))

    def update(state, captured):
        return SmoothQuantState(fold_per_input_channel(state.absmax, captured, lambda x: x.abs().amax(dim=0).float(),
                                                       torch.maximum))

    return Calibration(init, update, lambda state, params: state, reduce={"absmax": "max"})


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act_absmax^α / weight_absmax^(1-α) per channel, clamped at 1e-5; 1 where either maximum is 0 (a channel
    that never carries signal is left alone)."""
    s = act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)
    s = s.clamp(min=1e-5)
    return torch.where((act_absmax > 0) & (weight_absmax > 0), s, torch.ones_like(s))


def group_scales(params: Mapping[str, torch.Tensor], rules: Mapping[str, Rule], groups: list[InputGroup],
                 absmax: Mapping[str, torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """One smoothing vector per group, rounded to the dtype of its weights so that x / s and W * s match."""
    scales = []
    for group in groups:
        act = torch.stack([absmax[name] for name in group.linears]).amax(dim=0)
        weights = [canonical(params[name].detach(), rules[name].transposed).float() for name in group.linears]
        w_absmax = torch.cat(weights).abs().amax(dim=0)
        dtype = params[group.linears[0]].dtype
        scales.append(smoothing_scale(act, w_absmax, alpha).to(dtype).float())
    return scales


def expert_scales(w: torch.Tensor, act_absmax: torch.Tensor, transposed: bool, alpha: float) -> torch.Tensor:
    """Per expert e of a stack, s_e = act_absmax[e]^α / amax|W_e|^(1-α) per input channel ([E, K] fp32, rounded to
    the weight's dtype); 1 for an expert that received no token (its act_absmax is 0)."""
    w_absmax = torch.stack([canonical(expert.detach(), transposed).float().abs().amax(dim=0) for expert in w.unbind(0)])
    return smoothing_scale(act_absmax, w_absmax, alpha).to(w.dtype).float()


def smoothed_experts(w: torch.Tensor, s: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The stack with each expert's weight multiplied by its own s_e per input channel, in w's layout and dtype."""
    return torch.stack([from_canonical(canonical(expert.detach(), transposed).float() * s_e, expert, transposed)
                        for expert, s_e in zip(w.unbind(0), s.unbind(0))])


def smoothed(params: Mapping[str, torch.Tensor], rules: Mapping[str, Rule], groups: list[InputGroup],
             scales: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(float params with each folded group's scaler divided by s and its weights multiplied by s, {name: s} for the
    weights whose s is carried instead). The folded params compute the same function as `params`."""
    out = dict(params)
    carried = {}
    for group, s in zip(groups, scales):
        for name in group.linears:
            w = params[name].detach()
            out[name] = from_canonical(canonical(w, rules[name].transposed).float() * s, w, rules[name].transposed)
            if group.scaler is None:
                carried[name] = s
        if group.scaler is not None:
            for scale_name in (group.scaler.weight, group.scaler.bias):
                if scale_name is not None:
                    t = params[scale_name].detach()
                    out[scale_name] = (t.float() / s).to(t.dtype)
    return out, carried


def smoothquant(params: Mapping[str, torch.Tensor], batches: Any, *, model, alpha: float = 0.5,
                spec: Spec | None = None, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """SmoothQuant W8A8: new params with smoothed Int8Dynamic weights, and the smoothing folded into the preceding
    LayerNorm/RMSNorm where one feeds the linears directly (those norm tensors are replaced by new ones); `params`
    is left untouched.

    `model` is an nn.Module (run unmodified through functional_call) or a function f(params, batch); `batches` is
    any iterable of batches, read once. The spec picks Int8Dynamic weights (default: every 2-D weight used in a
    linear-like call, embeddings excluded, and every stack of experts the model uses). Per input channel s = amax|X|^alpha / amax|W|^(1 - alpha); linears reading
    the same input share one s. Where no norm can absorb 1/s, the weight carries it as its `act_scale` tensor and
    the layer divides its input by it when it runs. Stacked experts (3-D weights) are smoothed per expert with the
statistics of the rows routed to each, and always carry their s as an `act_scale` [E, K] (1 for an expert that
received no token).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
        >>> batches = [torch.randn(16, 64) * torch.linspace(1, 40, 64) for _ in range(4)]
        >>> qparams = aofunc.smoothquant(dict(model.named_parameters()), batches, model=model, progress=False)
        >>> qparams["1.weight"].scheme, "act_scale" in qparams["1.weight"].tensors
        (Int8Dynamic(), False)
    """
    params = check_params(params)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"smoothquant: alpha must be a number in [0, 1], got {alpha!r}")
    show_progress(progress, True, "smoothquant")  # refuses anything but True, False or None before any work
    check_model_uses(model, params, "smoothquant")
    first, stream = peek(batches, "smoothquant")
    with torch.no_grad(), recording_usage(params) as usage, recording_inputs(params) as groups_of:
        run_batch(model, params, first, 0, "smoothquant")
    if not usage.transposed:
        raise no_linear_call("smoothquant")
    rules = select(params, spec, Int8Dynamic(), usage, "smoothquant", (Int8Dynamic,))
    stacks = [name for name in rules if params[name].dim() == 3]
    groups = groups_of([name for name in rules if name not in stacks])
    state = fold(smoothquant_calibration(rules), params, stream, model=model, names=list(rules), progress=progress,
                 desc="smoothquant")
    scales = group_scales(params, rules, groups, state.absmax, alpha)
    smooth, carried = smoothed(params, rules, groups, scales)
    for name in stacks:  # per expert, always carried: no norm can absorb a scale that differs between experts
        carried[name] = expert_scales(params[name], state.absmax[name], rules[name].transposed, alpha)
        smooth[name] = smoothed_experts(params[name], carried[name], rules[name].transposed)
    written = [name for name in smooth if smooth[name] is not params[name]]
    out = detached_aliases(smooth)
    for name, rule in rules.items():
        q = quantize_weight(smooth[name], rule.scheme, rule.transposed)
        if name in carried:
            q = QTensor(q.scheme, {**q.tensors, "act_scale": carried[name].to(q.dtype)}, q.shape, q.dtype,
                        q.transposed)
        out[name] = q
    return share_tied(out, params, written)
