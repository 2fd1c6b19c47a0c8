"""Hugging Face model directories: `save_pretrained` writes a quantized params tree as a compressed-tensors
checkpoint that transformers (and vLLM) load; `load_pretrained` reads aofunc's files, compressed-tensors checkpoints
and GPTQ-format checkpoints back into a params tree of aofunc's layouts.

compressed-tensors (https://github.com/neuralmagic/compressed-tensors) names, per quantized `nn.Linear` "{module}":

- "pack-quantized" (int4 and int8 weight-only): `{module}.weight_packed` int32 [N, K·bits/32] holding the codes
  q + 2^(bits-1) (q signed, -8..7 or -128..127), element j of a row at bits (j mod 32/bits)·bits of word
  j // (32/bits); `{module}.weight_scale` [N, K/g] (groups) or [N, 1] (channel); `{module}.weight_shape` int64
  [N, K]; asymmetric groups add `{module}.weight_zero_point` int32 [N·4/32, K/g], the zero points z - 8 packed
  the same way along N. w = (q - zp)·scale.
- act-order int4 ("pack-quantized" with the weights arg `actorder: "group"`, written by compressed-tensors before
  0.20): `{module}.weight_g_idx` int32 [K], the group of each input column, the codes in the model's column order;
  w[:, j] = (q[:, j] - zp[:, g_idx[j]])·scale[:, g_idx[j]]. A g_idx holding -1 is the column order (no act-order).
- "int-quantized" (W8A8): `{module}.weight` int8 [N, K] and `{module}.weight_scale` [N, 1], the activations
  quantized per token when the layer runs (the config's `input_activations`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from aofunc import primitives as P
from aofunc.formats import NF4, Int4WeightOnly, Int8Dynamic, Int8DynamicInt4, Int8WeightOnly, QTensor
from aofunc.io import HEADER_KEY, _load_device, load
from aofunc.kernels.packing import GROUP_SIZES, aligned
from aofunc.tree import check_params

#: the formats `save_pretrained` writes
EXPORT_FORMATS = ("compressed-tensors",)
#: the largest safetensors shard `save_pretrained` writes by default (as transformers' save_pretrained)
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
#: files of the base directory copied beside the weights: tokenizer, generation and chat settings
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "generation_config.json",
                "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
#: how the exportable choices read in messages
EXPORTABLE = ("Int4WeightOnly(group_size, zero_point='int') or zero_point='none' (CLI --scheme int4 --zero-point "
              "int|none), Int8WeightOnly() (--scheme int8wo) or Int8Dynamic() (--scheme int8dq)")


class ExportError(ValueError):
    """A params tree (or an output directory) `save_pretrained` cannot write; raised before anything is written."""


# ---------------------------------------------------------------------------------------------- bit packing

def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] (each < 2^bits, bits 4 or 8) packed along C into int32 [R, ceil(C·bits/32)], element
    j at bits (j mod 32/bits)·bits of word j // (32/bits) (compressed-tensors' dense packing)."""
    per_word = 32 // bits
    rows, cols = codes.shape
    words = -(-cols // per_word)
    c = codes.to(torch.int64)
    if words * per_word != cols:
        c = torch.nn.functional.pad(c, (0, words * per_word - cols))
    shifts = torch.arange(per_word, dtype=torch.int64, device=c.device) * bits
    packed = (c.reshape(rows, words, per_word) << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # the bit pattern as a signed int32
    return packed.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 [R, W] -> unsigned codes int64 [R, cols]."""
    per_word = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=p.device) * bits
    codes = (p[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(p.shape[0], -1)[:, :cols]


# ---------------------------------------------------------------------------------------------- export

def _weights_args(bits: int, strategy: str, group_size: int | None, symmetric: bool,
                  actorder: str | None = None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": False, "actorder": actorder, "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


_PER_TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
                   "dynamic": True, "actorder": None, "block_structure": None, "observer": None,
                   "observer_kwargs": {}}


def _module_of(name: str) -> str:
    if not name.endswith(".weight") or name == ".weight":
        raise ExportError(f"save_pretrained: {name!r} is quantized but is not a module's '.weight'; compressed-"
                          "tensors quantizes nn.Linear weights only")
    return name[:-len(".weight")]


def _export_scheme(name: str, w: QTensor) -> tuple[str, dict, dict | None]:
    """(compressed-tensors format, weights args, input activations args) for one quantized weight, or an
    ExportError naming it and the exportable choice."""
    scheme = w.scheme
    if isinstance(scheme, NF4):
        raise ExportError(f"save_pretrained: {name!r} is {scheme}, which compressed-tensors cannot hold; quantize "
                          "it with Int4WeightOnly(group_size, zero_point='int') (CLI --scheme int4 --zero-point int) "
                          f"to export 4-bit weights. Exportable: {EXPORTABLE}")
    if isinstance(scheme, Int8DynamicInt4):
        raise ExportError(f"save_pretrained: {name!r} is {scheme} (8da4w), which has no exact compressed-tensors "
                          "form here; quantize it with Int4WeightOnly(group_size, zero_point='none') (CLI --scheme "
                          f"int4 --zero-point none) or Int8Dynamic(). Exportable: {EXPORTABLE}")
    if isinstance(scheme, Int4WeightOnly) and scheme.zero_point == "float":
        raise ExportError(f"save_pretrained: {name!r} is {scheme}, tinygemm's float-zero int4 grid, which "
                          "compressed-tensors cannot hold exactly; quantize it with Int4WeightOnly(group_size, "
                          "zero_point='int') (CLI --zero-point int), or zero_point='none' for symmetric groups")
    if not isinstance(scheme, (Int4WeightOnly, Int8WeightOnly, Int8Dynamic)):
        raise ExportError(f"save_pretrained: {name!r} is {scheme}, which is not exported. Exportable: {EXPORTABLE}")
    if w.transposed or w.dim() != 2:
        raise ExportError(f"save_pretrained: {name!r} is a {'transposed ' if w.transposed else ''}"
                          f"{list(w.shape)} weight; compressed-tensors quantizes nn.Linear weights stored [out, in] "
                          "only (not GPT-2's Conv1D [in, out] nor convolutions)")
    n, k = w.nk
    if isinstance(scheme, Int4WeightOnly):
        if "perm" in w.tensors:
            raise ExportError(f"save_pretrained: {name!r} carries an act-order input permutation ('perm'), whose "
                              "compressed-tensors form (weights arg actorder 'group' with a weight_g_idx tensor) "
                              "compressed-tensors 0.20 removed: its QuantizationArgs refuse actorder 'group', so "
                              "transformers and vLLM built on it cannot load the export. Save it with aofunc.save, "
                              "or export weights quantized without act-order")
        if k % scheme.group_size:
            raise ExportError(f"save_pretrained: {name!r} has K = {k} inputs, not a multiple of group_size "
                              f"{scheme.group_size}; compressed-tensors needs whole groups, so quantize it with a "
                              "group size dividing K")
        return "pack-quantized", _weights_args(4, "group", scheme.group_size, scheme.zero_point == "none"), None
    if isinstance(scheme, Int8Dynamic):
        if "act_scale" in w.tensors:
            raise ExportError(f"save_pretrained: {name!r} carries SmoothQuant's act_scale (the layer divides its "
                              "input by it), which compressed-tensors cannot hold; export weights quantized "
                              "without smoothquant (rtn or gptq)")
        return "int-quantized", _weights_args(8, "channel", None, True), dict(_PER_TOKEN_INT8)
    return "pack-quantized", _weights_args(8, "channel", None, True), None


def _export_tensors(module: str, w: QTensor, fmt: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized weight (exact: they decompress to w.dequantize())."""
    n, k = w.nk
    t = w.tensors
    if isinstance(w.scheme, Int4WeightOnly):
        hi, lo = (t["qdata"] >> 4), (t["qdata"] & 0xF)
        codes = torch.stack([hi, lo], dim=-1).reshape(n, -1)[:, :k]  # 0..15 = signed q + 8 ("none": stored q + 8)
        g_idx = None
        if "perm" in t:  # act-order: the codes back in the model's column order, each column's group in g_idx
            perm = t["perm"].long()
            codes = torch.empty_like(codes).index_copy_(1, perm, codes)
            g_idx = torch.empty(k, dtype=torch.int32).index_copy_(
                0, perm.cpu(), torch.arange(k, dtype=torch.int32) // w.scheme.group_size)
        out = {"weight_packed": pack_int32(codes, 4), "weight_scale": t["scale"].contiguous()}
        if g_idx is not None:
            out["weight_g_idx"] = g_idx
        if w.scheme.zero_point == "int":  # zp stored signed, z - 8, packed + 8 along N: the codes z themselves
            out["weight_zero_point"] = pack_int32(t["zero"].t(), 4).t().contiguous()
    elif fmt == "int-quantized":
        out = {"weight": t["qdata"].contiguous(), "weight_scale": t["scale"].reshape(n, 1).contiguous()}
    else:
        out = {"weight_packed": pack_int32(t["qdata"].to(torch.int16) + 128, 8),
               "weight_scale": t["scale"].reshape(n, 1).contiguous()}
    if fmt == "pack-quantized":
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    return {f"{module}.{key}": value.detach().cpu() for key, value in out.items()}


def _check_base(base) -> tuple[Path, dict]:
    if base is None:
        raise ExportError("save_pretrained: give base=, the Hugging Face model directory the params came from (its "
                          "config.json and tokenizer are written beside the weights)")
    base = Path(base)
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ExportError(f"save_pretrained: base {str(base)!r} has no config.json; give the directory "
                          "save_pretrained wrote for the model the params came from")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"save_pretrained: {config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ExportError(f"save_pretrained: {config_path} does not hold a JSON object")
    return base, config


def _shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into shards of at most max_shard_size bytes (a larger tensor alone)."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int) -> None:
    shards = _shards(tensors, max_shard_size)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_pretrained(qparams: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, *, base: str | os.PathLike,
                    format: str = "compressed-tensors", overwrite: bool = False,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a quantized params tree as a Hugging Face model directory that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads (with compressed-tensors installed) and
    `vllm serve out_dir` serves; returns the directory.

    `base` is the model directory the params came from: its config.json is written with a `quantization_config`
    in compressed-tensors form (and the params' dtype), its tokenizer, generation and chat-template files are
    copied, and the weights go to model.safetensors (shards of at most `max_shard_size` bytes and their index when
    larger). Exported exactly, the weights a loader decompresses equal `aofunc.dequantize(qparams)` bit for bit:

    - `Int4WeightOnly(g, zero_point="int")` and `zero_point="none"`: "pack-quantized" int4 groups (asymmetric
      with zero points, or symmetric), K a multiple of g;
    - `Int8WeightOnly()`: "pack-quantized" int8 per channel (W8A16);
    - `Int8Dynamic()`: "int-quantized" int8 per channel with per-token dynamic int8 activations (W8A8).

    Anything else (NF4, the float-zero int4 grid, 8da4w, SmoothQuant's act_scale, act-order int4 weights carrying
    `perm` (compressed-tensors 0.20 removed act-order groups, `actorder: "group"` with `weight_g_idx`, so
    transformers and vLLM built on it cannot load them), transposed weights, a tree with no quantized weight such
    as a 2:4-pruned one) is refused with an ExportError naming the parameter and the
    exportable choice, before anything is written. The directory appears whole or not at all (written beside it,
    then renamed); an existing `out_dir` is refused unless `overwrite=True`.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"save_pretrained: format must be one of {', '.join(map(repr, EXPORT_FORMATS))}, got "
                          f"{format!r} (aofunc's own file is written by aofunc.save)")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ExportError(f"save_pretrained: max_shard_size must be a positive number of bytes, got "
                          f"{max_shard_size!r}")
    qparams = check_params(qparams, "qparams")
    base, config = _check_base(base)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"save_pretrained: {str(out_dir)!r} exists; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"save_pretrained: {str(out_dir)!r} exists and is not a directory")
    if out_dir.resolve() == base.resolve():
        raise ExportError("save_pretrained: out_dir is the base directory itself; write to another directory")
    if not out_dir.parent.resolve().is_dir():
        raise ExportError(f"save_pretrained: the directory {str(out_dir.parent)!r} does not exist")

    groups: dict[tuple, dict] = {}  # (format, weights, activations) as JSON -> config group
    tensors: dict[str, torch.Tensor] = {}
    dtypes = set()
    quantized = {name: t for name, t in qparams.items() if isinstance(t, QTensor)}
    if not quantized:
        raise ExportError("save_pretrained: qparams holds no quantized weight (a pruned or float tree has no "
                          f"compressed-tensors form here); quantize it first. Exportable: {EXPORTABLE}")
    plans = {}
    for name, w in quantized.items():
        module = _module_of(name)
        plans[name] = (module, *_export_scheme(name, w))
        dtypes.add(w.dtype)
    formats = {plan[1] for plan in plans.values()}
    if len(formats) > 1:
        raise ExportError("save_pretrained: the tree mixes int8 dynamic (W8A8, int-quantized) with weight-only "
                          "schemes (pack-quantized); one compressed-tensors checkpoint holds one format: export "
                          "one kind")
    if len(dtypes) > 1:
        raise ExportError(f"save_pretrained: the quantized weights have several dtypes ({sorted(map(str, dtypes))});"
                          " cast the tree to one dtype first (qparams[name].to(dtype))")
    fmt = formats.pop()
    dtype = dtypes.pop()
    for name, t in qparams.items():
        if name in plans:
            module, _, weights, activations = plans[name]
            key = json.dumps([weights, activations], sort_keys=True)
            group = groups.setdefault(key, {"targets": [], "weights": weights, "input_activations": activations,
                                            "output_activations": None, "format": fmt})
            group["targets"].append(module)
            tensors.update(_export_tensors(module, t, fmt))
        else:
            if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
                raise ExportError(f"save_pretrained: {name!r} is a {type(t).__name__}, not a plain tensor")
            tensors[name] = t.detach().cpu().contiguous().clone()

    config_groups = {f"group_{i}": group for i, group in enumerate(groups.values())}
    config = dict(config)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
    }
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    config.pop("torch_dtype", None)

    parent = out_dir.parent
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.aofunc-"))
    try:
        _write_weights(tensors, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file in COPIED_FILES:
            if (base / file).is_file():
                shutil.copy2(base / file, tmp / file)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------------- import

#: what `load_pretrained` reads, as messages name it
IMPORT_FORMATS = ("aofunc's safetensors file (aofunc.save)", "compressed-tensors pack-quantized int4 (group, "
                  "act-order 'group' with weight_g_idx too) or int8 (channel)", "compressed-tensors int-quantized int8 (channel, W8A8)",
                  "GPTQ (quant_method 'gptq', 4 bits, checkpoint_format gptq or gptq_v2)")
_CT_WEIGHT_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
#: compressed-tensors' actorder values: calibration order only (the format unchanged), and act-order groups (g_idx)
_ACTORDER_WEIGHT = ("weight", "static")
_ACTORDER_GROUP = (True, "group", "dynamic")


class ImportFormatError(ValueError):
    """A model directory `load_pretrained` cannot read, naming the file and why."""


def _supported() -> str:
    return "; ".join(IMPORT_FORMATS)


def _read_safetensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the files, and the file each came from."""
    from safetensors import safe_open

    tensors, where = {}, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    where[key] = file
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise ImportFormatError(f"load_pretrained: {file} is not a readable safetensors file ({e})") from None
    return tensors, where


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ImportFormatError(f"load_pretrained: {index} is not a safetensors index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ImportFormatError(f"load_pretrained: {index} names missing shards: {', '.join(missing)}")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise ImportFormatError(f"load_pretrained: {directory} has no model.safetensors nor "
                            "model.safetensors.index.json (only safetensors weights are read)")


def _aofunc_file(directory: Path) -> Path | None:
    """The one safetensors file of the directory written by aofunc.save, if any."""
    from safetensors import safe_open

    found = []
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if HEADER_KEY in (f.metadata() or {}):
                    found.append(file)
        except Exception:
            continue
    if len(found) > 1:
        raise ImportFormatError(f"load_pretrained: {directory} holds several aofunc files "
                                f"({', '.join(f.name for f in found)}); give the file itself")
    return found[0] if found else None


def _expect(t: torch.Tensor, shape, dtype, key: str, where: dict, why: str) -> None:
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        raise ImportFormatError(f"load_pretrained: {where[key]}: {key!r} is {t.dtype} {list(t.shape)}, expected "
                                f"{dtype or t.dtype} {list(shape)} ({why})")


def _codes_to_qdata(codes: torch.Tensor) -> torch.Tensor:
    return P.pack_uint4(codes.to(torch.uint8))


def _ct_group(module: str, groups: dict, config_path: Path):
    """The config group quantizing `module`: a target naming it, a "re:" pattern matching it, or else the one
    group targeting a class (e.g. "Linear")."""
    by_class = []
    for group in groups.values():
        for target in group.get("targets") or []:
            if target == module or (target.startswith("re:") and re.match(target[3:], module)):
                return group
            if not target.startswith("re:") and "." not in target:
                by_class.append(group)
    if len(by_class) >= 1 and all(g is by_class[0] for g in by_class):
        return by_class[0]
    raise ImportFormatError(f"load_pretrained: {config_path}: no config group of the quantization_config targets "
                            f"{module!r}")


def _ct_scheme(module: str, group: dict, fmt: str, config_path: Path):
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    symmetric, kind = weights.get("symmetric", True), weights.get("type", "int")
    if weights.get("actorder") not in (None, False) + _ACTORDER_WEIGHT + _ACTORDER_GROUP:
        raise ImportFormatError(f"load_pretrained: {config_path}: {module!r} has actorder "
                                f"{weights.get('actorder')!r}; aofunc reads None, 'weight' (static) and 'group' "
                                "(dynamic, with weight_g_idx)")
    if weights.get("actorder") in _ACTORDER_GROUP and not (fmt == "pack-quantized" and bits == 4):
        raise ImportFormatError(f"load_pretrained: {config_path}: {module!r} has actorder "
                                f"{weights.get('actorder')!r} on {bits}-bit weights; aofunc reads act-order groups "
                                "of pack-quantized int4 only")
    plain_acts = acts is None
    token_acts = isinstance(acts, dict) and acts.get("num_bits") == 8 and acts.get("type", "int") == "int" \
        and acts.get("strategy") == "token" and acts.get("dynamic") is True and acts.get("symmetric", True)
    if kind == "int" and fmt == "pack-quantized" and bits == 4 and strategy == "group" and plain_acts:
        if weights.get("group_size") not in GROUP_SIZES:
            raise ImportFormatError(f"load_pretrained: {config_path}: {module!r} has group_size "
                                    f"{weights.get('group_size')!r}; aofunc's int4 takes "
                                    f"{', '.join(map(str, GROUP_SIZES))}")
        return Int4WeightOnly(weights["group_size"], zero_point="none" if symmetric else "int")
    if kind == "int" and bits == 8 and strategy == "channel" and symmetric:
        if fmt == "pack-quantized" and plain_acts:
            return Int8WeightOnly()
        if fmt == "int-quantized" and (plain_acts or token_acts):
            return Int8Dynamic() if token_acts else Int8WeightOnly()
    raise ImportFormatError(
        f"load_pretrained: {config_path}: {module!r} is quantized as format {fmt!r}, weights {weights!r}, input "
        f"activations {acts!r}, which aofunc does not read. Supported: {_supported()}")


def _no_g_idx(module: str, tensors: dict, where: dict) -> None:
    key = f"{module}.weight_g_idx"
    if key in tensors:
        raise ImportFormatError(f"load_pretrained: {where[key]}: {key!r} orders the columns of an int8 per-channel "
                                "weight; aofunc reads act-order groups of int4 weights only")


def _import_ct(qconfig: dict, config_path: Path, tensors: dict, where: dict) -> dict:
    if qconfig.get("quantization_status", "compressed") != "compressed":
        raise ImportFormatError(f"load_pretrained: {config_path}: quantization_status "
                                f"{qconfig.get('quantization_status')!r}; only compressed checkpoints are read")
    groups = qconfig.get("config_groups") or {}
    modules = sorted({key[:-len(".weight_scale")] for key in tensors if key.endswith(".weight_scale")})
    out = {}
    claimed = set()
    for module in modules:
        group = _ct_group(module, groups, config_path)
        fmt = group.get("format") or qconfig.get("format")
        scheme = _ct_scheme(module, group, fmt, config_path)
        scale_key = f"{module}.weight_scale"
        scale = tensors[scale_key]
        if isinstance(scheme, Int4WeightOnly) or fmt == "pack-quantized":
            keys = {name: f"{module}.{name}" for name in ("weight_packed", "weight_shape")}
            for key in keys.values():
                if key not in tensors:
                    raise ImportFormatError(f"load_pretrained: {where[scale_key]}: {key!r} is missing")
            shape = tensors[keys["weight_shape"]].tolist()
            if len(shape) != 2:
                raise ImportFormatError(f"load_pretrained: {where[keys['weight_shape']]}: "
                                        f"{keys['weight_shape']!r} is {shape}, not a 2-D shape")
            n, k = shape
            bits = 4 if isinstance(scheme, Int4WeightOnly) else 8
            packed = tensors[keys["weight_packed"]]
            _expect(packed, (n, -(-k * bits // 32)), torch.int32, keys["weight_packed"], where,
                    f"{bits}-bit codes of the {shape} weight")
            codes = unpack_int32(packed, bits, k)
            claimed.update(keys.values())
            if bits == 4:
                g = scheme.group_size
                if k % g:
                    raise ImportFormatError(f"load_pretrained: {where[scale_key]}: {module!r} has K = {k}, not a "
                                            f"multiple of group_size {g} of {config_path}")
                _expect(scale, (n, k // g), None, scale_key, where, f"groups of {g} in {config_path}")
                stored = {"qdata": _codes_to_qdata(codes), "scale": scale}
                if scheme.zero_point == "int":
                    zp_key = f"{module}.weight_zero_point"
                    if zp_key not in tensors:
                        raise ImportFormatError(f"load_pretrained: {where[scale_key]}: {zp_key!r} is missing "
                                                f"(asymmetric groups in {config_path})")
                    _expect(tensors[zp_key], (-(-n // 8), k // g), torch.int32, zp_key, where,
                            "4-bit zero points packed along N")
                    stored["zero"] = unpack_int32(tensors[zp_key].t(), 4, n).t().to(torch.uint8).contiguous()
                    claimed.add(zp_key)
                perm = _ct_perm(module, group, tensors, where, k, g, scale_key)
                if perm is not None:  # act-order: codes along the permuted columns, so that each group is consecutive
                    stored["qdata"] = _codes_to_qdata(codes[:, perm.long()])
                    stored["perm"] = perm
                claimed.add(f"{module}.weight_g_idx")
            else:
                _expect(scale, (n, 1), None, scale_key, where, "one scale per output channel")
                stored = {"qdata": (codes - 128).to(torch.int8), "scale": scale.reshape(n)}
                _no_g_idx(module, tensors, where)
        else:
            key = f"{module}.weight"
            if key not in tensors:
                raise ImportFormatError(f"load_pretrained: {where[scale_key]}: {key!r} is missing")
            q = tensors[key]
            if q.dim() != 2:
                raise ImportFormatError(f"load_pretrained: {where[key]}: {key!r} is {list(q.shape)}, not 2-D")
            n, k = q.shape
            _expect(q, (n, k), torch.int8, key, where, "int8 codes")
            _expect(scale, (n, 1), None, scale_key, where, "one scale per output channel")
            stored = {"qdata": q, "scale": scale.reshape(n)}
            claimed.add(key)
            _no_g_idx(module, tensors, where)
        claimed.add(scale_key)
        if not scale.dtype.is_floating_point:
            raise ImportFormatError(f"load_pretrained: {where[scale_key]}: {scale_key!r} is {scale.dtype}, not a "
                                    "floating point scale")
        # contiguous and starting on 64-byte boundaries, as the kernels want (a file maps tensors at its offsets)
        out[f"{module}.weight"] = QTensor(scheme, {s: aligned(t.contiguous()) for s, t in stored.items()}, (n, k),
                                          scale.dtype)
    extra = sorted(key for key in tensors if key not in claimed and key.rsplit(".", 1)[-1] in _CT_WEIGHT_NAMES)
    if extra:
        raise ImportFormatError(f"load_pretrained: {where[extra[0]]}: {extra[0]!r} belongs to no quantized weight "
                                f"(no {extra[0].rsplit('.', 1)[0]}.weight_scale)")
    for key, t in tensors.items():
        if key not in claimed:
            out[key] = t
    return out


def _ct_perm(module: str, group: dict, tensors: dict, where: dict, k: int, g: int,
             scale_key: str) -> torch.Tensor | None:
    """The `perm` of a compressed-tensors int4 weight: None without `weight_g_idx` (or with one holding -1,
    compressed-tensors' column order, or of consecutive groups), else the columns sorted by group (stable)."""
    key = f"{module}.weight_g_idx"
    if key not in tensors:
        if (group.get("weights") or {}).get("actorder") in _ACTORDER_GROUP:
            raise ImportFormatError(f"load_pretrained: {where[scale_key]}: {key!r} is missing (actorder "
                                    f"{group['weights']['actorder']!r} groups the columns by it)")
        return None
    g_idx = tensors[key]
    _expect(g_idx, (k,), None, key, where, "one group index per input column")
    if g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
        raise ImportFormatError(f"load_pretrained: {where[key]}: {key!r} is {g_idx.dtype}, not integer group indices")
    if bool((g_idx == -1).any()):
        if not bool((g_idx == -1).all()):
            raise ImportFormatError(f"load_pretrained: {where[key]}: {key!r} is not a grouping of the {k} input "
                                    f"columns into groups of {g}")
        return None
    return _gptq_perm(g_idx, k, g, key, where)


def _gptq_perm(g_idx: torch.Tensor, k: int, g: int, key: str, where: dict) -> torch.Tensor | None:
    """None for a g_idx of consecutive groups (k // g); for act-order (`desc_act`), a g_idx grouping a permutation
    of the input columns (every group index 0..K/g-1 held by g columns), the column order `perm` int32 [K] that
    lays each group's columns side by side (columns of one group keep their order); anything else is refused."""
    groups = torch.arange(k, dtype=torch.int64) // g
    g_idx = g_idx.long()
    if torch.equal(g_idx, groups):
        return None
    counts = torch.bincount(g_idx.clamp(min=0), minlength=k // g) if g_idx.numel() else None
    if counts is not None and int(g_idx.min()) >= 0 and int(g_idx.max()) < k // g and bool((counts == g).all()):
        return torch.sort(g_idx, stable=True).indices.to(torch.int32)
    raise ImportFormatError(f"load_pretrained: {where[key]}: {key!r} is not a grouping of the {k} input columns "
                            f"into groups of {g}")


def _import_gptq(qconfig: dict, config_path: Path, tensors: dict, where: dict) -> dict:
    bits, g = qconfig.get("bits"), qconfig.get("group_size")
    fmt = qconfig.get("checkpoint_format", "gptq")
    if bits != 4:
        raise ImportFormatError(f"load_pretrained: {config_path}: GPTQ with bits {bits!r}; aofunc reads 4-bit "
                                f"GPTQ. Supported: {_supported()}")
    if fmt not in ("gptq", "gptq_v2"):
        raise ImportFormatError(f"load_pretrained: {config_path}: GPTQ checkpoint_format {fmt!r}; aofunc reads "
                                "'gptq' (v1, zeros stored minus one) and 'gptq_v2'")
    if g not in GROUP_SIZES:
        raise ImportFormatError(f"load_pretrained: {config_path}: GPTQ group_size {g!r}; aofunc's int4 takes "
                                f"{', '.join(map(str, GROUP_SIZES))}")
    offset = 1 if fmt == "gptq" else 0
    out, claimed = {}, set()
    for module in sorted(key[:-len(".qweight")] for key in tensors if key.endswith(".qweight")):
        keys = {name: f"{module}.{name}" for name in ("qweight", "qzeros", "scales", "g_idx")}
        for name, key in keys.items():
            if key not in tensors and name != "g_idx":
                raise ImportFormatError(f"load_pretrained: {where[keys['qweight']]}: {key!r} is missing")
        qweight, qzeros, scales = (tensors[keys[n]] for n in ("qweight", "qzeros", "scales"))
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise ImportFormatError(f"load_pretrained: {where[keys['qweight']]}: {keys['qweight']!r} is "
                                    f"{qweight.dtype} {list(qweight.shape)}, expected int32 [K/8, N]")
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        if k % g:
            raise ImportFormatError(f"load_pretrained: {where[keys['qweight']]}: {module!r} has K = {k}, not a "
                                    f"multiple of group_size {g} of {config_path}")
        _expect(scales, (k // g, n), None, keys["scales"], where, f"groups of {g} along K = {k} in {config_path}")
        _expect(qzeros, (k // g, -(-n // 8)), torch.int32, keys["qzeros"], where,
                f"4-bit zeros of groups of {g} packed along N = {n}")
        if not scales.dtype.is_floating_point:
            raise ImportFormatError(f"load_pretrained: {where[keys['scales']]}: {keys['scales']!r} is "
                                    f"{scales.dtype}, not floating point")
        perm = None
        if keys["g_idx"] in tensors:
            _expect(tensors[keys["g_idx"]], (k,), None, keys["g_idx"], where, "one group index per input column")
            perm = _gptq_perm(tensors[keys["g_idx"]], k, g, keys["g_idx"], where)
            claimed.add(keys["g_idx"])
        codes = unpack_int32(qweight.t().contiguous(), 4, k)  # [N, K]: K packed eight a word
        if perm is not None:  # act-order: codes along the permuted columns, so that each group is consecutive
            codes = codes[:, perm.long()]
        zero = unpack_int32(qzeros, 4, n).t() + offset  # [N, K/g]
        if bool((zero > 15).any()):
            raise ImportFormatError(f"load_pretrained: {where[keys['qzeros']]}: {keys['qzeros']!r} holds the "
                                    "zero point 16 (stored -1 in GPTQ v1), which aofunc's grid (0..15) cannot hold")
        sym = bool((zero == 8).all())
        stored = {"qdata": _codes_to_qdata(codes), "scale": scales.t().contiguous()}
        if not sym:
            stored["zero"] = zero.to(torch.uint8).contiguous()
        if perm is not None:
            stored["perm"] = perm
        scheme = Int4WeightOnly(g, zero_point="none" if sym else "int")
        out[f"{module}.weight"] = QTensor(scheme, stored, (n, k), scales.dtype)
        claimed.update(keys[n] for n in ("qweight", "qzeros", "scales"))
    if not out:
        raise ImportFormatError(f"load_pretrained: {config_path} names GPTQ but the weights hold no '.qweight'")
    for key, t in tensors.items():
        if key not in claimed:
            out[key] = t
    return out


def load_pretrained(model_dir: str | os.PathLike, *, device: str | torch.device | None = None) -> dict:
    """Read a quantized model as a params tree `{name: tensor | QTensor}` in aofunc's layouts, onto `device`
    (default CPU), that the unmodified model runs through `torch.func.functional_call` (or `aofunc.apply`).

    `model_dir` is an aofunc file (`aofunc.save`), or a directory holding one, or a Hugging Face model directory
    (config.json with a `quantization_config`, weights in safetensors, sharded or not) in one of these forms:

    - compressed-tensors, "pack-quantized" int4 groups (integer zero points or symmetric) and int8 per channel,
      and "int-quantized" int8 per channel (W8A8 with per-token dynamic activations reads as `Int8Dynamic`).
      Act-order int4 (`actorder: "group"`, as compressed-tensors before 0.20 wrote it: a `weight_g_idx` [K]
      giving each input column's group) reads with the weight's `perm`, as GPTQ's act-order does below;
      `actorder: "weight"` changes calibration only and reads as plain groups;
    - GPTQ (`quant_method: "gptq"`), 4 bits as AutoGPTQ writes it: `qweight` int32 [K/8, N], `qzeros` int32
      [K/g, N/8] (zeros stored minus one in checkpoint_format "gptq", as they are in "gptq_v2"), `scales` [K/g, N]
      and `g_idx` [K]; symmetric checkpoints read as `Int4WeightOnly(g, zero_point="none")`, others as
      `zero_point="int"`. Act-order checkpoints (`desc_act`: a `g_idx` grouping a permutation of the input
      columns) read with the weight's `perm`, the column order that puts each group's columns side by side.

    What `save_pretrained` wrote reads back equal, stored tensor for stored tensor. Refused with an error naming
    the file: a directory without config.json (and no aofunc file), a quantization_config of another kind (the
    message lists the supported formats), a GPTQ `g_idx` (or compressed-tensors `weight_g_idx`) that is no grouping of the input columns into groups of
    `group_size`, and tensors whose shapes disagree with each other or with the config.
    """
    path = Path(model_dir)
    if path.is_file():
        return load(path, device)
    if not path.is_dir():
        raise FileNotFoundError(f"load_pretrained: no file or directory at {path}")
    device = _load_device(device)
    config_path = path / "config.json"
    qconfig = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ImportFormatError(f"load_pretrained: {config_path} is not valid JSON ({e})") from None
        qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if qconfig is None:
        own = _aofunc_file(path)
        if own is not None:
            return load(own, device)
        if not config_path.is_file():
            raise ImportFormatError(f"load_pretrained: {path} has no config.json and no aofunc file; give a Hugging "
                                    "Face model directory (save_pretrained's) or an aofunc.save file")
        raise ImportFormatError(f"load_pretrained: {config_path} has no quantization_config and {path} holds no "
                                f"aofunc file. Supported: {_supported()}")
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method not in ("compressed-tensors", "gptq"):
        raise ImportFormatError(f"load_pretrained: {config_path}: quantization_config quant_method {method!r} is "
                                f"not supported. Supported: {_supported()}")
    tensors, where = _read_safetensors(_weight_files(path))
    tree = (_import_ct if method == "compressed-tensors" else _import_gptq)(qconfig, config_path, tensors, where)
    return {name: t.to(device) for name, t in tree.items()}
