"""Triton where it is installed, else a stand-in that lets the kernel modules load: ``from ... import triton, tl``.

Triton ships for Linux only. On macOS and Windows the kernel modules still load, so their torch ops register and
every CPU path works (the CPU runs torch's kernels and the plain-torch twins, never a Triton kernel); launching a
Triton kernel there raises an ImportError that says so. ``cdiv`` and ``next_power_of_2`` work either way.
"""
from __future__ import annotations

MISSING = ("Triton is not installed: aofunc's CUDA kernels need it (pip install triton, on Linux); "
           "on the CPU, aofunc runs without it")


class _MissingKernel:
    """What ``@triton.jit`` gives without Triton: a kernel that cannot be launched."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid):
        raise ImportError(MISSING)

    def __call__(self, *args, **kwargs):
        raise ImportError(MISSING)


class _MissingTriton:
    """The few names the kernel modules use at import time, and a clear error for anything else."""

    available = False

    @staticmethod
    def jit(fn=None, **options):
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    @staticmethod
    def constexpr(value=None):
        return value

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (n - 1).bit_length()

    def __getattr__(self, name):
        raise ImportError(MISSING)


try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
    AVAILABLE = True
except ImportError:
    triton = tl = TensorDescriptor = _MissingTriton()
    AVAILABLE = False
