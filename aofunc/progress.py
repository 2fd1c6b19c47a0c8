"""What `progress=` means for every long-running function: True, a bar; False, none; None (the default), a bar when
the work is long and standard error is a terminal (so logs and pipelines stay clean)."""
from __future__ import annotations

import sys


def show_progress(progress: bool | None, long: bool, what: str) -> bool:
    """Whether to show a bar for work that is `long` (or not) under the caller's `progress`; `what` names the caller
    in the error for a value other than True, False or None."""
    if progress is None:
        return long and sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise TypeError(f"{what}: progress must be True, False or None, got {progress!r}")
    return progress
