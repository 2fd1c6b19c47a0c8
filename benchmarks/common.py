"""Timing and reporting helpers shared by the benchmark scripts.

    us = cold_us(lambda: F.linear(x, w))            # L2 cold, CUDA graphs, launch overhead excluded
    print(markdown_table(["shape", "us"], rows))
    update_section("docs/benchmarks.md", "Kernels: weight-only", text)
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


def median_us(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in microseconds: ``triton.testing.do_bench``, which flushes L2 before every run.

    Launch overhead on the host counts when it exceeds the flush: prefer ``cold_us`` for small kernels.
    """
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def cold_us(fn: Callable[[], object]) -> float:
    """Time of one call of ``fn`` in microseconds, L2 cold, in CUDA graphs (no launch overhead): see autotune."""
    from aofunc.kernels.autotune import cold_us as timer

    return timer(fn)


def card_name() -> str:
    """The name of the current CUDA card (``"NVIDIA H100 80GB HBM3"``), or ``"cpu"`` without one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def ratio(baseline_us: Optional[float], us: Optional[float]) -> Optional[float]:
    """How many times faster than the baseline (``baseline / us``); None when either is missing."""
    if baseline_us is None or us is None or us <= 0:
        return None
    return baseline_us / us


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    """A table cell: floats to ``digits`` decimals (plus ``suffix``), None or NaN as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are written with ``fmt``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(path, title: str, body: str) -> None:
    """Replace the body under the ``## title`` heading of a markdown file (created or appended when missing).

    The body runs to the next ``## `` heading or the end of the file; other sections are left as they are.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = f"## {title}"
    block = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
