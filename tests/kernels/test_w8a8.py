"""W8A8: the per-token quantization kernel and the int8 linear equal their plain-torch twins exactly.

Runs the Triton kernels on CUDA when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest).
The interpreter rounds fp32 -> bf16 casts wrongly, so bf16 outputs are compared on the GPU only.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aofunc.kernels import int_mm
from aofunc.kernels.w8a8 import (
    INTERPRETER_FUSED_CONFIG,
    candidate_configs,
    default_config,
    quantize_per_token_int8,
    quantize_per_token_int8_ref,
    quantize_per_token_int8_triton,
    w8a8_linear,
    w8a8_linear_ref,
    w8a8_linear_triton,
)

from tests.kernels.devices import DEVICE, LINEAR_DTYPES, ON_GPU, gpu_only


def _activation(m, k, dtype, seed, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        x = torch.randn(m, k, generator=g) * 3
    else:
        x = (torch.randn(k, m, generator=g) * 3).t()  # column-major rows
    return x.to(DEVICE, dtype)


def _weight(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qdata = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    return qdata.to(DEVICE), scale.to(DEVICE, dtype), bias.to(DEVICE, dtype)


# ------------------------------------------------------------------------------------------------ quantization

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("block_k", [None, 16])  # one pass over the row, and the two-pass loop
def test_quantize_kernel_equals_twin(dtype, smooth, block_k):
    x = _activation(9, 50, dtype, seed=1, contiguous=block_k is None)
    act_scale = (torch.rand(50) + 0.25).to(DEVICE, dtype) if smooth else None
    xq, s = quantize_per_token_int8_triton(x, act_scale, block_k=block_k)
    xq_ref, s_ref = quantize_per_token_int8_ref(x, act_scale)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(xq, xq_ref)
    assert torch.equal(s, s_ref)


def test_quantize_rounds_half_to_even_and_clamps_small_rows():
    # amax 127 makes s = 1, so x / s lands exactly on the ties; the zero row takes s = 1e-5 / 127.
    row = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0]
    x = torch.tensor([row, [0.0] * 8, [1e-7] * 8], device=DEVICE)
    xq, s = quantize_per_token_int8_triton(x, None)
    assert xq[0].tolist() == [127, 0, 2, 2, 0, -2, 126, -127]
    assert xq[1].tolist() == [0] * 8
    assert s[1].item() == pytest.approx(1e-5 / 127)
    assert torch.equal(xq, quantize_per_token_int8_ref(x, None)[0])
    assert torch.equal(quantize_per_token_int8(x, None)[0], xq)


def test_scale_is_the_ieee_quotient_on_every_device():
    # torch's CUDA division by a Python scalar multiplies by the reciprocal; the twin and kernel must not.
    x = _activation(64, 48, torch.bfloat16, seed=5)
    want = (x.float().abs().amax(dim=1).double() / 127).float()
    assert torch.equal(quantize_per_token_int8_ref(x, None)[1], want)
    assert torch.equal(quantize_per_token_int8_triton(x, None)[1], want)


def test_quantize_error_is_at_most_half_a_step():
    x = _activation(6, 40, torch.float32, seed=2)
    xq, s = quantize_per_token_int8_ref(x, None)
    assert xq.abs().max() <= 127
    assert ((x / s[:, None] - xq.float()).abs() <= 0.5 + 1e-5).all()


# ------------------------------------------------------------------------------------------------ linear

INTERPRETER_GEMV_CONFIG = {"path": "gemv", "BLOCK_N": 16, "BLOCK_W": 4, "SPLIT_K": 2, "LOOP_STAGES": 1,
                           "num_warps": 4, "num_stages": 1}


def _config_of(path, m):
    """A configuration of ``path`` (fused, two_pass, gemv, fused_gemv) for an M-row call on this device."""
    gemv, fused = path in ("gemv", "fused_gemv"), path in ("fused", "fused_gemv")
    if ON_GPU:
        # the search offers the GEMV up to 4 rows, with the quantization inside up to 2; both run any M
        m_search = min(m, 2 if fused else 4) if gemv else m
        return next(c for c in candidate_configs(m_search)
                    if (c.get("path") == "gemv") == gemv and c.get("FUSED", False) == fused)
    return ({"fused": INTERPRETER_FUSED_CONFIG, "gemv": INTERPRETER_GEMV_CONFIG,
             "fused_gemv": dict(INTERPRETER_GEMV_CONFIG, FUSED=True, ROWS=2)}.get(path)
            or {"FUSED": False, **int_mm.default_config(m, DEVICE)})


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("path", ["fused", "two_pass", "gemv", "fused_gemv"])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_linear_kernel_equals_twin(dtype, path, m):
    x = _activation(m, 50, dtype, seed=m, contiguous=m != 7)
    qdata, scale, bias = _weight(37, 50, dtype, seed=m + 1)
    act_scale = (torch.rand(50) + 0.5).to(DEVICE, dtype) if m == 33 else None
    config = _config_of(path, m)
    for b in (bias, None):
        y = w8a8_linear_triton(x, qdata, scale, b, act_scale, config)
        want = w8a8_linear_ref(x, qdata, scale, b, act_scale)
        assert y.dtype == dtype and y.shape == (m, 37)
        # same integers and scales; the fp32 epilogue may round its last bit differently (FMA contraction)
        torch.testing.assert_close(y, want)


@pytest.mark.parametrize("m,k,split,rows,smooth", [(1, 50, 1, 1, False), (3, 64, 2, 4, True), (5, 37, 3, 2, False),
                                                   (2, 130, 8, 2, True), (0, 16, 1, 1, False)])
def test_gemv_with_quantization_inside_equals_two_kernels(m, k, split, rows, smooth):
    """The one-kernel GEMV (each program quantizes its rows of x as it goes) gives the two-kernel GEMV's output bit
    for bit: the same scales and codes, sums and epilogue; for ragged K, splits of K and rows past M."""
    x = _activation(m, k, torch.bfloat16, seed=k, contiguous=m != 5)
    qdata, scale, bias = _weight(24, k, torch.bfloat16, seed=k + 1)
    act_scale = (torch.rand(k) + 0.5).to(DEVICE, torch.bfloat16) if smooth else None
    config = dict(INTERPRETER_GEMV_CONFIG, SPLIT_K=split, ROWS=rows)
    for b in (bias, None):
        two = w8a8_linear_triton(x, qdata, scale, b, act_scale, config)
        assert torch.equal(w8a8_linear_triton(x, qdata, scale, b, act_scale, dict(config, FUSED=True)), two)


@given(st.integers(1, 5), st.integers(1, 64), st.integers(1, 40), st.sampled_from([1, 2, 3]),
       st.sampled_from([1, 2, 4]), st.booleans(), st.sampled_from(LINEAR_DTYPES), st.integers(0, 2**31 - 1))
def test_gemv_with_quantization_inside_law(m, k, n, split, rows, smooth, dtype, seed):
    """For any small shape, split, rows a program and x dtype: the one-kernel GEMV equals the two-kernel one bit for
    bit, twice the same, and changes none of its inputs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(DEVICE, dtype)
    qdata = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(DEVICE)
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    act_scale = (torch.rand(k, generator=g) + 0.5).to(DEVICE, dtype) if smooth else None
    inputs = [t for t in (x, qdata, scale, bias, act_scale) if t is not None]
    before = [t.clone() for t in inputs]
    config = dict(INTERPRETER_GEMV_CONFIG, SPLIT_K=split, ROWS=rows)
    y = w8a8_linear_triton(x, qdata, scale, bias, act_scale, dict(config, FUSED=True))
    assert torch.equal(y, w8a8_linear_triton(x, qdata, scale, bias, act_scale, config))
    assert torch.equal(y, w8a8_linear_triton(x, qdata, scale, bias, act_scale, dict(config, FUSED=True)))
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


def test_linear_op_matches_twin_and_dequantized_float():
    x = _activation(5, 64, torch.float32, seed=7)
    qdata, scale, bias = _weight(24, 64, torch.float32, seed=8)
    y = w8a8_linear(x, qdata, scale, bias, None)
    torch.testing.assert_close(y, w8a8_linear_ref(x, qdata, scale, bias, None))
    assert torch.equal(torch.ops.aofunc.w8a8_linear(x, qdata, scale, bias, None), y)
    # Against the unquantized activation: the error is per-token int8 rounding only.
    exact = x @ (qdata.float() * scale[:, None]).t() + bias
    rel = (y - exact).norm() / exact.norm()
    assert rel < 2e-2


def test_smoothing_divides_activation_before_quantizing():
    x = _activation(4, 32, torch.float32, seed=9)
    qdata, scale, _ = _weight(16, 32, torch.float32, seed=10)
    act_scale = torch.full((32,), 2.0, device=DEVICE)
    assert torch.equal(w8a8_linear(x, qdata, scale, None, act_scale), w8a8_linear(x / 2, qdata, scale, None, None))


def test_inputs_are_not_modified():
    x = _activation(3, 32, torch.float16, seed=11)
    qdata, scale, bias = _weight(16, 32, torch.float16, seed=12)
    act_scale = (torch.rand(32) + 0.5).to(DEVICE, torch.float16)
    before = [t.clone() for t in (x, qdata, scale, bias, act_scale)]
    w8a8_linear_triton(x, qdata, scale, bias, act_scale)
    quantize_per_token_int8_triton(x, act_scale)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, qdata, scale, bias, act_scale)))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(2, 8, dtype=torch.int32)), "x must be float16, bfloat16 or float32"),
    (dict(x=torch.zeros(2, 2, 8)), "x must be 2-D"),
    (dict(x=torch.zeros(2, 0), qdata=torch.zeros(4, 0, dtype=torch.int8)), "at least one column"),
    (dict(qdata=torch.zeros(4, 8, dtype=torch.uint8)), "qdata must be a 2-D int8"),
    (dict(qdata=torch.zeros(4, 9, dtype=torch.int8)), "K=8"),
    (dict(scale=torch.ones(5)), r"scale must have shape \(4,\)"),
    (dict(bias=torch.ones(3)), r"bias must have shape \(4,\)"),
    (dict(act_scale=torch.ones(7)), r"act_scale must have shape \(8,\)"),
])
def test_bad_input_is_refused(change, match):
    args = dict(x=torch.zeros(2, 8), qdata=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4), bias=None,
                act_scale=None)
    args.update(change)
    for fn in (w8a8_linear, w8a8_linear_ref, w8a8_linear_triton):
        with pytest.raises((TypeError, ValueError), match=match):
            fn(**args)


def test_ops_register_and_compile_as_one_graph():
    x = torch.randn(3, 16)
    qdata, scale = torch.randint(-127, 128, (8, 16), dtype=torch.int8), torch.rand(8) * 0.01
    bias, act_scale = torch.randn(8), torch.rand(16) + 0.5
    torch.library.opcheck(torch.ops.aofunc.quantize_per_token_int8.default, (x, act_scale))
    torch.library.opcheck(torch.ops.aofunc.w8a8_linear.default, (x, qdata, scale, bias, act_scale))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return w8a8_linear(x.relu(), qdata, scale, bias, act_scale) * 2

    assert torch.equal(f(x), w8a8_linear_ref(x.relu(), qdata, scale, bias, act_scale) * 2)


# ------------------------------------------------------------------------------------------------ GPU, real sizes

@gpu_only
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 4, 16, 64, 128, 2048])
def test_real_sizes_on_gpu(k, n, m):
    x = _activation(m, k, torch.bfloat16, seed=m)
    qdata, scale, bias = _weight(n, k, torch.bfloat16, seed=n)
    act_scale = (torch.rand(k) + 0.5).to(DEVICE, torch.bfloat16)
    want = w8a8_linear_ref(x, qdata, scale, bias, act_scale)
    assert torch.equal(w8a8_linear(x, qdata, scale, bias, act_scale), want)
    xq, s = quantize_per_token_int8(x, None)
    xq_ref, s_ref = quantize_per_token_int8_ref(x, None)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)


def test_per_token_block_takes_wide_rows_in_two_passes():
    from aofunc.kernels.activations import per_token_block
    assert per_token_block(4096) == (4096, 8, True)
    assert per_token_block(1000) == (1024, 4, True)
    assert per_token_block(8192) == (8192, 8, True)
    assert per_token_block(14336) == (2048, 16, False)
    assert per_token_block(14336, one_pass_max=16384) == (16384, 16, True)
    assert per_token_block(100, block_k=64) == (64, 4, False)
    assert per_token_block(100, block_k=32, minimum=128) == (128, 4, True)
