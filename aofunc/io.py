"""save and load: quantized params trees in safetensors with a JSON description, no pickle.

The layout is versioned (docs/file-format.md): version 1 stores every name; version 2, written now, stores each
tensor once and names the others holding it (tied weights) in the header's "aliases" table. `load` reads both.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aofunc.formats import QTensor, scheme_from_dict
from aofunc.formats.qtensor import canonical_shape
from aofunc.tree import check_params

#: the version `save` writes
FILE_VERSION = 2
#: the versions `load` reads
READABLE_VERSIONS = (1, 2)
HEADER_KEY = "aofunc"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load: {where}: {name!r} is not a floating point dtype")
    return dtype


def _own_storage(t: torch.Tensor, seen: set) -> torch.Tensor:
    """A contiguous CPU tensor with memory of its own, as safetensors needs: one sharing storage is cloned."""
    t = t.detach().cpu().contiguous()
    storage = t.untyped_storage().data_ptr()
    if t.numel() and storage in seen:
        t = t.clone()
        storage = t.untyped_storage().data_ptr()
    seen.add(storage)
    return t


def _quantized_prefix(name: str, quantized: set) -> str | None:
    """The quantized name whose stored tensors ("{name}.{stored name}") `name` would sit among, if any."""
    for i, char in enumerate(name):
        if char == "." and name[:i] in quantized:
            return name[:i]
    return None


def save(qparams: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a (quantized) params tree to a safetensors file: tensor "{name}.{stored name}" for each QTensor,
    plain tensors under their own name, and the description of each QTensor in the header's "aofunc" entry.

    Names holding one tensor or QTensor object (tied weights) are stored once, under the first of them; the header's
    "aliases" table names the others, and `load` gives them all one object again. The file appears whole or not at
    all (written to a temporary file, then renamed). The layout is file version 2 (docs/file-format.md).

    Example:
        >>> w = torch.randn(16, 64)
        >>> path = os.path.join(tempfile.mkdtemp(), "tied.safetensors")
        >>> aofunc.save({"embed.weight": w, "head.weight": w}, path)
        >>> tree = aofunc.load(path)
        >>> tree["head.weight"] is tree["embed.weight"]
        True
    """
    check_params(qparams, "qparams")
    tensors, described, aliases, seen = {}, {}, {}, set()
    stored_as: dict[int, str] = {}
    quantized = {name for name, t in qparams.items() if isinstance(t, QTensor)}
    for name, t in qparams.items():
        owner = _quantized_prefix(name, quantized)
        if owner is not None:
            raise ValueError(f"save: the name {name!r} collides with the stored tensors of {owner!r}")
        if id(t) in stored_as:
            aliases[name] = stored_as[id(t)]
            continue
        stored_as[id(t)] = name
        if isinstance(t, QTensor):
            described[name] = {"scheme": t.scheme.to_dict(), "shape": list(t.shape),
                               "dtype": _dtype_name(t.dtype), "transposed": t.transposed}
            for stored_name, stored in t.tensors.items():
                tensors[f"{name}.{stored_name}"] = _own_storage(stored, seen)
        else:
            tensors[name] = _own_storage(t, seen)
    header = {HEADER_KEY: json.dumps({"version": FILE_VERSION, "params": described, "aliases": aliases})}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".aofunc-", suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_description(f, path) -> tuple[dict, dict]:
    """(the params table, the aliases table) of the header; a version 1 file has no aliases."""
    metadata = f.metadata() or {}
    if HEADER_KEY not in metadata:
        raise ValueError(f"load: {path} has no {HEADER_KEY!r} header entry; it was not written by aofunc.save")
    try:
        description = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"load: {path}: the {HEADER_KEY!r} header entry is not valid JSON ({e})") from None
    if not isinstance(description, dict) or not isinstance(description.get("params"), dict):
        raise ValueError(f"load: {path}: the {HEADER_KEY!r} header entry has no 'params' table")
    version = description.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"load: {path} is file version {version!r}; this release of aofunc reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))} (a newer file needs a newer aofunc)")
    if version == 1:
        return description["params"], {}
    aliases = description.get("aliases")
    if not isinstance(aliases, dict):
        raise ValueError(f"load: {path}: a version {version} header needs an 'aliases' table {{name: stored name}}, "
                         f"got {aliases!r}")
    return description["params"], aliases


def _check_aliases(aliases: dict, stored: set, keys: set, path) -> None:
    """Every alias names a stored parameter directly, and is not stored itself."""
    for name, target in aliases.items():
        if not isinstance(target, str):
            raise ValueError(f"load: {path}: alias {name!r} must name a stored parameter by a string, got {target!r}")
        if name in stored or name in keys:
            raise ValueError(f"load: {path}: alias {name!r} is itself stored in the file; an alias has no tensors "
                             "of its own")
    for name, target in aliases.items():
        if target in aliases:
            raise ValueError(f"load: {path}: alias {name!r} points at {target!r}, which is an alias too; an alias "
                             "must name a stored parameter directly (no chains)")
        if target not in stored:
            raise ValueError(f"load: {path}: alias {name!r} points at {target!r}, which the file does not store")


def _check_entry(name, entry, keys: set, f) -> tuple:
    """Validate one QTensor's description and stored tensors against each other; returns its parts."""
    if not isinstance(entry, dict) or not {"scheme", "shape", "dtype"} <= set(entry):
        raise ValueError(f"load: {name!r}: its description needs scheme, shape and dtype, got {entry!r}")
    try:
        scheme = scheme_from_dict(entry["scheme"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"load: {name!r}: {e}") from None
    shape = entry["shape"]
    transposed = bool(entry.get("transposed", False))
    if not isinstance(shape, list) or len(shape) not in (2, 4) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"load: {name!r}: shape {shape!r} is not a 2-D or 4-D shape of positive ints")
    dtype = _dtype_from_name(entry["dtype"], repr(name))
    n, k = canonical_shape(tuple(shape), transposed)
    expected = scheme.stored(n, k, dtype)
    for stored_name, (stored_shape, stored_dtype) in expected.items():
        key = f"{name}.{stored_name}"
        if key not in keys:
            if stored_name in scheme.optional_names:
                continue
            raise ValueError(f"load: {name!r}: the stored tensor {key!r} is missing")
        found = f.get_slice(key)
        found_shape, found_dtype = tuple(found.get_shape()), found.get_dtype()
        if found_shape != tuple(stored_shape) or found_dtype != _safetensors_dtype(stored_dtype):
            raise ValueError(f"load: {name!r}: {key!r} is {found_dtype}{list(found_shape)}, expected "
                             f"{_safetensors_dtype(stored_dtype)}{list(stored_shape)} for {scheme} of shape {shape}")
    extra = sorted(key for key in keys if key.startswith(name + ".") and key[len(name) + 1:] not in expected)
    if extra:
        raise ValueError(f"load: {name!r}: unexpected stored tensors {extra}")
    return scheme, shape, dtype, transposed, [s for s in expected if f"{name}.{s}" in keys]


_SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int32: "I32", torch.float64: "F64"}


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return _SAFETENSORS_DTYPES.get(dtype, str(dtype))


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by `save` onto `device` (default CPU). Every entry is checked against the header
    (names, dtypes, shapes, aliases) before anything is built; a mismatch is refused naming the parameter.

    Reads file versions 1 and 2 (docs/file-format.md) and refuses others; names stored as aliases of one tensor
    (tied weights) get one object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no file at {path}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    try:
        f = safe_open(path, framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise ValueError(f"load: {path} is not a readable safetensors file ({e})") from None
    with f:
        keys = set(f.keys())
        description, aliases = _read_description(f, path)
        parts = {name: _check_entry(name, entry, keys, f) for name, entry in description.items()}
        claimed = {f"{name}.{s}" for name, part in parts.items() for s in part[4]}
        plain = sorted(keys - claimed)
        _check_aliases(aliases, set(parts) | set(plain), keys, path)
        out: dict[str, torch.Tensor] = {}
        for name, (scheme, shape, dtype, transposed, stored_names) in parts.items():
            tensors = {s: f.get_tensor(f"{name}.{s}") for s in stored_names}
            out[name] = QTensor(scheme, tensors, shape, dtype, transposed)
        for key in plain:
            out[key] = f.get_tensor(key)
        for name, target in aliases.items():
            out[name] = out[target]
    return out
