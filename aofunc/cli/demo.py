"""Quantize the demo model (a small Llama trained on Python's standard library) with every method and compare.

Prints one table (method, bits per weight, size, held-out perplexity, quantization time, and decode tokens/s on
a GPU) and writes results.json and perplexity_vs_bits.png to --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aofunc.cli.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from aofunc.demo.methods import METHODS
    from aofunc.demo.train import RECIPES

    p.add_argument("--quick", action="store_true", help="every method on a tiny data budget (seconds)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--size", choices=list(RECIPES), default="small",
                   help="model size: 'small' is shipped; others are trained on first use and cached")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: " + ", ".join(m.name for m in METHODS).replace("%", "%%"))
    p.add_argument("--out", default="aofunc-demo", help="directory for results.json and the plot (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from aofunc.demo import report
    from aofunc.demo.methods import METHODS, by_name
    from aofunc.demo.run import run as run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    try:
        methods = METHODS if args.methods is None else by_name([m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as e:
        raise UsageError(f"--methods: {e}") from None
    if not methods:
        raise UsageError("--methods: no method named")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    numbers = run_demo(size=args.size, device=device, quick=args.quick, methods=methods,
                       progress=not args.no_progress)
    results = numbers["results"]
    print()
    print(report.table(results))
    report.write_json(numbers, out / "results.json")
    model = numbers["model"]
    title = (f"aofunc demo: {model['size']} Llama ({model['parameters'] / 1e6:.1f} M params) on the Python standard "
             f"library, {model['device']}" + (" (--quick)" if args.quick else ""))
    note = report.plot(results, out / "perplexity_vs_bits.png", title)
    print(f"\nwrote {out / 'results.json'}" + (f"\n{note}" if note else f" and {out / 'perplexity_vs_bits.png'}"))
    return 1 if any(r["error"] for r in results) else 0
