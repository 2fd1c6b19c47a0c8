"""One kernel parameter against the configuration each key runs: the configuration the op would use (the shipped or
cached table, else the default) timed as it is and with each setting applied, one process, bf16 cuBLAS timed
alongside; each variant's output compared with the configuration's own, bit for bit.

    python benchmarks/bench_override.py --formats w4a16 --path mma --ms 1,2,4,8 --set SPLIT_K=2 --set SPLIT_K=4
    python benchmarks/bench_override.py --formats w4a16,w8a16 --path wgmma --ms 64,256 --set STAGES=2 --set STAGES=3

Each line: the key, bf16's µs, the configuration (µs, × bf16), then each setting's µs, × bf16 and whether its
output equals the configuration's ("same bits") or its largest relative difference. ``--path`` keeps only the keys whose
configuration runs that path (a parameter of one kernel means nothing to another's). Nothing is recorded: these are
forms of one configuration, not rows of ``benchmarks/results``.
"""
from __future__ import annotations

import argparse
import ast

import torch
import torch.nn.functional as F

from bench_kernels import SHAPES, ours
from common import card_name, cold_us


def parse_setting(text: str) -> tuple[tuple[str, object], ...]:
    """``"NAME=VALUE"`` -> ((NAME, VALUE),) with VALUE a Python literal where it reads as one (0, 2.5, True), else
    the text itself; several at once joined by ``;`` (``"LOOP_STAGES=8;SPLIT_K=2"``)."""
    pairs = []
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if not sep or not name.isidentifier():
            raise argparse.ArgumentTypeError(f"--set takes NAME=VALUE[;NAME=VALUE...], got {text!r}")
        try:
            pairs.append((name, ast.literal_eval(value)))
        except (ValueError, SyntaxError):
            pairs.append((name, value))
    return tuple(pairs)


def overridden(config: dict, setting: tuple[tuple[str, object], ...]) -> dict:
    """A copy of ``config`` with the setting's values applied (``config`` itself is left as it is)."""
    return {**config, **dict(setting)}


def setting_text(setting: tuple[tuple[str, object], ...]) -> str:
    """``"LOOP_STAGES=8;SPLIT_K=2"`` for the setting's pairs."""
    return ";".join(f"{name}={value!r}" for name, value in setting)


def difference(y: torch.Tensor, base: torch.Tensor) -> str:
    """"same bits", or the largest difference relative to the largest magnitude of ``base``."""
    if torch.equal(y, base):
        return "same bits"
    scale = base.float().abs().max().clamp_min(1e-30)
    return f"differs by {float((y.float() - base.float()).abs().max() / scale):.1e}"


def compare(fmts, shapes, ms, settings, path=None, device="cuda") -> list[str]:
    """Print (and return) a line for each key of the formats, shapes and rows ``ms`` whose configuration runs
    ``path`` (every key where it is None)."""
    from aofunc.kernels import autotune

    lines = []
    for fmt in fmts:
        for shape in shapes:
            k, n = (int(v) for v in shape.split("x"))
            run, _, key, _, default = ours(fmt, n, k)
            weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02  # bf16's time: any values
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                config = autotune.lookup(key(x)) or default(x)
                if path is not None and config.get("path") != path:
                    continue
                bf16_us = cold_us(lambda: F.linear(x, weight))
                base = run(x, config)
                us = cold_us(lambda: run(x, config))
                cells = [f"{fmt} {k}x{n} M={m}: bf16 {bf16_us:.1f}", f"{config} {us:.1f} ({bf16_us / us:.2f}x)"]
                for setting in settings:
                    variant = overridden(config, setting)
                    try:
                        same = difference(run(x, variant), base)
                        variant_us = cold_us(lambda: run(x, variant))
                    except Exception as error:  # a setting the kernel refuses: say so, go on with the next
                        cells.append(f"{setting_text(setting)} failed: {str(error)[:120]}")
                        continue
                    cells.append(f"{setting_text(setting)} {variant_us:.1f} ({bf16_us / variant_us:.2f}x, {same})")
                lines.append(" | ".join(cells))
                print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="w4a16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ms", default="1,2,4,8")
    parser.add_argument("--path", help="only the keys whose configuration runs this path (gemv, gemm, mma, ...)")
    parser.add_argument("--set", action="append", required=True, type=parse_setting, dest="settings",
                        metavar="NAME=VALUE",
                        help="a setting to time against the configuration (repeatable; the values of one variant "
                             "joined by ';')")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"card: {card_name()}, torch {torch.__version__}", flush=True)
    compare(args.formats.split(","), args.shapes.split(","), [int(m) for m in args.ms.split(",")], args.settings,
            args.path)


if __name__ == "__main__":
    main()
