"""8da4w: per-token asymmetric int8 quantization and the int8 x int4 linear equal their plain-torch twins.

Runs the Triton kernels on CUDA when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest).
Integer codes are compared exactly; the linear's fp32 sums across groups to accumulation tolerance.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aofunc.kernels.int8_int4 import (
    EPS,
    int8_tile_candidates,
    exact_fp16_operands,
    exact_fp16_scales_ref,
    exact_fp16_scales_triton,
    fp16_gemm_candidates,
    gemm_config,
    group_code_sums_ref,
    group_code_sums_triton,
    HALVES_MAX_M,
    HALVES_MIN_M,
    halves_candidates,
    int8_int4_linear,
    int8_int4_linear_ref,
    int8_int4_config,
    int8_int4_linear_triton,
    quantize_per_token_asym_int8,
    quantize_per_token_asym_int8_ref,
    quantize_per_token_asym_int8_triton,
)

from aofunc.kernels import w4a16
from aofunc.kernels.packing import unpack_uint4
from aofunc.kernels.tiles import fragment_ordered_x
from aofunc.kernels.selector import Problem, default_path
from tests.kernels.devices import DEVICE, LINEAR_DTYPES, ON_GPU, gpu_only


def _activation(m, k, dtype, seed, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3 + 1 if contiguous else (torch.randn(k, m, generator=g) * 3 + 1).t()
    return x.to(DEVICE, dtype)


def _weight(n, k, group_size, dtype, seed):
    """Random nibbles, the padded columns holding code 8 (q = 0) as quantizing a zero-padded weight gives."""
    g = torch.Generator().manual_seed(seed)
    kp = -(-k // group_size) * group_size
    u = torch.randint(0, 16, (n, kp), dtype=torch.uint8, generator=g)
    u[:, k:] = 8
    qdata = (u[:, 0::2] << 4) | u[:, 1::2]
    scale = torch.rand(n, kp // group_size, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    return qdata.to(DEVICE), scale.to(DEVICE, dtype), bias.to(DEVICE, dtype)


def _close(y, want):
    assert y.dtype == want.dtype and y.shape == want.shape
    rel = ((y.double() - want.double()).norm() / want.double().norm()).item()
    assert rel < 1e-3, rel


def _twin_rounded_once(x, qdata, scale, group_size, bias):
    """The twin with the bias added in fp32 before the one rounding to x's dtype, as the GEMV path adds it (the
    quantizer reads x in fp32, so x.float() quantizes alike)."""
    b = None if bias is None else bias.float()
    return int8_int4_linear_ref(x.float(), qdata, scale, group_size, b).to(x.dtype)


# ------------------------------------------------------------------------------------------------ quantization

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_k", [None, 16])
def test_quantize_kernel_equals_twin(dtype, block_k):
    x = _activation(9, 50, dtype, seed=3, contiguous=block_k is None)
    x[1] = x[1].abs()  # a row with no negative values: min(x, 0) = 0
    x[2] = -x[2].abs()
    got = quantize_per_token_asym_int8_triton(x, block_k=block_k)
    want = quantize_per_token_asym_int8_ref(x)
    assert [t.dtype for t in got] == [torch.int8, torch.float32, torch.int32]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_quantize_reference_values():
    # min -1, max 254/255*... : s = 255/255 = 1 for a row spanning [-1, 254], zp = round(-128 + 1) = -127.
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.5, 254.0], [0.0] * 5], device=DEVICE)
    xq, s, zp = quantize_per_token_asym_int8_triton(x)
    assert s.tolist() == [1.0, EPS]
    assert zp.tolist() == [-127, -128]
    assert xq[0].tolist() == [-128, -127, -127, -125, 127]
    assert torch.equal(quantize_per_token_asym_int8(x)[0], xq)


def test_scale_is_the_ieee_quotient_on_every_device():
    # torch's CUDA division by a Python scalar multiplies by the reciprocal; the twin and kernel must not.
    x = _activation(64, 48, torch.bfloat16, seed=6).float()
    span = x.amax(dim=1).clamp(min=0) - x.amin(dim=1).clamp(max=0)
    want = (span.double() / 255).float()
    assert torch.equal(quantize_per_token_asym_int8_ref(x)[1], want)
    assert torch.equal(quantize_per_token_asym_int8_triton(x)[1], want)


def test_dequantized_activation_is_within_half_a_step():
    x = _activation(5, 64, torch.float32, seed=4)
    xq, s, zp = quantize_per_token_asym_int8_ref(x)
    dq = (xq.float() - zp[:, None]) * s[:, None]
    assert ((dq - x).abs() <= s[:, None] * (0.5 + 1e-4)).all()


# ------------------------------------------------------------------------------------------------ linear

@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("m,k,group_size", [(1, 64, 32), (7, 50, 32), (33, 100, 64)])
def test_linear_kernel_equals_twin(dtype, fused, m, k, group_size):
    x = _activation(m, k, dtype, seed=m, contiguous=m != 7)
    qdata, scale, bias = _weight(37, k, group_size, dtype, seed=k)
    if ON_GPU:
        config = next(c for c in int8_tile_candidates(min(m, 16)) if c["FUSED"] == fused)
    else:
        config = {"FUSED": fused, "BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
    for b in (bias, None):
        _close(int8_int4_linear_triton(x, qdata, scale, group_size, b, config),
               int8_int4_linear_ref(x, qdata, scale, group_size, b))


def _outputs(x, qdata, scale, bias, group_size, configs, twin):
    """(the bias or None, y, the twin's y) for each configuration, with the bias and without: the same shape and
    dtype, and within tolerance where x has rows."""
    for config in configs:
        for b in (bias, None):
            y = int8_int4_linear_triton(x, qdata, scale, group_size, b, config)
            want = twin(x, qdata, scale, group_size, b)
            assert y.shape == want.shape and y.dtype == want.dtype
            if x.shape[0]:
                _close(y, want)
            yield b, y, want


def _fp16_gemm_configs(m, n, k, group_size):
    """Tiles of the fp16_gemm path: the search's first (its default) and its first x-ordered tile on the GPU,
    small ones under the interpreter; x gathered, copied into the tile's order, or x-ordered."""
    if ON_GPU:
        candidates = fp16_gemm_candidates(max(m, 33), n, k, group_size, torch.device(DEVICE))
        return candidates[:1] + [c for c in candidates if c.get("FULL_DQ")][:1]
    return [dict(path="fp16_gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=split, SWAP=True, GATHER_X=True, PAIRS=True,
                 CENTERED=False, PERMUTE_X=permute_x, M_FAST=False, num_warps=2, num_stages=1)
            for split, permute_x in ((1, False), (2, True))] + [
        dict(path="fp16_gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, FULL_DQ=True, PREFETCH=True,
             M_FAST=False, num_warps=2, num_stages=1)]


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("m,k,group_size", [(5, 64, 32), (33, 100, 64), (0, 64, 32)])
@pytest.mark.parametrize("path", ["dequant", "fp16_gemm"])
def test_exact_fp16_paths_equal_twin(dtype, m, k, group_size, path):
    # fp16 operands exact (cuBLAS on the dequantized weight, or W4A16's tile in packed fp16 pairs), fp32 sums, one
    # epilogue. Each row's scales spread over 2^4; rows of scales past fp16's range and far below its normal numbers
    # show the row's power-of-two divisor
    x = _activation(m, k, dtype, seed=m + 1, contiguous=m != 33)
    qdata, scale, bias = _weight(37, k, group_size, dtype, seed=k + 1)
    rows = torch.ones(37, device=DEVICE)
    rows[1], rows[2] = (1.0 if dtype == torch.float16 else 2e5), 1e-5  # (fp16 y cannot hold the first's outputs)
    scale = (scale.float() * torch.logspace(-2, 2, scale.shape[1], base=2.0, device=DEVICE) * rows[:, None])
    scale = scale.to(dtype)
    scale[5] = 0  # a row of zero scales
    before = [t.clone() for t in (x, qdata, scale, bias)]
    # the tile adds the bias before its one rounding, cuBLAS's epilogue after it as the twin does
    configs, twin = ((_fp16_gemm_configs(m, 37, k, group_size), _twin_rounded_once) if path == "fp16_gemm"
                     else ([dict(path="dequant")], int8_int4_linear_ref))
    for b, y, want in _outputs(x, qdata, scale, bias, group_size, configs, twin):
        # each column alone where y is fp32 (a 16-bit y's last bit may differ from the twin's, which one column
        # of a few rows does not average out) and without a bias (which could cancel a column's sums)
        for column in range(37 if m and b is None and dtype == torch.float32 else 0):
            if column != 5:
                _close(y[:, column], want[:, column])
    assert all(torch.equal(a, b) for a, b in zip(before, (x, qdata, scale, bias)))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
def test_exact_fp16_scales_kernel_equals_twin(dtype):
    """One launch gives the torch form's powers of two and divided scales bit for bit: rows of zeros, exact powers
    of two, scales far above and below 1, a strided scale tensor."""
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(9, 40, generator=g) * torch.logspace(-12, 12, 9, base=2.0)[:, None]
    scale[1] = 0
    scale[2, 7] = 0.25  # the row's largest, a power of two
    scale[2] = scale[2].clamp(max=0.25)
    scale[3, 0] = -3.0  # magnitudes count
    scale = scale.to(DEVICE, dtype)
    for s in (scale, scale.t().contiguous().t()):
        p, scaled = exact_fp16_scales_triton(s)
        want_p, want_scaled = exact_fp16_scales_ref(s)
        assert torch.equal(p, want_p) and torch.equal(scaled, want_scaled) and scaled.dtype == want_scaled.dtype
    assert p[1] == 1 and p[2] == 0.25 and p[3] == 4


def test_linear_matches_fake_quantized_float_reference():
    """The integer kernel computes what the reference's fake quantization computes, to fp32 rounding."""
    x = _activation(6, 96, torch.float32, seed=5)
    qdata, scale, bias = _weight(24, 96, 32, torch.float32, seed=6)
    xq, s, zp = quantize_per_token_asym_int8_ref(x)
    x_dq = (xq.float() - zp[:, None]) * s[:, None]
    w = (unpack_uint4(qdata).float() - 8) * scale.repeat_interleave(32, dim=1)
    _close(int8_int4_linear(x, qdata, scale, 32, bias), x_dq @ w.t() + bias)
    _close(torch.ops.aofunc.int8_int4_linear(x, qdata, scale, 32, bias), x_dq @ w.t() + bias)


def test_padded_columns_do_not_contribute():
    # K = 40 in groups of 32: the last group has 8 real columns; nonzero codes in the padding must be ignored.
    x = _activation(3, 40, torch.float32, seed=7)
    qdata, scale, _ = _weight(16, 40, 32, torch.float32, seed=8)
    noisy = qdata.clone()
    noisy[:, 20:] |= 0x77
    want = int8_int4_linear_ref(x, qdata, scale, 32, None)
    _close(int8_int4_linear_ref(x, noisy, scale, 32, None), want)
    _close(int8_int4_linear_triton(x, noisy, scale, 32, None), want)


def test_inputs_are_not_modified():
    x = _activation(3, 64, torch.float16, seed=9)
    qdata, scale, bias = _weight(16, 64, 32, torch.float16, seed=10)
    before = [t.clone() for t in (x, qdata, scale, bias)]
    int8_int4_linear_triton(x, qdata, scale, 32, bias)
    quantize_per_token_asym_int8_triton(x)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, qdata, scale, bias)))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(2, 64, dtype=torch.int8)), "x must be float16, bfloat16 or float32"),
    (dict(group_size=48), "group_size must be one of"),
    (dict(qdata=torch.zeros(4, 64, dtype=torch.uint8)), r"qdata must be uint8 \[N, 32\]"),
    (dict(qdata=torch.zeros(4, 32, dtype=torch.int8)), "qdata must be uint8"),
    (dict(scale=torch.ones(4, 3)), r"scale must be a float tensor of shape \(4, 2\)"),
    (dict(bias=torch.ones(5)), r"bias must have shape \(4,\)"),
])
def test_bad_input_is_refused(change, match):
    args = dict(x=torch.zeros(2, 64), qdata=torch.zeros(4, 32, dtype=torch.uint8), scale=torch.ones(4, 2),
                group_size=32, bias=None)
    args.update(change)
    for fn in (int8_int4_linear, int8_int4_linear_ref, int8_int4_linear_triton):
        with pytest.raises((TypeError, ValueError), match=match):
            fn(**args)


def test_ops_register():
    x = torch.randn(3, 64)
    qdata, scale, bias = _weight(8, 64, 32, torch.float32, seed=11)
    torch.library.opcheck(torch.ops.aofunc.quantize_per_token_asym_int8.default, (x.cpu(),))
    torch.library.opcheck(torch.ops.aofunc.int8_int4_linear.default,
                          (x.cpu(), qdata.cpu(), scale.cpu(), 32, bias.cpu()))


# ------------------------------------------------------------------------------------------------ GPU, real sizes

@gpu_only
@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 3, 16, 128, 2048])
@pytest.mark.parametrize("group_size", [32, 128])
def test_real_sizes_on_gpu(k, n, m, group_size):
    x = _activation(m, k, torch.bfloat16, seed=m)
    qdata, scale, bias = _weight(n, k, group_size, torch.bfloat16, seed=n)
    # the path this call runs (a shipped tuned configuration, else the route's default) decides where the bias is
    # added: the W4A16 kernels add it in fp32 before their one rounding
    config = int8_int4_config(x, qdata, scale, group_size, None, None)
    w4a16_kernel = config.get("path") in ("gemv", "gemm", "fp16_gemm")
    twin = _twin_rounded_once if w4a16_kernel else int8_int4_linear_ref
    _close(int8_int4_linear(x, qdata, scale, group_size, bias), twin(x, qdata, scale, group_size, bias))
    if m >= 128:
        _close(int8_int4_linear_triton(x, qdata, scale, group_size, bias, dict(path="dequant")),
               int8_int4_linear_ref(x, qdata, scale, group_size, bias))
        for config in halves_candidates(m if m <= HALVES_MAX_M else HALVES_MAX_M, group_size):
            _close(int8_int4_linear_triton(x, qdata, scale, group_size, bias, config),
                   int8_int4_linear_ref(x, qdata, scale, group_size, bias))
    for a, b in zip(quantize_per_token_asym_int8(x), quantize_per_token_asym_int8_ref(x)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ the GEMV path

@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("m,k,group_size", [(1, 64, 32), (3, 100, 64), (1, 256, 128)])
def test_gemv_path_equals_twin(dtype, m, k, group_size):
    # the default for one row: the W4A16 GEMV on the centered integer activations, rows scaled by their scale
    x = _activation(m, k, dtype, seed=m + k)
    qdata, scale, bias = _weight(40, k, group_size, dtype, seed=k)
    for config in (dict(path="gemv", BLOCK_N=16, GROUPS=1, SPLIT_K=2, REDUCE_W=True, XVEC=True, COARSE=True,
                        num_warps=2, num_stages=1),
                   dict(path="gemv", BLOCK_N=32, GROUPS=2, SPLIT_K=1, num_warps=1, num_stages=1),
                   dict(path="gemv", BLOCK_N=16, GROUPS=1, SPLIT_K=2, REDUCE_W=True, XVEC=True, COARSE=True,
                        TWO_ROWS=True, num_warps=2, num_stages=1)):
        for b in (bias, None):
            _close(int8_int4_linear_triton(x, qdata, scale, group_size, b, config),
                   _twin_rounded_once(x, qdata, scale, group_size, b))


_GEMV_CONFIGS = (
    dict(path="gemv", BLOCK_N=16, GROUPS=1, SPLIT_K=2, REDUCE_W=True, XVEC=True, COARSE=True, num_warps=2,
         num_stages=1),
    dict(path="gemv", BLOCK_N=32, GROUPS=2, SPLIT_K=1, num_warps=1, num_stages=1),
    dict(path="gemv", BLOCK_N=16, GROUPS=2, SPLIT_K=3, REDUCE_W=False, XVEC=True, COARSE=False, TWO_ROWS=True,
         num_warps=1, num_stages=1),
)


@pytest.mark.parametrize("config", _GEMV_CONFIGS)
@pytest.mark.parametrize("m,k,group_size,contiguous", [(1, 64, 32, True), (3, 100, 64, False), (2, 200, 32, True),
                                                       (0, 64, 32, True)])
def test_gemv_with_quantization_inside_equals_two_kernels(config, m, k, group_size, contiguous):
    """The one-kernel GEMV (each program finds its rows' scale and zero point, then multiplies the centered codes)
    gives the two-kernel GEMV's output bit for bit: ragged K, splits, two rows a program, strided and empty x."""
    x = _activation(m, k, torch.bfloat16, seed=k, contiguous=contiguous)
    qdata, scale, bias = _weight(24, k, group_size, torch.bfloat16, seed=k + 1)
    for b in (bias, None):
        two = int8_int4_linear_triton(x, qdata, scale, group_size, b, config)
        assert torch.equal(int8_int4_linear_triton(x, qdata, scale, group_size, b, dict(config, FUSED=True)), two)


@given(st.integers(1, 4), st.integers(1, 64), st.integers(1, 40), st.sampled_from([32, 64]),
       st.sampled_from(_GEMV_CONFIGS), st.sampled_from(LINEAR_DTYPES), st.integers(0, 2**31 - 1))
def test_gemv_with_quantization_inside_law(m, k, n, group_size, config, dtype, seed):
    """For any small shape, configuration and x dtype: the one-kernel GEMV equals the two-kernel one bit for bit,
    twice the same, within tolerance of the twin, and changes none of its inputs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3 + 1).to(DEVICE, dtype)
    kp = -(-k // group_size) * group_size
    qdata = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=g).to(DEVICE)
    scale = (torch.rand(n, kp // group_size, generator=g) * 0.02 + 1e-3).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    inputs = (x, qdata, scale, bias)
    before = [t.clone() for t in inputs]
    y = int8_int4_linear_triton(x, qdata, scale, group_size, bias, dict(config, FUSED=True))
    _close(y, _twin_rounded_once(x, qdata, scale, group_size, bias))
    assert torch.equal(y, int8_int4_linear_triton(x, qdata, scale, group_size, bias, config))
    assert torch.equal(y, int8_int4_linear_triton(x, qdata, scale, group_size, bias, dict(config, FUSED=True)))
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("m,k,group_size", [(2, 64, 32), (5, 100, 64), (17, 256, 128)])
def test_gemm_path_equals_twin(dtype, m, k, group_size):
    # from 5 rows: the W4A16 tile on the centered integer activations, exact group sums, rows scaled by their scale
    x = _activation(m, k, dtype, seed=m + k)
    qdata, scale, bias = _weight(40, k, group_size, dtype, seed=k)
    sixteen_bit = dtype != torch.float32 or x.device.type != "cuda"  # fp32 x on CUDA keeps the int8 GEMM
    assert default_path("8da4w", Problem(16, 40, k, dtype, x.device, group_size)) == ("gemm" if sixteen_bit
                                                                                     else "two_pass")
    if not sixteen_bit:
        return
    tile = gemm_config(m, 40, k, group_size, dtype, x.device)
    assert tile["path"] == "gemm" and not (tile["FULL_DQ"] or tile["PAIRS"])
    assert tile["CENTERED"] == tile["GATHER_X"] == tile["PERMUTE_X"] == (group_size >= 32)
    # (tiles of 32 or 16 rows of w on as many warps as a 16 x 8 tensor-core tile a warp allows)
    for config in (tile, dict(tile, BLOCK_M=16, BLOCK_N=32, SPLIT_K=2, SWAP=False, num_warps=4),
                   dict(tile, BLOCK_M=16, BLOCK_N=16, SPLIT_K=3, SWAP=True, M_FAST=True, num_warps=2),
                   # the x-ordered units, and the centered tile (the default from groups of 32, x quantized into
                   # its order), also on x gathered: exact sums all
                   dict(tile, GATHER_X=False, CENTERED=False, PERMUTE_X=False),
                   dict(tile, BLOCK_N=32, SPLIT_K=2, GATHER_X=True, CENTERED=True, num_warps=4),
                   dict(tile, BLOCK_N=32, SPLIT_K=2, GATHER_X=True, CENTERED=True, PERMUTE_X=False, num_warps=4),
                   # with each step's scales loaded a step ahead (the default past 32 rows)
                   dict(tile, BLOCK_N=32, GATHER_X=group_size >= 32, CENTERED=group_size >= 32, PREFETCH=True,
                        num_warps=4)):
        for b in (bias, None):
            _close(int8_int4_linear_triton(x, qdata, scale, group_size, b, config),
                   _twin_rounded_once(x, qdata, scale, group_size, b))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
def test_centered_quantization_is_xq_minus_zp_in_the_activation_dtype(dtype):
    x = _activation(3, 300, dtype, seed=5)
    xq, s, zp = quantize_per_token_asym_int8_ref(x)
    for block_k in (None, 128):  # one pass, and two
        xi, s2, zp2 = quantize_per_token_asym_int8_triton(x, block_k, centered=True)
        assert xi.dtype == dtype and torch.equal(xi, (xq.int() - zp[:, None]).to(dtype))
        assert torch.equal(s2, s) and torch.equal(zp2, zp)


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("k,width,block_k", [(300, 320, None), (300, 320, 128), (64, 64, None), (33, 64, 32)])
def test_centered_quantization_in_fragment_order_is_the_copy(dtype, k, width, block_k):
    """Quantized straight into the W4A16 tiles' fragment order (zero-padded to the codes' width): what the copy
    into that order makes of the centered activations, bit for bit, in one pass or two, strided x too."""
    for x in (_activation(3, k, dtype, seed=k), _activation(3, k, dtype, seed=k, contiguous=False)):
        xi, s, zp = quantize_per_token_asym_int8_triton(x, block_k, centered=True, centered_dtype=torch.float16)
        xf, s2, zp2 = quantize_per_token_asym_int8_triton(x, block_k, centered=True, centered_dtype=torch.float16,
                                                          fragment_width=width)
        assert xf.shape == (3, width) and torch.equal(xf, fragment_ordered_x(xi, width))
        assert torch.equal(s2, s) and torch.equal(zp2, zp)
    with pytest.raises(ValueError, match="fragment_width"):
        quantize_per_token_asym_int8_triton(x, fragment_width=width + 16, centered=True)
    with pytest.raises(ValueError, match="fragment_width"):
        quantize_per_token_asym_int8_triton(x, fragment_width=width)


@pytest.mark.parametrize("path", ["gemm", "fp16_gemm"])
def test_tiles_on_x_in_fragment_order_equal_the_copy(path):
    """The PERMUTE_X tiles give the same y whether the activations were quantized into the tile's order or copied
    into it after (the launcher's own copy)."""
    x = _activation(5, 100, torch.bfloat16, seed=4)
    qdata, scale, bias = _weight(24, 100, 32, torch.bfloat16, seed=5)
    config = dict(path=path, BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, GATHER_X=True, PAIRS=path == "fp16_gemm",
                  CENTERED=path == "gemm", PERMUTE_X=True, M_FAST=False, num_warps=2, num_stages=1)
    y = int8_int4_linear_triton(x, qdata, scale, 32, bias, config)
    xi, sx, _ = quantize_per_token_asym_int8_triton(x, centered=True)
    if path == "fp16_gemm":
        xi, sx, p, scaled = exact_fp16_operands(x, scale)
        want = w4a16.launch(xi, qdata, scaled, None, 32, bias, dict(config, path="gemm"), row_scale=sx, col_scale=p,
                            out_dtype=x.dtype)
    else:
        want = w4a16.launch(xi, qdata, scale, None, 32, bias, config, row_scale=sx)
    assert torch.equal(y, want)
    with pytest.raises(ValueError, match="PERMUTE_X configurations only"):
        w4a16.launch(xi, qdata, scale, None, 32, bias, dict(config, path="gemm", PERMUTE_X=False), row_scale=sx,
                     x_fragment_ordered=True)
    with pytest.raises(ValueError, match="must be 128 columns wide"):
        w4a16.launch(xi, qdata, scale, None, 32, bias, dict(config, path="gemm"), row_scale=sx,
                     x_fragment_ordered=True)


def test_gemv_quantizing_x_refuses_row_scales_and_experts():
    x = _activation(2, 64, torch.bfloat16, seed=1)
    qdata, scale, _ = _weight(24, 64, 32, torch.bfloat16, seed=2)
    params = dict(_GEMV_CONFIGS[0])
    params.pop("path")
    with pytest.raises(ValueError, match="quantize_x"):
        w4a16.gemv(x, qdata, scale, None, 32, None, params, row_scale=torch.ones(2, device=DEVICE), quantize_x=True)
    with pytest.raises(ValueError, match="quantize_x"):
        w4a16.gemv(x, qdata[None], scale[None], None, 32, None, params,
                   offs=torch.tensor([2], dtype=torch.int32, device=DEVICE), quantize_x=True)


# ------------------------------------------------------------------------------------------------ the HALVES tile

def _halves_configs(m):
    """The HALVES tile's first two search candidates on the GPU, a 16 x 16 tile under the interpreter."""
    if ON_GPU:
        return halves_candidates(max(m, HALVES_MIN_M), 64)[:2]
    return [dict(FUSED=False, HALVES=True, BLOCK_M=16, BLOCK_N=16, GROUP_M=2, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("m,k,group_size", [(5, 128, 64), (33, 100, 64), (17, 300, 128), (3, 256, 256),
                                            (0, 64, 64)])
def test_halves_path_equals_twin(dtype, m, k, group_size):
    """Each group as two int8 dots (the high nibbles' weights on the group's even columns of x, the low ones' on
    its odd columns), the zero point's term from the weights' group sums, the sums turned to fp32 by the magic
    number: the twin's y (fp32 y bit for bit under the interpreter, which rounds each product and sum as the twin
    does); ragged K, strided and empty x, inputs unchanged."""
    x = _activation(m, k, dtype, seed=m + k, contiguous=m != 33)
    qdata, scale, bias = _weight(37, k, group_size, dtype, seed=k)
    before = [t.clone() for t in (x, qdata, scale, bias)]
    for _, y, want in _outputs(x, qdata, scale, bias, group_size, _halves_configs(m), int8_int4_linear_ref):
        if dtype == torch.float32 and not ON_GPU:
            assert torch.equal(y, want)
    # codes and scales held column-major
    strided = (qdata.t().contiguous().t(), scale.t().contiguous().t())
    for _, y, want in _outputs(x, *strided, bias, group_size, _halves_configs(m)[:1], int8_int4_linear_ref):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, (x, qdata, scale, bias)))


@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 40), st.sampled_from([64, 128]),
       st.sampled_from(LINEAR_DTYPES), st.integers(0, 2**31 - 1))
def test_halves_path_law(m, k, n, group_size, dtype, seed):
    """For any small shape and x dtype: the HALVES tile is within tolerance of the twin (any bytes of codes, the
    padding's too), the same twice."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3 + 1).to(DEVICE, dtype)
    kp = -(-k // group_size) * group_size
    qdata = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=g).to(DEVICE)
    scale = (torch.rand(n, kp // group_size, generator=g) * 0.02 + 1e-3).to(DEVICE, dtype)
    config = _halves_configs(m)[0]
    y = int8_int4_linear_triton(x, qdata, scale, group_size, None, config)
    # the twin reads only K columns of codes: the padding's codes meet the quantized zero, and add nothing
    _close(y, int8_int4_linear_ref(x, qdata, scale, group_size, None))
    assert torch.equal(y, int8_int4_linear_triton(x, qdata, scale, group_size, None, config))


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_group_code_sums_kernel_equals_twin(group_size):
    g = torch.Generator().manual_seed(group_size)
    for n, groups in ((1, 1), (37, 3), (300, 5)):
        qdata = torch.randint(0, 256, (n, groups * group_size // 2), dtype=torch.uint8, generator=g).to(DEVICE)
        want = group_code_sums_ref(qdata, group_size)
        assert want.dtype == torch.int32 and want.shape == (n, groups)
        assert torch.equal(group_code_sums_triton(qdata, group_size), want)
    extremes = torch.tensor([[0x00] * (group_size // 2), [0xFF] * (group_size // 2)], dtype=torch.uint8)
    assert group_code_sums_triton(extremes.to(DEVICE), group_size).tolist() == [[-8 * group_size],
                                                                                [7 * group_size]]


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("k,block_k", [(300, None), (300, 256), (64, 32), (1, None)])
def test_quantization_in_halves_order_is_the_twin_permuted(group_size, k, block_k):
    """xq padded with the quantized zero to whole groups, each group's even columns first, then its odd ones: the
    twin's xq of the zero-padded x in that order, in one pass or several, strided x too."""
    kp = -(-k // group_size) * group_size
    halves = torch.arange(kp).view(-1, group_size // 2, 2).transpose(1, 2).reshape(-1)
    for x in (_activation(3, k, torch.bfloat16, seed=k), _activation(3, k, torch.bfloat16, seed=k, contiguous=False)):
        xq, s, zp = quantize_per_token_asym_int8_triton(x, block_k, halves_group=group_size)
        want, s2, zp2 = quantize_per_token_asym_int8_ref(torch.nn.functional.pad(x, (0, kp - k)))
        assert xq.shape == (3, kp) and torch.equal(xq, want[:, halves.to(DEVICE)])
        assert torch.equal(s, s2) and torch.equal(zp, zp2)


def test_halves_refuses_groups_under_64_and_other_orders():
    x = _activation(3, 64, torch.bfloat16, seed=1)
    qdata, scale, _ = _weight(24, 64, 32, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="groups of 64 codes or more"):
        int8_int4_linear_triton(x, qdata, scale, 32, None, _halves_configs(5)[0])
    for change in (dict(halves_group=48), dict(halves_group=64, centered=True),
                   dict(halves_group=64, centered=True, fragment_width=64)):
        with pytest.raises(ValueError, match="halves_group"):
            quantize_per_token_asym_int8_triton(x, **change)
    assert halves_candidates(128, 32) == [] and halves_candidates(64, 128) == []
