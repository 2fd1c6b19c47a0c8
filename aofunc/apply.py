"""apply and bind: run an unmodified model with a (quantized) params tree, refusing keys the model does not have.

Both swap the tree into the module for the length of a call (apply) or of a ``with`` block (bind) and hold the
module's own lock meanwhile, so that threads sharing one module never see each other's trees.
"""
from __future__ import annotations

import contextlib
import difflib
import threading
import weakref
from typing import Iterator, Mapping

import torch
from torch.nn.utils.stateless import _reparametrize_module

from aofunc.formats import QTensor
from aofunc.formats.qtensor import keep_address_static
from aofunc.tree import check_params, check_tied_values

_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def module_lock(model: torch.nn.Module) -> threading.RLock:
    """The one re-entrant lock of `model` that `apply` and `bind` hold while its tensors are swapped.

    Made on first use, under a global lock so that two threads never make two; it lives as long as the module."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    return lock


def check_keys(model: torch.nn.Module, qparams: Mapping[str, torch.Tensor], caller: str) -> None:
    """Refuses a model that is not an nn.Module, a tree that is not {name: tensor}, and names the model lacks."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    check_params(qparams, "qparams")
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    known |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    unknown = sorted(set(qparams) - known)
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                 else repr(key) for key in unknown]
        raise KeyError(f"{caller}: the model has no parameter or buffer named {', '.join(hints)}")
    check_stacked_shapes(model, qparams, caller)
    check_tied_values(model, qparams, caller)


def check_stacked_shapes(model: torch.nn.Module, qparams: Mapping[str, torch.Tensor], caller: str) -> None:
    """A stack of quantized experts must have the shape of the model's tensor it stands for (as many experts)."""
    own = None
    for name, t in qparams.items():
        if not (isinstance(t, QTensor) and t.stacked):
            continue
        if own is None:
            own = dict(model.named_parameters(remove_duplicate=False))
            own.update(model.named_buffers(remove_duplicate=False))
        expected = tuple(own[name].shape)
        if len(expected) != 3 or expected[0] != t.shape[0]:
            raise ValueError(f"{caller}: {name!r} is a stack of {t.shape[0]} quantized experts, but the model's "
                             f"{name!r} has shape {expected}")
        if tuple(t.shape) != expected:
            raise ValueError(f"{caller}: {name!r} holds experts of shape {tuple(t.shape[1:])}, but the model's "
                             f"{name!r} has shape {expected}")


def apply(model: torch.nn.Module, qparams: Mapping[str, torch.Tensor], *args, **kwargs):
    """model(*args, **kwargs) with its parameters and buffers replaced by `qparams`, through functional_call.

    Unlike plain functional_call, a key the model does not have is an error (a misspelt key would otherwise be
    silently ignored). Tied weights (one tensor under two names) take the one value given for either name.

    Thread-safe: the call holds the module's own re-entrant lock while `qparams` are swapped in, so threads
    sharing one module (each with its own tree) get the answers they would get alone, one call at a time, and
    the module keeps its own tensors. Plain `torch.func.functional_call` on a module shared between threads is
    not thread-safe: calls interleave and can leave another thread's tensors in the module. The lock is per
    module object (a call on a submodule takes the submodule's lock), and it is skipped while
    `torch.compiler.is_compiling()`: a compiled function swaps nothing in the module, and the compiler does not
    trace locks.

    Example:
        >>> y = aofunc.apply(model, qparams, x)
    """
    if torch.compiler.is_compiling():
        check_keys(model, qparams, "apply")
        return torch.func.functional_call(model, dict(qparams), args, kwargs, tie_weights=True, strict=False)
    with module_lock(model):
        check_keys(model, qparams, "apply")
        return torch.func.functional_call(model, dict(qparams), args, kwargs, tie_weights=True, strict=False)


@contextlib.contextmanager
def bind(model: torch.nn.Module, qparams: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """A context manager under which the unmodified `model` computes with `qparams`: every method, not only
    `forward` (`model.generate(...)`, a pipeline holding the model), sees the tree's tensors in place of the
    module's own. On leaving the block, normally or by an exception, the module's own parameters and buffers (the
    same objects) are back.

    Keys are checked as `apply` checks them (a name the model does not have is an error, before anything is
    swapped), and tied weights stay tied: the one value given for either name is seen under both. A `QTensor`
    stands in for a Parameter like in `functional_call`. The block holds the module's own re-entrant lock, the
    one `apply` takes: `apply` (or another `bind`) on the same module inside the block, on the same thread,
    works and restores the block's tensors; other threads calling `apply` or `bind` on the module wait until the
    block ends (so a block must not wait on such a thread). Code that calls the module directly from another
    thread takes no lock and sees the bound tensors. Yields the model. The lock is skipped while
    `torch.compiler.is_compiling()`.

    Example:
        >>> with aofunc.bind(model, qparams):
        ...     y = model(x)
    """
    lock = None if torch.compiler.is_compiling() else module_lock(model)
    if lock is not None:
        lock.acquire()
    try:
        check_keys(model, qparams, "bind")
        with _reparametrize_module(model, dict(qparams), tie_weights=True, strict=False):
            yield model
    finally:
        if lock is not None:
            lock.release()


# {layout key: layout} of every tree split_quantized has opened. The key spells the layout out in full (names,
# schemes, stored tensors, shapes, dtypes, orientation), so equal layouts share one entry, and a compiled function
# that takes the key guards on one string.
_LAYOUTS: dict[str, tuple] = {}
SEPARATOR = ":"


def _stored_name(name: str, key: str) -> str:
    """The split tree's name of stored tensor ``key`` of the QTensor at ``name``."""
    return f"{name}{SEPARATOR}{key}"


def split_quantized(qparams: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, layout): `qparams` with every QTensor opened into its stored tensors, under "name:qdata",
    "name:scale", ... (the same tensors, not copies), and a string naming the layout that `join_quantized` rebuilds
    the QTensors from inside a compiled function.

    For compiled decoding on torch before 2.13: a compiled function given QTensors unwraps each of them in Python
    on every call (about 8 µs a weight on torch 2.11, near 1 µs from 2.13), which sets the pace of a decode step
    under ``mode="reduce-overhead"``; given plain tensors it does not:

        >>> tensors, layout = split_quantized(qparams)
        >>> def forward(tensors, layout, x):  # compiled: torch.compile(forward, mode="reduce-overhead")
        ...     return torch.func.functional_call(model, join_quantized(tensors, layout), (x,))
        >>> y = forward(tensors, layout, x)

    The compiled function guards on the layout by value: another scheme, group size, shape, dtype or orientation
    is another string and compiles anew, while new values of the same layout reuse the compiled code.
    """
    check_params(qparams, "qparams")
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for name, value in qparams.items():
        if SEPARATOR in name:
            raise ValueError(f"split_quantized: parameter name {name!r} contains {SEPARATOR!r}, which the split tree "
                             "uses to name stored tensors")
        if isinstance(value, QTensor):
            for key in value._names:  # weights, read in place by compiled code (as the QTensor itself is)
                tensors[_stored_name(name, key)] = keep_address_static(getattr(value, key))
            entries.append((name, value.scheme, value._names, tuple(value.shape), value.dtype, value.transposed))
        else:
            tensors[name] = value
    layout = repr(tuple(entries))
    _LAYOUTS.setdefault(layout, tuple(entries))
    return tensors, layout


def _layout_entries(layout: str) -> tuple:
    if layout not in _LAYOUTS:
        raise ValueError("join_quantized: unknown layout; pass the string split_quantized returned")
    return _LAYOUTS[layout]


# as torch.compiler.assume_constant_result marks a function, without importing the compiler here: traced code takes
# the entries as a constant, which is sound because the layout string, guarded by value, names them in full
_layout_entries._dynamo_marked_constant = True


def join_quantized(tensors: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The tree `split_quantized` opened, its QTensors rebuilt over ``tensors`` (call it inside the compiled
    function, so that the QTensors exist only in the traced code)."""
    entries = _layout_entries(layout)
    stored = {_stored_name(name, key) for name, _, keys, _, _, _ in entries for key in keys}
    out = {name: t for name, t in tensors.items() if name not in stored}
    for name, scheme, keys, shape, dtype, transposed in entries:
        out[name] = QTensor(scheme, {key: tensors[_stored_name(name, key)] for key in keys}, shape, dtype, transposed,
                            param_name=name)
    return out
