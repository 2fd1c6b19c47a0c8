"""The demo: quantize the trained model with every method and measure each on held-out files."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch

import aofunc
from aofunc.demo import checkpoint, data
from aofunc.demo.evaluate import decode_tokens_per_second, perplexity
from aofunc.demo.methods import LINEARS, METHODS, Method, Setup


@dataclass(frozen=True)
class Budget:
    """How much data each measurement reads: windows of ``seq_len + 1`` bytes."""

    eval_windows: int
    calib_windows: int
    seq_len: int
    batch_size: int
    decode_steps: int


FULL = Budget(eval_windows=64, calib_windows=32, seq_len=256, batch_size=16, decode_steps=128)
QUICK = Budget(eval_windows=4, calib_windows=4, seq_len=64, batch_size=4, decode_steps=8)


@dataclass
class Result:
    """One row of the demo's table. ``bits_per_weight`` counts the bytes stored for the weights the methods touch."""

    method: str
    description: str
    bits_per_weight: float | None = None
    size_bytes: int | None = None
    perplexity: float | None = None
    quantize_seconds: float | None = None
    eval_seconds: float | None = None
    decode_tokens_per_second: float | None = None
    error: str | None = None


def bits_per_weight(qparams, params) -> float:
    """``8 * bytes stored / weights`` over the block linears."""
    names = [n for n in params if re.fullmatch(LINEARS, n)]
    stored = sum(aofunc.size_in_bytes({n: qparams[n]}) for n in names)
    return 8 * stored / sum(params[n].numel() for n in names)


def measure(method: Method, setup: Setup, windows: torch.Tensor, budget: Budget, progress: bool) -> Result:
    """Runs one method and measures what it gives; an exception becomes the row's ``error``."""
    result = Result(method.name, method.description)
    on_cuda = next(iter(setup.params.values())).is_cuda
    try:
        start = time.perf_counter()
        qparams = method.transform(setup)
        if on_cuda:
            torch.cuda.synchronize()
        result.quantize_seconds = time.perf_counter() - start
        result.bits_per_weight = bits_per_weight(qparams, setup.params)
        result.size_bytes = aofunc.size_in_bytes(qparams)
        start = time.perf_counter()
        result.perplexity = perplexity(setup.model, qparams, windows, batch_size=budget.batch_size,
                                       progress=progress, desc=f"eval {method.name}")
        result.eval_seconds = time.perf_counter() - start
        if on_cuda:
            result.decode_tokens_per_second = decode_tokens_per_second(setup.model, qparams, budget.decode_steps)
    except Exception as e:  # noqa: BLE001  (one failing method must not hide the others' numbers)
        result.error = f"{type(e).__name__}: {e}"
    return result


def run(*, size: str = "small", device: str = "cpu", quick: bool = False, methods=METHODS, progress: bool = True,
        log=print) -> dict:
    """The demo's numbers: ``{"model": ..., "budget": ..., "results": [Result as dict, ...]}``."""
    budget = QUICK if quick else FULL
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, recipe, source = checkpoint.pretrained(size, device=device, progress=progress)
    model = model.to(device=device, dtype=dtype)
    params = {name: p.detach() for name, p in model.named_parameters()}
    train_tokens, heldout_tokens = data.corpus()
    seq_len = min(budget.seq_len, recipe.config.max_seq_len)
    windows = data.even_windows(heldout_tokens, budget.eval_windows, seq_len)
    calib = data.even_windows(train_tokens, budget.calib_windows, seq_len)[:, :-1].to(device)
    batches = list(calib.split(budget.batch_size))
    n_params = sum(p.numel() for p in params.values())
    log(f"model: {size}, {n_params / 1e6:.2f} M parameters ({source}); {dtype} on {device}")
    log(f"corpus: the standard library at {data.stdlib_root()}: {train_tokens.numel():,} training bytes, "
        f"{heldout_tokens.numel():,} held-out bytes; evaluating {windows.shape[0]} windows of {seq_len} bytes, "
        f"calibrating on {calib.shape[0]}")
    setup = Setup(model, params, batches, progress)
    results = []
    for method in methods:
        result = measure(method, setup, windows, budget, progress)
        results.append(result)
        log(f"  {method.name:14s} " + (f"perplexity {result.perplexity:.4f}, quantized in {result.quantize_seconds:.1f} s, "
                                        f"evaluated in {result.eval_seconds:.1f} s"
                                        if result.error is None else f"failed: {result.error}"))
    return {
        "model": {"size": size, "parameters": n_params, "source": source, "recipe": recipe.to_dict(),
                  "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "corpus": {"stdlib": str(data.stdlib_root()), "train_bytes": train_tokens.numel(),
                   "heldout_bytes": heldout_tokens.numel()},
        "budget": asdict(budget) | {"seq_len": seq_len},
        "results": [asdict(r) for r in results],
    }
