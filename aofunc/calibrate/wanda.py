"""Wanda: prune by weight times input norm, importance_nk = |W_nk| · ‖X_k‖ with ‖X_k‖² = Σ x_k² over the
calibration inputs (a sum in fp32, all-reduced in data-parallel calibration).

Stacked experts ([E, N, K]) are pruned expert by expert with the norms of the rows routed to each,
|W_e| · ‖X_e‖. An expert that received no token (‖X_e‖ = 0, which would rank every weight equal) is pruned by
magnitude |W_e| alone, with a warning naming it and the weight."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, NamedTuple

import torch

from aofunc.calibrate.batches import peek
from aofunc.calibrate.channel_stats import (
    fold_per_input_channel,
    zeros_per_input_channel,
)
from aofunc.calibrate.fold import Calibration, check_model_uses, fold
from aofunc.calibrate.selection import first_use, select
from aofunc.calibrate.sparse import Sparse, check_prunable, magnitude_pruned, pruned_weight
from aofunc.formats.qtensor import canonical, canonical_shape
from aofunc.progress import show_progress
from aofunc.spec import Rule, Spec
from aofunc.tree import check_params, detached_aliases, share_tied


class WandaState(NamedTuple):
    """Per selected weight, Σ x_k² over every calibration input row, per input channel (fp32 [K]); for stacked
    experts per expert over the rows routed to it (fp32 [E, K])."""

    sq_sum: dict


def wanda_calibration(rules: Mapping[str, Rule]) -> Calibration:
    """Wanda's fold: per selected weight, Σ x_k² over every input row, per input channel (per expert for stacked
    experts); `finalize` prunes each weight (each expert) by |W| · ‖X_k‖ as its rule's `Sparse` scheme says and
    returns the new params."""
    def init(params):
        return WandaState(zeros_per_input_channel(params, rules))

    def update(state, captured):
        return WandaState(fold_per_input_channel(state.sq_sum, captured, lambda x: x.float().square().sum(dim=0),
                                                 torch.add))

    def finalize(state, params):
        out = detached_aliases(params)
        for name, rule in rules.items():
            w = params[name]
            if w.dim() == 3:  # stacked experts: each expert by the norms of the rows routed to it
                out[name] = _pruned_experts(name, w, state.sq_sum[name], rule)
            else:
                out[name] = _pruned(w, state.sq_sum[name], rule)
        return out

    return Calibration(init, update, finalize)


def _pruned_experts(name: str, w: torch.Tensor, sq_sum: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Each expert by |W_e| · ‖X_e‖; an expert with no token (all its sums 0) by |W_e| alone, with a warning."""
    empty = (sq_sum == 0).all(dim=-1).nonzero().flatten().tolist()
    if empty:
        warnings.warn(f"wanda: expert(s) {empty[:16]} of {name!r} received no calibration token; pruned by "
                      "magnitude |W| alone", stacklevel=4)
    return torch.stack([magnitude_pruned(w[e], rule) if e in empty else _pruned(w[e], sq_sum[e], rule)
                        for e in range(w.shape[0])])


def _pruned(w: torch.Tensor, sq_sum: torch.Tensor, rule: Rule) -> torch.Tensor:
    importance = canonical(w.detach(), rule.transposed).float().abs() * sq_sum.sqrt()
    return pruned_weight(w, importance, rule.scheme, rule.transposed)


def wanda(params: Mapping[str, torch.Tensor], batches: Any, *, model, spec: Spec | None = None,
          sparsity: float | None = None, pattern: str | None = None, per: str = "row",
          progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Wanda pruning: new params whose selected weights have their least important entries (|W| · ‖X_k‖) set to
    zero, still dense; `params` is left untouched.

    `model` is an nn.Module (run unmodified through functional_call) or a function f(params, batch); `batches` is
    any iterable of batches, read once. Without a spec, `Sparse(sparsity, pattern, per)` applies to every 2-D
    weight used in a linear-like call (embeddings excluded) and every stack of experts the model uses; sparsity
    defaults to 0.5, or 1 - N/M for an "N:M" pattern. Stacked experts (3-D [E, N, K]) are pruned expert by expert,
    each by |W_e| · ‖X_e‖ over the rows routed to it (by |W_e| alone, with a warning, if it received none), and the
    result is a plain float stack.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        >>> batches = [torch.randn(16, 64) for _ in range(4)]
        >>> pruned = aofunc.wanda(dict(model.named_parameters()), batches, model=model, pattern="2:4", progress=False)
        >>> float((pruned["0.weight"] == 0).float().mean())
        0.5
    """
    params = check_params(params)
    if spec is not None and (sparsity is not None or pattern is not None or per != "row"):
        raise ValueError("wanda: give either spec= or sparsity/pattern/per (which build the default spec), not both")
    show_progress(progress, True, "wanda")  # refuses anything but True, False or None before any work
    default = Sparse(sparsity, pattern, per)
    check_model_uses(model, params, "wanda")
    first, stream = peek(batches, "wanda")
    usage = first_use(model, params, first, "wanda")
    rules = select(params, spec, default, usage, "wanda", (Sparse,))
    for name, rule in rules.items():
        check_prunable(name, canonical_shape(tuple(params[name].shape), rule.transposed)[1], rule.scheme, "wanda")
    pruned = fold(wanda_calibration(rules), params, stream, model=model, names=list(rules), progress=progress,
                  desc="wanda")
    return share_tied(pruned, params, rules)
