"""Held-out perplexity of a params tree run through the unmodified model."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm


def perplexity(model, params, windows: torch.Tensor, *, batch_size: int = 16, progress: bool = True, desc: str = "eval") -> float:
    """``exp(mean NLL per byte)`` of predicting ``windows[:, 1:]`` from ``windows[:, :-1]`` with ``model`` under ``params``.

    ``windows`` is int64 [count, seq_len + 1] (see ``data.even_windows``); the model runs on the device of
    its params, in their dtype. A uniform guess over bytes scores 256.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [count, seq_len + 1] with seq_len >= 1, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(iter(params.values())).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            logits = functional_call(model, params, (batch[:, :-1],))
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def decode_tokens_per_second(model, params, steps: int, *, warmup: int = 4) -> float:
    """Greedy decoding speed of one sequence with the key/value cache: ``steps / seconds`` after ``warmup`` steps.

    Each step runs the model on one new token through ``functional_call``; on CUDA the clock is read after
    synchronizing.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if warmup + steps > model.config.max_seq_len:
        raise ValueError(f"warmup + steps ({warmup + steps}) exceeds the model's max_seq_len ({model.config.max_seq_len})")
    device = next(iter(params.values())).device
    model.setup_cache(batch=1, max_len=warmup + steps)
    try:
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        with torch.no_grad():
            for i in range(warmup + steps):
                if i == warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                pos = torch.tensor([i], device=device)
                token = functional_call(model, params, (token, pos))[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return steps / (time.perf_counter() - start)
    finally:
        model.remove_cache()
