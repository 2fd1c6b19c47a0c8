"""The quantization math against its formulas, and its laws."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aofunc
from aofunc import primitives as P
from aofunc.kernels.int8_int4 import quantize_per_token_asym_int8_ref
from aofunc.kernels.w8a8 import quantize_per_token_int8_ref
from tests.models import ALL_SCHEMES

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def weights(draw, n_max=24, k_max=300, dtypes=FLOATS):
    n = draw(st.integers(1, n_max))
    k = draw(st.integers(1, k_max))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * scale).to(dtype)


weight_st = st.composite(weights)


# ---------------------------------------------------------------------------------------------- int8 per row

def test_int8_per_row_matches_the_formula_on_a_hand_example():
    w = torch.tensor([[-2.55, 1.0, 0.5], [0.0, 0.0, 0.0], [1.275, -0.1, 0.2]])
    q, scale = P.quantize_int8_per_row(w)
    eps = torch.finfo(torch.float32).eps
    assert torch.equal(scale, torch.tensor([2.55 / 127.5, eps, 1.275 / 127.5], dtype=torch.float32))
    expected = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    assert torch.equal(q, expected)
    assert q[0, 0] == -128 and q[2, 0] == 127


@given(weight_st())
def test_int8_per_row_codes_come_from_the_stored_scale(w):
    q, scale = P.quantize_int8_per_row(w)
    assert scale.dtype == w.dtype and q.dtype == torch.int8
    w32 = w.float()
    amax = torch.maximum(-w32.amin(1).clamp(max=0), w32.amax(1).clamp(min=0))
    assert torch.equal(scale, (amax / 127.5).clamp(min=torch.finfo(torch.float32).eps).to(w.dtype))
    assert torch.equal(q, torch.round(w32 / scale.float()[:, None]).clamp(-128, 127).to(torch.int8))


@given(weight_st())
def test_int8_per_row_error_is_at_most_half_a_step(w):
    q, scale = P.quantize_int8_per_row(w)
    dq = P.dequantize_int8_per_row(q, scale, torch.float32)
    s = scale.float()[:, None]
    inside = (w.float() / s).abs() <= 127
    err = (w.float() - dq).abs()
    # half a step, plus the float rounding of w / scale
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-30)[inside].all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_dequantized_in_a_16_bit_dtype_is_the_float32_product_rounded_once(dtype):
    # every int8 code against scales across the dtype's range, subnormals included
    q = torch.arange(-128, 128, dtype=torch.int8).repeat(64, 1)
    scale = torch.logspace(-30 if dtype == torch.bfloat16 else -7, 4, 64, dtype=torch.float64).to(dtype)
    want = (q.float() * scale.float()[:, None]).to(dtype)
    assert torch.equal(P.dequantize_int8_per_row(q, scale, dtype), want)


# ---------------------------------------------------------------------------------------------- int4 asymmetric

def test_int4_asymmetric_matches_the_tinygemm_formula_on_a_hand_example():
    w = torch.arange(32, dtype=torch.float32).reshape(1, 32) / 31  # one group of 32, min 0, max 1
    q, scale, zero = P.quantize_int4_asymmetric(w, 32)
    assert torch.allclose(scale, torch.tensor([[1 / 15]]))
    assert torch.allclose(zero, torch.tensor([[8 / 15]]))
    assert q.dtype == torch.uint8 and int(q.min()) == 0 and int(q.max()) == 15
    expected = torch.round((w - (zero - 8 * scale)) / scale).clamp(0, 15)
    assert torch.equal(q.float(), expected)


@given(weight_st(), st.sampled_from([32, 64, 128, 256]))
def test_int4_asymmetric_round_trip_error_is_at_most_half_a_step(w, g):
    q, scale, zero = P.quantize_int4_asymmetric(w, g)
    k = w.shape[1]
    kp = math.ceil(k / g) * g
    assert q.shape == (w.shape[0], kp) and scale.shape == zero.shape == (w.shape[0], kp // g)
    assert scale.dtype == zero.dtype == w.dtype
    dq = P.dequantize_int4_asymmetric(q, scale, zero, k, torch.float32)
    s = scale.float().repeat_interleave(g, dim=1)[:, :k]
    lo = (zero.float() - 8 * scale.float()).repeat_interleave(g, dim=1)[:, :k]
    inside = ((w.float() - lo) / s >= 0) & ((w.float() - lo) / s <= 15)
    err = (w.float() - dq).abs()
    assert bool((err <= s / 2 * (1 + 1e-3) + 1e-6 * w.float().abs())[inside].all())


@given(weight_st(dtypes=[torch.bfloat16, torch.float16]), st.sampled_from([32, 128]))
def test_int4_asymmetric_codes_use_the_stored_scale_and_zero(w, g):
    q, scale, zero = P.quantize_int4_asymmetric(w, g)
    grouped = P.grouped(w.float(), g)
    s, z = scale.float()[..., None], zero.float()[..., None]
    expected = torch.round((grouped - (z - 8 * s)) / s).clamp(0, 15).reshape(w.shape[0], -1)
    assert torch.equal(q.float(), expected)
    span = (grouped.amax(-1) - grouped.amin(-1)).clamp(min=1e-6) / 15
    assert torch.equal(scale, span.to(w.dtype))


# ---------------------------------------------------------------------------------------------- int4 integer zero points

def test_int4_integer_matches_gptqs_rule_on_a_hand_example():
    w = (torch.arange(32, dtype=torch.float32) / 31 * 1.5 - 0.5).reshape(1, 32)  # one group: min -0.5, max 1
    q, scale, z = P.quantize_int4_integer(w, 32)
    assert torch.equal(scale, torch.tensor([[1.5 / 15]])) and torch.equal(z, torch.tensor([[5]], dtype=torch.uint8))
    assert q.dtype == torch.uint8 and int(q[0, 0]) == 0 and int(q[0, -1]) == 15
    assert torch.equal(q.float(), torch.clamp(torch.round(w / scale) + 5, 0, 15))  # round(w / scale) + z
    # the range always holds 0: an all-positive group has z = 0, an all-negative one z = 15, and 0 is a code
    pos, neg = torch.linspace(1, 2, 32).reshape(1, 32), torch.linspace(-2, -1, 32).reshape(1, 32)
    (qp, sp, zp), (qn, sn, zn) = P.quantize_int4_integer(pos, 32), P.quantize_int4_integer(neg, 32)
    assert int(zp) == 0 and int(zn) == 15
    assert torch.allclose(sp, torch.tensor([[2 / 15]])) and torch.allclose(sn, torch.tensor([[2 / 15]]))
    assert torch.equal(P.dequantize_int4_integer(z.expand(1, 32), scale, z, 32, torch.float32), torch.zeros(1, 32))


@given(weight_st(), st.sampled_from([32, 64, 128, 256]))
def test_int4_integer_codes_use_the_stored_scale_and_zero_point(w, g):
    q, scale, z = P.quantize_int4_integer(w, g)
    kp = math.ceil(w.shape[1] / g) * g
    assert q.shape == (w.shape[0], kp) and scale.shape == z.shape == (w.shape[0], kp // g)
    assert scale.dtype == w.dtype and z.dtype == torch.uint8 and int(z.max()) <= 15 and int(q.max()) <= 15
    grouped = P.grouped(w.float(), g).double()
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    assert torch.equal(scale, ((hi - lo).clamp(min=1e-6) / 15).to(w.dtype))
    assert torch.equal(z.double(), torch.round(-lo / scale.double()).clamp(0, 15))
    s, zf = scale.float()[..., None], z.float()[..., None]
    expected = torch.round((grouped.float() + zf * s) / s).clamp(0, 15).reshape(w.shape[0], -1)
    assert torch.equal(q.float(), expected)


@given(weight_st(), st.sampled_from([32, 64, 128, 256]))
def test_int4_integer_round_trip_error_is_at_most_half_a_step(w, g):
    q, scale, z = P.quantize_int4_integer(w, g)
    k = w.shape[1]
    dq = P.dequantize_int4_integer(q, scale, z, k, torch.float32)
    assert bool(torch.isfinite(dq).all())
    s = scale.float().repeat_interleave(g, dim=1)[:, :k]
    zk = z.float().repeat_interleave(g, dim=1)[:, :k]
    inside = (w.float() / s + zk >= 0) & (w.float() / s + zk <= 15)  # within the grid [-z s, (15 - z) s]
    err = (w.float() - dq).abs()
    assert bool((err <= s / 2 * (1 + 1e-3) + 1e-6 * w.float().abs())[inside].all())
    # the grid covers the group's range (and 0) up to the rounding of the scale to the weight's dtype
    assert bool((err <= s * (1 / 2 + 16 * torch.finfo(w.dtype).eps) + 1e-6 * w.float().abs()).all())


# ---------------------------------------------------------------------------------------------- int4 symmetric

@given(weight_st(), st.sampled_from([32, 64, 128, 256]))
def test_int4_symmetric_matches_the_formula(w, g):
    q, scale = P.quantize_int4_symmetric(w, g)
    grouped = P.grouped(w.float(), g)
    amax = torch.maximum(-grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0))
    assert torch.equal(scale, (amax / 7.5).clamp(min=torch.finfo(torch.float32).eps).to(w.dtype))
    expected = torch.round(grouped / scale.float()[..., None]).clamp(-8, 7).reshape(w.shape[0], -1)
    assert torch.equal(q.float(), expected)
    assert int(q.min()) >= -8 and int(q.max()) <= 7


# ---------------------------------------------------------------------------------------------- activations
# (the per-token quantizers live with the kernels, whose reference twins they are)

def test_per_token_symmetric_int8_matches_the_formula():
    x = torch.tensor([[0.0, 0.0], [1.27, -2.54], [1e-7, 0.0]])
    xq, s = quantize_per_token_int8_ref(x, None)
    assert torch.allclose(s, torch.tensor([1e-5 / 127, 2.54 / 127, 1e-5 / 127]))
    assert xq.tolist() == [[0, 0], [64, -127], [1, 0]]  # 63.5 rounds half to even; 1e-7 / s = 1.27


@given(weight_st())
def test_per_token_asymmetric_int8_round_trip(x):
    xq, s, zp = quantize_per_token_asym_int8_ref(x)
    x32 = x.float()
    lo, hi = x32.amin(1).clamp(max=0), x32.amax(1).clamp(min=0)
    assert torch.equal(s, ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps))
    assert torch.equal(zp, torch.round(-128 - lo / s).clamp(-128, 127).to(torch.int32))
    dq = (xq.float() - zp[:, None]) * s[:, None]
    assert bool(((x32 - dq).abs() <= s[:, None] * 0.5001 + 1e-6 * x32.abs()).all())


# ---------------------------------------------------------------------------------------------- packing

@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_pack_unpack_uint4_round_trip(n, half_k, seed):
    codes = torch.randint(0, 16, (n, 2 * half_k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = P.pack_uint4(codes)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(P.unpack_uint4(packed), codes)
    assert torch.equal(packed >> 4, codes[:, 0::2])  # first code in the high nibble


def test_pack_uint4_refuses_an_odd_length():
    with pytest.raises(ValueError, match="even"):
        P.pack_uint4(torch.zeros(3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- NF4

def nearest_by_argmin(x):
    return (x.reshape(-1, 1) - P.nf4_levels()).abs().argmin(dim=1).reshape(x.shape).to(torch.uint8)


@given(st.integers(0, 2**31 - 1), st.integers(1, 3000))
def test_encode_nf4_equals_a_first_minimum_argmin(seed, numel):
    x = torch.rand(numel, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    assert torch.equal(P.encode_nf4(x, chunk=257), nearest_by_argmin(x))


def test_encode_nf4_sends_ties_to_the_lower_level():
    levels = P.nf4_levels()
    midpoints = (levels[1:] + levels[:-1]) / 2
    assert torch.equal(P.encode_nf4(midpoints), nearest_by_argmin(midpoints))
    assert torch.equal(P.encode_nf4(levels), torch.arange(16, dtype=torch.uint8))


def test_quantize_nf4_matches_the_double_quantization_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g)  # 512 blocks of 64 = 2 scaler blocks of 256
    packed, scaler_q, factor, mean = P.quantize_nf4(w)
    s1 = w.reshape(-1, 64).abs().amax(1)
    assert torch.allclose(mean, s1.mean())
    centred = (s1 - s1.mean()).reshape(2, 256)
    assert torch.allclose(factor, 256 / (2 * centred.abs().amax(1)))
    assert torch.equal(scaler_q, torch.round(centred * factor[:, None]).clamp(-128, 127).to(torch.int8).reshape(-1))
    codes = P.unpack_uint4(packed)
    assert torch.equal(codes, nearest_by_argmin(w.reshape(-1, 64) / s1[:, None]).reshape(-1))


@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([64, 32]), st.sampled_from([256, 4]),
       st.sampled_from(FLOATS), st.integers(0, 2**31 - 1))
def test_nf4_round_trip_is_close_for_any_size(n, k, block, scaler_block, dtype, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed, scaler_q, factor, mean = P.quantize_nf4(w, block, scaler_block)
    padded = P.blocks_padded_numel(n * k, block, scaler_block)
    assert packed.numel() * 2 == padded and scaler_q.numel() == padded // block
    dq = P.dequantize_nf4(packed, scaler_q, factor, mean, (n, k), dtype, block, scaler_block)
    assert dq.shape == (n, k) and dq.dtype == dtype
    # each element is within half the widest level gap (0.30) of its block's scale, plus the scaler's error
    s1 = torch.nn.functional.pad(w.float().reshape(-1), (0, -(-n * k // block) * block - n * k)).reshape(-1, block)
    s1 = s1.abs().amax(1).repeat_interleave(block)[: n * k].reshape(n, k)
    assert bool(((w.float() - dq.float()).abs() <= 0.16 * s1 + 0.02 * s1.max() + 1e-2 * w.float().abs()).all())


def test_quantize_nf4_builds_no_numel_by_16_temporary():
    w = torch.randn(1024, 1024)
    levels_sized = []

    class Probe(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                levels_sized.append(out.numel())
            return out

    with Probe():
        P.quantize_nf4(w)
    assert max(levels_sized) < 4 * w.numel()


def test_sqnr():
    x = torch.tensor([3.0, 4.0])
    assert P.sqnr(x, x) == float("inf")
    assert math.isclose(P.sqnr(x, torch.tensor([3.0, 4.5])), 20 * math.log10(5 / 0.5))
    with pytest.raises(ValueError, match="shapes"):
        P.sqnr(x, torch.zeros(3))


def test_choose_qparams_int4_asymmetric_rounds_to_the_stored_dtype():
    g = torch.tensor([[0.0, 1.5], [2.0, 2.0]])
    scale, zero = P.choose_qparams_int4_asymmetric(g, torch.bfloat16)
    assert scale.dtype == zero.dtype == torch.bfloat16
    assert torch.equal(scale, torch.tensor([0.1, 1e-6 / 15]).to(torch.bfloat16))
    assert torch.equal(zero, (torch.tensor([0.0, 2.0]) + 8 * scale.float()).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- near the dtype's range

@st.composite
def near_range_weights(draw):
    """Finite weights of every size whose values reach up to the largest value of their dtype."""
    n, k = draw(st.integers(1, 6)), draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(FLOATS))
    top = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    u = torch.rand(n, k, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(n, k, generator=g) > 0.5, 1.0, -1.0).double()
    shape = draw(st.sampled_from(["top", "spread", "extremes", "one huge"]))
    w = {"top": (0.99 + 0.01 * u) * top * (sign if draw(st.booleans()) else 1),
         "spread": u * top * sign,
         "extremes": torch.where(u > 0.5, top, -top) * (u > 0.2),
         "one huge": torch.where(u > 0.9, top * sign, u)}[shape]
    return w.clamp(-top, top).to(dtype)


def _ulp(w):
    """One unit in the last place of each element in its dtype (float64)."""
    w64 = w.double().abs().clamp(min=torch.finfo(w.dtype).tiny)
    return torch.finfo(w.dtype).eps * torch.exp2(torch.floor(torch.log2(w64)))


@given(near_range_weights(), st.sampled_from(ALL_SCHEMES))
def test_finite_weights_dequantize_to_finite_values_within_the_error_bounds(w, scheme):
    q = aofunc.quantize({"w": w}, aofunc.Spec([aofunc.Rule("w", scheme)]))["w"]
    dq = q.dequantize()
    assert dq.dtype == w.dtype and bool(torch.isfinite(dq).all())
    assert all(bool(torch.isfinite(t.float()).all()) for t in q.tensors.values())
    err = (w.double() - dq.double()).abs()
    n, k = w.shape
    if isinstance(scheme, aofunc.NF4):
        s1 = torch.nn.functional.pad(w.double().reshape(-1), (0, -(-n * k // 64) * 64 - n * k)).reshape(-1, 64)
        s1 = s1.abs().amax(1).repeat_interleave(64)[: n * k].reshape(n, k)
        bound = 0.16 * s1 + 0.02 * s1.max() + 1e-2 * w.double().abs()
    else:
        scale = q.scale.double()
        step = scale[:, None].expand(n, k) if scale.dim() == 1 else scale.repeat_interleave(scheme.group_size, 1)[:, :k]
        # half a step, up to the dtype's own rounding of the stored zero and of the dequantized value; an integer
        # zero point cannot centre its grid on the range, so a code beyond the dtype's largest value moving inward
        # leaves up to one step there
        steps = 1 if getattr(scheme, "zero_point", None) == "int" else 1 / 2
        bound = step * steps * (1 + 1e-3) + 2 * _ulp(w)
    assert bool((err <= bound).all()), float((err - bound).max())


def test_the_reported_overflows_quantize_to_finite_values():
    cases = [(torch.tensor([[65504.0]], dtype=torch.float16), aofunc.Int4WeightOnly()),
             (torch.tensor([[3e38, -3e38]]), aofunc.Int4WeightOnly(32)),
             (torch.tensor([[3.3e38, -3.3e38]]).bfloat16(), aofunc.Int8DynamicInt4()),
             (torch.full((4, 64), 3.4e38), aofunc.NF4()),
             (torch.tensor([[-3.4e38, 1.0]]), aofunc.Int8WeightOnly())]
    for w, scheme in cases:
        dq = aofunc.quantize({"w": w}, aofunc.Spec([aofunc.Rule("w", scheme)]))["w"].dequantize()
        assert bool(torch.isfinite(dq).all()), (w, scheme, dq)
        huge = w.double().abs() > 1e3
        torch.testing.assert_close(dq.double()[huge], w.double()[huge], rtol=0.08, atol=0)
