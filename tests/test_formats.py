"""Each scheme's stored tensors: the exact formulas, the declared layout, dequantization, row gathers."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aofunc
from aofunc import primitives as P
from aofunc.formats import SCHEMES, scheme_from_dict

SCHEMES_UNDER_TEST = [aofunc.Int8WeightOnly(), aofunc.Int8Dynamic(), aofunc.Int4WeightOnly(32),
                      aofunc.Int4WeightOnly(256), aofunc.Int8DynamicInt4(64), aofunc.NF4(), aofunc.NF4(32, 8)]
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
