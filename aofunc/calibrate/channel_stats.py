"""Per-input-channel statistics folded over calibration inputs: the state of SmoothQuant and Wanda."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from aofunc.formats.qtensor import canonical
from aofunc.spec import Rule


def zeros_per_input_channel(params: Mapping[str, torch.Tensor], rules: Mapping[str, Rule]) -> dict:
    """{name: fp32 zeros [K]} for each selected weight, K its input features."""
    return {name: torch.zeros(canonical(params[name], rule.transposed).shape[1], dtype=torch.float32,
                              device=params[name].device)
            for name, rule in rules.items()}


def fold_per_input_channel(stats: dict, captured: Mapping[str, list],
                           rows: Callable[[torch.Tensor], torch.Tensor],
                           combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
    """stats[name] = combine(stats[name], rows(x)) for every input x [tokens, K] captured for a selected weight."""
    stats = dict(stats)
    for name, xs in captured.items():
        if name in stats:
            for x in xs:
                stats[name] = combine(stats[name], rows(x.detach()))
    return stats
