"""qlinear and the torch functions a QTensor answers."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import aofunc
from aofunc import QTensor
from aofunc.quantize import quantize_weight
from tests.kernels.devices import DEVICE
from tests.models import ALL_SCHEMES

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@st.composite
def linear_case(draw):
    scheme = draw(st.sampled_from(ALL_SCHEMES + [aofunc.Int4WeightOnly(128)]))
    n = draw(st.sampled_from([1, 16, 24, 48]))
    k = draw(st.integers(1, 160))
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 5)]))
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if draw(st.booleans()) else None
    return scheme, w, x, bias


def reference_linear(x, qw, bias):
    """The same math in float64: activations fake-quantized where the scheme quantizes them."""
    from aofunc.kernels.int8_int4 import quantize_per_token_asym_int8_ref
    from aofunc.kernels.w8a8 import quantize_per_token_int8_ref
    w = qw.dequantize().double()
    x64 = x.double()
    if isinstance(qw.scheme, aofunc.Int8Dynamic):
        xq, s = quantize_per_token_int8_ref(x.reshape(-1, x.shape[-1]), None)
        x64 = (xq.double() * s.double()[:, None]).reshape(x.shape)
    if isinstance(qw.scheme, aofunc.Int8DynamicInt4):
        xq, s, zp = quantize_per_token_asym_int8_ref(x.reshape(-1, x.shape[-1]))
        x64 = ((xq.double() - zp.double()[:, None]) * s.double()[:, None]).reshape(x.shape)
    y = x64 @ w.t()
    return y if bias is None else y + bias.double()


@given(linear_case())
def test_qlinear_equals_the_dequantized_linear(case):
    scheme, w, x, bias = case
    qw = quantize_weight(w, scheme)
    y = aofunc.qlinear(x, qw, bias)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == x.dtype
    expected = reference_linear(x, qw, bias)
    assert relative_error(y, expected) <= TOLERANCE[x.dtype]


@given(linear_case())
def test_qlinear_is_pure_and_deterministic(case):
    scheme, w, x, bias = case
    qw = quantize_weight(w, scheme)
    x_before, stored_before = x.clone(), {k: v.clone() for k, v in qw.tensors.items()}
    a, b = aofunc.qlinear(x, qw, bias), aofunc.qlinear(x, qw, bias)
    assert torch.equal(a, b) and torch.equal(x, x_before)
    assert all(torch.equal(qw.tensors[k], v) for k, v in stored_before.items())


@pytest.mark.parametrize("scheme, k, bound", [
    (aofunc.Int8Dynamic(), 256, 35), (aofunc.Int8WeightOnly(), 256, 40), (aofunc.Int4WeightOnly(128), 256, 10),
    (aofunc.Int4WeightOnly(128), 4096, 14), (aofunc.NF4(), 256, 15), (aofunc.Int8DynamicInt4(32), 256, 14),
])
def test_output_sqnr_meets_the_reference_thresholds(scheme, k, bound):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, k, generator=g), torch.randn(32, k, generator=g)
    y = aofunc.qlinear(x, quantize_weight(w, scheme))
    assert aofunc.sqnr(x @ w.t(), y) > bound


def test_int4_on_cpu_uses_the_packed_kernel_and_agrees_with_the_fallback():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 200, generator=g, dtype=torch.bfloat16)
    x = torch.randn(5, 200, generator=g, dtype=torch.bfloat16)
    qw = quantize_weight(w, aofunc.Int4WeightOnly(64))
    fast = aofunc.qlinear(x, qw)  # N % 16 == 0: aten._weight_int4pack_mm_for_cpu, K padded 200 -> 256
    slow = F.linear(x.float(), qw.dequantize().float())
    assert relative_error(fast, slow) < 1e-2


INT4_GRIDS = [aofunc.Int4WeightOnly(64, zero_point=z) for z in ("float", "int", "none")]


@pytest.mark.parametrize("scheme", INT4_GRIDS, ids=repr)
@pytest.mark.parametrize("w_dtype", FLOATS)
@pytest.mark.parametrize("x_dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 4, 9, 130])
def test_int4_grids_on_cpu_agree_with_the_dequantized_twin(scheme, w_dtype, x_dtype, m):
    """The packed CPU kernel (N % 16 == 0, the rows ops.CPU_PACKED_MAX_M gives x's dtype; on the integer grid with
    16-bit activations its float zero, rounded to x's dtype, is corrected by the rounding error times each group's
    sum of x) and the dequantized fallback both give the twin, F.linear on the dequantized weight."""
    from aofunc import ops
    g = torch.Generator().manual_seed(m)
    w = torch.randn(32, 200, generator=g).to(w_dtype)
    x = torch.randn(m, 200, generator=g).to(x_dtype)
    bias = torch.randn(32, generator=g).to(x_dtype)
    qw = quantize_weight(w, scheme)
    y = aofunc.qlinear(x, qw, bias)
    assert y.dtype == x_dtype and y.shape == (m, 32)
    twin = F.linear(x.double(), scheme.dequantize(qw.tensors, 32, 200, torch.float64), bias.double())
    assert relative_error(y, twin) <= TOLERANCE[x_dtype]
    if m > ops.CPU_PACKED_MAX_M.get(x_dtype, ops.CPU_PACKED_MAX_M_OTHER):  # the dequantized path itself
        assert torch.equal(y, F.linear(x, scheme.dequantize(qw.tensors, 32, 200, x_dtype), bias))


@pytest.mark.parametrize("scheme", INT4_GRIDS[1:], ids=repr)
@pytest.mark.parametrize("config", [
    dict(path="gemv", BLOCK_N=8, GROUPS=1, SPLIT_K=2, PREFETCH=False, num_warps=2, num_stages=1),
    dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, FULL_DQ=True, num_warps=2, num_stages=1)])
def test_int4_grids_run_on_the_w4a16_kernels_as_stored(scheme, config):
    """What the CUDA path runs (here interpreted): the W4A16 kernels reading the grid's zero as stored (uint8 zero
    points, or none)."""
    from aofunc.kernels import w4a16
    g = torch.Generator().manual_seed(7)
    w = torch.randn(24, 128, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 128, generator=g, dtype=torch.float16)
    t = quantize_weight(w, scheme).tensors
    on = {k: v.to(DEVICE) for k, v in t.items()}
    y = w4a16.w4a16_linear_triton(x.to(DEVICE), on["qdata"], on["scale"], on.get("zero"), 64, None, config=config)
    twin = F.linear(x.double(), scheme.dequantize(t, 24, 128, torch.float64)).to(DEVICE)
    assert relative_error(y, twin) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("bad, match", [
    (lambda w: aofunc.qlinear(torch.randn(2, 7), w), "input features 8"),
    (lambda w: aofunc.qlinear(torch.ones(2, 8, dtype=torch.int32), w), "floating point"),
    (lambda w: aofunc.qlinear(torch.randn(2, 8), w, torch.zeros(3)), r"bias must have shape \(4,\)"),
    (lambda w: aofunc.qlinear(torch.randn(2, 8), w.dequantize()), "QTensor"),
])
def test_qlinear_refuses_bad_input(bad, match):
    w = quantize_weight(torch.randn(4, 8), aofunc.Int8WeightOnly())
    with pytest.raises((TypeError, ValueError), match=match):
        bad(w)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
def test_matmul_mm_addmm_and_linear_route_to_qlinear(scheme):
    g = torch.Generator().manual_seed(1)
    w, x, b = torch.randn(16, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(16, generator=g)
    qw = quantize_weight(w, scheme)
    expected = aofunc.qlinear(x, qw, b)
    qt = quantize_weight(w.t().contiguous(), scheme, transposed=True)  # stored [in, out]
    assert torch.equal(qt.dequantize(), qw.dequantize().t())
    assert torch.equal(F.linear(x, qw, b), expected)
    assert torch.equal(torch.matmul(x, qt) + b, aofunc.qlinear(x, qw) + b)
    assert torch.equal(x @ qw.t(), aofunc.qlinear(x, qw))
    assert torch.equal(torch.mm(x, qt), aofunc.qlinear(x, qw))
    assert torch.equal(torch.addmm(b, x, qt), expected)


def test_uses_no_fast_path_covers_run_on_the_dequantized_weight():
    g = torch.Generator().manual_seed(4)
    qw = quantize_weight(torch.randn(16, 32, generator=g), aofunc.Int8WeightOnly())
    dq = qw.dequantize()
    x, m, c = torch.randn(3, 16, generator=g), torch.randn(3, 32, generator=g), torch.randn(3, 16, generator=g)
    assert torch.equal(x @ qw, x @ dq)  # contraction over N
    assert torch.allclose(torch.addmm(c, m, qw.t(), beta=0.5), torch.addmm(c, m, dq.t(), beta=0.5), atol=1e-5)
    assert torch.equal(F.linear(m, qw.t().t()), aofunc.qlinear(m, qw))  # t() twice is the weight again


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 0), (1, 1), ((2, 1), (0, 2)), (1, "same")])
def test_pointwise_conv2d_runs_as_a_linear_over_channels(stride, padding):
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(32, 16, 1, stride=stride, padding=padding)
    x = torch.randn(2, 32, 5, 6, generator=g)
    qw = quantize_weight(conv.weight, aofunc.Int8WeightOnly())
    y = F.conv2d(x, qw, conv.bias, conv.stride, conv.padding)
    expected = F.conv2d(x, qw.dequantize(), conv.bias, conv.stride, conv.padding)
    assert y.shape == expected.shape and relative_error(y, expected) < 1e-5
    assert relative_error(F.conv2d(x[0], qw, None), F.conv2d(x[0], qw.dequantize(), None)) < 1e-5


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
def test_embedding_gathers_rows_then_dequantizes(scheme):
    w = torch.randn(50, 24, dtype=torch.bfloat16)
    qw = quantize_weight(w, scheme)
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    out = F.embedding(ids, qw)
    assert out.dtype == torch.bfloat16 and torch.equal(out, qw.dequantize()[ids])


def test_nf4_lora_trains_on_a_frozen_base_with_torch_func_grad():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    base = quantize_weight(w, aofunc.NF4())
    x = torch.randn(256, 64, generator=g)
    delta = torch.randn(32, 4, generator=g) @ torch.randn(4, 64, generator=g) * 0.3  # a rank-4 change to learn
    target = x @ (w + delta).t()
    lora = {"a": torch.randn(4, 64, generator=g) * 0.1, "b": torch.zeros(32, 4)}

    def loss(adapter):
        y = aofunc.qlinear(x, base) + (x @ adapter["a"].t()) @ adapter["b"].t()
        return ((y - target) ** 2).mean()

    start = loss(lora).item()
    for _ in range(60):
        grads = torch.func.grad(loss)(lora)
        lora = {k: v - 0.2 * grads[k] for k, v in lora.items()}
    assert loss(lora).item() < 0.05 * start
    assert torch.equal(base.dequantize(), quantize_weight(w, aofunc.NF4()).dequantize())  # the base stayed frozen


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
def test_gradient_wrt_the_input_is_the_dequantized_weight(scheme):
    w = torch.randn(8, 16)
    qw = quantize_weight(w, scheme)
    x = torch.randn(3, 16, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    aofunc.qlinear(x, qw, b).sum().backward()
    assert torch.allclose(x.grad, qw.dequantize().sum(0).expand(3, 16), atol=1e-5)
    assert torch.equal(b.grad, torch.full((8,), 3.0))


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
def test_torch_func_grad_flows_through_stacked_quantized_layers(scheme):
    g = torch.Generator().manual_seed(5)
    first, second = (quantize_weight(torch.randn(32, 32, generator=g), scheme) for _ in range(2))
    x = torch.randn(6, 32, generator=g)
    a = torch.randn(32, 32, generator=g) * 0.1

    def loss(adapter):
        return aofunc.qlinear(torch.relu(aofunc.qlinear(x @ adapter, first)), second).pow(2).sum()

    grad = torch.func.grad(loss)(a)
    a_eager = a.clone().requires_grad_()
    loss(a_eager).backward()
    assert torch.allclose(grad, a_eager.grad, rtol=1e-5, atol=1e-5)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("m", [1, 4, 5, 64])
@pytest.mark.parametrize("scheme", [aofunc.Int4WeightOnly(32), aofunc.Int8WeightOnly()], ids=repr)
def test_cpu_weight_only_paths_agree_across_batch_sizes(scheme, m):
    g = torch.Generator().manual_seed(m)
    qw = quantize_weight(torch.randn(32, 64, generator=g), scheme)
    x = torch.randn(m, 64, generator=g)
    assert relative_error(aofunc.qlinear(x, qw), x @ qw.dequantize().t()) < 1e-5


def _unaligned(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A copy of t whose data starts offset_bytes past a 64-byte boundary (as tensors read from a file do)."""
    raw = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
    return raw[offset_bytes:offset_bytes + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)


@pytest.mark.parametrize("x_dtype, m",
                         [(torch.float32, 1), (torch.float16, 2), (torch.bfloat16, 4), (torch.bfloat16, 128)])
@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_cpu_kernels_take_weights_and_rows_at_any_address(scheme, x_dtype, m, tmp_path):
    # torch's CPU int8 weight-only kernel crashed on codes or rows off a 64-byte boundary; a file maps them anywhere
    g = torch.Generator().manual_seed(3)
    qw = quantize_weight(torch.randn(64, 64, generator=g).to(x_dtype), scheme)
    aofunc.save({"w": qw}, tmp_path / "w.safetensors")
    loaded = aofunc.load(tmp_path / "w.safetensors")["w"]
    assert all(t.data_ptr() % 64 == 0 for t in loaded.tensors.values())  # load aligns what the file maps anywhere
    shifted = QTensor(qw.scheme, {k: _unaligned(t, 16) for k, t in qw.tensors.items()}, qw.shape, qw.dtype)
    x = _unaligned(torch.randn(m, 64, generator=g).to(x_dtype), 8)
    want = reference_linear(x, qw, None)
    for w in (loaded, shifted):
        assert relative_error(aofunc.qlinear(x, w), want) <= TOLERANCE[x_dtype]


def test_compiled_cpu_int8_checks_the_addresses_of_each_call(tmp_path):
    # the address check runs inside an opaque op: a compiled function given weights read from a file runs too
    qw = quantize_weight(torch.randn(64, 64).to(torch.bfloat16), aofunc.Int8WeightOnly())
    aofunc.save({"w": qw}, tmp_path / "w.safetensors")
    loaded = aofunc.load(tmp_path / "w.safetensors")["w"]
    shifted = QTensor(qw.scheme, {k: _unaligned(t, 16) for k, t in qw.tensors.items()}, qw.shape, qw.dtype)
    run = torch.compile(aofunc.qlinear, fullgraph=True, backend="aot_eager")
    x = _unaligned(torch.randn(4, 64).to(torch.bfloat16), 8)
    for w in (loaded, shifted):
        assert torch.equal(run(x, w), aofunc.qlinear(x, qw))


@given(st.sampled_from(ALL_SCHEMES), st.sampled_from([(0,), (0, 3), (2, 0), (0, 0)]),
       st.sampled_from(["contiguous", "every other column", "zero strides", "transposed"]), st.sampled_from(FLOATS),
       st.booleans())
def test_qlinear_of_an_empty_input_is_an_empty_output_whatever_its_strides(scheme, lead, layout, dtype, with_bias):
    k, n = 64, 16
    qw = quantize_weight(torch.randn(n, k).to(dtype), scheme)
    if layout == "contiguous":
        x = torch.randn(*lead, k)
    elif layout == "every other column":
        x = torch.randn(*lead, 2 * k)[..., ::2]
    elif layout == "zero strides":
        x = torch.empty_strided((*lead, k), (0,) * (len(lead) + 1))
    else:
        x = torch.randn(k, *reversed(lead)).permute(*range(len(lead), 0, -1), 0)
    x = x.to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = aofunc.qlinear(x, qw, bias)
    assert y.shape == (*lead, n) and y.dtype == dtype and y.numel() == 0


@pytest.mark.parametrize("x_dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 4, 9])
def test_8da4w_on_cpu_agrees_with_the_integer_twin(x_dtype, m):
    """A few rows take torch's packed int4 CPU kernel on the integer activations (exact in bf16), more rows the
    dequantized weight: both give the twin that sums integers inside each group."""
    from aofunc.kernels import int8_int4
    g = torch.Generator().manual_seed(m)
    w = torch.randn(32, 256, generator=g).to(x_dtype)
    x = torch.randn(m, 256, generator=g).to(x_dtype)
    bias = torch.randn(32, generator=g).to(x_dtype)
    qw = quantize_weight(w, aofunc.Int8DynamicInt4(64))
    t = qw.tensors
    y = aofunc.qlinear(x, qw, bias)
    assert y.dtype == x_dtype and y.shape == (m, 32)
    assert relative_error(y, int8_int4.int8_int4_linear_ref(x, t["qdata"], t["scale"], 64, bias)) <= TOLERANCE[x_dtype]
