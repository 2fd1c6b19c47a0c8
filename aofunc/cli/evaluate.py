"""Perplexity of a Hugging Face checkpoint saved locally on a text, in full precision or with a file of quantized params.

The text (a file, or a directory of text files) is tokenized by the model's own tokenizer and cut into
consecutive windows of --seq-len tokens; the perplexity is exp of the mean next-token loss over them.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aofunc.cli import hf_model
from aofunc.cli.errors import UsageError
from aofunc.cli.text import read_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="a directory written by save_pretrained (config, weights, tokenizer), or the id of a model "
                        "in the local Hugging Face cache")
    p.add_argument("--qparams", default=None, help="a file written by 'python -m aofunc quantize' (default: the float model)")
    p.add_argument("--text", required=True, help="the text to score: a file or a directory")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default %(default)s, capped by the model)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows, evenly spread")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=list(hf_model.DTYPES), default=None,
                   help="the model's dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' included)")


def perplexity(model, params, windows: torch.Tensor, batch_size: int, device: str, progress: bool) -> float:
    """``exp(mean NLL)`` of each window's tokens 1.. given the tokens before them."""
    import aofunc

    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in tqdm(windows.split(batch_size), desc="eval", disable=not progress, leave=False):
            chunk = chunk.to(device)
            logits = hf_model.logits(aofunc.apply(model, params, **hf_model.batch(chunk))).float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return math.exp(total / count)


def run(args) -> int:
    import aofunc
    from aofunc.cli.quantize import device_and_dtype

    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    model_dir = hf_model.resolve_model_dir(args.model_dir)
    if args.qparams is not None and not Path(args.qparams).is_file():
        raise UsageError(f"--qparams {args.qparams!r} is not a file")
    text = read_text(args.text, "--text")
    device, dtype = device_and_dtype(args)
    model, tokenizer = hf_model.load(model_dir, device, dtype, progress=not args.no_progress)
    params = {name: p.detach() for name, p in model.named_parameters()}
    if args.qparams is not None:
        try:
            loaded = aofunc.load(args.qparams, device=device)
        except (ValueError, OSError) as e:
            raise UsageError(f"--qparams: {e}") from None
        unknown = sorted(set(loaded) - set(params))
        if unknown:
            raise UsageError(f"--qparams {args.qparams!r} does not fit MODEL_DIR: the model has no parameter "
                             f"{unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        params.update({name: t.to(dtype) if t.is_floating_point() else t for name, t in loaded.items()})
    limit = hf_model.max_positions(model)
    seq_len = min(args.seq_len, limit) if limit else args.seq_len
    windows = hf_model.windows(tokenizer, text, seq_len, "--text")
    if args.max_windows is not None:
        windows = hf_model.spread(windows, args.max_windows)
    ppl = perplexity(model, params, windows, args.batch_size, device, not args.no_progress)
    source = args.qparams if args.qparams is not None else "full precision"
    print(f"perplexity {ppl:.4f} over {windows.shape[0] * (windows.shape[1] - 1):,} predicted tokens "
          f"({windows.shape[0]} window(s) of {windows.shape[1]}; {source})")
    return 0
