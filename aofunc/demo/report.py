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


def plot_panels(points: list[dict]) -> list[tuple[list[dict], str]]:
    """The plot's panels as (results, title): quantized formats (fewer than 16 bits a weight), then methods stored
    dense at float width (pruned); the float model itself is the baseline line, not a point; empty panels left out."""
    quantized = [r for r in points if r["method"] != "float" and r["bits_per_weight"] < 16]
    dense = [r for r in points if r["method"] != "float" and r["bits_per_weight"] >= 16]
    return [p for p in ((quantized, "quantized formats"), (dense, "pruned, stored dense")) if p[0]]


#: one distinct colour per method, in the demo's order (tab10's hues, then Dark2's)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def plot(results: list[dict], path: Path, title: str) -> str | None:
    """Writes perplexity against bits per weight as a PNG; returns a note instead when matplotlib is missing.

    Quantized formats go on a bits-per-weight axis; methods that prune but store their weights dense (as many bits
    as float) get a panel of their own, so they do not squash the rest. The float model is a dashed line in both,
    named in the legend.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn (pip install 'aofunc[plot]')"
    points = [r for r in results if r.get("error") is None and r.get("perplexity") is not None]
    base = next((r["perplexity"] for r in points if r["method"] == "float"), None)
    colour = {r["method"]: COLOURS[i % len(COLOURS)] for i, r in enumerate(points)}
    panels = plot_panels(points)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.8), dpi=120,
                             squeeze=False, gridspec_kw={"width_ratios": [max(1, len(p[0])) for p in panels] or [1]})
    for ax, (shown, subtitle) in zip(axes[0], panels or [([], "no method ran")]):
        if subtitle == "pruned, stored dense":
            for j, r in enumerate(shown):
                ax.scatter(j, r["perplexity"], s=40, color=colour[r["method"]], label=r["method"])
            ax.set_xticks(range(len(shown)), [r["method"] for r in shown], rotation=20, fontsize=8)
            ax.set_xlim(-0.5, len(shown) - 0.5)
        else:
            for r in shown:
                ax.scatter(r["bits_per_weight"], r["perplexity"], s=40, color=colour[r["method"]], label=r["method"])
            ax.set_xlabel("bits per weight (block linears)")
        if base is not None:
            ax.axhline(base, color="black", linewidth=0.9, linestyle="--", label=f"float ({base:.4f})")
        ax.set_ylabel("held-out perplexity per byte")
        ax.set_title(subtitle, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
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
