"""Quantize a Hugging Face checkpoint saved locally and write aofunc's safetensors file.

MODEL_DIR is a directory written by save_pretrained, or the id of a model in the local Hugging Face cache (read
offline). The model runs unmodified through functional_call. The weights of every linear-like call are taken,
except the embeddings and the output head, which stay in full precision. Calibration text comes from --calib (a
file, or a directory of text files), tokenized by the model's own tokenizer; rtn and magnitude read no text and
need no tokenizer. The output SQNR printed at the end is measured on --eval-text when given, else on one fixed
synthetic batch of random tokens, the same for every method.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from pathlib import Path

import torch

from aofunc.cli import hf_model
from aofunc.formats import Int4WeightOnly, Int8Dynamic
from aofunc.formats.int4 import ZERO_POINTS
from aofunc.formats.scheme import GROUP_SIZES, grouped_schemes, scheme_from_name, scheme_names
from aofunc.cli.errors import UsageError
from aofunc.cli.text import read_text

FORMATS = tuple(scheme_names())  # the stored formats by their short names: int4, int8wo, int8dq, 8da4w, nf4
SCHEMES = FORMATS + ("2:4",)
METHODS = {  # method -> the schemes it takes
    "rtn": FORMATS,
    "gptq": tuple(cls.short_name for cls in grouped_schemes()),
    "smoothquant": (Int8Dynamic.short_name,),
    "wanda": ("2:4",),
    "magnitude": ("2:4",),
}
CALIBRATED = ("gptq", "smoothquant", "wanda")
OUT_FORMATS = ("aofunc", "compressed-tensors")
#: the schemes --format compressed-tensors writes (int4 only on the integer and symmetric grids)
EXPORTED = (Int4WeightOnly.short_name, "int8wo", Int8Dynamic.short_name)
EVAL_WINDOWS = 8  # windows of --eval-text the output SQNR is measured on, at most
SYNTHETIC = (4, 64, 0)  # the synthetic batch: sequences, tokens per sequence (at most --seq-len), seed
# formats with groups along K, and their default group size
GROUPED = {name: cls().group_size for name, cls in scheme_names().items() if hasattr(cls(), "group_size")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="a directory written by save_pretrained (config, weights, tokenizer), or the id of a model "
                        "in the local Hugging Face cache")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--scheme", required=True, choices=SCHEMES)
    p.add_argument("--group-size", type=int, default=None,
                   help="group size along the input dimension for int4 (default 128) and 8da4w (default 32)")
    p.add_argument("--zero-point", choices=list(ZERO_POINTS), default=None,
                   help="the int4 grid: float (tinygemm's, the default), int (integer zero points, as GPTQ "
                        "checkpoints store them) or none (symmetric)")
    p.add_argument("--calib", default=None, help="calibration text: a file or a directory (needed by gptq, smoothquant, wanda)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default %(default)s, capped by the model)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration batch (default %(default)s)")
    p.add_argument("--eval-text", default=None,
                   help=f"text to measure the output SQNR on: a file or a directory (at most {EVAL_WINDOWS} windows "
                        "of --seq-len tokens; default: a fixed synthetic batch)")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength (default %(default)s)")
    p.add_argument("--format", choices=list(OUT_FORMATS), default="aofunc",
                   help="aofunc (default): one .safetensors file that aofunc.load reads; compressed-tensors: a "
                        "Hugging Face model directory that transformers and vLLM load (int4 with --zero-point int "
                        "or none, int8wo, int8dq)")
    p.add_argument("--out", required=True,
                   help="the .safetensors file to write (--format aofunc) or the model directory (--format "
                        "compressed-tensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=list(hf_model.DTYPES), default=None,
                   help="the model's dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' included)")


def scheme_of(name: str, group_size: int | None, zero_point: str | None = None):
    import aofunc

    if name == "2:4":
        return aofunc.Sparse(pattern="2:4")
    scheme = scheme_from_name(name, group_size)
    if zero_point is not None:
        scheme = dataclasses.replace(scheme, zero_point=zero_point)
    return scheme


def check_arguments(args) -> None:
    """Every bad-input case that needs no model: refused before any work."""
    if args.scheme not in METHODS[args.method]:
        raise UsageError(f"--method {args.method} does not take --scheme {args.scheme}; it takes: "
                         f"{', '.join(METHODS[args.method])}")
    if args.group_size is not None:
        if args.scheme not in GROUPED:
            raise UsageError(f"--group-size applies to {' and '.join(GROUPED)} only, not --scheme {args.scheme}")
        if args.group_size not in GROUP_SIZES:
            raise UsageError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {args.group_size}")
    if getattr(args, "zero_point", None) is not None and args.scheme != Int4WeightOnly.short_name:
        raise UsageError(f"--zero-point applies to --scheme {Int4WeightOnly.short_name} only, not --scheme "
                         f"{args.scheme}")
    if args.method in CALIBRATED and args.calib is None:
        raise UsageError(f"--method {args.method} calibrates on text: give --calib FILE_OR_DIR")
    for option in ("calib_samples", "seq_len", "batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha}")
    out = Path(args.out)
    if getattr(args, "format", "aofunc") == "compressed-tensors":
        check_export_arguments(args, out)
    elif out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a directory; give a file name")
    if out.exists() and not args.force:
        raise UsageError(f"--out {str(out)!r} exists; pass --force to overwrite it")
    if not out.parent.resolve().is_dir():
        raise UsageError(f"--out {str(out)!r}: the directory {str(out.parent)!r} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")


def check_export_arguments(args, out: Path) -> None:
    """--format compressed-tensors takes the schemes it writes exactly, and --out is a directory."""
    if args.scheme not in EXPORTED:
        raise UsageError(f"--format compressed-tensors writes --scheme {', '.join(EXPORTED)} (int4 with --zero-point "
                         f"int or none), not --scheme {args.scheme}")
    if args.scheme == Int4WeightOnly.short_name and args.zero_point not in ("int", "none"):
        raise UsageError("--format compressed-tensors holds int4 on integer zero points or symmetric groups: add "
                         "--zero-point int (or --zero-point none); the default float-zero grid has no "
                         "compressed-tensors form")
    if args.method == "smoothquant":
        raise UsageError("--format compressed-tensors cannot hold SmoothQuant's act_scale; use --method rtn or "
                         "gptq")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; --format compressed-tensors writes a directory")
    if out.exists() and not args.force:
        raise UsageError(f"--out {str(out)!r} exists; pass --force to overwrite it")
    if not out.parent.resolve().is_dir():
        raise UsageError(f"--out {str(out)!r}: the directory {str(out.parent)!r} does not exist")


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = hf_model.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    return device, dtype


def is_router(name: str) -> bool:
    """A mixture-of-experts router (`mlp.gate`) or shared-expert gate (`shared_expert_gate`): kept in full
    precision, as the embeddings are (the routing decides which expert runs)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and (parts[-2] in ("gate", "router")
                                                          or parts[-2].endswith("expert_gate"))


def target_spec(model, params, example, scheme):
    """``scheme`` on every weight the model uses in a linear-like call, in the orientation it uses it, stacked
    experts included, except the embeddings, the output head and the routers (MoE gates)."""
    import aofunc
    from aofunc.capture import detect_uses
    from aofunc.spec import is_conv_name

    name_of = {id(p): name for name, p in model.named_parameters()}
    keep = {name_of.get(id(m.weight)) for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None}
    uses = detect_uses(model, params, example)
    rules = [aofunc.Rule(re.escape(name), scheme, "in_out" in found) for name, found in uses.items()
             if name not in keep and not is_router(name) and "conv" not in found
             and (params[name].dim() == 2 or (params[name].dim() == 3 and not is_conv_name(name)))]
    if not rules:
        raise UsageError("the model makes no linear-like call with a weight other than its embeddings and output head")
    return aofunc.Spec(rules)


def synthetic_batch(model, seq_len: int, device: str) -> dict:
    """One fixed batch of token ids drawn uniformly from the vocabulary with a fixed seed: the same for every
    method, so the output SQNR of two runs on one model compares."""
    sequences, tokens, seed = SYNTHETIC
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (sequences, min(tokens, seq_len)), generator=torch.Generator().manual_seed(seed))
    return hf_model.batch(ids.to(device))


def output_sqnr(model, params, qparams, batches) -> float:
    """SQNR in dB of the quantized model's logits against the float model's over every batch:
    10 log10(Σ ref² / Σ (ref - out)²), summed batch by batch."""
    import aofunc

    signal = noise = 0.0
    with torch.no_grad():
        for b in batches:
            reference = hf_model.logits(aofunc.apply(model, params, **b)).float()
            result = hf_model.logits(aofunc.apply(model, qparams, **b)).float()
            signal += float(reference.square().sum(dtype=torch.float64))
            noise += float((reference - result).square().sum(dtype=torch.float64))
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)


def run(args) -> int:
    import aofunc

    check_arguments(args)
    model_dir = hf_model.resolve_model_dir(args.model_dir)
    calibrated = args.method in CALIBRATED
    if args.calib is not None and not calibrated:
        print(f"note: --method {args.method} reads no calibration text; --calib is not used", file=sys.stderr)
    calib_text = read_text(args.calib, "--calib") if calibrated else None
    eval_text = read_text(args.eval_text, "--eval-text") if args.eval_text is not None else None
    device, dtype = device_and_dtype(args)
    progress = not args.no_progress
    model, tokenizer = hf_model.load(model_dir, device, dtype, progress=progress,
                                     tokenizer=calib_text is not None or eval_text is not None)
    limit = hf_model.max_positions(model)
    seq_len = min(args.seq_len, limit) if limit else args.seq_len
    synthetic = synthetic_batch(model, seq_len, device)
    if calib_text is not None:
        ids = hf_model.spread(hf_model.windows(tokenizer, calib_text, seq_len, "--calib"), args.calib_samples)
        batches = [hf_model.batch(chunk.to(device)) for chunk in ids.split(args.batch_size)]
    else:  # rtn and magnitude need one batch only, to see how the model uses each weight
        batches = [synthetic]
    if eval_text is not None:
        ids = hf_model.spread(hf_model.windows(tokenizer, eval_text, seq_len, "--eval-text"), EVAL_WINDOWS)
        eval_batches = [hf_model.batch(chunk.to(device)) for chunk in ids.split(args.batch_size)]
        measured_on = f"--eval-text {args.eval_text} ({ids.shape[0]} window(s) of {ids.shape[1]} tokens)"
    else:
        eval_batches = [synthetic]
        shape = synthetic["input_ids"].shape
        measured_on = (f"a fixed synthetic batch ({shape[0]} sequences of {shape[1]} random tokens; "
                       "give --eval-text to measure on text)")
    params = {name: p.detach() for name, p in model.named_parameters()}
    scheme = scheme_of(args.scheme, args.group_size, args.zero_point)
    spec = target_spec(model, params, batches[0], scheme)

    start = time.perf_counter()
    if args.method == "rtn":
        qparams = aofunc.quantize(params, spec, model=model, example=batches[0], progress=progress)
    elif args.method == "gptq":
        qparams = aofunc.gptq(params, batches, model=model, spec=spec, progress=progress)
    elif args.method == "smoothquant":
        qparams = aofunc.smoothquant(params, batches, model=model, spec=spec, alpha=args.alpha, progress=progress)
    elif args.method == "wanda":
        qparams = aofunc.wanda(params, batches, model=model, spec=spec, progress=progress)
    else:
        qparams = aofunc.prune(params, spec)
    seconds = time.perf_counter() - start

    sqnr = output_sqnr(model, params, qparams, eval_batches)
    if getattr(args, "format", "aofunc") == "compressed-tensors":
        from aofunc.pretrained import ExportError

        try:
            aofunc.save_pretrained(qparams, args.out, base=model_dir, overwrite=args.force)
        except ExportError as e:
            raise UsageError(str(e)) from None
    else:
        aofunc.save(qparams, args.out)
    experts = sum(1 for t in qparams.values() if isinstance(t, aofunc.QTensor) and t.stacked)
    print(f"{args.method} {scheme}: {len(spec.rules)} weights ({experts} stacked-expert tensors) in {seconds:.1f} s; "
          f"{aofunc.size_in_bytes(params):,} -> {aofunc.size_in_bytes(qparams):,} bytes; "
          f"output SQNR {sqnr:.1f} dB on {measured_on}")
    print(f"wrote {args.out}")
    return 0
