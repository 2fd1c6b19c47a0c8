"""apply: run an unmodified model with a (quantized) params tree, refusing keys the model does not have."""
from __future__ import annotations

import difflib
from typing import Mapping

import torch

from aofunc.tree import check_params


def apply(model: torch.nn.Module, qparams: Mapping[str, torch.Tensor], *args, **kwargs):
    """model(*args, **kwargs) with its parameters and buffers replaced by `qparams`, through functional_call.

    Unlike plain functional_call, a key the model does not have is an error (a misspelt key would otherwise be
    silently ignored). Tied weights (one tensor under two names) take the one value given for either name.

    Example:
        >>> y = aofunc.apply(model, qparams, x)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply: model must be an nn.Module, got {type(model).__name__}")
    check_params(qparams, "qparams")
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    known |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    unknown = sorted(set(qparams) - known)
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                 else repr(key) for key in unknown]
        raise KeyError(f"apply: the model has no parameter or buffer named {', '.join(hints)}")
    return torch.func.functional_call(model, dict(qparams), args, kwargs, tie_weights=True, strict=False)
