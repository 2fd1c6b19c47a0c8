"""Hugging Face transformers checkpoints saved locally: checks, loading, and tokenized windows of text."""
from __future__ import annotations

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


def transformers_module():
    """The transformers package, or a clear error naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise UsageError("this command reads Hugging Face checkpoints and needs transformers: "
                         "pip install 'aofunc[hf]'") from None
    return transformers


def load(path: Path, device: str, dtype: torch.dtype):
    """``(model in eval mode with its decode cache off, tokenizer)`` from a checked model directory."""
    transformers = transformers_module()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a missing or broken tokenizer)
        raise UsageError(f"MODEL_DIR {str(path)!r}: its tokenizer files could not be loaded ({type(e).__name__}: {e})") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"MODEL_DIR {str(path)!r}: the model could not be loaded ({type(e).__name__}: {e})") from None
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer


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


def batch(input_ids: torch.Tensor) -> dict:
    """What the model's forward takes for a batch of token ids (no decode cache)."""
    return {"input_ids": input_ids, "use_cache": False}


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]
