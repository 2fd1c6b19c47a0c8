"""transformers' ``generate`` with quantized params: tokens/s of a Llama-3-8B-shaped model, int4 against bf16.

    python benchmarks/generate.py --layers 8 --new-tokens 128 --variants bf16,int4
    python benchmarks/render.py            # the tables of docs/benchmarks.md from benchmarks/results/; no GPU needed

The model is transformers' ``LlamaForCausalLM`` with Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32 heads,
8 key-value heads, vocabulary 128256) and ``--layers`` decoder layers, random bf16 weights. Each variant generates
``--new-tokens`` tokens greedily after a prompt of ``--prompt`` tokens, as transformers' recipe for speed runs it:
a static KV cache, with which ``generate`` compiles the decoding step itself (``CompileConfig(fullgraph=True,
mode="reduce-overhead")``; the prompt's forward runs uncompiled). The quantized
variants run the unmodified model under ``aofunc.bind(model, qparams)``. Tokens/s counts new tokens over the wall
time of a whole ``generate`` call (prefill included), after two warm-up calls; the row also says where that time
went: ``prefill_ms`` (a call for one token) and ``step_ms`` (each further token). bf16 runs first in the same
process; each variant gives a ``generate`` row recorded with ``common.record_rows``. ``--tiny`` builds a two-layer
model of small shapes without compiling, on the CPU when there is no GPU (a smoke test of the script, not a
measurement). ``--profile``, after every variant is timed (a profiler session slows the launches that follow it),
prints for each how much of a token's wall time the GPU was busy: below the wall time, the host sets the pace.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aofunc  # noqa: E402
from common import add_record_options, card_name, git_commit, markdown_table, recorder  # noqa: E402

LINEARS = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight"
SCHEMES = {"int4": aofunc.Int4WeightOnly(128), "int8wo": aofunc.Int8WeightOnly(), "nf4": aofunc.NF4()}
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=2048)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=256)
MODE = "compile-static"


def build_model(layers: int, tiny: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, **(TINY if tiny else LLAMA3_8B))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    model.generation_config.cache_implementation = "static"
    model.generation_config.pad_token_id = 0
    if not tiny:
        # generate compiles the decoding forward itself when the cache is static and the model on a GPU; compiling
        # model.forward by hand as well makes the prefill's CUDA graphs overwrite the cache the decoding step reads
        from transformers import CompileConfig
        model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    return model


def timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(seconds, the new tokens) of one greedy ``generate`` call of exactly ``new_tokens`` tokens."""
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out[:, prompt.shape[1]:]


def tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, warmup: int = 2) -> tuple[float, torch.Tensor, dict]:
    """(new tokens per second of one greedy ``generate`` call, the tokens it produced, where its time went), after
    ``warmup`` calls. Where the time went: ``prefill_ms``, a call for one token (the prompt's forward and the
    call's own work), and ``step_ms``, each further token: the difference of the two calls over the extra tokens."""
    with torch.no_grad():
        for _ in range(warmup):
            timed_generate(model, prompt, new_tokens)
            timed_generate(model, prompt, 1)
        seconds, tokens = timed_generate(model, prompt, new_tokens)
        one, _ = timed_generate(model, prompt, 1)
    split = {"prefill_ms": round(1e3 * one, 3),
             "step_ms": round(1e3 * (seconds - one) / (new_tokens - 1), 3) if new_tokens > 1 else None}
    return new_tokens / seconds, tokens, split


def print_gpu_busy(model, prompt: torch.Tensor, new_tokens: int, label: str) -> None:
    """The GPU's busy time against the wall time of one ``generate`` call, a token each (kernels summed as the
    profiler records them, CUDA-graph replays included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if not prompt.is_cuda:
        print(f"{label}: no GPU, nothing to profile")
        return
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        seconds, _ = timed_generate(model, prompt, new_tokens)
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    print(f"{label}: GPU busy {busy_us / 1e3 / new_tokens:.3f} ms a token of {1e3 * seconds / new_tokens:.3f} ms "
          f"wall (profiled call)", flush=True)


def generate_row(variant: str, layers: int, tps: float, bf16_tps, prompt: int, new_tokens: int, mode: str,
                 split: dict) -> dict:
    """The ``generate`` results row (benchmarks/common.py) of one variant, with where its time went."""
    return {"kind": "generate", "variant": variant, "batch": 1, "layers": layers, "mode": mode,
            "tokens_per_s": round(tps, 2), "bf16_tokens_per_s": round(bf16_tps, 2) if bf16_tps else None,
            "prompt": prompt, "tokens": new_tokens, **split, "commit": git_commit()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="bf16,int4")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="small shapes, no compile: a smoke test of the script")
    parser.add_argument("--profile", action="store_true", help="then print each variant's GPU busy time a token")
    add_record_options(parser)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.layers, args.tiny, device)
    mode = "eager-static" if args.tiny else MODE
    params = {name: p.detach() for name, p in model.named_parameters()}
    prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    print(f"card: {card_name()}, torch {torch.__version__}", flush=True)
    variants = sorted(args.variants.split(","), key=lambda v: v != "bf16")  # bf16 first: others carry its speed
    rows, bf16_tps, bf16_tokens, trees = [], None, None, {}
    for variant in variants:
        if variant == "bf16":
            trees[variant] = params
            tps, tokens, split = tokens_per_s(model, prompt, args.new_tokens)
            bf16_tps, bf16_tokens = tps, tokens
        elif variant in SCHEMES:
            trees[variant] = aofunc.quantize(params, aofunc.Spec([aofunc.Rule(LINEARS, SCHEMES[variant])]))
            with aofunc.bind(model, trees[variant]):
                tps, tokens, split = tokens_per_s(model, prompt, args.new_tokens)
        else:
            raise SystemExit(f"unknown variant {variant!r}: expected bf16 or one of {', '.join(SCHEMES)}")
        same = None if bf16_tokens is None or variant == "bf16" else float((tokens == bf16_tokens).float().mean())
        rows.append(generate_row(variant, args.layers, tps, bf16_tps, args.prompt, args.new_tokens, mode, split))
        print(f"{variant}: {tps:.1f} tokens/s" + (f" ({tps / bf16_tps:.2f}x bf16)" if bf16_tps else "")
              + f"; one-token call {split['prefill_ms']} ms, then {split['step_ms']} ms a token"
              + (f", {100 * same:.0f} % of tokens as bf16's" if same is not None else ""), flush=True)
    recorder(args)(rows)
    if args.profile:
        for variant, tree in trees.items():
            with aofunc.bind(model, tree):
                print_gpu_busy(model, prompt, args.new_tokens, variant)
    print(markdown_table(["variant", "tokens/s", "bf16 tokens/s"],
                         [[r["variant"], r["tokens_per_s"], r["bf16_tokens_per_s"]] for r in rows]))


if __name__ == "__main__":
    main()
