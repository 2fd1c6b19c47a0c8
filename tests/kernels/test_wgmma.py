"""The ``wgmma`` path of W4A16, W8A16 and 8da4w (Gluon, Hopper's warpgroup MMA).

On a Hopper GPU with Triton's Gluon: the path against the reference twin on ragged shapes, every zero kind, fp16 and
bf16 x, with and without bias, K split, the weight tile in registers or through shared memory, strided and empty x;
the same bits on every run; inputs unchanged. Everywhere else: the path is refused with a reason before any work,
never searched, and a stored choice of it falls back to the generic path.
"""
import pytest
import torch

from aofunc.kernels import autotune, int8_int4, nf4, tiles, w4a16, w8a16
from aofunc.kernels.tiles import tolerance
from tests.kernels.devices import DEVICE, LINEAR_DTYPES

ON_HOPPER = DEVICE == "cuda" and tiles.wgmma_runs(torch.device(DEVICE))
hopper_only = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU and Triton's Gluon")


def _config(block_m=64, block_n=64, stages=2, split=1, shared=False, warps=4, decoupled=False):
    return dict(path="wgmma", BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, SPLIT_K=split, A_SHARED=shared,
                num_warps=warps, **({"DECOUPLED": True} if decoupled else {}))


def _weight(n, k, dtype, grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    kp = -(-k // 128) * 128
    qdata = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, kp // 128, generator=g) * 0.02 + 1e-3
    zero = {"float": (torch.randn(n, kp // 128, generator=g) * 0.05).to(dtype),
            "int": torch.randint(0, 16, (n, kp // 128), dtype=torch.uint8, generator=g), "none": None}[grid]
    return (qdata.to(DEVICE), scale.to(DEVICE, dtype), None if zero is None else zero.to(DEVICE))


CONFIGS = [_config(), _config(128, 128, 3, 1, False, 8), _config(64, 64, 2, 3, True, 4),
           _config(128, 128, 2, 2, True, 4), _config(64, 128, 3, 1, True, 8),
           _config(256, 128, 2, 1, decoupled=True), _config(64, 256, 4, 2, decoupled=True)]


@hopper_only
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("k", [3968, 4096])  # an odd and an even number of steps
def test_decoupled_warpgroups_give_the_bits_of_the_coupled_form(split, k):
    # the same MMAs in the same order on each warpgroup's rows: only when the two run differs
    qdata, scale, zero = _weight(320, k, torch.bfloat16, "float")
    x = torch.randn(200, k, device=DEVICE, dtype=torch.bfloat16)
    coupled = _config(128, 128, 3, split, False, 8)
    decoupled = w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128, config=_config(128, 128, 3, split,
                                                                                     decoupled=True))
    assert torch.equal(decoupled, w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128, config=coupled))


@hopper_only
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (37, 200, 384), (300, 130, 1000), (130, 256, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", ["float", "int", "none"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in list(c.values())[1:]))
def test_wgmma_matches_the_twin_every_run_inputs_unchanged(m, n, k, dtype, grid, config):
    assert_w4a16_path_matches_the_twin(m, n, k, dtype, grid, config)


def assert_w4a16_path_matches_the_twin(m, n, k, dtype, grid, config):
    """W4A16 through ``config`` on a random weight of this zero kind: the twin's output within the accumulation
    tolerance, the same bits on a second run, every input unchanged (x of m rows, a bias where m is odd)."""
    qdata, scale, zero = _weight(n, k, dtype, grid, seed=m)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if m % 2 else None
    inputs = [t.clone() for t in (x, qdata, scale) + tuple(t for t in (zero, bias) if t is not None)]
    want = w4a16.w4a16_linear_ref(x, qdata, scale, zero, 128, bias).float()
    got = w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128, bias, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    assert float((got.float() - want).norm() / want.norm()) <= tolerance(dtype)
    assert torch.equal(w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128, bias, config=config), got)
    after = [t for t in (x, qdata, scale, zero, bias) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after))


@hopper_only
@pytest.mark.parametrize("shared", [False, True])
def test_wgmma_takes_strided_and_empty_x(shared):
    qdata, scale, zero = _weight(96, 256, torch.bfloat16, "float")
    wide = torch.randn(20, 512, device=DEVICE, dtype=torch.bfloat16)
    config = _config(shared=shared)
    strided = w4a16.w4a16_linear_triton(wide[:, ::2], qdata, scale, zero, 128, config=config)
    assert torch.equal(strided, w4a16.w4a16_linear_triton(wide[:, ::2].contiguous(), qdata, scale, zero, 128,
                                                          config=config))
    empty = w4a16.w4a16_linear_triton(wide[:0, :256], qdata, scale, zero, 128, config=config)
    assert empty.shape == (0, 96) and empty.dtype == torch.bfloat16


@hopper_only
def test_wgmma_is_searched_on_hopper():
    configs = w4a16.candidate_configs(128, 4096, 4096, 128, torch.bfloat16, torch.device(DEVICE))
    assert any(c["path"] == "wgmma" for c in configs)
    assert not any(c["path"] == "wgmma" for c in w4a16.candidate_configs(128, 4096, 4096, 64, torch.bfloat16,
                                                                         torch.device(DEVICE)))


@pytest.mark.parametrize("group_size,dtype,why", [(64, torch.bfloat16, "groups of 128"),
                                                  (128, torch.float32, "fp16 or bf16 x")])
def test_wgmma_refuses_what_it_cannot_take_before_any_work(group_size, dtype, why):
    qdata, scale, zero = _weight(64, 256, torch.float16, "float")
    scale = scale.repeat_interleave(2, 1) if group_size == 64 else scale
    zero = zero.repeat_interleave(2, 1) if group_size == 64 else zero
    x = torch.randn(3, 256, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match=why):
        w4a16.launch(x, qdata, scale.to(dtype), zero.to(dtype), group_size, None, _config())


@pytest.mark.skipif(ON_HOPPER, reason="off Hopper only")
def test_wgmma_is_refused_off_hopper_and_never_searched():
    qdata, scale, zero = _weight(64, 256, torch.float16, "float")
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.float16)
    assert w4a16.wgmma_refusal(x, scale, zero, 128).startswith("the wgmma path needs a Hopper GPU")
    with pytest.raises(ValueError, match="Hopper"):
        w4a16.launch(x, qdata, scale, zero, 128, None, _config())
    configs = w4a16.candidate_configs(64, 64, 256, 128, torch.float16, torch.device(DEVICE))
    assert configs and not any(c["path"] == "wgmma" for c in configs)


def test_a_stored_wgmma_choice_the_inputs_cannot_take_runs_the_generic_path(monkeypatch):
    # fp32 x on any device, or any x off Hopper: the stored choice is set aside for the default configuration
    qdata, scale, zero = _weight(64, 256, torch.float32, "float")
    x = torch.randn(5, 256, device=DEVICE)
    monkeypatch.setattr(autotune, "choose", lambda key, default, **kwargs: _config())
    got = w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128)
    want = w4a16.launch(x, qdata, scale, zero, 128, None, w4a16.default_config(5, 64, 256, 128, x.dtype, x.device))
    assert torch.equal(got, want)


def _fake_ptxas(tmp_path, release):
    tool = tmp_path / f"ptxas-{release}"
    tool.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    tool.chmod(0o755)
    return str(tool)


@pytest.mark.parametrize("release,in_flight", [("12.8", False), ("13.2", False), ("13.3", True), ("14.0", True)])
def test_an_mma_stays_in_flight_only_with_an_assembler_from_cuda_13_3(tmp_path, monkeypatch, release, in_flight):
    pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_PTXAS_PATH", _fake_ptxas(tmp_path, release))
    assert tiles.mma_in_flight() is in_flight
    assert any(c.get("IN_FLIGHT") for c in tiles.wgmma_configs(256, 4096)) is in_flight


@hopper_only
@pytest.mark.skipif(not ON_HOPPER or not tiles.mma_in_flight(), reason="needs an assembler from CUDA 13.3 on")
@pytest.mark.parametrize("config", CONFIGS[:2] + [_config(128, 64, 3, 2, False, 4), _config(256, 128, 2, 1, False, 8)],
                         ids=lambda c: "-".join(str(v) for v in list(c.values())[1:]))
@pytest.mark.parametrize("k", [3968, 4096])  # an odd and an even number of steps
def test_an_mma_in_flight_gives_the_bits_of_one_at_a_time(config, k):
    qdata, scale, zero = _weight(320, k, torch.bfloat16, "float")
    x = torch.randn(200, k, device=DEVICE, dtype=torch.bfloat16)
    in_flight = w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128, config=dict(config, IN_FLIGHT=True))
    assert torch.equal(in_flight, w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128, config=config))
    want = w4a16.w4a16_linear_ref(x, qdata, scale, zero, 128).float()
    assert float((in_flight.float() - want).norm() / want.norm()) <= tolerance(torch.bfloat16)


def _int8_weight(n, k, scale_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qdata = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return qdata.to(DEVICE), (torch.rand(n, generator=g) * 0.02 + 1e-3).to(DEVICE, scale_dtype)


@hopper_only
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (37, 200, 384), (300, 130, 1024), (130, 256, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in list(c.values())[1:]))
def test_w8a16_wgmma_matches_the_twin_every_run_inputs_unchanged(m, n, k, dtype, config):
    qdata, scale = _int8_weight(n, k, torch.float32 if m % 3 == 0 else dtype, seed=m)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if m % 2 else None
    inputs = [t.clone() for t in (x, qdata, scale) + (() if bias is None else (bias,))]
    want = w8a16.w8a16_linear_ref(x, qdata, scale, bias).float()
    got = w8a16.w8a16_linear_triton(x, qdata, scale, bias, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    assert float((got.float() - want).norm() / want.norm()) <= tolerance(dtype)
    assert torch.equal(w8a16.w8a16_linear_triton(x, qdata, scale, bias, config=config), got)
    after = [t for t in (x, qdata, scale, bias) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after))


@hopper_only
def test_w8a16_wgmma_sums_the_codes_exactly():
    # integer x and codes with a unit scale: every partial sum is an integer below 2**24, so fp32 holds it exactly
    qdata, _ = _int8_weight(192, 1024, torch.bfloat16)
    x = torch.randint(-8, 9, (70, 1024), device=DEVICE).to(torch.bfloat16)
    scale = torch.ones(192, device=DEVICE, dtype=torch.float32)
    got = w8a16.w8a16_linear_triton(x, qdata, scale, config=_config(128, 128, 3, 2, False, 8))
    want = (x.double() @ qdata.double().T)
    assert torch.equal(got.double(), want.to(torch.bfloat16).double())


@pytest.mark.parametrize("k,dtype,why", [(200, torch.bfloat16, "multiple of 128"),
                                         (256, torch.float32, "fp16 or bf16")])
def test_w8a16_wgmma_refuses_what_it_cannot_take_before_any_work(k, dtype, why):
    qdata, scale = _int8_weight(64, k, torch.float32)
    x = torch.randn(3, k, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match=why):
        w8a16.launch(x, qdata, scale, None, _config())


def test_a_stored_w8a16_wgmma_choice_the_inputs_cannot_take_runs_the_generic_path(monkeypatch):
    qdata, scale = _int8_weight(64, 200, torch.float32)
    x = torch.randn(5, 200, device=DEVICE)
    monkeypatch.setattr(autotune, "choose", lambda key, default, **kwargs: _config())
    got = w8a16.w8a16_linear_triton(x, qdata, scale)
    assert torch.equal(got, w8a16.launch(x, qdata, scale, None, w8a16.default_config(5, 64, 200, x.dtype, x.device)))


def _int4_weight(n, k, scale_dtype, seed=0):
    """8da4w codes: random nibbles, K padded to whole groups of 128 with code 8 (q = 0), scales spread over 2^4."""
    g = torch.Generator().manual_seed(seed)
    kp = -(-k // 128) * 128
    u = torch.randint(0, 16, (n, kp), dtype=torch.uint8, generator=g)
    u[:, k:] = 8
    scale = (torch.rand(n, kp // 128, generator=g) + 0.0625) * 0.02
    return ((u[:, 0::2] << 4) | u[:, 1::2]).to(DEVICE), scale.to(DEVICE, scale_dtype)


def _8da4w_twin(x, qdata, scale, bias):
    """The 8da4w twin with the bias added in fp32 before the one rounding to x's dtype, as the wgmma path does."""
    return int8_int4.int8_int4_linear_ref(x.float(), qdata, scale, 128, None if bias is None else bias.float()
                                          ).to(x.dtype)


@hopper_only
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (37, 200, 384), (300, 130, 1000), (130, 256, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in list(c.values())[1:]))
def test_8da4w_wgmma_matches_the_twin_every_run_inputs_unchanged(m, n, k, dtype, config):
    # the W4A16 kernel on the exact fp16 operands: centered activations times (code - 8) * scale / p, the row's
    # scale and the column's power of two in the epilogue
    qdata, scale = _int4_weight(n, k, torch.float16 if m % 3 == 0 else torch.bfloat16, seed=m)
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(m, k, generator=g) * 3 + 1).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if m % 2 else None
    inputs = [t.clone() for t in (x, qdata, scale) + (() if bias is None else (bias,))]
    want = _8da4w_twin(x, qdata, scale, bias).double()
    got = int8_int4.int8_int4_linear_triton(x, qdata, scale, 128, bias, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    assert float((got.double() - want).norm() / want.norm()) < 1e-3
    assert torch.equal(int8_int4.int8_int4_linear_triton(x, qdata, scale, 128, bias, config=config), got)
    after = [t for t in (x, qdata, scale, bias) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after))


@hopper_only
def test_8da4w_wgmma_takes_strided_and_empty_x_and_is_searched():
    qdata, scale = _int4_weight(96, 256, torch.bfloat16)
    wide = torch.randn(20, 512, device=DEVICE, dtype=torch.bfloat16)
    config = _config(128, 128, 3, 2, False, 8)
    strided = int8_int4.int8_int4_linear_triton(wide[:, ::2], qdata, scale, 128, None, config=config)
    assert torch.equal(strided, int8_int4.int8_int4_linear_triton(wide[:, ::2].contiguous(), qdata, scale, 128,
                                                                  None, config=config))
    empty = int8_int4.int8_int4_linear_triton(wide[:0, :256], qdata, scale, 128, None, config=config)
    assert empty.shape == (0, 96) and empty.dtype == torch.bfloat16
    device = torch.device(DEVICE)
    assert any(c.get("path") == "wgmma" for c in int8_int4.candidate_configs(64, 4096, 4096, 128, torch.bfloat16,
                                                                          torch.bfloat16, device))
    for m, group_size, scale_dtype in ((32, 128, torch.bfloat16), (64, 64, torch.bfloat16), (64, 128, torch.float32)):
        configs = int8_int4.candidate_configs(m, 4096, 4096, group_size, torch.bfloat16, scale_dtype, device)
        assert not any(c.get("path") == "wgmma" for c in configs), (m, group_size, scale_dtype)


@pytest.mark.parametrize("group_size,scale_dtype,why", [(64, torch.bfloat16, "groups of 128"),
                                                        (128, torch.float32, "fp16 or bf16 scales")])
def test_8da4w_wgmma_refuses_what_it_cannot_take_before_any_work(group_size, scale_dtype, why):
    qdata, scale = _int4_weight(64, 256, scale_dtype)
    scale = scale.repeat_interleave(2, 1) if group_size == 64 else scale
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=why):
        int8_int4.int8_int4_linear_triton(x, qdata, scale, group_size, None, config=_config())


@pytest.mark.skipif(ON_HOPPER, reason="off Hopper only")
def test_8da4w_wgmma_is_refused_off_hopper_and_never_searched():
    qdata, scale = _int4_weight(64, 256, torch.bfloat16)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="Hopper"):
        int8_int4.int8_int4_linear_triton(x, qdata, scale, 128, None, config=_config())
    configs = int8_int4.candidate_configs(64, 64, 256, 128, torch.bfloat16, torch.bfloat16, torch.device(DEVICE))
    assert configs and not any(c.get("path") == "wgmma" for c in configs)


def test_a_stored_8da4w_wgmma_choice_the_inputs_cannot_take_runs_the_generic_path(monkeypatch):
    # fp32 scales on any device, or any scales off Hopper: the stored choice is set aside for the default
    qdata, scale = _int4_weight(64, 256, torch.float32)
    x = torch.randn(5, 256, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(autotune, "choose", lambda *args, **kwargs: _config())
    got = int8_int4.int8_int4_linear_triton(x, qdata, scale, 128, None)
    default = int8_int4.default_config(5, 64, 256, 128, x.dtype, scale.dtype, x.device)
    assert torch.equal(got, int8_int4.int8_int4_linear_triton(x, qdata, scale, 128, None, config=default))


def _nf4_weight(n, k, seed=0):
    """An NF4 weight (blocks of 64, 4 block scales a scaler): random codes, scales 0.02 +- 0.01."""
    g = torch.Generator().manual_seed(seed)
    padded = -(-n * k // 256) * 256
    qdata = torch.randint(0, 256, (padded // 2,), dtype=torch.uint8, generator=g)
    scaler_q = torch.randint(-127, 128, (padded // 64,), dtype=torch.int8, generator=g)
    factor = torch.full((padded // 256,), 12700.0)
    return tuple(t.to(DEVICE) for t in (qdata, scaler_q, factor, torch.tensor(0.02)))


@hopper_only
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (37, 200, 384), (300, 130, 1024), (130, 256, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in list(c.values())[1:]))
def test_nf4_wgmma_matches_the_twin_every_run_inputs_unchanged(m, n, k, dtype, config):
    tensors = _nf4_weight(n, k, seed=m)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if m % 2 else None
    inputs = [t.clone() for t in (x,) + tensors + (() if bias is None else (bias,))]
    args = (x, *tensors, n, k, 64, 4, bias)
    want = nf4.nf4_linear_ref(*args).float()
    got = nf4.nf4_linear_triton(*args, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    assert float((got.float() - want).norm() / want.norm()) <= tolerance(dtype)
    assert torch.equal(nf4.nf4_linear_triton(*args, config=config), got)
    after = [t for t in (x,) + tensors + (bias,) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after))


@hopper_only
def test_nf4_wgmma_takes_strided_and_empty_x_and_is_searched():
    tensors = _nf4_weight(96, 256)
    wide = torch.randn(20, 512, device=DEVICE, dtype=torch.bfloat16)
    config = _config(128, 128, 3, 2, False, 8)
    strided = nf4.nf4_linear_triton(wide[:, ::2], *tensors, 96, 256, 64, 4, config=config)
    assert torch.equal(strided, nf4.nf4_linear_triton(wide[:, ::2].contiguous(), *tensors, 96, 256, 64, 4,
                                                      config=config))
    empty = nf4.nf4_linear_triton(wide[:0, :256], *tensors, 96, 256, 64, 4, config=config)
    assert empty.shape == (0, 96) and empty.dtype == torch.bfloat16
    device = torch.device(DEVICE)
    assert any(c["path"] == "wgmma" for c in nf4.candidate_configs(64, 4096, 4096, 64, torch.bfloat16, device))
    for k, block_size in ((4096, 32), (4032, 64)):
        configs = nf4.candidate_configs(64, 4096, k, block_size, torch.bfloat16, device)
        assert not any(c["path"] == "wgmma" for c in configs), (k, block_size)


@pytest.mark.parametrize("k,block_size,dtype,why", [(256, 32, torch.bfloat16, "blocks of 64 codes"),
                                                    (192, 64, torch.bfloat16, "multiple of 128"),
                                                    (256, 64, torch.float32, "fp16 or bf16 x")])
def test_nf4_wgmma_refuses_what_it_cannot_take_before_any_work(k, block_size, dtype, why):
    padded = -(-64 * k // (block_size * 4)) * block_size * 4
    tensors = (torch.zeros(padded // 2, dtype=torch.uint8, device=DEVICE),
               torch.ones(padded // block_size, dtype=torch.int8, device=DEVICE),
               torch.ones(padded // (block_size * 4), device=DEVICE), torch.tensor(0.0, device=DEVICE))
    x = torch.randn(3, k, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match=why):
        nf4.nf4_linear_triton(x, *tensors, 64, k, block_size, 4, config=_config())


@pytest.mark.skipif(ON_HOPPER, reason="off Hopper only")
def test_nf4_wgmma_is_refused_off_hopper_and_never_searched():
    tensors = _nf4_weight(64, 256)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="Hopper"):
        nf4.nf4_linear_triton(x, *tensors, 64, 256, 64, 4, config=_config())
    configs = nf4.candidate_configs(64, 64, 256, 64, torch.bfloat16, torch.device(DEVICE))
    assert configs and not any(c["path"] == "wgmma" for c in configs)


def test_a_stored_nf4_wgmma_choice_the_inputs_cannot_take_runs_the_generic_path(monkeypatch):
    # fp32 x on any device, or any x off Hopper: the stored choice is set aside for the default configuration
    tensors = _nf4_weight(64, 256)
    x = torch.randn(5, 256, device=DEVICE)
    monkeypatch.setattr(autotune, "choose", lambda key, default, **kwargs: _config())
    got = nf4.nf4_linear_triton(x, *tensors, 64, 256, 64, 4)
    default = nf4.default_config(5, 64, 256, 64, x.dtype, x.device)
    assert torch.equal(got, nf4.nf4_linear_triton(x, *tensors, 64, 256, 64, 4, config=default))


@pytest.mark.parametrize("split,m,n", [(2, 1, 1), (3, 5, 64), (8, 2, 40), (4, 0, 16)])
@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_sum_adds_the_splits_in_order_then_the_bias_rounding_once(split, m, n, dtype, with_bias):
    g = torch.Generator().manual_seed(split * 100 + m)
    ws = torch.randn(split, m, n, generator=g).to(DEVICE)
    bias = (torch.randn(n, generator=g) * 4).to(DEVICE, dtype) if with_bias else None
    before = ws.clone()
    want = ws[0].clone()
    for s in range(1, split):
        want += ws[s]
    if bias is not None:
        want += bias.float()
    got = tiles.split_sum(ws, bias, dtype)
    assert got.shape == (m, n) and got.dtype == dtype
    assert torch.equal(got, want.to(dtype)) and torch.equal(ws, before)


def test_split_sum_past_the_kernels_offsets_gives_the_same_bits(monkeypatch):
    g = torch.Generator().manual_seed(7)
    ws = torch.randn(5, 3, 40, generator=g).to(DEVICE)
    bias = torch.randn(40, generator=g).to(DEVICE, torch.float16)
    want = tiles.split_sum(ws, bias, torch.float16)
    monkeypatch.setattr(tiles, "SPLIT_SUM_ELEMENTS", ws.numel())
    assert torch.equal(tiles.split_sum(ws, bias, torch.float16), want)
