"""How fast a weight can be read the way the few-row kernels read it: each program owns ROWS rows and walks their
bytes along K a step (CHUNK bytes of each row) at a time, AHEAD steps a load, and keeps only an xor of what it read.
Two orders of the same bytes are timed: the rows one after another (row-major, how the weight is stored) and each
step of all rows together (step-major: a program's ROWS x CHUNK bytes of a step contiguous).

    python benchmarks/bench_read.py --weight 28672x4096 --programs 32/1,128/4,256/8 --ahead 4,8

Each line: the program's rows and warps, the step's bytes and depth, then µs (``cold_us``: CUDA graphs, L2 flushed)
and TB/s for each order. A ceiling for the GEMVs and the ``mma`` path at a few rows, which read about these bytes
(4-bit codes of 8192 x 28672 are 117 MB, 4 KB a row) plus scales and x.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(w_ptr, out_ptr, KW, STEPS, ROWS: tl.constexpr, CW: tl.constexpr, AHEAD: tl.constexpr,
                 STEP_MAJOR: tl.constexpr):
    """out[row] = xor of the int32 words the program reads for that row: its rows' KW words each, CW words a step,
    AHEAD steps a load; STEP_MAJOR: the program's region read as [steps, ROWS, CW] instead of [ROWS, KW]."""
    pid = tl.program_id(0)
    base = w_ptr + pid.to(tl.int64) * ROWS * KW
    ahead = tl.arange(0, AHEAD)[:, None, None]
    rows = tl.arange(0, ROWS)[None, :, None]
    words = tl.arange(0, CW)[None, None, :]
    if STEP_MAJOR:
        offsets = ahead * (ROWS * CW) + rows * CW + words
        advance = AHEAD * ROWS * CW
    else:
        offsets = rows * KW + ahead * CW + words
        advance = AHEAD * CW
    acc = tl.zeros([ROWS], dtype=tl.int32)
    for _ in range(0, STEPS, AHEAD):
        acc ^= tl.xor_sum(tl.xor_sum(tl.load(base + offsets), 2), 0)
        base += advance
    tl.store(out_ptr + pid * ROWS + tl.arange(0, ROWS), acc)


def read_rows(w: torch.Tensor, rows: int, chunk: int, ahead: int, step_major: bool, warps: int = 1) -> torch.Tensor:
    """The kernel's xor per row over int32 ``w`` [N, KW] (N a multiple of ``rows``; KW of ``chunk`` * ``ahead``)."""
    n, kw = w.shape
    if n % rows or kw % (chunk * ahead):
        raise ValueError(f"w {tuple(w.shape)}: rows must be a multiple of {rows} and words of {chunk * ahead}")
    out = torch.empty(n, dtype=torch.int32, device=w.device)
    _read_kernel[(n // rows,)](w, out, kw, kw // chunk, ROWS=rows, CW=chunk, AHEAD=ahead, STEP_MAJOR=step_major,
                               num_warps=warps)
    return out


def expected(w: torch.Tensor, rows: int, chunk: int, step_major: bool) -> torch.Tensor:
    """read_rows' answer computed by torch: each row's xor, or with step_major each program's region as [steps,
    rows, chunk] xor-ed over steps and words."""
    n, kw = w.shape
    region = w.reshape(n // rows, kw // chunk, rows, chunk) if step_major else w.reshape(n // rows, rows, kw)
    words = region.permute(0, 2, 1, 3).reshape(n, -1) if step_major else region.reshape(n, -1)
    out = torch.zeros(n, dtype=torch.int32, device=w.device)
    for column in words.unbind(1):
        out ^= column
    return out


def main(argv=None):
    from common import card_name, cold_us

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", default="28672x4096", help="rows x bytes a row")
    parser.add_argument("--programs", default="32/1,128/4,256/8", help="rows/warps of a program, comma-separated")
    parser.add_argument("--chunk", type=int, default=64, help="bytes of a row a step")
    parser.add_argument("--ahead", default="4,8", help="steps a load, comma-separated")
    args = parser.parse_args(argv)
    n, row_bytes = (int(v) for v in args.weight.split("x"))
    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, row_bytes // 4), dtype=torch.int32, device="cuda")
    print(f"card: {card_name()}, {n} rows x {row_bytes} B ({w.numel() * 4 / 1e6:.0f} MB)", flush=True)
    for program in args.programs.split(","):
        rows, warps = (int(v) for v in program.split("/"))
        for ahead in (int(v) for v in args.ahead.split(",")):
            cells = []
            for step_major in (False, True):
                us = cold_us(lambda: read_rows(w, rows, args.chunk // 4, ahead, step_major, warps))
                cells.append(f"{'step-major' if step_major else 'row-major'} {us:.1f} us "
                             f"{w.numel() * 4 / us / 1e6:.2f} TB/s")
            print(f"{rows} rows, {warps} warps, {args.chunk} B x {ahead}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
