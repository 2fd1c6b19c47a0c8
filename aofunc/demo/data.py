"""The demo corpus: the running Python's standard library source, as bytes.

Files are read in sorted order of their path relative to the standard library root, so the corpus is the
same on every run of one Python version. A file belongs to the held-out split when the first byte of the
SHA-256 of its relative path is below ``256 * heldout_fraction``: the split depends on the path alone, so
a file keeps its side across Python versions and a file new in a later version is split the same way.
Tokens are bytes (vocabulary 256, nothing to download); files are joined with a NUL byte, which Python
source never contains.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

SEPARATOR = 0
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"})


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[str]:
    """Relative posix paths of the ``.py`` files under ``root``, sorted, without tests, encodings tables, and build data."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root {str(root)!r} is not a directory")
    paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata"):  # describes the build machine, not Python
            continue
        paths.append(rel.as_posix())
    return sorted(paths)


def is_heldout(rel_path: str, heldout_fraction: float = 0.1) -> bool:
    """Whether a file is in the held-out split: ``sha256(rel_path)[0] < 256 * heldout_fraction``."""
    return hashlib.sha256(rel_path.encode()).digest()[0] < round(256 * heldout_fraction)


def split_files(files: list[str], heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` relative paths, each in the order given."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    heldout = [f for f in files if is_heldout(f, heldout_fraction)]
    train = [f for f in files if not is_heldout(f, heldout_fraction)]
    return train, heldout


def tokens(files: list[str], root: Path | None = None) -> torch.Tensor:
    """The bytes of ``files`` joined by NUL separators, as a uint8 tensor."""
    root = stdlib_root() if root is None else Path(root)
    chunks = []
    for rel in files:
        chunks.append((root / rel).read_bytes())
        chunks.append(bytes([SEPARATOR]))
    data = b"".join(chunks)
    if not data:
        raise ValueError("files is empty: no tokens to read")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def corpus(heldout_fraction: float = 0.1, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, heldout)`` token streams of the standard library under ``root``."""
    train, heldout = split_files(source_files(root), heldout_fraction)
    return tokens(train, root), tokens(heldout, root)


def random_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len + 1`` tokens at uniformly drawn offsets, int64 [batch_size, seq_len + 1]."""
    if stream.numel() <= seq_len + 1:
        raise ValueError(f"stream has {stream.numel()} tokens, too few for windows of {seq_len + 1}")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()


def even_windows(stream: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``count`` windows of ``seq_len + 1`` tokens at evenly spaced offsets, int64 [count, seq_len + 1].

    The fixed evaluation and calibration sets: deterministic and spread over the whole stream.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    span = stream.numel() - seq_len - 1
    if span < 0:
        raise ValueError(f"stream has {stream.numel()} tokens, too few for windows of {seq_len + 1}")
    starts = torch.linspace(0, span, count, dtype=torch.float64).round().long()
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()
