"""The GPTQ algorithm on one weight: reduces to round-to-nearest without correlations, equals an unblocked column
by column reference, and stays finite on degenerate Hessians."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aofunc
from aofunc.calibrate.gptq_core import gptq_quantize_weight, hessian, input_gram, inverse_hessian_factor

SCHEMES = [aofunc.Int4WeightOnly(32), aofunc.Int8DynamicInt4(32), aofunc.Int4WeightOnly(32, zero_point="int"),
           aofunc.Int4WeightOnly(32, zero_point="none")]


def _correlated_inputs(tokens, k, rank=6, seed=0):
    """Rows from one low-rank distribution (the mixing is fixed); `seed` draws the samples."""
    mix = torch.randn(rank, k, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rank, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)


def _output_error(scheme, parts, W, X):
    n, k = W.shape
    dq = scheme.dequantize(parts, n, k, torch.float32)
    return float((X @ (dq - W.float()).T).norm())


@given(n=st.integers(1, 40), k=st.integers(1, 150), seed=st.integers(0, 2**16),
       scheme=st.sampled_from(SCHEMES), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       blocksize=st.sampled_from([1, 16, 128]))
def test_uncorrelated_inputs_give_round_to_nearest_exactly(n, k, seed, scheme, dtype, blocksize):
    """With a diagonal Hessian no error is propagated, so GPTQ stores exactly what quantize() stores."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g).to(dtype)
    H = torch.diag(torch.rand(k, generator=g) + 0.1)
    parts = gptq_quantize_weight(W, H, scheme, blocksize=blocksize)
    expected = scheme.quantize(W)
    assert set(parts) == set(expected)
    for name in expected:
        assert parts[name].dtype == expected[name].dtype and parts[name].shape == expected[name].shape
        assert torch.equal(parts[name], expected[name]), name


def _reference_gptq(W, H, group_size, percdamp=0.01):
    """Unblocked GPTQ, int4 asymmetric: each column's error applied to all later columns at once; a group's
    qparams from the current weights when it starts."""
    W, H = W.clone().double(), H.clone().double()
    k = W.shape[1]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    for c in range(k):
        if c % group_size == 0:
            g = W[:, c:c + group_size]
            lo, hi = g.amin(1), g.amax(1)
            scale = ((hi - lo).clamp(min=1e-6) / 15).float().double()
            zero = (lo + 8 * scale).float().double()
        q = torch.round((W[:, c] - (zero - 8 * scale)) / scale).clamp(0, 15)
        codes[:, c] = q
        err = (W[:, c] - ((q - 8) * scale + zero)) / U[c, c]
        W[:, c:] -= err[:, None] * U[c, c:][None, :]
    return codes


@pytest.mark.parametrize("blocksize", [8, 48, 128])
def test_lazy_blocks_equal_the_unblocked_reference(blocksize):
    """Lazy batch updates and group qparams from the current weights (groups inside and across blocks)."""
    torch.manual_seed(0)
    W, X = torch.randn(24, 96), _correlated_inputs(512, 96)
    H = 2 * X.T @ X / 512
    parts = gptq_quantize_weight(W, H, aofunc.Int4WeightOnly(32), blocksize=blocksize)
    codes = aofunc.primitives.unpack_uint4(parts["qdata"]).float()
    expected = _reference_gptq(W, H, 32)
    assert (codes != expected).float().mean() <= 0.005  # float rounding may move a rare code by one step


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptq_reduces_the_layer_output_error(scheme):
    torch.manual_seed(0)
    W, X = torch.randn(64, 128), _correlated_inputs(1024, 128)
    H = 2 * X.T @ X / 1024
    test = _correlated_inputs(256, 128, seed=1)
    rtn = _output_error(scheme, scheme.quantize(W), W, test)
    gptq = _output_error(scheme, gptq_quantize_weight(W, H, scheme), W, test)
    ordered = _output_error(scheme, gptq_quantize_weight(W, H, scheme, act_order=True), W, test)
    assert gptq <= 0.5 * rtn
    assert ordered <= 1.05 * gptq


def test_act_order_keeps_static_groups_and_the_layout():
    """With act_order the groups' qparams come from the weights before any update, in the usual layout."""
    torch.manual_seed(1)
    W, X = torch.randn(16, 64), _correlated_inputs(256, 64) * torch.linspace(0.1, 3, 64)
    parts = gptq_quantize_weight(W, 2 * X.T @ X / 256, aofunc.Int4WeightOnly(32), act_order=True)
    rtn = aofunc.Int4WeightOnly(32).quantize(W)
    assert torch.equal(parts["scale"], rtn["scale"]) and torch.equal(parts["zero"], rtn["zero"])
    assert not torch.equal(parts["qdata"], rtn["qdata"])


def test_dead_columns_are_zeroed_and_nothing_is_nan():
    torch.manual_seed(2)
    W, X = torch.randn(8, 64), _correlated_inputs(200, 64)
    X[:, 5] = 0
    X[:, 40:] = 0
    parts = gptq_quantize_weight(W, 2 * X.T @ X / 200, aofunc.Int4WeightOnly(32))
    dq = aofunc.Int4WeightOnly(32).dequantize(parts, 8, 64, torch.float32)
    assert torch.isfinite(dq).all()
    # a dead column's weight is set to 0 before quantizing: it dequantizes to within half a step of 0
    step = parts["scale"].repeat_interleave(32, dim=1)
    assert (dq[:, 5].abs() <= step[:, 5] / 2 + 1e-6).all()


@pytest.mark.parametrize("H", [torch.zeros(64, 64), torch.ones(64, 64), None])
def test_singular_hessians_are_damped(H):
    """All-zero (every input dead), rank one, and two tokens for 64 channels: finite results, never a crash."""
    torch.manual_seed(3)
    if H is None:
        X = torch.randn(2, 64)
        H = 2 * X.T @ X / 2
    for percdamp in (0.0, 0.01):
        parts = gptq_quantize_weight(torch.randn(8, 64), H, aofunc.Int4WeightOnly(32), percdamp=percdamp)
        assert all(torch.isfinite(t.float()).all() for t in parts.values())


def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse():
    X = _correlated_inputs(300, 32).double()
    H = 2 * X.T @ X / 300
    U = inverse_hessian_factor(H, 0.01)
    damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(32, dtype=H.dtype)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped))
    assert torch.equal(U, U.triu())


def test_hessian_from_input_grams():
    x1, x2 = torch.randn(5, 8), torch.randn(3, 8).to(torch.bfloat16)
    total = input_gram(x1) + input_gram(x2)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, x1.T @ x1 + x2.float().T @ x2.float())
    torch.testing.assert_close(hessian(total, torch.tensor(8)), total / 4)


def test_bad_input():
    with pytest.raises(TypeError, match="Int4WeightOnly or Int8DynamicInt4"):
        gptq_quantize_weight(torch.randn(4, 32), torch.eye(32), aofunc.Int8WeightOnly())
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize_weight(torch.randn(4, 32), torch.eye(31), aofunc.Int4WeightOnly(32))
    H = torch.eye(32)
    H[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize_weight(torch.randn(4, 32), H, aofunc.Int4WeightOnly(32))


def test_inputs_are_not_modified():
    W, H = torch.randn(8, 64), torch.eye(64)
    H[3, 3] = 0
    W0, H0 = W.clone(), H.clone()
    gptq_quantize_weight(W, H, aofunc.Int4WeightOnly(32), act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)


@pytest.mark.parametrize("zero_point", ["float", "int", "none"])
def test_gptq_stores_each_int4_grid_as_quantize_does(zero_point):
    """Same names, dtypes and shapes as round-to-nearest, K not a multiple of the group (padded codes included)."""
    scheme = aofunc.Int4WeightOnly(32, zero_point=zero_point)
    W, X = torch.randn(16, 100, generator=torch.Generator().manual_seed(5)).bfloat16(), _correlated_inputs(300, 100)
    parts = gptq_quantize_weight(W, 2 * X.T @ X / 300, scheme)
    rtn = scheme.quantize(W)
    assert {n: (t.dtype, t.shape) for n, t in parts.items()} == {n: (t.dtype, t.shape) for n, t in rtn.items()}
    if zero_point == "int":
        assert int(parts["zero"].max()) <= 15
    codes = aofunc.primitives.unpack_uint4(parts["qdata"])
    expected_pad = {"float": None, "int": parts.get("zero"), "none": 8}[zero_point]
    if expected_pad is not None:  # the padding is zero weights: the code of 0, z (or 8, symmetric)
        pad = codes[:, 100:]
        assert torch.equal(pad, expected_pad[:, -1:].expand_as(pad)) if zero_point == "int" else bool((pad == 8).all())
