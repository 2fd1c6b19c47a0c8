"""Each scheme's stored tensors: the exact formulas, the declared layout, dequantization, row gathers."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aofunc
from aofunc import primitives as P
from aofunc.formats import SCHEMES, scheme_from_dict

SCHEMES_UNDER_TEST = [aofunc.Int8WeightOnly(), aofunc.Int8Dynamic(), aofunc.Int4WeightOnly(32),
                      aofunc.Int4WeightOnly(256), aofunc.Int8DynamicInt4(64), aofunc.NF4(), aofunc.NF4(32, 8),
                      aofunc.Int4WeightOnly(32, zero_point="int"), aofunc.Int4WeightOnly(128, zero_point="none")]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def weight_and_scheme(draw):
    scheme = draw(st.sampled_from(SCHEMES_UNDER_TEST))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**31 - 1))
    return scheme, torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@given(weight_and_scheme())
def test_stored_tensors_match_the_declared_layout(case):
    scheme, w = case
    n, k = w.shape
    tensors = scheme.quantize(w)
    declared = scheme.stored(n, k, w.dtype)
    assert set(tensors) == set(declared) - set(scheme.optional_names)
    for name, t in tensors.items():
        assert (tuple(t.shape), t.dtype) == (tuple(declared[name][0]), declared[name][1]), name


@given(weight_and_scheme())
def test_quantize_is_deterministic_and_pure(case):
    scheme, w = case
    before = w.clone()
    a, b = scheme.quantize(w), scheme.quantize(w)
    assert torch.equal(w, before)
    assert all(torch.equal(a[name], b[name]) for name in a)


@given(weight_and_scheme())
def test_rows_equal_dequantized_rows(case):
    scheme, w = case
    n, k = w.shape
    tensors = scheme.quantize(w)
    index = torch.tensor([[n - 1, 0], [n // 2, n - 1]])
    full = scheme.dequantize(tensors, n, k, w.dtype)
    assert torch.equal(scheme.rows(tensors, index, n, k, w.dtype), full[index])


def test_int4_codes_and_layout_match_the_formula():
    w = torch.randn(3, 70, dtype=torch.bfloat16)
    t = aofunc.Int4WeightOnly(32).quantize(w)
    q, scale, zero = P.quantize_int4_asymmetric(w, 32)
    assert torch.equal(t["scale"], scale) and torch.equal(t["zero"], zero)
    assert t["qdata"].shape == (3, 48)  # K=70 padded to 96, two codes a byte
    assert torch.equal(t["qdata"][:, 0] >> 4, q[:, 0]) and torch.equal(t["qdata"][:, 0] & 15, q[:, 1])


def test_8da4w_stores_q_plus_8():
    w = torch.randn(2, 64)
    t = aofunc.Int8DynamicInt4(32).quantize(w)
    q, scale = P.quantize_int4_symmetric(w, 32)
    assert torch.equal(P.unpack_uint4(t["qdata"]).to(torch.int8) - 8, q)
    assert torch.equal(t["scale"], scale)


def test_int8_dynamic_with_act_scale_dequantizes_to_the_unsmoothed_weight():
    w = torch.randn(4, 8)
    s = torch.rand(8) + 0.5
    t = aofunc.Int8Dynamic().quantize(w * s)
    t["act_scale"] = s
    assert torch.allclose(aofunc.Int8Dynamic().dequantize(t, 4, 8, torch.float32), w, atol=0.05)


@pytest.mark.parametrize("bad", [0, 48, 512, "128", True])
def test_group_size_is_checked(bad):
    with pytest.raises(ValueError, match="group_size"):
        aofunc.Int4WeightOnly(bad)
    with pytest.raises(ValueError, match="group_size"):
        aofunc.Int8DynamicInt4(bad)


def test_nf4_block_sizes_are_checked():
    with pytest.raises(ValueError, match="block_size"):
        aofunc.NF4(block_size=0)
    with pytest.raises(ValueError, match="even"):
        aofunc.NF4(block_size=3, scaler_block_size=3)


def test_schemes_are_frozen_hashable_and_round_trip_through_dicts():
    for scheme in SCHEMES_UNDER_TEST:
        assert hash(scheme) == hash(type(scheme)(**{k: v for k, v in scheme.to_dict().items() if k != "type"}))
        assert scheme_from_dict(scheme.to_dict()) == scheme
        with pytest.raises(Exception):
            scheme.group_size = 1
    assert set(SCHEMES) >= {"Int8WeightOnly", "Int8Dynamic", "Int4WeightOnly", "Int8DynamicInt4", "NF4"}
    with pytest.raises(ValueError, match="unknown scheme"):
        scheme_from_dict({"type": "Int3"})


def test_bits_per_weight():
    assert aofunc.Int8WeightOnly().bits_per_weight(4096, 4096, torch.bfloat16) == pytest.approx(8 + 16 / 4096)
    assert aofunc.Int4WeightOnly(128).bits_per_weight(4096, 4096, torch.bfloat16) == pytest.approx(4 + 32 / 128)
    assert aofunc.NF4().bits_per_weight(4096, 4096, torch.bfloat16) == pytest.approx(4 + 8 / 64 + 32 / 16384)


# ---------------------------------------------------------------------------------------------- int4 grids

def test_the_tinygemm_grid_is_the_default_and_reads_as_before():
    scheme = aofunc.Int4WeightOnly(64)
    assert scheme == aofunc.Int4WeightOnly(64, zero_point="float") and scheme.zero_point == "float"
    assert repr(scheme) == "Int4WeightOnly(group_size=64)"
    assert scheme.to_dict() == {"type": "Int4WeightOnly", "group_size": 64}
    assert scheme.float_names == ("scale", "zero")
    w = torch.randn(5, 100, dtype=torch.bfloat16)
    q, scale, zero = P.quantize_int4_asymmetric(w, 64)
    t = scheme.quantize(w)
    assert set(t) == {"qdata", "scale", "zero"}
    assert torch.equal(t["qdata"], P.pack_uint4(q)) and torch.equal(t["scale"], scale) and torch.equal(t["zero"], zero)
    assert scheme.kernel_zero(t) is t["zero"]


def test_int4_grids_name_themselves():
    for zero_point in ("int", "none"):
        scheme = aofunc.Int4WeightOnly(32, zero_point=zero_point)
        assert repr(scheme) == f"Int4WeightOnly(group_size=32, zero_point='{zero_point}')"
        assert scheme.to_dict() == {"type": "Int4WeightOnly", "group_size": 32, "zero_point": zero_point}
        assert scheme_from_dict(scheme.to_dict()) == scheme and scheme != aofunc.Int4WeightOnly(32)
        assert scheme.float_names == ("scale",)  # an integer zero point stays uint8 on .to(dtype)


@pytest.mark.parametrize("bad", ["x", "Int", None, 0, "symmetric"])
def test_an_unknown_zero_point_is_refused_naming_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"zero_point must be one of 'float', 'int', 'none', got " + repr(bad)):
        aofunc.Int4WeightOnly(zero_point=bad)


def test_the_integer_grid_stores_uint8_zero_points():
    w = torch.randn(6, 70, dtype=torch.float16)
    scheme = aofunc.Int4WeightOnly(32, zero_point="int")
    t = scheme.quantize(w)
    q, scale, z = P.quantize_int4_integer(w, 32)
    assert set(t) == {"qdata", "scale", "zero"} and t["zero"].dtype == torch.uint8 and t["zero"].shape == (6, 3)
    assert torch.equal(t["qdata"], P.pack_uint4(q)) and torch.equal(t["scale"], scale) and torch.equal(t["zero"], z)
    expected = ((q.float().reshape(6, 3, 32) - z.float()[..., None]) * scale.float()[..., None]).reshape(6, -1)
    assert torch.equal(scheme.dequantize(t, 6, 70, torch.float32), expected[:, :70])
    assert scheme.bits_per_weight(4096, 4096, torch.bfloat16) == pytest.approx(4 + 24 / 32)


def test_the_symmetric_grid_stores_what_8da4w_stores():
    w = torch.randn(6, 70, dtype=torch.bfloat16)
    t = aofunc.Int4WeightOnly(32, zero_point="none").quantize(w)
    assert set(t) == {"qdata", "scale"}
    expected = aofunc.Int8DynamicInt4(32).quantize(w)
    assert all(torch.equal(t[name], expected[name]) for name in expected)
    q = P.unpack_uint4(t["qdata"]).float() - 8  # q + 8 stored: q in -8..7, w = q * scale
    dq = (q.reshape(6, 3, 32) * t["scale"].float()[..., None]).reshape(6, -1)[:, :70]
    assert torch.equal(aofunc.Int4WeightOnly(32, zero_point="none").dequantize(t, 6, 70, torch.float32), dq)


@pytest.mark.parametrize("zero_point", ["int", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernels_float_zero_gives_the_grid_exactly(zero_point, dtype):
    """w = (q - 8) * scale + kernel_zero, the tinygemm kernels' formula in fp32, is (q - z) * scale bit for bit."""
    from aofunc.kernels.w4a16 import w4a16_dequantize_ref
    scheme = aofunc.Int4WeightOnly(32, zero_point=zero_point)
    w = (torch.randn(16, 96) * torch.logspace(-3, 3, 16)[:, None]).to(dtype)
    t = scheme.quantize(w)
    zero = scheme.kernel_zero(t)
    assert zero.dtype == torch.float32 and zero.shape == t["scale"].shape
    as_kernels_see_it = w4a16_dequantize_ref(t["qdata"], t["scale"], zero, 32, 96, torch.float32)
    assert torch.equal(as_kernels_see_it, scheme.dequantize(t, 16, 96, torch.float32))
