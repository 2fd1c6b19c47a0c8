"""Quantize a Hugging Face checkpoint saved locally and write aofunc's safetensors file.

The model runs unmodified through functional_call. The weights of every linear-like call are taken, except
the embeddings and the output head, which stay in full precision. Calibration text comes from --calib (a file,
or a directory of text files), tokenized by the model's own tokenizer.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from aofunc.cli import hf_model
from aofunc.cli.errors import UsageError
from aofunc.cli.text import read_text

SCHEMES = ("int8wo", "int8dq", "int4", "8da4w", "nf4", "2:4")
METHODS = {  # method -> the schemes it takes
    "rtn": ("int8wo", "int8dq", "int4", "8da4w", "nf4"),
    "gptq": ("int4", "8da4w"),
    "smoothquant": ("int8dq",),
    "wanda": ("2:4",),
    "magnitude": ("2:4",),
}
CALIBRATED = ("gptq", "smoothquant", "wanda")
GROUPED = {"int4": 128, "8da4w": 32}  # schemes with groups, and their default group size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a directory written by save_pretrained (config, weights, tokenizer)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--scheme", required=True, choices=SCHEMES)
    p.add_argument("--group-size", type=int, default=None,
                   help="group size along the input dimension for int4 (default 128) and 8da4w (default 32)")
    p.add_argument("--calib", default=None, help="calibration text: a file or a directory (needed by gptq, smoothquant, wanda)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default %(default)s, capped by the model)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration batch (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength (default %(default)s)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=list(hf_model.DTYPES), default=None,
                   help="the model's dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--no-progress", action="store_true")


def scheme_of(name: str, group_size: int | None):
    import aofunc

    if name == "int8wo":
        return aofunc.Int8WeightOnly()
    if name == "int8dq":
        return aofunc.Int8Dynamic()
    if name == "int4":
        return aofunc.Int4WeightOnly(group_size or GROUPED["int4"])
    if name == "8da4w":
        return aofunc.Int8DynamicInt4(group_size or GROUPED["8da4w"])
    if name == "nf4":
        return aofunc.NF4()
    return aofunc.Sparse(pattern="2:4")


def check_arguments(args) -> None:
    """Every bad-input case that needs no model: refused before any work."""
    if args.scheme not in METHODS[args.method]:
        raise UsageError(f"--method {args.method} does not take --scheme {args.scheme}; it takes: "
                         f"{', '.join(METHODS[args.method])}")
    if args.group_size is not None:
        if args.scheme not in GROUPED:
            raise UsageError(f"--group-size applies to {' and '.join(GROUPED)} only, not --scheme {args.scheme}")
        if args.group_size not in (32, 64, 128, 256):
            raise UsageError(f"--group-size must be one of 32, 64, 128, 256, got {args.group_size}")
    if args.method in CALIBRATED and args.calib is None:
        raise UsageError(f"--method {args.method} calibrates on text: give --calib FILE_OR_DIR")
    for option in ("calib_samples", "seq_len", "batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha}")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a directory; give a file name")
    if out.exists() and not args.force:
        raise UsageError(f"--out {str(out)!r} exists; pass --force to overwrite it")
    if not out.parent.resolve().is_dir():
        raise UsageError(f"--out {str(out)!r}: the directory {str(out.parent)!r} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = hf_model.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    return device, dtype


def target_spec(model, params, example, scheme):
    """``scheme`` on every weight the model uses in a linear-like call, in the orientation it uses it, except the
    embeddings and the output head."""
    import aofunc
    from aofunc.capture import detect_transposed

    name_of = {id(p): name for name, p in model.named_parameters()}
    keep = {name_of.get(id(m.weight)) for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None}
    used = detect_transposed(model, params, example)
    rules = [aofunc.Rule(re.escape(name), scheme, transposed) for name, transposed in used.items()
             if params[name].dim() == 2 and name not in keep]
    if not rules:
        raise UsageError("the model makes no linear-like call with a weight other than its embeddings and output head")
    return aofunc.Spec(rules)


def run(args) -> int:
    import aofunc

    check_arguments(args)
    model_dir = hf_model.check_model_dir(args.model_dir)
    calib_text = read_text(args.calib, "--calib") if args.calib is not None else None
    device, dtype = device_and_dtype(args)
    model, tokenizer = hf_model.load(model_dir, device, dtype)
    limit = hf_model.max_positions(model)
    seq_len = min(args.seq_len, limit) if limit else args.seq_len
    if calib_text is not None:
        ids = hf_model.windows(tokenizer, calib_text, seq_len, "--calib")
        ids = ids[torch.linspace(0, ids.shape[0] - 1, min(args.calib_samples, ids.shape[0])).round().long()]
    else:  # round-to-nearest needs one batch only to see how the model uses each weight
        ids = torch.arange(min(16, seq_len))[None] % model.get_input_embeddings().weight.shape[0]
    batches = [hf_model.batch(chunk.to(device)) for chunk in ids.split(args.batch_size)]
    params = {name: p.detach() for name, p in model.named_parameters()}
    scheme = scheme_of(args.scheme, args.group_size)
    spec = target_spec(model, params, batches[0], scheme)
    progress = not args.no_progress

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

    with torch.no_grad():
        reference = hf_model.logits(aofunc.apply(model, params, **batches[0])).float()
        result = hf_model.logits(aofunc.apply(model, qparams, **batches[0])).float()
    aofunc.save(qparams, args.out)
    print(f"{args.method} {scheme}: {len(spec.rules)} weights in {seconds:.1f} s; "
          f"{aofunc.size_in_bytes(params):,} -> {aofunc.size_in_bytes(qparams):,} bytes; "
          f"output SQNR {float(aofunc.sqnr(reference, result)):.1f} dB on {batches[0]['input_ids'].shape[0]} "
          f"sequence(s) of {batches[0]['input_ids'].shape[1]} tokens")
    print(f"wrote {args.out}")
    return 0
