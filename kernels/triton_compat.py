"""Triton, imported when a kernel first runs: ``from aofunc.kernels.triton_compat import tl, triton``.

The kernel modules define their kernels at import with ``@triton.jit`` and ``tl.constexpr`` through the stand-ins
here, which only record them; importing aofunc therefore never imports Triton, and the kernels' torch ops register
either way. The first launch of any kernel (``kernel[grid](...)``) calls ``load()``: it imports Triton, compiles
the recorded functions with the real ``triton.jit``, and rebinds every recorded kernel, constant and the names
``triton`` and ``tl`` in the modules of ``aofunc.kernels`` to the real objects, so kernels that call one another
resolve as Triton expects. Where Triton is not installed (macOS, Windows: it ships for Linux only) the CPU paths
never launch a kernel, and a launch raises an ImportError that says what is missing. ``cdiv`` and
``next_power_of_2`` work without Triton.
"""
from __future__ import annotations

import importlib.util
import sys
import threading

MISSING = ("Triton is not installed: aofunc's CUDA kernels need it (pip install triton, on Linux); "
           "on the CPU, aofunc runs without it")

_recorded: list = []  # every DeferredKernel and DeferredConstexpr, in definition order
_lock = threading.Lock()
_loaded: dict = {}  # "triton" -> the real module, once load() ran


def available() -> bool:
    """Whether Triton can be imported here (without importing it)."""
    return "triton" in _loaded or importlib.util.find_spec("triton") is not None


class DeferredKernel:
    """What ``@triton.jit`` gives at import: the Python function, compiled by the real decorator on first launch."""

    def __init__(self, fn, options):
        self.fn, self.options = fn, options
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        _recorded.append(self)

    def __getitem__(self, grid):
        return load()[self][grid]

    def __call__(self, *args, **kwargs):
        return load()[self](*args, **kwargs)


class DeferredConstexpr:
    """What ``tl.constexpr(value)`` gives at import: the value (``.value``), made a real constexpr by ``load()``."""

    def __init__(self, value):
        self.value = value
        _recorded.append(self)

    def __repr__(self) -> str:
        return f"constexpr({self.value!r})"


class _Triton:
    """The ``triton`` stand-in: ``jit`` records, ``cdiv`` and ``next_power_of_2`` compute; anything else is read
    from the real module (imported then)."""

    @staticmethod
    def jit(fn=None, **options):
        if fn is None:
            return lambda f: DeferredKernel(f, options)
        return DeferredKernel(fn, options)

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (n - 1).bit_length()

    def __getattr__(self, name):
        return getattr(_real_triton(), name)


class _Language:
    """The ``triton.language`` stand-in: ``constexpr`` records; anything else is read from the real module."""

    constexpr = DeferredConstexpr

    def __getattr__(self, name):
        return getattr(_real_triton().language, name)


triton = _Triton()
tl = _Language()


def _real_triton():
    if "triton" not in _loaded:
        try:
            import triton as real
            import triton.language  # noqa: F401
        except ImportError as error:
            raise ImportError(MISSING) from error
        _loaded["triton"] = real
    return _loaded["triton"]


def load() -> dict:
    """Import Triton, compile every recorded kernel and rebind the kernel modules' names to the real objects;
    returns {recorded object: real object}. Runs once; later calls return the same mapping."""
    with _lock:
        if "mapping" in _loaded:
            return _loaded["mapping"]
        real = _real_triton()
        mapping = {}
        for item in _recorded:
            if isinstance(item, DeferredKernel):
                mapping[item] = real.jit(item.fn, **item.options)
            else:
                mapping[item] = real.language.constexpr(item.value)
        for name, module in list(sys.modules.items()):
            if module is None or not (name.startswith("aofunc.kernels") or name == __name__):
                continue
            for attr, value in list(vars(module).items()):
                if isinstance(value, (DeferredKernel, DeferredConstexpr)) and value in mapping:
                    setattr(module, attr, mapping[value])
                elif value is triton and name != __name__:
                    setattr(module, attr, real)
                elif value is tl and name != __name__:
                    setattr(module, attr, real.language)
        _loaded["mapping"] = mapping
        return mapping


def tensor_descriptor():
    """Triton's TensorDescriptor class (host-side TMA descriptors), imported on first use."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor
