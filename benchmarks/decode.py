"""Decode (and prefill) speed of a Llama-3-8B-shaped model at batch 1: tokens/s for bf16 and quantized params.

    python benchmarks/decode.py --variants bf16,int4,int8wo,nf4,torchao-int4,torchao-int8 --mode manual-graphs
    python benchmarks/decode.py --mode compile+manual-graphs --prefill 512
    python benchmarks/render.py            # the tables of docs/benchmarks.md from benchmarks/results/; no GPU needed

Every variant runs the same unmodified model; aofunc variants through functional_call with quantized params,
torchao's through its own module swap. ``--mode`` says how a step runs:
- ``manual-graphs`` (the default): each step (one token, static KV cache) is captured once in a CUDA graph by this
  script and replayed, so launch overhead is excluded alike for all;
- ``compile+manual-graphs`` (``--compile``): the same after ``torch.compile`` (inductor);
- ``reduce-overhead``, ``max-autotune``: ``torch.compile`` in that mode, called step by step (its own CUDA graphs);
- ``eager``: plain calls, launch overhead included.
bf16 is measured first in the same process, so every ratio comes from one card. Each variant gives a ``decode`` row
(and a ``prefill`` row with ``--prefill N``: one forward of N prompt tokens) recorded with ``common.record_rows``
into ``benchmarks/results/<card>.json`` (``--results`` names another file, ``--no-record`` prints only).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aofunc  # noqa: E402
from common import add_record_options, card_name, git_commit, markdown_table, recorder  # noqa: E402
from llama import LlamaShape, random_llama  # noqa: E402

LINEARS = r".*(wq|wk|wv|wo|w1|w2|w3|output)\.weight"
SCHEMES = {"int4": aofunc.Int4WeightOnly(128), "int8wo": aofunc.Int8WeightOnly(), "nf4": aofunc.NF4(),
           "8da4w": aofunc.Int8DynamicInt4(128), "int8dq": aofunc.Int8Dynamic()}
MODES = ("manual-graphs", "compile+manual-graphs", "reduce-overhead", "max-autotune", "eager")


def runner(step, tok, pos, mode: str):
    """A no-argument function that runs one step on the fixed tensors ``tok``, ``pos`` and returns the logits.

    In the graph modes the step is captured here once (after warm-up calls on a side stream) and replayed."""
    if mode not in ("manual-graphs", "compile+manual-graphs"):
        def call():
            if mode in ("reduce-overhead", "max-autotune"):
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                return step(tok, pos)
        return call
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            step(tok, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        logits = step(tok, pos)

    def replay():
        graph.replay()
        return logits
    return replay


def decode_tokens_per_s(step, tokens: int, max_seq: int, mode: str) -> float:
    """Tokens a second of greedy decoding, one token a step at growing positions, ``tokens`` steps timed."""
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    run = runner(step, tok, pos, mode)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for warm in (True, False):
        torch.cuda.synchronize()
        start.record()
        for i in range(tokens if not warm else 10):
            pos.fill_(i % max_seq)
            logits = run()
            tok.copy_(logits[:, -1:].argmax(-1))
        end.record()
        torch.cuda.synchronize()
    return tokens / (start.elapsed_time(end) / 1e3)


def prefill_tokens_per_s(step, prompt: int, repeats: int, mode: str) -> float:
    """Prompt tokens a second of one forward over ``prompt`` tokens at positions 0..prompt-1, ``repeats`` timed."""
    tok = torch.randint(0, 1000, (1, prompt), device="cuda")
    pos = torch.arange(prompt, device="cuda")
    run = runner(step, tok, pos, mode)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for count in (3, repeats):
        torch.cuda.synchronize()
        start.record()
        for _ in range(count):
            run()
        end.record()
        torch.cuda.synchronize()
    return prompt * repeats / (start.elapsed_time(end) / 1e3)


def aofunc_step(model, qparams):
    return lambda tok, pos: functional_call(model, qparams, (tok, pos))


def torchao_model(kind: str, shape: LlamaShape):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    model = random_llama(shape)
    config = (Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d") if kind == "int4"
              else Int8WeightOnlyConfig())
    quantize_(model, config)
    return model


def compiled(step, mode: str, fullgraph: bool):
    if mode == "compile+manual-graphs":
        return torch.compile(step, fullgraph=fullgraph)
    if mode in ("reduce-overhead", "max-autotune"):
        return torch.compile(step, mode=mode, fullgraph=fullgraph)
    return step


def model_rows(variant, shape, mode, times, bf16_times):
    """The ``decode`` and ``prefill`` rows of one variant (benchmarks/common.py); ``times`` by kind, None: failed."""
    return [{"kind": kind, "variant": variant, "batch": 1, "layers": shape.layers, "mode": mode,
             "tokens_per_s": round(tps, 2), "bf16_tokens_per_s": round(bf16_times[kind], 2)
             if bf16_times.get(kind) else None, "commit": git_commit(), **extra}
            for kind, (tps, extra) in times.items() if tps is not None]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="bf16,int4,int8wo,nf4")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200, help="decode steps timed")
    parser.add_argument("--prefill", type=int, default=0, help="also time a forward over this many prompt tokens")
    parser.add_argument("--mode", choices=MODES, default="manual-graphs")
    parser.add_argument("--compile", action="store_true", help="the same as --mode compile+manual-graphs")
    add_record_options(parser)
    args = parser.parse_args(argv)
    mode = "compile+manual-graphs" if args.compile else args.mode
    shape = LlamaShape(layers=args.layers)
    if args.prefill > shape.max_seq:
        raise SystemExit(f"--prefill must be at most the cache length {shape.max_seq}")
    model = random_llama(shape)
    params = dict(model.named_parameters())
    variants = args.variants.split(",")
    variants.sort(key=lambda v: v != "bf16")  # bf16 first: every other row carries its speed
    table, bf16 = [], {}
    for variant in variants:
        t0 = time.perf_counter()
        qparams = None
        if variant == "bf16":
            step, size = aofunc_step(model, params), aofunc.size_in_bytes(params)
        elif variant in SCHEMES:
            spec = aofunc.Spec([aofunc.Rule(LINEARS, SCHEMES[variant])])
            qparams = aofunc.quantize(params, spec)
            step, size = aofunc_step(model, qparams), aofunc.size_in_bytes(qparams)
        elif variant.startswith("torchao-"):
            try:
                step, size = torchao_model(variant.removeprefix("torchao-"), shape), None
            except Exception as e:  # a peer that fails to build is reported, not fatal
                print(f"{variant}: {type(e).__name__}: {e}", flush=True)
                table.append([variant, "—", None, None, "failed to build"])
                continue
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        step = compiled(step, mode, fullgraph=not variant.startswith("torchao-"))
        weights = {"weights_gib": round(size / 2**30, 2)} if size else {}
        times, notes = {}, []
        for kind in ("decode", "prefill") if args.prefill else ("decode",):
            try:
                tps = (decode_tokens_per_s(step, args.tokens, shape.max_seq, mode) if kind == "decode" else
                       prefill_tokens_per_s(step, args.prefill, 10, mode))
            except Exception as e:  # report and continue with the other variants
                tps = None
                notes.append(f"{kind}: {type(e).__name__}: {str(e)[:80]}")
                print(f"{variant} {kind} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            extra = dict(weights, tokens=args.tokens) if kind == "decode" else dict(weights, prompt=args.prefill)
            times[kind] = (tps, extra)
        if variant == "bf16":
            bf16 = {kind: tps for kind, (tps, _) in times.items()}
        rows = model_rows(variant, shape, mode, times, bf16)
        recorder(args)(rows)
        for kind, (tps, _) in times.items():
            ratio = tps / bf16[kind] if tps and bf16.get(kind) else None
            table.append([variant if kind == "decode" else f"{variant} (prefill {args.prefill})",
                          f"{size / 2**30:.1f}" if size else "—", tps, f"{ratio:.2f}" if ratio else "—",
                          "; ".join(notes) or f"{time.perf_counter() - t0:.0f} s"])
            print(" ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in table[-1]), flush=True)
        step = qparams = None
        gc.collect()
        torch.cuda.empty_cache()
    print(f"Card: {card_name()}. Llama-3-8B shapes ({shape.layers} layers, random bf16 weights), batch 1, static KV "
          f"cache of {shape.max_seq}, mode {mode}, {args.tokens} decode steps timed.\n")
    print(markdown_table(["variant", "weights GiB", "tokens/s", "× bf16", "wall s (setup and run)"], table))


if __name__ == "__main__":
    main()
