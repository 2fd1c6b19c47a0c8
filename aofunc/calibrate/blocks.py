"""The repeated blocks of a model, in execution order, and their inputs captured on entry with temporary hooks.

The blocks are the children of the `nn.ModuleList` holding the most parameters whose children share one class
(Llama's `model.layers`, GPT-2's `transformer.h`), or the children of the module named by `blocks=`. One probe run
finds the order the blocks run in and whether they are chained: block i+1 reads block i's output and the same
other arguments (masks, position embeddings), so captured inputs can be replayed through each block in turn.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from aofunc.calibrate.fold import no_linear_call, run_batch
from aofunc.calibrate.selection import Usage, recording_usage
from aofunc.capture import run_model


class _Stop(Exception):
    """Raised by a temporary hook to end a forward once what it needed was captured."""


def find_blocks(model: Any, blocks: str | None) -> list[tuple[str, nn.Module]] | None:
    """[(path, block)] of the model's repeated blocks (declaration order), or None for a model without them."""
    if not isinstance(model, nn.Module):
        if blocks is not None:
            raise TypeError("gptq: blocks= names a submodule, but model is a function; a function model is "
                            "handled op by op")
        return None
    if blocks is not None:
        if not isinstance(blocks, str):
            raise TypeError(f"gptq: blocks must be the path of a submodule such as 'model.layers', got {blocks!r}")
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"gptq: blocks={blocks!r} is not a submodule of the model") from None
        children = list(container.named_children())
        if not children:
            raise ValueError(f"gptq: blocks={blocks!r} has no child modules to quantize block by block")
        return [(f"{blocks}.{name}", child) for name, child in children]
    best, best_size = None, 0
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 \
                and len({type(child) for child in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (path, module), size
    if best is None:
        return None
    path, container = best
    prefix = f"{path}." if path else ""
    return [(f"{prefix}{name}", child) for name, child in container.named_children()]


def block_params(params: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The block's own entries of a params tree, under their full names ("{path}.{name in the block}")."""
    prefix = path + "."
    return {name: t for name, t in params.items() if name.startswith(prefix)}


def first_output(output: Any) -> Any:
    """What a block hands on: its output, or the first element of a tuple/list output."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


@dataclasses.dataclass
class Structure:
    """What one probe run showed: blocks in execution order, and how a block's inputs follow from the last one."""

    blocks: list[tuple[str, nn.Module]]     # in execution order
    chained: bool                           # replay each block's output into the next with the same extras
    carried: tuple[str, Any] | None         # ("arg", index) or ("kwarg", key) of the hidden state in the inputs


def _position_of(value: Any, args: tuple, kwargs: dict) -> tuple[str, Any] | None:
    for i, a in enumerate(args):
        if a is value:
            return ("arg", i)
    for key, a in kwargs.items():
        if a is value:
            return ("kwarg", key)
    return None


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # an == that is not a boolean: not provably the same
        return False


def _extras_shared(first: tuple, other: tuple, carried: tuple[str, Any]) -> bool:
    (args0, kwargs0), (args1, kwargs1) = first, other
    if len(args0) != len(args1) or set(kwargs0) != set(kwargs1):
        return False
    kind, key = carried
    same_args = all(_same(a, b) for i, (a, b) in enumerate(zip(args0, args1)) if (kind, i) != ("arg", key))
    same_kwargs = all(_same(kwargs0[k], kwargs1[k]) for k in kwargs0 if (kind, k) != ("kwarg", key))
    return same_args and same_kwargs


def probe(model: Any, params: Mapping[str, torch.Tensor], batch: Any, blocks: str | None,
          what: str) -> tuple[Usage, Structure | None]:
    """One run on `batch`: how the params are used (calls tagged "pre", "post" or the block's path) and the
    block structure (None for a model handled op by op)."""
    found = find_blocks(model, blocks)
    entries: dict[str, list] = {}
    outputs: dict[str, Any] = {}
    order: list[str] = []
    where = {"now": "pre"}
    handles = []

    def hooks_for(path):
        def pre(module, args, kwargs):
            if path not in entries:
                order.append(path)
            entries.setdefault(path, []).append((args, kwargs))
            where["now"] = path

        def post(module, args, kwargs, output):
            outputs[path] = output
            where["now"] = "post"
        return pre, post

    try:
        for path, module in found or []:
            pre, post = hooks_for(path)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad(), recording_usage(params, lambda: where["now"]) as usage:
            run_batch(model, params, batch, 0, what)
    finally:
        for handle in handles:
            handle.remove()
    if not usage.transposed:
        raise no_linear_call(what)
    if not order:
        return usage, None
    modules = dict(found)
    ran = [(path, modules[path]) for path in order]
    if any(len(entries[path]) != 1 for path in order):
        return usage, Structure(ran, chained=False, carried=None)
    if len(order) == 1:
        return usage, Structure(ran, chained=True, carried=None)
    carried, chained = None, True
    for previous, path in zip(order, order[1:]):
        args, kwargs = entries[path][0]
        position = _position_of(first_output(outputs[previous]), args, kwargs)
        if position is None or (carried is not None and position != carried):
            chained = False
            break
        carried = position
    if chained:
        chained = all(_extras_shared(entries[order[0]][0], entries[path][0], carried) for path in order[1:])
    return usage, Structure(ran, chained=chained, carried=carried if chained else None)


def stopping_before(model: Any, module: nn.Module) -> Callable:
    """f(params, batch): the model run until `module` is entered (the rest of the forward is skipped)."""
    def run(params, batch):
        def stop(mod, args, kwargs):
            raise _Stop
        handle = module.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            return run_model(model, params, batch)
        except _Stop:
            return None
        finally:
            handle.remove()
    return run


def to_device(tree: Any, device: torch.device | None) -> Any:
    """Every tensor of an (args, kwargs) tree moved to `device` (None: left where it is)."""
    if device is None:
        return tree
    return tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=True), tree)


def capture_block_inputs(model: Any, params: Mapping[str, torch.Tensor], batches, module: nn.Module,
                         store: torch.device | None, what: str) -> list[tuple[tuple, dict]]:
    """[(args, kwargs)] with which `module` is first entered on each batch (kept on `store`, or where they are)."""
    inputs: list = []

    def capture(mod, args, kwargs):
        inputs.append(to_device((args, kwargs), store))
        raise _Stop

    def run_until_captured(params, batch) -> bool:
        try:
            run_model(model, params, batch)
        except _Stop:
            return True
        return False

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if not run_batch(run_until_captured, params, batch, index, what):
                    raise ValueError(f"{what}: the block being calibrated did not run on batch {index}")
    finally:
        handle.remove()
    return inputs


def with_carried(inputs: tuple[tuple, dict], carried: tuple[str, Any], value: Any) -> tuple[tuple, dict]:
    """The (args, kwargs) with the carried hidden state replaced by `value`."""
    args, kwargs = inputs
    kind, key = carried
    if kind == "arg":
        return args[:key] + (value,) + args[key + 1:], kwargs
    return args, {**kwargs, key: value}
