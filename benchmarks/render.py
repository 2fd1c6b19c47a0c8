"""Rewrite the generated tables of docs/benchmarks.md from the results files; no GPU needed.

    python benchmarks/render.py [--results benchmarks/results] [--doc docs/benchmarks.md]

Every ``benchmarks/results/<card>.json`` (rows as benchmarks/common.py describes) gives
- ``## Linear: <card>``: one table per format of its ``linear`` rows, with the bf16/aofunc and peer/aofunc ratios;
- ``## Targets: <card>``: those rows against the speeds the batched GEMMs aim at (TARGETS), and every time that
  does not grow with M;
- ``## Decode: <card>``: one table of its ``decode``, ``prefill`` and ``generate`` rows.
Each such section starts with a line naming the file it was generated from; ``common.update_section`` replaces
these sections only, so hand-written sections stay as they are. A generated section whose results file is gone
is removed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, fmt, load_results, markdown_table, ratio, update_section  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
FORMAT_ORDER = ("w4a16", "w8a16", "nf4", "w8a8", "8da4w")
MODEL_KINDS = ("decode", "prefill", "generate")
MODE_ORDER = ("manual-graphs", "compile+manual-graphs", "reduce-overhead", "max-autotune", "eager")
GENERATED = "Generated from `benchmarks/results/{name}` by `benchmarks/render.py`"
TIMINGS = {"cold_us": "`cold_us` (CUDA-graph replays with L2 flushed before each call, median; kernels/autotune.py)",
           "do_bench": "`triton.testing.do_bench` (eager calls, L2 flushed, median)"}
PEERS = {"tinygemm": "tinygemm is `aten._weight_int4pack_mm` on the same codes",
         "torch._int_mm": "torch._int_mm is an eager per-token quantization, `torch._int_mm` and eager scaling",
         "torchao": "torchao is its `quantize_` on an `nn.Linear`, compiled with `torch.compile`"}


# The speeds the quantized linears aim at: bf16_us / aofunc_us with bf16 x, by format and M, on every benchmark
# shape; TARGET_SHAPES holds a shape's own figure where it differs (a 4096 x 4096 weight at one row reads too few
# bytes for the larger ones). And no time may jump: t(M) <= JUMP * t(the next larger M measured).
TARGETS = {
    "w4a16": {1: 3.0, 16: 2.5, 64: 1.8, 256: 1.1, 2048: 0.95},
    "w8a16": {1: 1.8, 16: 1.6, 64: 1.3, 256: 1.0, 2048: 0.95},
    "nf4": {1: 2.5, 16: 2.0, 64: 1.5, 256: 0.95, 2048: 0.9},
    "w8a8": {1: 1.5, 16: 1.5, 64: 1.3, 256: 1.3, 2048: 1.4},
    "8da4w": {1: 2.5, 16: 2.0, 64: 1.5, 256: 1.2, 2048: 1.2},
}
TARGET_SHAPES = {("w4a16", 1, 4096, 4096): 2.0, ("w8a16", 1, 4096, 4096): 1.4}
JUMP = 1.05


def target(name: str, m: int, k: int, n: int):
    """The bf16/aofunc ratio format ``name`` aims at for M rows of a K x N weight, or None where it has none."""
    return TARGET_SHAPES.get((name, m, k, n), TARGETS.get(name, {}).get(m))


# what bounds a quantized linear from below on a card: its weight's bytes at the fastest rate bf16 read a weight
# (rows of up to 16 rows of x) and its multiply-adds at the fastest rate the card did them (bf16 for the weight-only
# formats; int8 for W8A8 and 8da4w, from the W8A8 rows, aofunc's or torch._int_mm's)
WEIGHT_BYTES = {"w4a16": 0.5 + 4 / 128, "w8a16": 1.0, "nf4": 0.5 + 1 / 64, "w8a8": 1.0, "8da4w": 0.5 + 2 / 128}
INT8_MMA = ("w8a8", "8da4w")


def card_rates(rows) -> dict:
    """{"bytes": bytes a µs, "bf16": and "int8": multiply-adds times two a µs}: the fastest the card's rows show."""
    def best(pairs):
        return max((work / us for work, us in pairs if us), default=None)

    rates = {"bytes": best((2 * r["K"] * r["N"], r["bf16_us"]) for r in rows if r["M"] <= 16),
             "bf16": best((2 * r["M"] * r["K"] * r["N"], r["bf16_us"]) for r in rows)}
    int8 = [(2 * r["M"] * r["K"] * r["N"], min(us for us in (r["aofunc_us"], r.get("peer_us")) if us))
            for r in rows if r["format"] == "w8a8"]
    rates["int8"] = best(int8) or (2 * rates["bf16"] if rates["bf16"] else None)
    return rates


def ceiling(name: str, m: int, k: int, n: int, bf16_us: float, rates: dict):
    """The largest bf16/aofunc ratio format ``name`` can reach at M rows of a K x N weight on a card with ``rates``
    (card_rates): bf16's time over the longer of moving the weight and doing the multiply-adds at those rates."""
    rate = rates["int8" if name in INT8_MMA else "bf16"]
    if name not in WEIGHT_BYTES or not (rates["bytes"] and rate):
        return None
    return bf16_us / max(WEIGHT_BYTES[name] * k * n / rates["bytes"], 2 * m * k * n / rate)


def target_table(rows) -> str:
    """Each format's bf16/aofunc ratio (bf16 x) at every M that has a target, a column a weight shape, with "✓"
    where the target is met and the ceiling (in parentheses) no kernel passes on the card, and how many shapes meet
    the target and how many have a ceiling above it."""
    rows = [r for r in rows if r["x_dtype"] == "bfloat16" and r.get("bf16_us") and r.get("aofunc_us")]
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: (s[0] * s[1], s))
    rates = card_rates(rows)
    measured = {(r["format"], r["M"], r["K"], r["N"]): r for r in rows}
    body = []
    for name in [f for f in FORMAT_ORDER if f in TARGETS]:
        for m in TARGETS[name]:
            cells, met, reach, known = [], 0, 0, 0
            for k, n in shapes:
                row, want = measured.get((name, m, k, n)), target(name, m, k, n)
                if row is None:
                    cells.append("—")
                    continue
                got = ratio(row["bf16_us"], row["aofunc_us"])
                bound = ceiling(name, m, k, n, row["bf16_us"], rates)
                known += 1
                met += got >= want
                reach += bound is not None and bound >= want
                own = f" [≥ {want}]" if want != TARGETS[name][m] else ""  # this shape's own target
                cells.append(f"{got:.2f}" + (" ✓" if got >= want else "") + own
                             + (f" ({bound:.2f})" if bound is not None else ""))
            if known:
                body.append([name, str(m), f"≥ {TARGETS[name][m]}"] + cells + [f"{met} of {known}", str(reach)])
    return markdown_table(["format", "M", "target"] + [f"{k}×{n}" for k, n in shapes] + ["met", "reachable"], body)


def jumps(rows) -> list:
    """Every (format, shape, x dtype, M) whose time exceeds JUMP times the time at the next larger M measured."""
    series = {}
    for r in rows:
        if r.get("aofunc_us"):
            series.setdefault((r["format"], r["K"], r["N"], r["x_dtype"]), []).append((r["M"], r["aofunc_us"]))
    out = []
    for (name, k, n, dtype), points in sorted(series.items(), key=lambda item: (_format_rank(item[0][0]), item[0])):
        points.sort()
        for (m, us), (m_next, us_next) in zip(points, points[1:]):
            if us > JUMP * us_next:
                out.append(f"{name} {k}×{n} ({dtype}): {fmt(us)} µs at M = {m}, {fmt(us_next)} at M = {m_next}")
    return out


def _joined(values) -> str:
    values = sorted({str(v) for v in values if v is not None})
    return ", ".join(values) if values else "—"


def _format_rank(name: str) -> tuple:
    return (FORMAT_ORDER.index(name), "") if name in FORMAT_ORDER else (len(FORMAT_ORDER), name)


def linear_tables(rows) -> str:
    """The body under the heading of a card's linear rows: one ``### <format>`` table per format."""
    parts = []
    mixed = len({r.get("timing") for r in rows}) > 1
    for name in sorted({r["format"] for r in rows}, key=_format_rank):
        ours = [r for r in rows if r["format"] == name]
        dtypes = sorted({r["x_dtype"] for r in ours})
        several = len(dtypes) > 1
        headers = ["K×N", "M"] + (["x dtype"] if several else []) + [
            "bf16 µs", "aofunc µs", "bf16/aofunc", "path", "peer", "peer µs", "peer/aofunc"]
        body = []
        for r in ours:
            path = (r.get("path") or "—") + (" (tuned)" if r.get("tuned") else "")
            body.append([f"{r['K']}×{r['N']}", str(r["M"])] + ([r["x_dtype"]] if several else []) + [
                r.get("bf16_us"), r.get("aofunc_us"), fmt(ratio(r.get("bf16_us"), r.get("aofunc_us")), 2), path,
                r.get("peer") or "—", r.get("peer_us"), fmt(ratio(r.get("peer_us"), r.get("aofunc_us")), 2)])
        notes = [f"activations {', '.join(dtypes)}"] + (
            [f"timing {_joined(r.get('timing') for r in ours)}"] if mixed else []) + [
            f"commit {_joined(r.get('commit') for r in ours)}"]
        notes += [note for peer in sorted({r.get("peer") or "" for r in ours}) for prefix, note in PEERS.items()
                  if peer.split(" ")[0] == prefix]
        parts.append(f"### {name}\n\n" + "; ".join(notes) + ".\n\n" + markdown_table(headers, body))
    return "\n\n".join(parts)


def model_table(rows) -> str:
    """One table of a card's decode, prefill and generate rows."""
    def order(r):
        mode = r["mode"]
        return (MODEL_KINDS.index(r["kind"]), MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode,
                r["layers"], r["batch"], r["variant"] != "bf16", r["variant"])

    prompts = any("prompt" in r for r in rows)
    body = [[r["kind"], r["variant"], str(r["batch"]), str(r["layers"]), r["mode"]]
            + ([fmt(r.get("prompt"))] if prompts else [])
            + [r.get("tokens_per_s"), r.get("bf16_tokens_per_s"),
               fmt(ratio(r.get("tokens_per_s"), r.get("bf16_tokens_per_s")), 2)]
            for r in sorted(rows, key=order)]
    note = f"commit {_joined(r.get('commit') for r in rows)}. Ratios are tokens/s over bf16's in the same process."
    return note + "\n\n" + markdown_table(
        ["kind", "variant", "batch", "layers", "mode"] + (["prompt"] if prompts else [])
        + ["tokens/s", "bf16 tokens/s", "× bf16"], body)


def layer_rows(rows) -> list:
    """A "layer" row for each (format, experts, top k, tokens) measured with both of an MoE layer's products (gate_up
    and down, Mixtral's): the sums of their times, so the ratio is the whole layer's."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["format"], r["experts"], r["top_k"], r["batch"], r["M"]), {})[r["variant"]] = r
    out = []
    for parts in by_key.values():
        if set(parts) >= {"gate_up", "down"}:
            up, down = parts["gate_up"], parts["down"]
            total = {key: round(up[key] + down[key], 2) if up.get(key) is not None and down.get(key) is not None
                     else None for key in ("bf16_us", "aofunc_us", "loop_us")}
            out.append({**up, **total, "variant": "layer", "N": None, "K": None, "path": up.get("path")})
    return out


def moe_table(rows) -> str:
    """One table of a card's stacked-experts rows, with a whole-layer row where both products were measured."""
    rank = {"gate_up": 0, "down": 1, "layer": 2}

    def order(r):
        return (_format_rank(r["format"]), r["batch"], rank.get(r["variant"], 3), r["variant"])

    rows = rows + layer_rows(rows)

    note = (f"commit {_joined(r.get('commit') for r in rows)}. Ratios are bf16 `torch._grouped_mm` time over "
            "aofunc's (> 1: aofunc faster).")
    body = [[r["format"], r["variant"], f"{r['experts']} × " + (f"{r['N']}×{r['K']}" if r["N"] else "both"),
             str(r["top_k"]), str(r["batch"]), str(r["M"]), r.get("bf16_us"), r.get("aofunc_us"), r.get("loop_us"),
             fmt(ratio(r.get("bf16_us"), r.get("aofunc_us")), 2), r.get("path") or "—"]
            for r in sorted(rows, key=order)]
    return note + "\n\n" + markdown_table(
        ["format", "variant", "experts × N×K", "top k", "tokens", "rows", "bf16 µs", "aofunc µs", "qlinear loop µs",
         "bf16/aofunc", "path"], body)


def sections(path) -> dict:
    """``{heading title: body}`` of the generated sections of one results file."""
    path = Path(path)
    data = load_results(path)
    card = data["card"] or path.stem
    source = GENERATED.format(name=path.name)
    out = {}
    linear = [r for r in data["rows"] if r.get("kind") == "linear"]
    if linear:
        timing = "; ".join(TIMINGS[t] for t in sorted({r.get("timing") for r in linear} & set(TIMINGS)))
        out[f"Linear: {card}"] = (
            f"{source}; do not edit by hand.\n\n"
            f"`y = x @ W.T` for weight format and shape K×N (input × output features), M rows of x, in µs"
            + (f", timed by {timing}" if timing else "") + ". `bf16` is `F.linear` with the bf16 weight (cuBLAS); "
            "ratios are baseline / aofunc (> 1: aofunc faster); \"(tuned)\" marks a stored configuration.\n\n"
            + linear_tables(linear))
        slower = jumps(linear)
        out[f"Targets: {card}"] = (
            f"{source}; do not edit by hand.\n\n"
            "bf16/aofunc for bf16 x at the rows that have a target, by weight shape K×N; \"✓\" marks a target met. "
            "In parentheses the ceiling: bf16's time over the least time the card allows the format, the longer of "
            "reading its weight at the fastest rate bf16 read one (up to 16 rows) and doing its multiply-adds at the "
            "fastest rate the card's rows show (bf16; int8 for W8A8 and 8da4w, from the W8A8 rows). \"reachable\" "
            "counts the shapes whose ceiling is at or above the target.\n\n"
            + target_table(linear) + f"\n\nNo time may exceed {JUMP} times the time at the next larger M measured; "
            + ("on this card these do:\n\n" + "\n".join(f"- {line}" for line in slower) if slower
               else "on this card none does."))
    model = [r for r in data["rows"] if r.get("kind") in MODEL_KINDS]
    if model:
        out[f"Decode: {card}"] = (
            f"{source}; do not edit by hand.\n\n"
            "Llama-3-8B shapes (`benchmarks/decode.py`, model in `benchmarks/llama.py`, random bf16 weights): "
            "decode is one token a step with a static KV cache, prefill one forward over the prompt; mode as in "
            "decode.py's docstring.\n\n" + model_table(model))
    moe = [r for r in data["rows"] if r.get("kind") == "moe"]
    if moe:
        out[f"Stacked experts: {card}"] = (
            f"{source}; do not edit by hand.\n\n"
            "One mixture-of-experts layer's grouped product (`benchmarks/bench_moe.py`): the routed rows of a batch of "
            "tokens, sorted by expert, through a stack of experts, in µs.\n\n" + moe_table(moe))
    return out


def generated_titles(text: str) -> dict:
    """``{title: results file name}`` of the generated sections a markdown text holds."""
    pattern = re.compile(r"^## (.+?)[ \t]*\n\s*" + re.escape(GENERATED).replace(r"\{name\}", r"([^`]+)"), re.M)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


def remove_section(path, title: str) -> None:
    """Delete the ``## title`` heading of a markdown file and its body (to the next ``## `` heading)."""
    path = Path(path)
    text = path.read_text()
    pattern = re.compile(rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    path.write_text(pattern.sub("", text, count=1).rstrip() + "\n")


def render(results_dir=RESULTS_DIR, doc=DOC) -> list:
    """Rewrite the generated sections of ``doc`` from every ``results_dir/*.json``; returns the titles written."""
    results_dir, doc = Path(results_dir), Path(doc)
    written = {}
    for path in sorted(results_dir.glob("*.json")):
        for title, body in sections(path).items():
            written[title] = path.name
            update_section(doc, title, body)
    if doc.exists():
        for title in generated_titles(doc.read_text()):
            if title not in written:
                remove_section(doc, title)
    return list(written)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS_DIR), help="folder of <card>.json results files")
    parser.add_argument("--doc", default=str(DOC), help="markdown file whose generated sections are rewritten")
    args = parser.parse_args(argv)
    for title in render(args.results, args.doc):
        print(f"wrote ## {title} in {args.doc}")


if __name__ == "__main__":
    main()
