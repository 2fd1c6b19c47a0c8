"""What every quantization scheme provides, and the registry that names them in files."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from aofunc.kernels.packing import GROUP_SIZES

SCHEMES: dict[str, type] = {}


def register_scheme(cls):
    """Class decorator: a frozen, hashable scheme that files can name by its class name."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    SCHEMES[cls.__name__] = cls
    return cls


def check_group_size(scheme, group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"{type(scheme).__name__}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")


class GroupQuantizer:
    """How a format with groups along K quantizes a weight column by column (what GPTQ needs): codes run from
    `lowest` to `highest`, and a code c of a group with (scale, zero) stands for c * scale + base(scale, zero)."""

    lowest: int
    highest: int

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the weight's dtype: scales and zeros are rounded to it, as the format stores them

    def choose(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) in fp32 for each row of a group g [N, group], rounded as stored."""
        raise NotImplementedError

    def base(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The value of code 0."""
        raise NotImplementedError

    def stored(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
        """The format's stored tensors from codes [N, Kp] and per-group scale and zero [N, Kp/g]."""
        raise NotImplementedError


class Scheme:
    """A quantized weight format for a 2-D weight in canonical orientation [N, K] (N outputs, K inputs).

    A scheme is a frozen dataclass (its fields are its settings, e.g. `group_size`) that turns a float [N, K] weight
    into named tensors and back and says which stored tensors it holds; a new format subclasses Scheme, implements
    `quantize`, `dequantize` and `stored`, and is decorated with `aofunc.formats.scheme.register_scheme` so that
    files can name it.
    """

    #: stored tensors that follow the logical dtype on `.to(dtype)`
    float_names: ClassVar[tuple[str, ...]] = ()
    #: stored tensors a weight may carry or not
    optional_names: ClassVar[tuple[str, ...]] = ()
    #: False for schemes that transform weights in place of storing them (pruning): quantize refuses those
    is_stored_format: ClassVar[bool] = True
    #: the format's name on the command line, in the demo and in the docs ("int4"); empty for unnamed schemes
    short_name: ClassVar[str] = ""

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of a float weight w [N, K] (canonical orientation, groups along K)."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [N, K] in `dtype` that the stored tensors describe (what every kernel computes with)."""
        raise NotImplementedError

    def stored(self, n: int, k: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{tensor name: (shape, dtype)} of what a [N, K] weight of this dtype stores, optional names included."""
        raise NotImplementedError

    def group_quantizer(self, dtype: torch.dtype) -> GroupQuantizer | None:
        """The format's column-by-column quantizer for weights of `dtype` (GPTQ's); None for formats without
        groups along K."""
        return None

    def bits_per_weight(self, n: int, k: int, dtype: torch.dtype) -> float:
        """Stored bits per weight of an [N, K] weight of this dtype, scales and padding included."""
        size = sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size() * 8
                   for name, (shape, dt) in self.stored(n, k, dtype).items() if name not in self.optional_names)
        return size / (n * k)

    def rows(self, tensors: dict[str, torch.Tensor], index: torch.Tensor, n: int, k: int,
             dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows w[index] (for embeddings); formats laid out by row gather before dequantizing."""
        return self.dequantize(tensors, n, k, dtype)[index]

    def gathered_rows(self, tensors: dict[str, torch.Tensor], index: torch.Tensor, k: int,
                      dtype: torch.dtype) -> torch.Tensor:
        """`rows` for formats whose every stored tensor is laid out by output row: gather those rows of each, then
        dequantize only them."""
        picked = {name: t[index.reshape(-1)] for name, t in tensors.items()}
        return self.dequantize(picked, index.numel(), k, dtype).reshape(*index.shape, k)

    def to_dict(self) -> dict:
        """{"type": class name, **fields}: how files name the scheme."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


def scheme_from_dict(d: dict) -> Scheme:
    """The scheme a file's metadata names: {"type": class name, **fields}."""
    if not isinstance(d, dict) or d.get("type") not in SCHEMES:
        raise ValueError(f"unknown scheme {d!r}; known: {sorted(SCHEMES)}")
    fields = {key: value for key, value in d.items() if key != "type"}
    return SCHEMES[d["type"]](**fields)


def grouped_schemes() -> tuple[type, ...]:
    """The registered formats that have a group quantizer (those GPTQ can calibrate), in registration order."""
    return tuple(cls for cls in SCHEMES.values() if cls.group_quantizer is not Scheme.group_quantizer)


def scheme_names() -> dict[str, type]:
    """{short name: scheme class} of the registered stored formats, in registration order: the one list the
    command line, the demo and the docs name formats from."""
    return {cls.short_name: cls for cls in SCHEMES.values() if cls.short_name and cls.is_stored_format}


def scheme_from_name(name: str, group_size: int | None = None) -> Scheme:
    """The scheme a short name stands for, with its default settings (or `group_size` for formats with groups)."""
    names = scheme_names()
    if name not in names:
        raise ValueError(f"unknown format {name!r}: expected one of {', '.join(names)}")
    cls = names[name]
    if group_size is None:
        return cls()
    if "group_size" not in {f.name for f in dataclasses.fields(cls)}:
        grouped = [n for n, c in names.items() if "group_size" in {f.name for f in dataclasses.fields(c)}]
        raise ValueError(f"a group size applies to {' and '.join(grouped)} only, not {name}")
    return cls(group_size=group_size)
