"""Calibration batches: one-pass iterables, and re-iterables for methods that read the batches several times."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator


class Reiterable:
    """Batches that can be read again: a sized sequence (list, tuple) or a zero-argument callable returning a fresh
    iterator each time. `first` is the first batch, read once up front for checks."""

    def __init__(self, batches: Any, what: str):
        if callable(batches) and not hasattr(batches, "__iter__"):
            self._fresh: Callable[[], Iterable] = batches
        elif isinstance(batches, (list, tuple)):
            self._fresh = lambda: batches
        elif hasattr(batches, "__iter__") and iter(batches) is batches:
            raise TypeError(f"{what}: batches is a one-shot iterator (a generator?), but {what} reads the batches "
                            "several times; pass a list, or a zero-argument function returning a fresh iterator")
        elif hasattr(batches, "__iter__") and hasattr(batches, "__len__"):
            self._fresh = lambda: batches
        else:
            raise TypeError(f"{what}: batches must be a list of batches or a zero-argument function returning a "
                            f"fresh iterator of them, got {type(batches).__name__}")
        self.what = what
        it = iter(self._fresh())
        try:
            self.first = next(it)
        except StopIteration:
            raise ValueError(f"{what}: batches is empty; calibration needs at least one batch") from None

    def __iter__(self) -> Iterator:
        return iter(self._fresh())


def peek(batches: Any, what: str) -> tuple[Any, Iterable]:
    """(first batch, an iterable yielding every batch once, the first included) for a one-pass method."""
    if isinstance(batches, Reiterable):
        return batches.first, batches
    if callable(batches) and not hasattr(batches, "__iter__"):
        batches = batches()
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"{what}: batches must be an iterable of batches, got {type(batches).__name__}") from None
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{what}: batches is empty; calibration needs at least one batch") from None
    if isinstance(batches, (list, tuple)):
        return first, batches
    return first, itertools.chain([first], it)
