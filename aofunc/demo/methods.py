"""Every method the demo compares, each a function from the float params to new params.

All methods touch the same weights: the seven linear weights of every block (``LINEARS``). The embedding
and ``lm_head`` stay in full precision, as is usual for 4-bit models.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

import aofunc

LINEARS = r"layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down))\.weight"


class Setup(NamedTuple):
    """What a method may use: the model, its float params, and calibration batches (token ids [b, t])."""

    model: torch.nn.Module
    params: Mapping[str, torch.Tensor]
    calibration: list[torch.Tensor]
    progress: bool


class Method(NamedTuple):
    """A named way to turn float params into quantized or pruned params."""

    name: str
    description: str
    transform: Callable[[Setup], dict]
    calibrated: bool


def spec_of(scheme) -> aofunc.Spec:
    """The demo's spec: ``scheme`` on the block linears, everything else in full precision."""
    return aofunc.Spec([aofunc.Rule(LINEARS, scheme)])


def rtn(scheme) -> Callable[[Setup], dict]:
    return lambda s: aofunc.quantize(s.params, spec_of(scheme))


def gptq(act_order: bool) -> Callable[[Setup], dict]:
    return lambda s: aofunc.gptq(s.params, s.calibration, model=s.model, spec=spec_of(aofunc.Int4WeightOnly(128)),
                                 act_order=act_order, progress=s.progress)


def wanda(sparse) -> Callable[[Setup], dict]:
    return lambda s: aofunc.wanda(s.params, s.calibration, model=s.model, spec=spec_of(sparse), progress=s.progress)


METHODS = (
    Method("float", "the trained model, unquantized", lambda s: dict(s.params), False),
    Method("rtn-int8wo", "int8 weight-only, per channel (W8A16)", rtn(aofunc.Int8WeightOnly()), False),
    Method("rtn-int8dq", "int8 dynamic: int8 weights and per-token int8 activations (W8A8)", rtn(aofunc.Int8Dynamic()), False),
    Method("smoothquant-int8dq", "SmoothQuant W8A8, alpha 0.5, smoothing folded into the RMSNorms",
           lambda s: aofunc.smoothquant(s.params, s.calibration, model=s.model, spec=spec_of(aofunc.Int8Dynamic()),
                                        progress=s.progress), True),
    Method("rtn-int4", "int4 weight-only g128, round to nearest", rtn(aofunc.Int4WeightOnly(128)), False),
    Method("gptq-int4", "int4 weight-only g128, GPTQ", gptq(act_order=False), True),
    Method("gptq-int4-act", "int4 weight-only g128, GPTQ with act-order", gptq(act_order=True), True),
    Method("rtn-8da4w", "int8 dynamic activations, int4 weights g32", rtn(aofunc.Int8DynamicInt4(32)), False),
    Method("rtn-nf4", "NF4, blocks of 64, double-quantized scales", rtn(aofunc.NF4()), False),
    Method("magnitude-2:4", "2:4 sparsity by |W| (stored dense)",
           lambda s: aofunc.prune(s.params, spec_of(aofunc.Sparse(pattern="2:4"))), False),
    Method("wanda-2:4", "2:4 sparsity by Wanda, |W| * ||X|| (stored dense)", wanda(aofunc.Sparse(pattern="2:4")), True),
    Method("wanda-50%", "50 % unstructured sparsity per row by Wanda (stored dense)", wanda(aofunc.Sparse(0.5)), True),
)


#: the names the demo used before its methods were named as the command line's `--method` and `--scheme` are
FORMER_NAMES = {"int8-wo": "rtn-int8wo", "int8-dyn": "rtn-int8dq", "smoothquant": "smoothquant-int8dq",
                "int4-rtn": "rtn-int4", "int4-gptq": "gptq-int4", "int4-gptq-act": "gptq-int4-act", "8da4w": "rtn-8da4w",
                "nf4": "rtn-nf4"}


def by_name(names) -> list[Method]:
    """The methods named (as `quantize`'s method-scheme, or by a former name), in the demo's order; an unknown name
    is an error listing the known ones."""
    known = {m.name: m for m in METHODS}
    names = [FORMER_NAMES.get(n, n) for n in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(known)}")
    return [m for m in METHODS if m.name in set(names)]
