"""save and load: quantized params trees in safetensors with a JSON description, no pickle.

The layout is versioned (docs/file-format.md): version 1 stores every name; version 2 stores each tensor once and
names the others holding it (tied weights) in the header's "aliases" table; version 3 adds the int4 grids with an
integer zero point and without one (`Int4WeightOnly(zero_point=...)`); version 4, written now, adds stacked experts
(a 3-D logical shape, every stored tensor with a leading E) and int4's act-order input permutation (`perm`).
`load` reads all four.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import torch
import safetensors.torch
from safetensors import safe_open
from safetensors.torch import save_file

from aofunc.formats import QTensor, scheme_from_dict
from aofunc.formats.qtensor import canonical_shape
from aofunc.kernels.packing import aligned
from aofunc.tree import check_params

#: the version `save` writes
FILE_VERSION = 4
#: the versions `load` reads
READABLE_VERSIONS = (1, 2, 3, 4)
#: the first version whose schemes may name an int4 grid (`zero_point`)
ZERO_POINT_VERSION = 3
#: the first version that stores stacked experts (a 3-D logical shape) and int4's act-order `perm`
STACKED_VERSION = PERM_VERSION = 4
HEADER_KEY = "aofunc"
#: the key safetensors keeps for its own header metadata: no tensor may have it as its name
RESERVED_NAME = "__metadata__"
#: the dtypes safetensors stores (empty when this safetensors does not say; then save_file itself decides)
_STORABLE_DTYPES = frozenset(getattr(safetensors.torch, "_TYPES", {}).values())


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


def _unsavable_reason(t: torch.Tensor) -> str | None:
    """Why a plain tensor cannot be written (None when it can)."""
    if t.device.type == "meta":
        return "is on the meta device (a shape without values); materialize it (e.g. load real weights) first"
    if t.layout != torch.strided:
        return f"has the {t.layout} layout; save dense tensors (e.g. .to_dense())"
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and not isinstance(t, QTensor):
        return f"is a {type(t).__name__}, a tensor subclass a file cannot describe; save a plain tensor or a QTensor"
    if _STORABLE_DTYPES and t.dtype not in _STORABLE_DTYPES:
        return f"has dtype {t.dtype}, which safetensors cannot store; cast it to a dtype it stores (e.g. float32)"
    return None


def check_savable(qparams: Mapping[str, torch.Tensor]) -> None:
    """Every name and tensor of the tree can be written so that `load` reads the same tree back; otherwise a
    ValueError naming the entry and why, before any file is touched."""
    quantized = {name for name, t in qparams.items() if isinstance(t, QTensor)}
    for name, t in qparams.items():
        if name == RESERVED_NAME:
            raise ValueError(f"save: the name {name!r} is reserved by safetensors for its own header, so a file "
                             "could not hold it; rename that entry")
        owner = _quantized_prefix(name, quantized)
        if owner is not None:
            raise ValueError(f"save: the name {name!r} collides with the stored tensors of {owner!r} (a quantized "
                             f"weight is stored as {owner!r}.<tensor name>, and no other name may start with "
                             f"{owner + '.'!r}); rename one of them")
        for part, tensor in (t.tensors.items() if isinstance(t, QTensor) else [(None, t)]):
            reason = _unsavable_reason(tensor)
            if reason is not None:
                where = repr(name) if part is None else f"{name!r} (its stored tensor {part!r})"
                raise ValueError(f"save: {where} {reason}")


def save(qparams: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a (quantized) params tree to a safetensors file: tensor "{name}.{stored name}" for each QTensor,
    plain tensors under their own name, and the description of each QTensor in the header's "aofunc" entry.

    Names holding one tensor or QTensor object (tied weights) are stored once, under the first of them; the header's
    "aliases" table names the others, and `load` gives them all one object again. The file appears whole or not at
    all (written to a temporary file, then renamed). The layout is file version 4 (docs/file-format.md): stacked
    experts are described by their 3-D logical shape and stored with every stored tensor's leading E, and an
    act-order int4 weight stores its input column order as "{name}.perm".

    A tree no file could hold as it is (the name "__metadata__", which safetensors reserves; a name under a
    QTensor's stored tensors, "{name}.…"; a meta, sparse or other non-plain tensor) is refused with a ValueError
    naming the entry before anything is written, so an existing file at `path` is left as it was.

    Example:
        >>> w = torch.randn(16, 64)
        >>> path = os.path.join(tempfile.mkdtemp(), "tied.safetensors")
        >>> aofunc.save({"embed.weight": w, "head.weight": w}, path)
        >>> tree = aofunc.load(path)
        >>> tree["head.weight"] is tree["embed.weight"]
        True
    """
    check_params(qparams, "qparams")
    check_savable(qparams)
    tensors, described, aliases, seen = {}, {}, {}, set()
    stored_as: dict[int, str] = {}
    for name, t in qparams.items():
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


def _read_description(f, path) -> tuple[dict, dict, int]:
    """(the params table, the aliases table, the version) of the header; a version 1 file has no aliases."""
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
        return description["params"], {}, version
    aliases = description.get("aliases")
    if not isinstance(aliases, dict):
        raise ValueError(f"load: {path}: a version {version} header needs an 'aliases' table {{name: stored name}}, "
                         f"got {aliases!r}")
    return description["params"], aliases, version


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


def _check_entry(name, entry, keys: set, f, version: int = FILE_VERSION) -> tuple:
    """Validate one QTensor's description and stored tensors against each other; returns its parts."""
    if not isinstance(entry, dict) or not {"scheme", "shape", "dtype"} <= set(entry):
        raise ValueError(f"load: {name!r}: its description needs scheme, shape and dtype, got {entry!r}")
    if version < ZERO_POINT_VERSION and isinstance(entry["scheme"], dict) and "zero_point" in entry["scheme"]:
        raise ValueError(f"load: {name!r}: its scheme names a zero_point, which file version {version} does not "
                         f"have (int4 grids came with version {ZERO_POINT_VERSION})")
    try:
        scheme = scheme_from_dict(entry["scheme"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"load: {name!r}: {e}") from None
    shape = entry["shape"]
    transposed = entry.get("transposed", False)
    if not isinstance(transposed, bool):
        raise ValueError(f"load: {name!r}: 'transposed' must be true or false, got {transposed!r}")
    if not isinstance(shape, list) or len(shape) not in (2, 3, 4) \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"load: {name!r}: shape {shape!r} is not a 2-D, 3-D (stacked experts) or 4-D shape of "
                         "positive ints")
    if len(shape) == 3 and version < STACKED_VERSION:
        raise ValueError(f"load: {name!r}: shape {shape} is a stack of experts, which file version {version} does "
                         f"not have (stacked experts came with version {STACKED_VERSION})")
    if len(shape) == 4 and (shape[2:] != [1, 1] or transposed):
        raise ValueError(f"load: {name!r}: shape {shape} is not a quantized weight's: a 4-D weight is a 1x1 "
                         "convolution's [out, in, 1, 1], never stored transposed")
    dtype = _dtype_from_name(entry["dtype"], repr(name))
    n, k = canonical_shape(tuple(shape), transposed)
    # stacked experts [E, N, K]: every stored tensor is one expert's with a leading E
    lead = tuple(shape[:1]) if len(shape) == 3 else ()
    expected = {s: (lead + tuple(stored_shape), stored_dtype)
                for s, (stored_shape, stored_dtype) in scheme.stored(n, k, dtype).items()}
    for stored_name, (stored_shape, stored_dtype) in expected.items():
        key = f"{name}.{stored_name}"
        if key not in keys:
            if stored_name in scheme.optional_names:
                continue
            raise ValueError(f"load: {name!r}: the stored tensor {key!r} is missing")
        found = f.get_slice(key)
        found_shape, found_dtype = tuple(found.get_shape()), found.get_dtype()
        if found_shape != tuple(stored_shape) or found_dtype != _safetensors_dtype(stored_dtype):
            what = f"a stack of {shape[0]} experts of {scheme}" if lead else str(scheme)
            raise ValueError(f"load: {name!r}: {key!r} is {found_dtype}{list(found_shape)}, expected "
                             f"{_safetensors_dtype(stored_dtype)}{list(stored_shape)} for {what} of shape {shape}")
    extra = sorted(key for key in keys if key.startswith(name + ".") and key[len(name) + 1:] not in expected)
    if extra:
        raise ValueError(f"load: {name!r}: unexpected stored tensors {extra}")
    if "perm" in expected and f"{name}.perm" in keys:
        _check_perm(name, f.get_tensor(f"{name}.perm"), k, version)
    return scheme, shape, dtype, transposed, [s for s in expected if f"{name}.{s}" in keys]


def _check_perm(name, perm: torch.Tensor, k: int, version: int) -> None:
    """An act-order weight's `perm` (each expert's, for a stack) orders all K input columns, each once."""
    if version < PERM_VERSION:
        raise ValueError(f"load: {name!r}: it stores a 'perm' (act-order), which file version {version} does not "
                         f"have (act-order came with version {PERM_VERSION})")
    rows = perm.reshape(-1, k).long().cpu()
    if not torch.equal(rows.sort(dim=-1).values, torch.arange(k).expand_as(rows)):
        raise ValueError(f"load: {name!r}: its 'perm' is not a permutation of the {k} input columns (each of "
                         f"0..{k - 1} once)")


_SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int32: "I32", torch.float64: "F64"}


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return _SAFETENSORS_DTYPES.get(dtype, str(dtype))


def _load_device(device) -> torch.device:
    """The device to load onto, checked to exist here before any file is read."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"load: device={device!r} is not a torch device ({e})") from None
    if device.type == "meta":
        raise ValueError("load: device='meta' holds no values; load onto 'cpu' or an accelerator")
    if device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, ValueError) as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
            raise ValueError(f"load: device {str(device)!r} is not available on this machine ({first_line}); load "
                             "onto 'cpu', or onto a device this torch build sees") from None
    return device


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by `save` onto `device` (default CPU). Every entry is checked against the header
    (names, dtypes, shapes, aliases) before anything is built; a mismatch is refused naming the parameter.

    Reads file versions 1, 2, 3 and 4 (docs/file-format.md) and refuses others; names stored as aliases of one
    tensor (tied weights) get one object; stacked experts load as one stacked QTensor. A device this machine
    does not have is refused naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no file at {path}")
    device = _load_device(device)
    try:
        f = safe_open(path, framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise ValueError(f"load: {path} is not a readable safetensors file ({e})") from None
    with f:
        keys = set(f.keys())
        description, aliases, version = _read_description(f, path)
        parts = {name: _check_entry(name, entry, keys, f, version) for name, entry in description.items()}
        claimed = {f"{name}.{s}" for name, part in parts.items() for s in part[4]}
        plain = sorted(keys - claimed)
        for name in plain:
            if name in parts:
                raise ValueError(f"load: {path}: {name!r} is both a quantized weight of the header (stored as "
                                 f"{name + '.'!r}…) and a plain tensor of the file; a name holds one or the other")
        _check_aliases(aliases, set(parts) | set(plain), keys, path)
        for name in aliases:
            owner = _quantized_prefix(name, set(parts))
            if owner is not None:
                raise ValueError(f"load: {path}: alias {name!r} sits among the stored tensors of {owner!r}; no "
                                 f"other name may start with {owner + '.'!r}")
        out: dict[str, torch.Tensor] = {}
        for name, (scheme, shape, dtype, transposed, stored_names) in parts.items():
            # stored tensors start on 64-byte boundaries, as kernels' vector loads want (a file maps them anywhere)
            tensors = {s: aligned(f.get_tensor(f"{name}.{s}")) for s in stored_names}
            out[name] = QTensor(scheme, tensors, shape, dtype, transposed, param_name=name)
        for key in plain:
            out[key] = f.get_tensor(key)
        for name, target in aliases.items():
            out[name] = out[target]
    return out
