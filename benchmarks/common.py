"""Timing, results and reporting helpers shared by the benchmark scripts.

    us = cold_us(lambda: F.linear(x, w))            # L2 cold, CUDA graphs, launch overhead excluded
    record_rows([row, ...])                          # into benchmarks/results/<card slug>.json
    print(markdown_table(["shape", "us"], rows))
    update_section("docs/benchmarks.md", "Linear: NVIDIA H200", text)

Results as data
---------------
Every measurement a benchmark keeps is a row in ``benchmarks/results/<card>.json``, where ``<card>`` is
``aofunc.kernels.autotune.device_slug`` of the card's name (``nvidia-h200``, ``nvidia-h100-80gb-hbm3``)::

    {"card": "NVIDIA H200", "rows": [{...}, {...}]}

``record_rows`` is the one writer: a row replaces the row of the file with the same key fields, or is appended;
rows are kept sorted by their key fields and the file is replaced atomically. ``benchmarks/render.py`` makes the
generated tables of docs/benchmarks.md from these files. Rows by ``kind`` (key fields first; more fields are
allowed and kept):

``linear`` -- one linear layer, ``y = x @ W.T`` (bench_kernels.py, bench_w8a8.py); key ``(kind, format, K, N, M,
x_dtype)``::

    {"kind": "linear", "format": "w4a16", "K": 4096, "N": 14336, "M": 1, "x_dtype": "bfloat16",
     "bf16_us": 42.2, "aofunc_us": 16.3, "path": "gemv", "tuned": true,
     "peer": "tinygemm", "peer_us": 18.7, "timing": "cold_us", "commit": "c9a5dca"}

    format     aofunc's weight format: w4a16, w8a16, nf4, w8a8, 8da4w
    K, N, M    input features, output features, rows of x
    x_dtype    the activations' dtype, torch's name without "torch."
    bf16_us    F.linear with the bf16 weight (cuBLAS), same process
    aofunc_us  aofunc's kernel with the configuration it runs (shipped, user-cache or default)
    path       the kernel path that configuration names (gemv, gemm, dequant, quantize+gemm, fused)
    tuned      whether the configuration was a stored winner rather than the launcher's default
    peer       the peer timed in the same process (tinygemm, torch._int_mm, "torchao 0.17"), null if none
    peer_us    its time, null if none
    timing     how the times were taken: "cold_us" (CUDA-graph replays with L2 flushed before each call, median;
               kernels/autotune.py) or "do_bench" (triton.testing.do_bench median, eager, L2 flushed); a mixed
               row says which time used which, e.g. "cold_us; peer: do_bench"
    commit     ``git rev-parse --short HEAD`` of the measured tree, "+dirty" when it had changes, null without git
               (``git_commit``; ``$AOFUNC_BENCH_COMMIT`` names it for a copy of the tree without git)

``decode``, ``prefill``, ``generate`` -- a whole model (decode.py); key ``(kind, variant, batch, layers, mode)``::

    {"kind": "decode", "variant": "int4", "batch": 1, "layers": 32, "mode": "manual-graphs",
     "tokens_per_s": 298.5, "bf16_tokens_per_s": 146.4, "commit": "c9a5dca"}

    variant            bf16, an aofunc scheme (int4, int8wo, nf4, 8da4w, int8dq) or a peer (torchao-int4, ...)
    mode               eager, manual-graphs (each step captured in one CUDA graph by the script),
                       compile+manual-graphs (torch.compile, then captured), reduce-overhead, max-autotune
                       (torch.compile modes, which use CUDA graphs themselves)
    tokens_per_s       tokens a second: decode one token a step; prefill ``prompt`` tokens a forward
    bf16_tokens_per_s  the bf16 variant in the same process and mode, null if it was not run
    weights_gib, tokens, prompt   (decode.py's extras) size of the params, decode steps timed, prefill length;
                       the prompt length is no key field: a prefill row of another length replaces the old one

``moe`` -- a mixture-of-experts layer; key ``(kind, format, variant, experts, top_k, K, N, M, batch, x_dtype)``,
a missing key field counting as null (a row names its format or variant, and M or batch).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

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


def timed_us(fn: Callable[[], object]) -> tuple[float, str]:
    """``(µs, how)``: ``cold_us`` and "cold_us", or, where ``fn`` cannot be captured in a CUDA graph, the
    ``median_us`` of eager calls and "do_bench"."""
    try:
        return cold_us(fn), "cold_us"
    except RuntimeError as error:
        print(f"graph timing failed ({str(error)[:80]}); do_bench instead", flush=True)
        torch.cuda.synchronize()
        return median_us(fn), "do_bench"


def timing_of(**methods: Optional[str]) -> str:
    """The ``timing`` field of a row from how each of its times was taken (None: not measured).

    ``timing_of(aofunc="cold_us", bf16="cold_us", peer=None)`` -> "cold_us";
    ``timing_of(aofunc="cold_us", peer="do_bench")`` -> "cold_us; peer: do_bench".
    """
    taken = {name: how for name, how in methods.items() if how is not None}
    common = max(set(taken.values()), key=list(taken.values()).count) if taken else "cold_us"
    odd = [f"{name}: {how}" for name, how in taken.items() if how != common]
    return "; ".join([common] + odd)


def torchao_name() -> str:
    """The peer name of the installed torchao, ``"torchao 0.17"`` (major.minor), or ``"torchao"``."""
    try:
        import torchao
    except ImportError:
        return "torchao"
    return "torchao " + ".".join(str(torchao.__version__).split(".")[:2])


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


# ------------------------------------------------------------------------------------------- results as data

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: the fields that identify a row, by kind (see the module docstring)
KEY_FIELDS = {
    "linear": ("kind", "format", "K", "N", "M", "x_dtype"),
    "decode": ("kind", "variant", "batch", "layers", "mode"),
    "prefill": ("kind", "variant", "batch", "layers", "mode"),
    "generate": ("kind", "variant", "batch", "layers", "mode"),
    "moe": ("kind", "format", "variant", "experts", "top_k", "K", "N", "M", "batch", "x_dtype"),
}
#: kinds whose rows may leave key fields out (they count as null)
PARTIAL_KEYS = {"moe"}


def row_key(row: dict) -> tuple:
    """The values of the row's key fields, in KEY_FIELDS order; ValueError for an unknown kind or a missing field."""
    kind = row.get("kind")
    if kind not in KEY_FIELDS:
        raise ValueError(f"row of unknown kind {kind!r} (known: {', '.join(KEY_FIELDS)}): {row}")
    fields = KEY_FIELDS[kind]
    missing = [f for f in fields if f not in row]
    if missing and kind not in PARTIAL_KEYS:
        raise ValueError(f"{kind} row lacks key fields {missing}: {row}")
    return tuple(row.get(f) for f in fields)


def _order(row: dict) -> tuple:
    """Sort key: kind, then the key fields, numbers by value before strings, null last."""
    def rank(value):
        if value is None:
            return (2, 0, "")
        if isinstance(value, (int, float)):
            return (0, value, "")
        return (1, 0, str(value))

    return tuple(rank(v) for v in row_key(row))


def _canonical(row: dict) -> dict:
    """The row with its key fields first, in KEY_FIELDS order, then the other fields sorted by name."""
    fields = KEY_FIELDS[row["kind"]]
    out = {f: row[f] for f in fields if f in row}
    out.update((f, row[f]) for f in sorted(row) if f not in out)
    return out


def results_path(card: str) -> Path:
    """``benchmarks/results/<device_slug(card)>.json``."""
    from aofunc.kernels.autotune import device_slug

    return RESULTS_DIR / f"{device_slug(card)}.json"


def load_results(path) -> dict:
    """``{"card": name or None, "rows": [...]}`` of a results file; empty rows when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {"card": None, "rows": []}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a benchmark results file (a {{'card', 'rows'}} object)")
    return data


def dump_results(card: str, rows: Sequence[dict]) -> str:
    """The text of a results file: one row a line, so that a new measurement changes its own line only."""
    lines = ",\n".join("  " + json.dumps(_canonical(row), ensure_ascii=False) for row in rows)
    rows_text = f"[\n{lines}\n ]" if rows else "[]"
    return f'{{\n "card": {json.dumps(card, ensure_ascii=False)},\n "rows": {rows_text}\n}}\n'


def record_rows(rows: Iterable[dict], card: Optional[str] = None, path=None) -> Path:
    """Write benchmark rows into the results file of a card; returns the file's path.

    ``card`` defaults to the current CUDA card's name (``card_name()``) and ``path`` to
    ``benchmarks/results/<device_slug(card)>.json``. The file is read if present; each new row replaces the row
    with the same key fields (``KEY_FIELDS`` of its kind), else is appended; rows of other kinds and keys stay.
    Rows are kept sorted by kind and key fields, and the file is replaced atomically (a temporary file in the same
    folder renamed over it), so a reader never sees half a file.
    """
    rows = [dict(row) for row in rows]
    for row in rows:
        row_key(row)  # validate before touching the file
    card = card or card_name()
    path = Path(path) if path is not None else results_path(card)
    by_key = {row_key(row): row for row in load_results(path)["rows"]}
    for row in rows:
        by_key[row_key(row)] = row
    merged = sorted(by_key.values(), key=_order)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dump_results(card, merged))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@functools.lru_cache(maxsize=None)
def add_record_options(parser) -> None:
    """The harnesses' ``--results FILE`` (record there instead of ``benchmarks/results/<card>.json``) and
    ``--no-record`` (print only) options."""
    parser.add_argument("--results", help="record into this file instead of benchmarks/results/<card>.json")
    parser.add_argument("--no-record", action="store_true", help="print the table only, record nothing")


def recorder(args) -> Callable[[Sequence[dict]], None]:
    """``record(rows)`` for parsed ``add_record_options``: record_rows into the chosen file and say where, or nothing
    with ``--no-record`` or no rows."""
    def record(rows):
        if rows and not args.no_record:
            print(f"recorded in {record_rows(rows, path=args.results)}", flush=True)
    return record


def git_commit() -> Optional[str]:
    """``git rev-parse --short HEAD`` of this checkout, with "+dirty" when tracked files outside
    benchmarks/results differ from it; None where git or the repository is unavailable.

    ``$AOFUNC_BENCH_COMMIT``, when set, is the answer instead: for a copy of the tree without its git history,
    the commit (and "+dirty") of the tree it was copied from. Cached: the first answer of a process stands, so
    results it records itself do not make it dirty."""
    if os.environ.get("AOFUNC_BENCH_COMMIT"):
        return os.environ["AOFUNC_BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + "+dirty" if status.returncode == 0 and status.stdout.strip() else commit
