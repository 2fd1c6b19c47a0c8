"""The demo's outputs: a text table, a JSON file of the numbers, and a plot of perplexity against bits per weight."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

COLUMNS = (
    ("method", "method", "{}"),
    ("bits_per_weight", "bits/weight", "{:.2f}"),
    ("size_bytes", "size (bytes)", "{:,}"),
    ("perplexity", "perplexity", "{:.4f}"),
    ("increase", "vs float", "{:+.2%}"),
    ("quantize_seconds", "quantize (s)", "{:.2f}"),
    ("decode_tokens_per_second", "decode tok/s", "{:.0f}"),
)


def rows_with_increase(results: list[dict]) -> list[dict]:
    """The results with ``increase`` = perplexity / float perplexity - 1 (None without a float row)."""
    base = next((r["perplexity"] for r in results if r["method"] == "float"), None)
    return [r | {"increase": None if base is None or r.get("perplexity") is None else r["perplexity"] / base - 1}
            for r in results]


def table(results: list[dict]) -> str:
    """The results as an aligned text table; a failed method shows its error in place of numbers."""
    rows = rows_with_increase(results)
    columns = [c for c in COLUMNS if c[0] != "decode_tokens_per_second"
               or any(r.get(c[0]) is not None for r in rows)]
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in columns]
              for r in rows if not r.get("error")]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    lines += [f"{r['method'].ljust(widths[0])}  failed: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines)


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(report: dict, path: Path) -> None:
    write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())


def plot(results: list[dict], path: Path, title: str) -> str | None:
    """Writes perplexity against bits per weight as a PNG; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn (pip install 'aofunc[plot]')"
    points = [r for r in results if r.get("error") is None and r.get("perplexity") is not None]
    base = next((r["perplexity"] for r in points if r["method"] == "float"), None)
    low_bit = [r for r in points if r["bits_per_weight"] < 16]
    fig, axes = plt.subplots(1, 2 if low_bit else 1, figsize=(11, 4.8) if low_bit else (6, 4.8), dpi=120,
                             squeeze=False)
    markers = "osD^v<>ph*XP"
    for ax, shown, subtitle in zip(axes[0], (points, low_bit), ("every method", "quantized formats (zoom)")):
        for i, r in enumerate(points):
            if r in shown:
                ax.scatter(r["bits_per_weight"], r["perplexity"], s=36, marker=markers[i % len(markers)],
                           color=plt.cm.tab20(i % 20), label=r["method"])
        if base is not None:
            ax.axhline(base, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xlabel("bits per weight (block linears)")
        ax.set_ylabel("held-out perplexity per byte")
        ax.set_title(subtitle, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return None
