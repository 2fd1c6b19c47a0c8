"""GPTQ over a model: Hessians folded from calibration batches, sequentially, block by block in execution order.

Each block's Hessians H = (2/t) Σ x xᵀ are gathered with every earlier block already quantized, its weights
quantized by `gptq_quantize_weight`, and its quantized outputs become the next block's inputs. Weights outside
the blocks (before them, after them, or in a model without repeated blocks or given as a function) go op by op:
one pass over the batches per group of weights reading the same input.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, NamedTuple

import torch
from tqdm.auto import tqdm

from aofunc.calibrate.batches import Reiterable
from aofunc.calibrate.blocks import (
    block_params,
    capture_block_inputs,
    first_output,
    probe,
    stopping_before,
    to_device,
    with_carried,
)
from aofunc.calibrate.fold import Calibration, check_model_uses, fold
from aofunc.calibrate.gptq_core import gptq_quantize_weight, hessian, input_gram
from aofunc.calibrate.selection import input_key, select
from aofunc.formats import Int4WeightOnly, QTensor
from aofunc.formats.scheme import grouped_schemes
from aofunc.capture import ExpertRows
from aofunc.formats.qtensor import canonical, canonical_shape, stacked_tensors
from aofunc.quantize import quantize_weight
from aofunc.progress import show_progress
from aofunc.spec import Rule, Spec
from aofunc.tree import check_params, detached_aliases, share_tied


class HessianState(NamedTuple):
    """Σ x xᵀ (fp32 [K, K]) over a layer's inputs, and the number t of input rows; for stacked experts one per
    expert, from the rows routed to it ([E, K, K] and [E])."""

    total: torch.Tensor
    tokens: torch.Tensor


def _k_of(w: torch.Tensor, transposed: bool) -> int:
    return canonical_shape(tuple(w.shape), transposed)[1]


def _zero_state(w: torch.Tensor, transposed: bool) -> HessianState:
    k = _k_of(w, transposed)
    lead = (w.shape[0],) if w.dim() == 3 else ()
    return HessianState(torch.zeros(*lead, k, k, dtype=torch.float32, device=w.device),
                        torch.zeros(lead, dtype=torch.int64, device=w.device))


def expert_grams(rows: ExpertRows, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ x xᵀ per expert [E, K, K] in fp32, rows per expert [E]) over one call's routed rows."""
    k = rows.x.shape[-1]
    counts = torch.bincount(rows.expert, minlength=experts)[:experts].to(torch.int64)
    total = torch.zeros(experts, k, k, dtype=torch.float32, device=rows.x.device)
    for e in counts.nonzero().flatten().tolist():
        total[e] = input_gram(rows.of(e))
    return total, counts.to(rows.x.device)


def gptq_calibration(rules: Mapping[str, Rule], *, blocksize: int = 128, percdamp: float = 0.01,
                     act_order: bool = False) -> Calibration:
    """The Calibration that folds each selected weight's Hessian and quantizes it by GPTQ in `finalize`.

    Weights reading the same input (q, k, v) share the product xᵀx of each call and, having equal Hessians, are
    quantized together as one taller matrix. A weight no call used is quantized to nearest, with a warning.

    Example:
        >>> fc = torch.nn.Linear(64, 16)
        >>> rules = {"weight": aofunc.Rule("weight", aofunc.Int4WeightOnly(32))}
        >>> qparams = aofunc.fold(aofunc.gptq_calibration(rules), dict(fc.named_parameters()),
        ...                       [torch.randn(32, 64)], model=fc, progress=False)
        >>> qparams["weight"]
        QTensor(Int4WeightOnly(group_size=32), shape=(16, 64), dtype=torch.float32, device=cpu)
    """
    def init(params):
        return {name: _zero_state(params[name], rule.transposed) for name, rule in rules.items()}

    def update(state, captured):
        state = dict(state)
        products: dict[tuple, torch.Tensor] = {}
        for name, xs in captured.items():
            if name not in state:
                continue
            total, tokens = state[name]
            for x in xs:
                if isinstance(x, ExpertRows):
                    key = (input_key(x.x), input_key(x.expert))
                    if key not in products:
                        products[key] = expert_grams(x, total.shape[0])
                    total = total + products[key][0]
                    tokens = tokens + products[key][1]
                    continue
                key = input_key(x)
                if key not in products:
                    products[key] = input_gram(x)
                total = total + products[key]
                tokens = tokens + x.shape[0]
            state[name] = HessianState(total, tokens)
        return state

    def finalize(state, params):
        out = detached_aliases(params)
        stacked = [name for name in rules if state[name].tokens.dim() == 1]
        for name in stacked:
            out[name] = _quantize_experts(name, params[name], state[name], rules[name], blocksize, percdamp,
                                          act_order)
        flat = [name for name in rules if name not in stacked]
        unseen = [name for name in flat if int(state[name].tokens) == 0]
        if unseen:
            warnings.warn(f"gptq: {unseen[:5]} saw no calibration input; quantized to nearest", stacklevel=2)
        for name in unseen:
            out[name] = quantize_weight(params[name], rules[name].scheme, rules[name].transposed)
        for group in _equal_hessian_groups([name for name in flat if name not in unseen], state, params, rules):
            H = hessian(*state[group[0]])
            weights = [canonical(params[name].detach(), rules[name].transposed) for name in group]
            parts = gptq_quantize_weight(torch.cat(weights), H, rules[group[0]].scheme, blocksize, percdamp,
                                         act_order)
            start = 0
            for name, w in zip(group, weights):
                rows = {key: t[start:start + w.shape[0]].contiguous() for key, t in parts.items()}
                start += w.shape[0]
                p = params[name]
                out[name] = QTensor(rules[name].scheme, rows, p.shape, p.dtype, rules[name].transposed)
        return out

    return Calibration(init, update, finalize)


def _quantize_experts(name: str, w: torch.Tensor, state: HessianState, rule: Rule, blocksize: int,
                      percdamp: float, act_order: bool) -> QTensor:
    """A stack of experts [E, ., .] by GPTQ, each expert with the Hessian of the rows routed to it; an expert that
    received none is quantized to nearest, with a warning naming it and the weight."""
    tokens = state.tokens.tolist()
    empty = [e for e, t in enumerate(tokens) if t == 0]
    nearest = quantize_weight(w, rule.scheme, rule.transposed) if empty else None
    if empty:
        warnings.warn(f"gptq: expert(s) {empty[:16]} of {name!r} received no calibration token; "
                      "quantized to nearest", stacklevel=3)
    experts = []
    for e, t in enumerate(tokens):
        if t == 0:
            experts.append({key: part[e] for key, part in nearest.tensors.items()})
            continue
        W = canonical(w[e].detach(), rule.transposed)
        experts.append(gptq_quantize_weight(W, hessian(state.total[e], state.tokens[e]), rule.scheme, blocksize,
                                            percdamp, act_order))
    return QTensor(rule.scheme, stacked_tensors(experts), w.shape, w.dtype, rule.transposed)


def _equal_hessian_groups(names, state, params, rules) -> list[list[str]]:
    """Names in groups of one scheme and dtype whose Hessians are equal (weights that read the same inputs)."""
    groups: list[list[str]] = []
    for name in names:
        for group in groups:
            lead = group[0]
            if (rules[lead].scheme == rules[name].scheme and params[lead].dtype == params[name].dtype
                    and state[lead].total.shape == state[name].total.shape
                    and bool(state[lead].tokens == state[name].tokens)
                    and torch.equal(state[lead].total, state[name].total)):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _input_groups(names: list[str], first_input: Mapping[str, int]) -> list[list[str]]:
    """Consecutive names (in execution order) that read the same input, e.g. [[q, k, v], [o], ...]."""
    groups: list[list[str]] = []
    for name in names:
        if groups and first_input[groups[-1][0]] == first_input[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _check_arguments(blocksize, percdamp, act_order, offload, progress) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"gptq: blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(percdamp, (int, float)) or isinstance(percdamp, bool) or not 0 <= percdamp < float("inf"):
        raise ValueError(f"gptq: percdamp must be a finite number >= 0, got {percdamp!r}")
    for name, value in (("act_order", act_order), ("offload", offload)):
        if not isinstance(value, bool):
            raise TypeError(f"gptq: {name} must be True or False, got {value!r}")
    show_progress(progress, True, "gptq")


def gptq(params: Mapping[str, torch.Tensor], batches: Any, *, model, spec: Spec | None = None,
         blocks: str | None = None, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
         offload: bool = False, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """GPTQ: new params whose selected weights are QTensors chosen to minimize ‖W X - Q X‖ over the calibration
    inputs X, each layer seeing the outputs of the layers before it already quantized; `params` is left untouched.

    `model` is an nn.Module (run unmodified through functional_call) or a function f(params, batch); `batches` is a
    list of batches (or a zero-argument function returning a fresh iterator), each what the forward takes. The
    spec picks Int4WeightOnly or Int8DynamicInt4 weights (default: Int4WeightOnly(128) on every 2-D weight used in
    a linear-like call, embeddings excluded, and on every stack of experts the model uses); weights it does not select stay as given. The blocks are the
    children of the nn.ModuleList holding the most parameters whose children share one class (Llama's
    `model.layers`, GPT-2's `transformer.h`), or those named by `blocks=` ("model.layers"); their inputs (positional and keyword) are held for
    all batches, on the model's device or on the CPU with `offload=True`. `act_order` takes columns by decreasing
    Hessian diagonal with static groups. Disable any decode cache in the batches (e.g. use_cache=False).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        >>> batches = [torch.randn(16, 64) for _ in range(4)]
        >>> spec = aofunc.Spec([aofunc.Rule(r".*weight", aofunc.Int4WeightOnly(32))])
        >>> qparams = aofunc.gptq(dict(model.named_parameters()), batches, model=model, spec=spec, progress=False)
        >>> type(qparams["0.weight"]).__name__
        'QTensor'
    """
    params = check_params(params)
    _check_arguments(blocksize, percdamp, act_order, offload, progress)
    check_model_uses(model, params, "gptq")
    source = Reiterable(batches, "gptq")
    usage, structure = probe(model, params, source.first, blocks, "gptq")
    rules = select(params, spec, Int4WeightOnly(128), usage, "gptq", grouped_schemes())
    if structure is not None and not structure.chained:
        warnings.warn("gptq: the model's blocks do not each run once with the previous block's output as input, "
                      "so each block's inputs are captured by running the model up to it (slower)", stacklevel=2)
    options = dict(blocksize=blocksize, percdamp=percdamp, act_order=act_order)

    in_block = {path for path, _ in structure.blocks} if structure is not None else set()
    block_of = {name: next(iter(usage.contexts[name])) for name in rules
                if len(usage.contexts[name]) == 1 and next(iter(usage.contexts[name])) in in_block}
    pre = [name for name in rules if name not in block_of and usage.contexts[name] == {"pre"}]
    post = [name for name in rules if name not in block_of and name not in pre]
    pre_groups = _input_groups(pre, usage.first_input)
    post_groups = _input_groups(post, usage.first_input)
    steps = len(pre_groups) + len(post_groups) + (len(structure.blocks) if structure is not None else 0)
    bar = tqdm(total=steps, desc="gptq", disable=not show_progress(progress, True, "gptq"), unit="step")

    qparams = detached_aliases(params)
    try:
        if structure is None:
            qparams = _op_by_op(qparams, pre_groups + post_groups, rules, source, model, options, bar)
        else:
            first_block = structure.blocks[0][1]
            qparams = _op_by_op(qparams, pre_groups, rules, source, stopping_before(model, first_block), options,
                                bar)
            qparams = _blocks(qparams, structure, block_of, rules, source, model, options, offload, bar)
            qparams = _op_by_op(qparams, post_groups, rules, source, model, options, bar)
    finally:
        bar.close()
    return share_tied(qparams, params, rules)


def _op_by_op(qparams, groups, rules, source, model, options, bar) -> dict:
    """Each group's Hessians from one pass with every earlier group quantized, then its weights quantized."""
    for group in groups:
        bar.set_postfix_str(group[0])
        calibration = gptq_calibration({name: rules[name] for name in group}, **options)
        qparams = fold(calibration, qparams, source, model=model, names=group, progress=False, desc="gptq")
        bar.update()
    return qparams


def _blocks(qparams, structure, block_of, rules, source, model, options, offload, bar) -> dict:
    """The blocks in execution order, each calibrated on inputs that went through the quantized blocks before it."""
    store = torch.device("cpu") if offload else None
    inputs = None
    for index, (path, module) in enumerate(structure.blocks):
        bar.set_postfix_str(path)
        if inputs is None or not structure.chained:
            inputs = capture_block_inputs(model, qparams, source, module, store, "gptq")
        local = block_params(qparams, path)
        device = next(iter(local.values())).device if local else None

        def run_block(block_tree, batch, module=module, cut=len(path) + 1):
            args, kwargs = to_device(batch, device if offload else None)
            own = {name[cut:]: t for name, t in block_tree.items()}
            return torch.func.functional_call(module, own, args, kwargs, strict=False)

        names = [name for name, where in block_of.items() if where == path]
        if names:
            calibration = gptq_calibration({name: rules[name] for name in names}, **options)
            local = fold(calibration, local, inputs, model=run_block, names=names, progress=False, desc="gptq")
            qparams.update({name: local[name] for name in names})
        if structure.chained and index + 1 < len(structure.blocks):
            with torch.no_grad():
                for i, batch in enumerate(inputs):
                    hidden = first_output(run_block(local, batch)).detach()
                    inputs[i] = with_carried(batch, structure.carried, to_device(hidden, store))
        bar.update()
    return qparams
