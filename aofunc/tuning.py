"""tune: search kernel configurations for the weights a params tree holds, on the card at hand."""
from __future__ import annotations

import sys
import warnings
from typing import Any, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from aofunc.formats import QTensor
from aofunc.kernels import autotune
from aofunc.ops import qlinear
from aofunc.tree import check_params

#: more launches than this show a progress bar by default (each search compiles and times many candidates)
PROGRESS_LAUNCHES = 4


def tune(qparams: Mapping[str, Any], *, ms: Iterable[int] = (1, 16, 64, 256), x_dtype: torch.dtype = torch.bfloat16,
         retune: bool = False, progress: bool | None = None) -> dict[str, int]:
    """Search the fastest correct kernel configuration for every quantized weight of ``qparams`` at each number of
    rows in ``ms``, on the CUDA card the weights are on; returns how many keys were searched, per format.

    A key is (kernel, rows of x rounded up to a power of two, N, K, dtypes, card): weights of one shape share it.
    Every candidate is checked against the kernel's plain-torch reference twin before it is timed; winners go to
    the user kernel cache (``$AOFUNC_KERNEL_CACHE``, else ``~/.cache/aofunc/kernels.json``), which later calls and
    processes read before the tables shipped for known cards. Keys already in the cache are checked against the
    twin and kept (searched again only when they fail, or with ``retune=True``). Without a CUDA device, or with no
    quantized weight on one, nothing is searched: ``{}`` with a warning. ``progress``: a bar (True), none (False),
    or a bar when the work is long and stderr is a terminal (None).

    Example (the weights must be on the GPU: on the CPU, torch's own kernels run and there is nothing to tune):
        >>> aofunc.tune(qparams)
        {}
        >>> aofunc.tune({name: t.to("cuda") for name, t in qparams.items()}, ms=(1, 16))  # doctest: +SKIP
        {'Int8WeightOnly': 2}
    """
    check_params(qparams, "qparams")
    ms = tuple(ms)
    if not ms or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms):
        raise ValueError(f"tune: ms must be a non-empty sequence of row counts >= 1, got {ms!r}")
    if not (isinstance(x_dtype, torch.dtype) and x_dtype.is_floating_point):
        raise TypeError(f"tune: x_dtype must be a floating point torch.dtype, got {x_dtype!r}")
    if not torch.cuda.is_available():
        warnings.warn("aofunc.tune: no CUDA device, so there is nothing to tune (the CPU runs torch's kernels)")
        return {}
    weights = {}  # one weight per (scheme, shape, device): the keys depend on nothing else
    for w in qparams.values():
        if isinstance(w, QTensor) and w.is_cuda and w.dim() == 2:
            weights.setdefault((w.scheme, w.nk, w.device), w)
    if not weights:
        warnings.warn("aofunc.tune: qparams hold no quantized 2-D weight on a CUDA device; move them there first "
                      "(e.g. {k: v.to('cuda') for k, v in qparams.items()})")
        return {}
    work = [(w, m) for w in weights.values() for m in ms]
    if progress is None:
        progress = len(work) > PROGRESS_LAUNCHES and sys.stderr.isatty()
    searched: dict[str, int] = {}
    with torch.no_grad():
        for w, m in tqdm(work, desc="tune", unit="launch", disable=not progress):
            n, k = w.nk
            x = torch.randn(m, k, dtype=x_dtype, device=w.device)
            with autotune.tuning(True, retune=retune, verify=True) as keys:
                qlinear(x, w)
            name = type(w.scheme).__name__
            searched[name] = searched.get(name, 0) + len(keys)
    return searched
