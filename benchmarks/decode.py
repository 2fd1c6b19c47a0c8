"""Decode (and prefill) speed of a Llama-3-8B-shaped model at batch 1: tokens/s for bf16 and quantized params.

    python benchmarks/decode.py --variants bf16,int4,int8wo,nf4,torchao-int4,torchao-int8 --mode manual-graphs
    python benchmarks/decode.py --mode compile+manual-graphs --prefill 512
    python benchmarks/render.py            # the tables of docs/benchmarks.md from benchmarks/results/; no GPU needed

Every variant runs the same unmodified model; aofunc variants through functional_call with quantized params
(``<scheme>-split``, e.g. ``int4-split``: the params opened into plain tensors by ``aofunc.split_quantized`` and the
QTensors rebuilt inside the step), torchao's through its own module swap. ``--mode`` says how a step runs:
- ``manual-graphs`` (the default): each step (one token, static KV cache) is captured once in a CUDA graph by this
  script and replayed, so launch overhead is excluded alike for all;
- ``compile+manual-graphs`` (``--compile``): the same after ``torch.compile`` (inductor);
- ``reduce-overhead``, ``max-autotune``: ``torch.compile`` in that mode, called step by step (its own CUDA graphs);
- ``eager``: plain calls, launch overhead included.
bf16 is measured first in the same process, so every ratio comes from one card. Each variant gives a ``decode`` row
(and a ``prefill`` row with ``--prefill N``: one forward of N prompt tokens) recorded with ``common.record_rows``
into ``benchmarks/results/<card>.json`` (``--results`` names another file, ``--no-record`` prints only).
``--mode`` takes a comma list to compare harnesses in one process; ``--batch B`` decodes B sequences a step (tokens/s
counts all of them); ``--profile`` prints where one decode step's GPU time goes, matmuls against the rest, and
records nothing (a profiler session slows the launches of every later variant in the process).
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from collections import defaultdict

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


# Kernel names of matrix products: cuBLAS/CUTLASS GEMMs, aofunc's linears, inductor's mm templates.
MATMUL_KERNELS = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|wgmma|_mm_|matmul|w4a16|w8a16|nf4|w8a8|int_mm|splitk",
                            re.IGNORECASE)


def decode_tokens_per_s(step, tokens: int, max_seq: int, mode: str, batch: int = 1, profile: bool = False) -> float:
    """Tokens a second of greedy decoding of ``batch`` sequences, one token each a step at growing positions,
    ``tokens`` steps timed. ``profile``: also print where one step's GPU time goes."""
    tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
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
    if profile:  # after timing: a profiler session can slow later launches
        print_step_profile(run)
    return batch * tokens / (start.elapsed_time(end) / 1e3)


def print_step_profile(run, steps: int = 5, top: int = 12) -> None:
    """GPU time of one step by kernel (mean over ``steps`` steps): the ``top`` kernels, then matmuls against the
    rest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    by_kernel, launches = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            by_kernel[event.name] += event.time_range.elapsed_us() / steps
            launches[event.name] += 1
    matmul = sum(t for name, t in by_kernel.items() if MATMUL_KERNELS.search(name))
    total = sum(by_kernel.values())
    for name, t in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t:9.1f} us  x{launches[name] / steps:<5g} {name[:110]}")
    print(f"  one step: {total:.1f} us of kernels, matmuls {matmul:.1f} us, the rest {total - matmul:.1f} us "
          f"({sum(launches.values()) / steps:g} kernels)", flush=True)


def prefill_tokens_per_s(step, prompt: int, repeats: int, mode: str, batch: int = 1) -> float:
    """Prompt tokens a second of one forward over ``batch`` prompts of ``prompt`` tokens at positions 0..prompt-1,
    ``repeats`` timed."""
    tok = torch.randint(0, 1000, (batch, prompt), device="cuda")
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
    return batch * prompt * repeats / (start.elapsed_time(end) / 1e3)


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
    return [{"kind": kind, "variant": variant, "batch": shape.batch, "layers": shape.layers, "mode": mode,
             "tokens_per_s": round(tps, 2), "bf16_tokens_per_s": round(bf16_times[kind], 2)
             if bf16_times.get(kind) else None, "commit": git_commit(), **extra}
            for kind, (tps, extra) in times.items() if tps is not None]


def variant_step(variant: str, model, params, shape):
    """(step function, weight bytes or None) of one variant; raises for a torchao peer that cannot be built."""
    if variant == "bf16":
        return aofunc_step(model, params), aofunc.size_in_bytes(params)
    scheme = SCHEMES.get(variant.removesuffix("-split"))
    if scheme is not None:
        qparams = aofunc.quantize(params, aofunc.Spec([aofunc.Rule(LINEARS, scheme)]))
        if not variant.endswith("-split"):
            return aofunc_step(model, qparams), aofunc.size_in_bytes(qparams)
        # the same params passed as plain tensors, the QTensors rebuilt inside the step (aofunc.split_quantized)
        tensors, layout = aofunc.split_quantized(qparams)
        step = lambda tok, pos: functional_call(model, aofunc.join_quantized(tensors, layout), (tok, pos))  # noqa: E731
        return step, aofunc.size_in_bytes(qparams)
    if variant.startswith("torchao-"):
        return torchao_model(variant.removeprefix("torchao-"), shape), None
    raise SystemExit(f"unknown variant {variant!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="bf16,int4,int8wo,nf4")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--tokens", type=int, default=200, help="decode steps timed")
    parser.add_argument("--prefill", type=int, default=0, help="also time a forward over this many prompt tokens")
    parser.add_argument("--max-seq", type=int, default=None,
                        help="positions of the KV cache (default 1024, or the prefill length when longer)")
    parser.add_argument("--mode", default="manual-graphs", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--compile", action="store_true", help="the same as --mode compile+manual-graphs")
    parser.add_argument("--profile", action="store_true", help="print one decode step's GPU time by kernel")
    add_record_options(parser)
    args = parser.parse_args(argv)
    modes = ["compile+manual-graphs"] if args.compile else args.mode.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--mode: unknown {unknown}; choose from {', '.join(MODES)}")
    max_seq = args.max_seq or max(LlamaShape.max_seq, args.prefill)
    if args.prefill > max_seq:
        raise SystemExit(f"--prefill must be at most the cache length --max-seq {max_seq}")
    shape = LlamaShape(layers=args.layers, batch=args.batch, max_seq=max_seq)
    model = random_llama(shape)
    params = dict(model.named_parameters())
    variants = args.variants.split(",")
    variants.sort(key=lambda v: v != "bf16")  # bf16 first: every other row carries its speed
    for mode in modes:
        table, bf16 = [], {}
        for variant in variants:
            t0 = time.perf_counter()
            try:
                step, size = variant_step(variant, model, params, shape)
            except Exception as e:  # a peer that fails to build is reported, not fatal
                print(f"{variant}: {type(e).__name__}: {e}", flush=True)
                table.append([variant, "—", None, None, "failed to build"])
                continue
            step = compiled(step, mode, fullgraph=not variant.startswith("torchao-"))
            weights = {"weights_gib": round(size / 2**30, 2)} if size else {}
            times, notes = {}, []
            for kind in ("decode", "prefill") if args.prefill else ("decode",):
                if args.profile and kind == "decode":
                    print(f"{variant}, {mode}: one decode step", flush=True)
                try:
                    tps = (decode_tokens_per_s(step, args.tokens, shape.max_seq, mode, shape.batch, args.profile)
                           if kind == "decode" else prefill_tokens_per_s(step, args.prefill, 10, mode, shape.batch))
                except Exception as e:  # report and continue with the other variants
                    tps = None
                    notes.append(f"{kind}: {type(e).__name__}: {str(e)[:80]}")
                    print(f"{variant} {kind} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                extra = dict(weights, tokens=args.tokens) if kind == "decode" else dict(weights, prompt=args.prefill)
                times[kind] = (tps, extra)
            if variant == "bf16":
                bf16 = {kind: tps for kind, (tps, _) in times.items()}
            if not args.profile:
                recorder(args)(model_rows(variant, shape, mode, times, bf16))
            for kind, (tps, _) in times.items():
                ratio = tps / bf16[kind] if tps and bf16.get(kind) else None
                table.append([variant if kind == "decode" else f"{variant} (prefill {args.prefill})",
                              f"{size / 2**30:.1f}" if size else "—", tps, f"{ratio:.2f}" if ratio else "—",
                              "; ".join(notes) or f"{time.perf_counter() - t0:.0f} s"])
                print(" ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in table[-1]), flush=True)
            step = None
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        print(f"Card: {card_name()}. Llama-3-8B shapes ({shape.layers} layers, random bf16 weights), batch "
              f"{shape.batch}, static KV cache of {shape.max_seq}, mode {mode}, {args.tokens} decode steps timed.\n")
        print(markdown_table(["variant", "weights GiB", "tokens/s", "× bf16", "wall s (setup and run)"], table))


if __name__ == "__main__":
    main()
