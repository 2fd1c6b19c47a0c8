"""Launch configurations for Triton kernels: shipped defaults, an on-disk cache, and a search run only when asked.

A configuration is a plain dict of launch meta-parameters (block sizes, ``num_warps``, ``num_stages``) that a
launcher passes straight to ``kernel[grid](..., **config)``. It is keyed on
``(kernel name, M bucket, N, K, dtypes, device name)``, M rounded up to a power of two.

``choose`` answers, in order: a winner found earlier in this process or stored in the user cache file, a
winner shipped with the package for this card (``kernels/configs/<device-slug>.json``; skipped when
``AOFUNC_SHIPPED_CONFIGS=0``), a new search when tuning is on (``with tuning():`` or ``AOFUNC_AUTOTUNE=1``), and
otherwise the launcher's default, which is a model of the card: block sizes and splits of K from its
multiprocessor count and the shape. A search checks every candidate against the reference twin before timing it
and stores the fastest correct one in the user cache (``$AOFUNC_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/aofunc/kernels.json``, else ``~/.cache/aofunc/kernels.json``). A user cache that cannot be read
(not JSON, another program's file, another version) is ignored with a warning naming it, never used, never
overwritten.

Example::

    key = config_key("w4a16", m, n, k, (x.dtype, scale.dtype), x.device)
    config = choose(key, default={"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                    candidates=lambda: [...], run=lambda c: launch(c), reference=lambda: twin(), tolerance=1e-2)
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import torch

Config = dict  # meta-parameter name -> int (or bool), as passed to a Triton launch
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"


class ConfigKey(NamedTuple):
    """The identity of one tuning problem; ``str(key)`` (device excluded) names it inside a device's table."""

    kernel: str
    m_bucket: int
    n: int
    k: int
    dtypes: tuple
    device: str

    def __str__(self) -> str:
        return f"{self.kernel}|m={self.m_bucket}|n={self.n}|k={self.k}|{','.join(self.dtypes)}"


class Trial(NamedTuple):
    """One candidate of a search: its median time in microseconds, or None with the reason it was rejected."""

    config: Config
    us: Optional[float]
    reason: str


def m_bucket(m: int) -> int:
    """The smallest power of two ``>= m``: rows of the activation share a configuration within a bucket."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    return 1 << (m - 1).bit_length()


def config_for_m(m: int, device, by_m_max, larger: Config, interpreter: Config) -> Config:
    """A copy of the first config of ((m_max, config), ...) whose m_max >= m on CUDA, else `larger`;
    `interpreter` off CUDA (small tiles that Triton's interpreter runs quickly)."""
    if torch.device(device).type != "cuda":
        return dict(interpreter)
    return dict(next((config for m_max, config in by_m_max if m <= m_max), larger))


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device) -> str:
    """The card's marketing name for a CUDA device (``"NVIDIA H100 80GB HBM3"``), the device type otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


def device_slug(name: str) -> str:
    """The file-name form of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_key(kernel: str, m: int, n: int, k: int, dtypes: Iterable, device) -> ConfigKey:
    """The key of a launch: kernel name, M bucket, N, K, operand dtypes, and the device (a torch.device or a name)."""
    name = device_name(device) if isinstance(device, torch.device) else str(device)
    return ConfigKey(kernel, m_bucket(m), int(n), int(k), tuple(_dtype_name(d) for d in dtypes), name)


def cache_path() -> Path:
    """The user cache file: ``$AOFUNC_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/aofunc/kernels.json``, else ``~/.cache``."""
    explicit = os.environ.get("AOFUNC_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "aofunc" / "kernels.json"


def shipped_path(device: str) -> Path:
    """The file of tuned configurations shipped for a device name."""
    return SHIPPED_DIR / f"{device_slug(device)}.json"


def read_table(path: Path) -> dict:
    """``{device name: {str(key): config}}`` from a cache or shipped file; empty if the file does not exist."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    if data.get("version") != FORMAT_VERSION or not isinstance(data.get("configs"), dict):
        raise ValueError(f"{path}: not an aofunc kernel configuration file of version {FORMAT_VERSION}")
    return data["configs"]


def write_table(path: Path, table: dict) -> None:
    """Write ``{device name: {str(key): config}}`` atomically (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"version": FORMAT_VERSION, "configs": table}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


# Winners known in this process, keyed by ConfigKey; filled from the files lazily, one device at a time.
_known: dict = {}
_loaded_devices: set = set()
_tuning: list = []  # stack of (enabled, retune, verify, keys searched) set by `tuning()`


def shipped_enabled() -> bool:
    """False when ``AOFUNC_SHIPPED_CONFIGS=0``: only the user cache and the card model (the launchers' defaults)."""
    return os.environ.get("AOFUNC_SHIPPED_CONFIGS", "1") != "0"


def _valid_entries(table, path: Path) -> dict:
    """The {device: {key text: config}} entries of a user cache whose configs are plain dicts of meta-parameters;
    others are dropped with a warning."""
    out = {}
    for device, entries in table.items():
        if not isinstance(entries, dict):
            warnings.warn(f"aofunc: ignoring the entries for {device!r} in the kernel cache {path}: not a mapping")
            continue
        for text, config in entries.items():
            if isinstance(config, dict) and all(isinstance(k, str) and isinstance(v, (int, bool, str))
                                                for k, v in config.items()):
                out.setdefault(device, {})[text] = config
            else:
                warnings.warn(f"aofunc: ignoring the malformed entry {text!r} in the kernel cache {path}")
    return out


def read_user_cache(path: Path) -> Optional[dict]:
    """The user cache's table, or None (with a warning naming the file) when it exists but cannot be used."""
    try:
        return _valid_entries(read_table(path), path)
    except (OSError, ValueError, TypeError, AttributeError) as error:  # json's errors are ValueErrors
        warnings.warn(f"aofunc: ignoring the kernel cache {path}: it is not an aofunc kernel configuration file "
                      f"({type(error).__name__}: {error}); remove it or set AOFUNC_KERNEL_CACHE to another path")
        return None


def _load_device(device: str) -> None:
    if device in _loaded_devices:
        return
    _loaded_devices.add(device)
    if shipped_enabled():
        for text, config in read_table(shipped_path(device)).get(device, {}).items():
            _known[(device, text)] = config
    for text, config in (read_user_cache(cache_path()) or {}).get(device, {}).items():  # overrides shipped
        _known[(device, text)] = config


def lookup(key: ConfigKey) -> Optional[Config]:
    """The stored winner for ``key`` (this process, the user cache, or shipped for the card), or None."""
    _load_device(key.device)
    return _known.get((key.device, str(key)))


def same_tile_config(key: ConfigKey, default: Config) -> Optional[Config]:
    """For 2 to 8 rows whose default is a GEMM, the stored GEMM configuration of the 16-row bucket when its tiles
    are 16 rows: such tiles pad x to 16 rows, so the winner's time at 16 rows bounds its time at fewer, and a
    tuned 16-row key then serves the 2, 4 and 8-row keys no search has reached. None otherwise."""
    if not 1 < key.m_bucket < 16 or default.get("path") != "gemm":
        return None
    config = lookup(key._replace(m_bucket=16))
    if config is not None and config.get("path") == "gemm" and config.get("BLOCK_M") == 16:
        return dict(config)
    return None


def store(key: ConfigKey, config: Config) -> None:
    """Remember ``config`` for ``key`` in this process and in the user cache file (unless that file is unusable)."""
    _load_device(key.device)
    _known[(key.device, str(key))] = dict(config)
    _update_user_cache(lambda table: table.setdefault(key.device, {}).__setitem__(str(key), dict(config)))


def discard(key: ConfigKey) -> None:
    """Drop the stored winner for ``key`` from this process and from the user cache file."""
    _load_device(key.device)
    _known.pop((key.device, str(key)), None)
    _update_user_cache(lambda table: table.get(key.device, {}).pop(str(key), None))


def _update_user_cache(change: Callable[[dict], object]) -> None:
    path = cache_path()
    table = read_user_cache(path)
    if table is None:
        return  # an unusable file is left as it is (the warning named it)
    change(table)
    write_table(path, table)


def forget() -> None:
    """Drop what this process has read or found, so the next ``lookup`` reads the files again."""
    _known.clear()
    _loaded_devices.clear()


@contextlib.contextmanager
def tuning(enabled: bool = True, *, retune: bool = False, verify: bool = False) -> Iterator[list]:
    """Within the block, launches on a key without a stored winner search for one (``retune``: every key).

    Yields the list of keys searched in the block, filled as searches run. ``verify``: a stored winner is first
    checked against the reference twin, and discarded (from the user cache too) when it fails or does not launch.
    """
    searched: list = []
    _tuning.append((enabled, retune, verify, searched))
    try:
        yield searched
    finally:
        _tuning.pop()


def tuning_enabled() -> bool:
    """True inside ``tuning()``, else when the environment variable ``AOFUNC_AUTOTUNE`` is ``1``."""
    if _tuning:
        return _tuning[-1][0]
    return os.environ.get("AOFUNC_AUTOTUNE", "0") == "1"


def _retuning() -> bool:
    return bool(_tuning) and _tuning[-1][0] and _tuning[-1][1]


def _verifying() -> bool:
    return bool(_tuning) and _tuning[-1][0] and _tuning[-1][2]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (infinite when ``out`` has a non-finite element ``ref`` lacks)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return float("inf")
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))


def cold_us(fn: Callable[[], object], calls: int = 8, replays: int = 10) -> float:
    """Time of one call of ``fn`` in microseconds with a cold L2 cache, free of launch overhead.

    Two CUDA graphs are replayed: ``calls`` times (read a 256 MB buffer, then ``fn``) and ``calls`` times the
    read alone; the difference of their medians over ``replays`` replays, per call. Reading (not writing)
    evicts L2 without leaving dirty lines for ``fn`` to write back.
    """
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside capture: compilation, workspaces, cached buffers
        fn()
        flush.max()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    with torch.cuda.graph(graphs[0]):
        for _ in range(calls):
            flush.max()
            fn()
    with torch.cuda.graph(graphs[1]):
        for _ in range(calls):
            flush.max()
    times = ([], [])
    for _ in range(replays):
        for graph, out in zip(graphs, times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    median = [sorted(t)[len(t) // 2] for t in times]
    return 1e3 * (median[0] - median[1]) / calls


def search(
    candidates: Iterable[Config],
    run: Callable[[Config], torch.Tensor],
    reference: torch.Tensor,
    tolerance: float,
    timer: Optional[Callable[[Callable[[], object]], float]] = None,
) -> tuple[Optional[Config], list[Trial]]:
    """The fastest candidate whose output is within ``tolerance`` (relative error) of ``reference``, and all trials.

    A candidate that fails to compile or launch (too much shared memory, too many registers) is rejected,
    as is one whose output differs; the first winner is returned when none beats it. ``(None, trials)``
    when every candidate was rejected. ``timer`` defaults to ``cold_us``.
    """
    timer = timer or cold_us
    trials = []
    for config in candidates:
        try:
            out = run(config)
        except Exception as error:  # a candidate that does not compile or launch on this card is skipped
            trials.append(Trial(dict(config), None, f"{type(error).__name__}: {error}"[:200]))
            continue
        err = relative_error(out, reference)
        if not err <= tolerance:
            trials.append(Trial(dict(config), None, f"relative error {err:.3g} > {tolerance:.3g}"))
            continue
        trials.append(Trial(dict(config), timer(lambda: run(config)), "ok"))
    timed = [t for t in trials if t.us is not None]
    best = min(timed, key=lambda t: t.us).config if timed else None
    return best, trials


def choose(
    key: ConfigKey,
    default: Config,
    candidates: Callable[[], Iterable[Config]],
    run: Callable[[Config], torch.Tensor],
    reference: Callable[[], torch.Tensor],
    tolerance: float,
) -> Config:
    """The configuration to launch ``key`` with: stored winner, else a new search when tuning is on, else default.

    ``candidates``, ``run`` and ``reference`` are only called when a search runs; ``default`` is part of
    every search, so a stored winner is never slower than the default on the card it was measured on.
    """
    if not _retuning():
        known = lookup(key)
        if known is not None and not (_verifying() and not _matches(known, run, reference(), tolerance, key)):
            return known
    if not tuning_enabled():
        return same_tile_config(key, default) or default
    pool = [dict(default)] + [dict(c) for c in candidates() if dict(c) != dict(default)]
    best, _ = search(pool, run, reference(), tolerance)
    if best is None:
        raise RuntimeError(f"no configuration of {key} matched its reference twin, the default included")
    store(key, best)
    if _tuning:
        _tuning[-1][3].append(key)
    return best


def _matches(config: Config, run, reference, tolerance: float, key: ConfigKey) -> bool:
    """Whether a stored config still launches and matches the twin; one that does not is discarded, with a warning."""
    try:
        err = relative_error(run(config), reference)
    except Exception as error:  # a stored config this version's launcher cannot run
        err, why = float("inf"), f"{type(error).__name__}: {error}"[:200]
    else:
        why = f"relative error {err:.3g} > {tolerance:.3g}"
    if err <= tolerance:
        return True
    warnings.warn(f"aofunc: discarding the stored configuration of {key} ({why}); searching again")
    discard(key)
    return False
