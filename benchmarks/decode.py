"""Decode speed of a Llama-3-8B-shaped model at batch 1: tokens/s for bf16 and quantized params, CUDA graphs.

    python benchmarks/decode.py --variants bf16,int4,int8wo,nf4,torchao-int4,torchao-int8 [--doc docs/benchmarks.md]

Every variant runs the same unmodified model; aofunc variants through functional_call with quantized params,
torchao's through its own module swap. Each decode step (one token, static KV cache) is captured once in a CUDA
graph and replayed, so launch overhead is excluded alike for all. bf16 is measured in the same process, so every
ratio comes from one card.
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
from common import card_name, markdown_table, update_section  # noqa: E402
from llama import LlamaShape, random_llama  # noqa: E402

LINEARS = r".*(wq|wk|wv|wo|w1|w2|w3|output)\.weight"
SCHEMES = {"int4": aofunc.Int4WeightOnly(128), "int8wo": aofunc.Int8WeightOnly(), "nf4": aofunc.NF4(),
           "8da4w": aofunc.Int8DynamicInt4(128), "int8dq": aofunc.Int8Dynamic()}


def graph_decode_tokens_per_s(step, tokens: int, max_seq: int) -> float:
    """Capture step(tok, pos) in a CUDA graph, replay it `tokens` times at growing positions, return tokens/s."""
    device = "cuda"
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            step(tok, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        logits = step(tok, pos)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for warm in (True, False):
        torch.cuda.synchronize()
        start.record()
        for i in range(tokens if not warm else 10):
            pos.fill_(i % max_seq)
            graph.replay()
            tok.copy_(logits[:, -1:].argmax(-1))
        end.record()
        torch.cuda.synchronize()
    return tokens / (start.elapsed_time(end) / 1e3)


def aofunc_step(model, qparams):
    return lambda tok, pos: functional_call(model, qparams, (tok, pos))


def torchao_model(kind: str, shape: LlamaShape):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    model = random_llama(shape)
    config = (Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d") if kind == "int4"
              else Int8WeightOnlyConfig())
    quantize_(model, config)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="bf16,int4,int8wo,nf4")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="torch.compile each step (inductor) before capture")
    parser.add_argument("--doc", default=None, help="write the table into this markdown file")
    args = parser.parse_args(argv)
    shape = LlamaShape(layers=args.layers)
    model = random_llama(shape)
    params = dict(model.named_parameters())
    rows, bf16 = [], None
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        if variant == "bf16":
            step, size = aofunc_step(model, params), aofunc.size_in_bytes(params)
        elif variant in SCHEMES:
            spec = aofunc.Spec([aofunc.Rule(LINEARS, SCHEMES[variant])])
            qparams = aofunc.quantize(params, spec)
            step, size = aofunc_step(model, qparams), aofunc.size_in_bytes(qparams)
        elif variant.startswith("torchao-"):
            try:
                tao = torchao_model(variant.removeprefix("torchao-"), shape)
            except Exception as e:  # a peer that fails to build is reported, not fatal
                print(f"{variant}: {type(e).__name__}: {e}")
                rows.append([variant, None, None, None, "failed to build"])
                continue
            step, size = tao, None
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        if args.compile:
            step = torch.compile(step, fullgraph=not variant.startswith("torchao-"))
        try:
            tps = graph_decode_tokens_per_s(step, args.tokens, shape.max_seq)
            note = ""
            prepared = time.perf_counter() - t0
        except Exception as e:  # report and continue with the other variants
            tps, note = None, f"{type(e).__name__}: {str(e)[:80]}"
        if variant == "bf16":
            bf16 = tps
        ratio = tps / bf16 if tps and bf16 else None
        rows.append([variant, f"{size / 2**30:.1f}" if size else "—", tps, f"{ratio:.2f}" if ratio else "—",
                     note or f"{prepared:.0f} s"])
        print(f"{variant:14s} {fmt_row(rows[-1])}", flush=True)
        step = qparams = None
        gc.collect()
        torch.cuda.empty_cache()
    table = markdown_table(["variant", "weights GiB", "tokens/s", "× bf16", "wall s (setup and run)"], rows)
    text = (f"Card: {card_name()}. Llama-3-8B shapes ({shape.layers} layers, random bf16 weights), batch 1, one "
            f"token per step with a static KV cache of {shape.max_seq}, each step one CUDA graph replay, "
            f"{args.tokens} tokens timed, " + ("compiled with torch.compile (inductor) before capture. "
            "`python benchmarks/decode.py --compile`." if args.compile else
            "eager (uncompiled) model. `python benchmarks/decode.py`.") + f"\n\n{table}")
    print(text)
    if args.doc:
        update_section(args.doc, "Decode, compiled" if args.compile else "Decode, eager", text)


def fmt_row(row):
    return " ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in row[1:])


if __name__ == "__main__":
    main()
