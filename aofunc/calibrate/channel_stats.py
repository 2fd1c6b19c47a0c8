"""Per-input-channel statistics folded over calibration inputs: the state of SmoothQuant and Wanda."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from aofunc.capture import ExpertRows
from aofunc.formats.qtensor import canonical_shape
from aofunc.spec import Rule


def zeros_per_input_channel(params: Mapping[str, torch.Tensor], rules: Mapping[str, Rule]) -> dict:
    """{name: fp32 zeros [K]} for each selected weight, K its input features; [E, K] for stacked experts."""
    def shape(w, transposed):
        k = canonical_shape(tuple(w.shape), transposed)[1]
        return (w.shape[0], k) if w.dim() == 3 else (k,)

    return {name: torch.zeros(shape(params[name], rule.transposed), dtype=torch.float32, device=params[name].device)
            for name, rule in rules.items()}


def fold_per_input_channel(stats: dict, captured: Mapping[str, list],
                           rows: Callable[[torch.Tensor], torch.Tensor],
                           combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
    """stats[name] = combine(stats[name], rows(x)) for every input x [tokens, K] captured for a selected weight; for
    stacked experts (`ExpertRows`), stats[name][e] = combine(stats[name][e], rows(rows routed to expert e))."""
    stats = dict(stats)
    for name, xs in captured.items():
        if name in stats:
            for x in xs:
                if isinstance(x, ExpertRows):
                    stats[name] = _per_expert(stats[name], x, rows, combine)
                else:
                    stats[name] = combine(stats[name], rows(x.detach()))
    return stats


def _per_expert(stat: torch.Tensor, x: ExpertRows, rows, combine) -> torch.Tensor:
    counts = torch.bincount(x.expert, minlength=stat.shape[0])[:stat.shape[0]]
    present = counts.nonzero().flatten().tolist()
    if not present:
        return stat
    stat = stat.clone()
    for e in present:
        stat[e] = combine(stat[e], rows(x.of(e).detach()))
    return stat
