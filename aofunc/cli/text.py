"""Text the commands read: one file, or every file under a directory, each checked to be non-empty UTF-8 text."""
from __future__ import annotations

from pathlib import Path

from aofunc.cli.errors import UsageError


def read_file_text(path: Path, option: str) -> str:
    """The UTF-8 text of one file; a file that is empty, holds NUL bytes, or does not decode is refused."""
    data = path.read_bytes()
    if not data.strip():
        raise UsageError(f"{option}: {str(path)!r} is empty")
    if b"\x00" in data:
        raise UsageError(f"{option}: {str(path)!r} is not text (it holds NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{option}: {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_text(path, option: str) -> str:
    """The text of a file, or of every regular file under a directory in sorted path order, joined by blank lines."""
    path = Path(path)
    if path.is_file():
        return read_file_text(path, option)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UsageError(f"{option}: the directory {str(path)!r} holds no files")
        return "\n\n".join(read_file_text(p, option) for p in files)
    raise UsageError(f"{option}: {str(path)!r} does not exist")
