"""qlinear, the pure quantized linear op, and the torch functions a QTensor answers through it."""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from aofunc import primitives as P
from aofunc.formats import Int4WeightOnly, Int8Dynamic, Int8DynamicInt4, Int8WeightOnly, NF4, QTensor
from aofunc.formats.qtensor import implements, values_readable
from aofunc.kernels import int8_int4, int_mm, nf4, w4a16, w8a8, w8a16
from aofunc.kernels.packing import aligned
from aofunc.kernels.selector import Problem, default_path


def qlinear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias with W quantized: any leading batch dims, fp32/fp16/bf16 x, CPU or CUDA.

    Differentiable in x and bias (dL/dx = dL/dy @ W, the dequantized weight), through .backward() and torch.func,
    so adapters train on a frozen quantized base. On CUDA the Triton kernels of `aofunc.kernels` run.

    Example:
        >>> w = aofunc.quantize({"w": torch.randn(64, 128)}, aofunc.Spec([aofunc.Rule("w", aofunc.Int8WeightOnly())]))["w"]
        >>> aofunc.qlinear(torch.randn(2, 5, 128), w).shape
        torch.Size([2, 5, 64])
    """
    if not isinstance(w, QTensor):
        raise TypeError(f"qlinear: w must be an aofunc.QTensor, got {type(w).__name__}")
    n, k = w.nk
    if not x.is_floating_point():
        raise TypeError(f"qlinear: x must be a floating point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"qlinear: x's last dimension must be the weight's input features {k}, "
                         f"got x of shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"qlinear: bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.device != w.device:
        raise ValueError(f"qlinear: x is on {x.device} but the weight is on {w.device}")
    x2d = x.reshape(-1, k)
    if bias is not None:
        bias = bias.to(x.dtype)
    stored = w.tensors
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = _LinearWithInputGrad.apply(x2d, bias, w.scheme, n, k, tuple(stored), *stored.values())
    else:
        y = LINEAR[type(w.scheme)](x2d, w.scheme, stored, n, k, bias)
    return y.reshape(*x.shape[:-1], n)


class _LinearWithInputGrad(torch.autograd.Function):
    """The quantized forward, with gradients for x and bias (dL/dx = dL/dy @ W): adapters train on a frozen base,
    through .backward() and through torch.func transforms alike."""

    @staticmethod
    def forward(x, bias, scheme, n, k, names, *stored):
        return LINEAR[type(scheme)](x, scheme, dict(zip(names, stored)), n, k, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, scheme, n, k, names, *stored = inputs
        ctx.scheme, ctx.n, ctx.k, ctx.names = scheme, n, k, names
        ctx.save_for_backward(*stored)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.scheme.dequantize(dict(zip(ctx.names, ctx.saved_tensors)), ctx.n, ctx.k, grad_y.dtype)
            grad_x = grad_y @ w
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.sum(0)
        return (grad_x, grad_bias, None, None, None, None) + (None,) * len(ctx.saved_tensors)


# Function.apply binds every call to forward's signature, and inspect rebuilds that signature each time unless the
# function carries it: stored once, a small int8 linear with grad enabled takes 87 µs a call on CPU, against 115.
_LinearWithInputGrad.forward.__signature__ = inspect.signature(_LinearWithInputGrad.forward)


# ---------------------------------------------------------------------------------------------- per format
# Each takes x [M, K] and the weight's stored tensors, and returns y [M, N] in x's dtype.

def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _dequantized_linear(x, scheme, t, n, k, bias):
    return F.linear(x, scheme.dequantize(t, n, k, x.dtype), bias)


#: The most rows of x that torch's packed CPU weight-only kernels (int8, int4) take, by x's dtype; past them the
#: weight is dequantized once and the float matmul runs. The kernels reread the weight for every row and are fast for
#: bf16 rows only. Two cores, a 4096x4096 weight: bf16 rows take 4.6 (int8) and 4.0 ms (int4) at 16 rows and 34 and
#: 29 ms at 128, where dequantizing alone takes 70 and 125 ms; fp16 and fp32 rows take 10 to 34 ms at one row and
#: lose to dequantizing from a few rows.
CPU_PACKED_MAX_M = {torch.bfloat16: 128}
CPU_PACKED_MAX_M_OTHER = 4


def _cpu_packed_rows(x: torch.Tensor) -> bool:
    """Whether x is a CPU activation with rows for torch's packed kernels (an empty x takes F.linear: the packed
    kernels refuse its strides, whatever they are)."""
    return x.device.type == "cpu" and 0 < x.shape[0] <= CPU_PACKED_MAX_M.get(x.dtype, CPU_PACKED_MAX_M_OTHER)


@torch.library.custom_op("aofunc::cpu_int8pack_mm", mutates_args=())
def _cpu_int8pack_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's packed CPU int8 weight-only matmul, x @ (qdata * scale[:, None]).T in x's dtype, given x and codes
    that start on a 64-byte boundary: its vector loads crash on others, such as tensors read from a file (mapped at
    the file's offsets) or sliced from a larger one, so those are copied first. An opaque op, so under
    torch.compile the addresses are checked on the real tensors of each call."""
    return torch.ops.aten._weight_int8pack_mm(aligned(x.contiguous()), aligned(qdata), scale.to(x.dtype))


@_cpu_int8pack_mm.register_fake
def _(x, qdata, scale):
    return x.new_empty(x.shape[0], qdata.shape[0])


def _int8_weight_only(x, scheme, t, n, k, bias):
    if x.is_cuda:
        return w8a16.w8a16_linear(x, t["qdata"], t["scale"], bias)
    # torch's CPU int8 kernel reads out of bounds when K is not a multiple of 16 (wrong values or a crash)
    if k % 16 == 0 and _cpu_packed_rows(x):
        return _add_bias(_cpu_int8pack_mm(x, t["qdata"], t["scale"]), bias)
    return _dequantized_linear(x, scheme, t, n, k, bias)


def _int8_dynamic(x, scheme, t, n, k, bias):
    if x.is_cuda:
        return w8a8.w8a8_linear(x, t["qdata"], t["scale"], bias, t.get("act_scale"))
    xq, sx = w8a8.quantize_per_token_int8(x, t.get("act_scale"))
    acc = int_mm.int_mm(xq, t["qdata"].t())
    # int32 times both scales in fp32, so fp16 outputs cannot overflow before the cast
    y = acc.float() * sx[:, None] * t["scale"].float()
    return _add_bias(y.to(x.dtype), bias)


_CPU_INT4_PACKED = WeakIdKeyDictionary()


def _cpu_int4_packed(qdata: torch.Tensor) -> torch.Tensor:
    """tinygemm's CPU packing of the codes, derived on first use and cached per stored tensor (never saved)."""
    compiling = torch.compiler.is_compiling()
    cached = None if compiling else _CPU_INT4_PACKED.get(qdata)
    if cached is None:
        cached = torch.ops.aten._convert_weight_to_int4pack_for_cpu(P.unpack_uint4(qdata).to(torch.int32), 1)
        if not compiling:
            _CPU_INT4_PACKED[qdata] = cached
    return cached


def _int4_weight_only(x, scheme, t, n, k, bias):
    perm = t.get("perm")
    if perm is not None:
        # act-order: the codes and groups run along the permuted input columns, y = x[:, perm] @ w_stored.T; the
        # kernels below then see an ordinary weight
        x = x.index_select(-1, perm)
        t = {name: v for name, v in t.items() if name != "perm"}
    # the CUDA kernels read every grid as stored: a float zero, uint8 zero points, or none
    if x.is_cuda:
        return w4a16.w4a16_linear(x, t["qdata"], t["scale"], t.get("zero"), scheme.group_size, bias)
    if _cpu_packed_fits(x, n):
        zero = scheme.kernel_zero(t)
        xp = P.pad_to_multiple(x, t["qdata"].shape[1] * 2)
        y = _cpu_int4_linear(xp, t["qdata"], t["scale"], zero, scheme.group_size)
        if scheme.zero_point == "int" and x.dtype != torch.float32:
            # the CPU kernel takes its zeros in x's dtype, where (8 - z) * scale is no longer exact: its rounding
            # error comes back as a small product, each group's sum of x times it
            residual = zero.float() - zero.to(x.dtype).float()  # [N, Kp/g]
            group_sums = xp.float().reshape(xp.shape[0], -1, scheme.group_size).sum(-1)  # [M, Kp/g]
            y = (y.float() + group_sums @ residual.t()).to(x.dtype)
        return _add_bias(y, bias)
    return _dequantized_linear(x, scheme, t, n, k, bias)


def _cpu_packed_fits(x: torch.Tensor, n: int) -> bool:
    """Whether torch's packed int4 CPU kernel takes this call: rows of x it is fast for, outputs a multiple of 16."""
    return n % 16 == 0 and _cpu_packed_rows(x)


def _cpu_int4_linear(x, qdata, scale, zero, group_size: int) -> torch.Tensor:
    """x @ w.T with w = (code - 8) * scale + zero through torch's packed int4 CPU kernel, scales and zeros taken in
    x's dtype (rounded to it); y in x's dtype."""
    scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(x.dtype).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(P.pad_to_multiple(x, qdata.shape[1] * 2).contiguous(),
                                                     _cpu_int4_packed(qdata), group_size, scales_and_zeros)


def _int8_dynamic_int4(x, scheme, t, n, k, bias):
    if x.is_cuda:
        return int8_int4.int8_int4_linear(x, t["qdata"], t["scale"], scheme.group_size, bias)
    xq, sx, zp = int8_int4.quantize_per_token_asym_int8(x)
    x_int = xq.float() - zp[:, None].float()  # integers in -255..255
    if _cpu_packed_fits(x, n):
        # the packed int4 kernel on the integer activations: exact in bf16 (integers up to 256 are), whose kernel is
        # the fast one, where the result may round there (bf16 x); in fp32 otherwise
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        y = _cpu_int4_linear(x_int.to(dtype), t["qdata"], t["scale"], torch.zeros_like(t["scale"]), scheme.group_size)
        return _add_bias((y.float() * sx[:, None]).to(x.dtype), bias)
    y = F.linear(x_int * sx[:, None], scheme.dequantize(t, n, k, torch.float32))
    return _add_bias(y.to(x.dtype), bias)


def _nf4(x, scheme, t, n, k, bias):
    if x.is_cuda:
        return nf4.nf4_linear(x, t["qdata"], t["scaler_q"], t["scaler_factor"], t["scaler_mean"], n, k,
                              scheme.block_size, scheme.scaler_block_size, bias)
    return _dequantized_linear(x, scheme, t, n, k, bias)


LINEAR = {
    Int8WeightOnly: _int8_weight_only,
    Int8Dynamic: _int8_dynamic,
    Int4WeightOnly: _int4_weight_only,
    Int8DynamicInt4: _int8_dynamic_int4,
    NF4: _nf4,
}


# ---------------------------------------------------------------------------------------------- torch functions

def _dequantized_call(func, *args, **kwargs):
    """The correct answer for any use a fast path does not cover: run func on the dequantized weights."""
    args, kwargs = tree_map_only(QTensor, lambda t: t.dequantize(), (args, kwargs))
    return func(*args, **kwargs)


def _is_linear_weight(w, transposed: bool) -> bool:
    return isinstance(w, QTensor) and w.dim() == 2 and w.transposed == transposed


@implements(F.linear)
def _linear(input, weight, bias=None):
    if _is_linear_weight(weight, False) and not isinstance(input, QTensor) and not isinstance(bias, QTensor):
        return qlinear(input, weight, bias)
    return _dequantized_call(F.linear, input, weight, bias)


@implements(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
def _matmul(input, other, *, out=None):
    if out is None and _is_linear_weight(other, True) and not isinstance(input, QTensor) and input.dim() >= 1:
        return qlinear(input, other)
    return _dequantized_call(torch.matmul, input, other, out=out)


@implements(torch.mm, torch.Tensor.mm)
def _mm(input, mat2, *, out=None):
    if out is None and _is_linear_weight(mat2, True) and not isinstance(input, QTensor):
        return qlinear(input, mat2)
    return _dequantized_call(torch.mm, input, mat2, out=out)


@implements(torch.addmm, torch.Tensor.addmm)
def _addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    plain = not isinstance(input, QTensor) and not isinstance(mat1, QTensor)
    if out is None and beta == 1 and alpha == 1 and plain and _is_linear_weight(mat2, True) and input.dim() <= 1:
        return qlinear(mat1, mat2, input if input.dim() == 1 else input.expand(mat2.shape[1]))
    return _dequantized_call(torch.addmm, input, mat1, mat2, beta=beta, alpha=alpha, out=out)


def is_pointwise_conv(input, weight, groups=1) -> bool:
    """A 1x1, ungrouped conv2d over a (C, H, W) or (B, C, H, W) input: a linear over the channels."""
    return (isinstance(weight, torch.Tensor) and weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1)
            and groups == 1 and isinstance(input, torch.Tensor) and input.dim() in (3, 4))


def pointwise_conv_input(input, stride=1, padding=0) -> torch.Tensor:
    """The channels-last pixels a 1x1 conv2d reads: padded with zeros, subsampled by the stride."""
    if isinstance(padding, str):
        ph = pw = 0  # "valid" and "same" both mean no padding for a 1x1 kernel
    else:
        ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    x = F.pad(input, (pw, pw, ph, ph)) if ph or pw else input
    return x[..., ::sh, ::sw].movedim(-3, -1)


@implements(F.conv2d)
def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(input, QTensor) or not is_pointwise_conv(input, weight, groups):
        return _dequantized_call(F.conv2d, input, weight, bias, stride, padding, dilation, groups)
    return qlinear(pointwise_conv_input(input, stride, padding), weight, bias).movedim(-1, -3)


@implements(F.embedding)
def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
               sparse=False):
    if isinstance(weight, QTensor) and weight.dim() == 2 and not weight.transposed and max_norm is None \
            and not isinstance(input, QTensor):
        n, k = weight.nk
        return weight.scheme.rows(weight.tensors, input, n, k, weight.dtype)
    return _dequantized_call(F.embedding, input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                             sparse)


@implements(torch.embedding)
def _torch_embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return _embedding(indices, weight)


# ---------------------------------------------------------------------------------------------- stacked experts

def _is_expert_stack(w, transposed: bool) -> bool:
    return isinstance(w, QTensor) and w.stacked and w.transposed == transposed


def grouped_qlinear(x: torch.Tensor, w: QTensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x, W, offs=offs) for stacked experts W [E, K, N] (stored [E, N, K], transposed to the
    layout grouped_mm takes): rows offs[e-1]:offs[e] of x [S, K] go through expert e as `qlinear` runs it; rows past
    offs[-1] come back as zeros."""
    experts = w.shape[0]
    if offs.dim() != 1 or offs.numel() != experts:
        raise ValueError(f"grouped_mm: {w.describe()} holds {experts} experts, but offs has shape "
                         f"{tuple(offs.shape)}; it must give one end offset per expert")
    n, k = w.nk
    if x.shape[-1] != k:
        raise ValueError(f"grouped_mm: {w.describe()} takes inputs of {k} features, got x of shape {tuple(x.shape)}")
    grouped = _grouped_kernel(x, w, n, k)
    if grouped is not None:
        if values_readable(offs):
            _check_offsets(offs.tolist(), x.shape[0], w)  # one read of E offsets; the kernel reads them itself
        return grouped(offs)
    if not values_readable(offs):
        # the loop below reads offs on the host (a sync that breaks the graph): traced, the stack is dequantized
        # and torch's grouped product runs on it
        return torch._grouped_mm(x, w.dequantize().to(x.dtype), offs=offs)
    ends = offs.tolist()
    _check_offsets(ends, x.shape[0], w)
    y = x.new_zeros(x.shape[0], n)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            y[start:end] = qlinear(x[start:end], w.expert(e))
        start = end
    return y


def _check_offsets(ends: list[int], rows: int, w: QTensor) -> None:
    start = 0
    for end in ends:
        if end < start or end > rows:
            raise ValueError(f"grouped_mm: offs must rise from 0 to at most {rows} (the rows of x), got {ends} for "
                             f"{w.describe()}")
        start = end


def _grouped_kernel(x: torch.Tensor, w: QTensor, n: int, k: int):
    """offs -> y through the one-launch grouped kernel of w's format, where the kernels' route table sends this
    problem there (CUDA, 16-bit x, W4A16 without act-order or W8A16); else None."""
    if not x.is_cuda or x.dim() != 2:
        return None
    t, scheme = w.tensors, w.scheme
    if isinstance(scheme, Int4WeightOnly) and "perm" not in t:
        fmt, block = "w4a16_experts", scheme.group_size
    elif isinstance(scheme, Int8WeightOnly):
        fmt, block = "w8a16_experts", 0
    else:
        return None
    if default_path(fmt, Problem(x.shape[0], n, k, x.dtype, x.device, block)) != "grouped":
        return None
    if fmt == "w4a16_experts":
        return lambda offs: w4a16.w4a16_grouped_linear(x, t["qdata"], t["scale"], t.get("zero"), offs.to(torch.int32),
                                                       scheme.group_size)
    return lambda offs: w8a16.w8a16_grouped_linear(x, t["qdata"], t["scale"], offs.to(torch.int32))


@implements(torch._grouped_mm)
def _grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    plain = isinstance(mat_a, torch.Tensor) and not isinstance(mat_a, QTensor) and mat_a.dim() == 2
    if plain and _is_expert_stack(mat_b, True) and offs is not None and bias is None \
            and out_dtype in (None, mat_a.dtype) and mat_a.dtype == mat_b.dtype:
        return grouped_qlinear(mat_a, mat_b, offs)
    return _dequantized_call(torch._grouped_mm, mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)


@implements(torch.bmm, torch.Tensor.bmm)
def _bmm(input, mat2, *, out=None):
    # a batch of gathered experts (one per row) has no fast path yet: the dequantized weights give the answer
    return _dequantized_call(torch.bmm, input, mat2, out=out)
