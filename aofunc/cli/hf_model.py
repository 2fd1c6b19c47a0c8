"""Hugging Face transformers checkpoints saved locally or in the local Hugging Face cache: checks, loading, and
tokenized windows of text."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from aofunc.cli.errors import UsageError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path) -> Path:
    """``path`` as a Path, refused unless it is a directory holding ``config.json`` and weights."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"MODEL_DIR {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {str(path)!r} has no config.json (save the model with save_pretrained)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"MODEL_DIR {str(path)!r} has no weights (none of {', '.join(WEIGHT_FILES)})")
    return path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it, read from the environment now (not when
    huggingface_hub was imported): ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(model_id: str) -> Path | None:
    """The directory of the local Hugging Face cache's snapshot of ``model_id`` ("org/name" at revision main), or
    None when the cache has none. Reads the cache only: nothing goes over the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        config = try_to_load_from_cache(model_id, "config.json", cache_dir=hub_cache_dir())
    except ValueError:  # not a valid model id (huggingface_hub's HFValidationError)
        return None
    return Path(config).parent if isinstance(config, str) else None


def resolve_model_dir(name) -> Path:
    """MODEL_DIR as a checked directory: ``name`` itself when it is a directory, else the local Hugging Face cache's
    snapshot of the model id ``name`` (offline); refused when it is neither."""
    path = Path(name)
    if not path.is_dir():
        snapshot = cached_snapshot(str(name))
        if snapshot is None:
            raise UsageError(f"MODEL_DIR {str(name)!r} is not a directory, nor the id of a model in the local "
                             f"Hugging Face cache ({hub_cache_dir()})")
        path = snapshot
    return check_model_dir(path)


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """transformers' and huggingface_hub's progress bars (transformers' "Loading weights") off inside the block
    when not ``enabled``, then as they were."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    transformers_on, hub_on = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        (hub_utils.enable_progress_bars if hub_on else hub_utils.disable_progress_bars)()


def transformers_module():
    """The transformers package, or a clear error naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise UsageError("this command reads Hugging Face checkpoints and needs transformers: "
                         "pip install 'aofunc[hf]'") from None
    return transformers


def load(path: Path, device: str, dtype: torch.dtype, *, tokenizer: bool = True, progress: bool = True):
    """``(model in eval mode with its decode cache off, tokenizer)`` from a checked model directory; the tokenizer
    is None when not asked for (its files are then not read)."""
    transformers = transformers_module()
    tok = None
    with progress_bars(progress):
        if tokenizer:
            try:
                tok = transformers.AutoTokenizer.from_pretrained(path)
            except Exception as e:  # noqa: BLE001  (transformers raises many types for a missing or broken tokenizer)
                raise UsageError(f"MODEL_DIR {str(path)!r}: its tokenizer files could not be loaded "
                                 f"({type(e).__name__}: {e})") from None
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"MODEL_DIR {str(path)!r}: the model could not be loaded ({type(e).__name__}: {e})") from None
    model.config.use_cache = False
    return model.to(device).eval(), tok


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings take, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def windows(tokenizer, text: str, seq_len: int, option: str) -> torch.Tensor:
    """The text's token ids cut into consecutive windows of ``seq_len`` (the last partial one dropped), int64 [n, seq_len].

    A text shorter than one window gives one window of all its tokens.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 2:
        raise UsageError(f"{option}: the text gives {ids.numel()} token(s); at least 2 are needed")
    if ids.numel() < seq_len:
        return ids[None]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def spread(windows: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` of the windows, evenly spread over them (the first and the last among them)."""
    if windows.shape[0] <= n:
        return windows
    return windows[torch.linspace(0, windows.shape[0] - 1, n).round().long()]


def batch(input_ids: torch.Tensor) -> dict:
    """What the model's forward takes for a batch of token ids (no decode cache)."""
    return {"input_ids": input_ids, "use_cache": False}


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]
