"""The ``mma`` path of W4A16, W8A16 and NF4 (Gluon, the warp-level m16n8k16 MMA, up to 32 rows of x: 8 from
registers, 16 or 32 through shared memory).

On a GPU of compute capability 8.0 or later with Triton's Gluon: the path against the reference twin on ragged
shapes, every zero kind, fp16 and bf16 x, with and without bias, K split, strided and empty x; the same bits on
every run; inputs unchanged. Everywhere else: the path is refused with a reason before any work, never searched,
and a stored choice of it falls back to the generic path.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from aofunc.kernels import autotune, nf4, tiles, w4a16, w8a16
from aofunc.kernels.tiles import tolerance
from tests.kernels.devices import DEVICE
from tests.kernels.test_wgmma import _weight, assert_w4a16_path_matches_the_twin

RUNS = DEVICE == "cuda" and tiles.mma_runs(torch.device(DEVICE))
gpu_only = pytest.mark.skipif(not RUNS, reason="needs a GPU of compute capability 8.0+ and Triton's Gluon")


def _config(block_n=64, split=1, warps=4, block_m=8):
    return dict(path="mma", BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, num_warps=warps)


CONFIGS = [_config(), _config(32, 1, 2), _config(128, 3, 4), _config(256, 2, 8), _config(16, 4, 1), _config(32, 1, 1)]
# x through shared memory: 16 rows of x on 16 or 32 rows of w a warp, K split so that x's steps fit; 32 rows of x
SHARED = [_config(64, 1, 4, 16), _config(64, 3, 2, 16), _config(128, 2, 8, 16), _config(64, 4, 4, 32),
          _config(32, 2, 1, 32)]


@gpu_only
@pytest.mark.parametrize("m,n,k", [(9, 64, 128), (16, 200, 384), (13, 130, 1000), (32, 256, 2048), (27, 48, 640),
                                   (17, 96, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", ["float", "int", "none"])
@pytest.mark.parametrize("config", SHARED, ids=lambda c: "-".join(str(v) for v in list(c.values())[1:]))
def test_mma_with_x_in_shared_memory_matches_the_twin(m, n, k, dtype, grid, config):
    assert_w4a16_path_matches_the_twin(m, n, k, dtype, grid, config)


@gpu_only
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 200, 384), (8, 130, 1000), (5, 256, 4096), (2, 48, 640)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", ["float", "int", "none"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in list(c.values())[2:]))
def test_mma_matches_the_twin_every_run_inputs_unchanged(m, n, k, dtype, grid, config):
    assert_w4a16_path_matches_the_twin(m, n, k, dtype, grid, config)


@gpu_only
@pytest.mark.parametrize("rows,block_m", [(6, 8), (20, 32)])
def test_mma_takes_strided_misaligned_and_empty_x(rows, block_m):
    qdata, scale, zero = _weight(96, 256, torch.bfloat16, "float")
    wide = torch.randn(rows, 513, device=DEVICE, dtype=torch.bfloat16)
    config = _config(block_m=block_m)
    for view in (wide[:, :512:2], wide[:, 1:257]):  # every other column; an odd offset (not 4-byte aligned)
        assert torch.equal(w4a16.w4a16_linear_triton(view, qdata, scale, zero, 128, config=config),
                           w4a16.w4a16_linear_triton(view.contiguous(), qdata, scale, zero, 128, config=config))
    empty = w4a16.w4a16_linear_triton(wide[:0, :256], qdata, scale, zero, 128, config=config)
    assert empty.shape == (0, 96)


@gpu_only
def test_mma_is_searched_up_to_32_rows():
    for m, searched in ((1, True), (8, True), (9, True), (32, True), (33, False)):
        configs = w4a16.candidate_configs(m, 4096, 4096, 128, torch.bfloat16, torch.device(DEVICE))
        assert any(c["path"] == "mma" for c in configs) == searched
    assert not any(c["path"] == "mma" for c in w4a16.candidate_configs(4, 4096, 4096, 64, torch.bfloat16,
                                                                       torch.device(DEVICE)))
    assert any(c["path"] == "mma" for c in w8a16.candidate_configs(4, 4096, 4096, torch.bfloat16,
                                                                   torch.device(DEVICE)))
    assert any(c["path"] == "mma" for c in nf4.candidate_configs(4, 4096, 4096, 64, torch.bfloat16,
                                                                 torch.device(DEVICE)))


@given(m=st.integers(1, tiles.MMA_ROWS), n=st.integers(1, 1 << 16), k=st.integers(1, 1 << 16))
def test_mma_search_offers_only_tiles_whose_x_fits(m, n, k):
    # 8 rows from registers; 16 or 32 (the next power of two of m) through shared memory, K split until x fits
    configs = tiles.mma_configs(m, n, k)
    steps = -(-k // 128)
    for config in configs:
        assert config["BLOCK_M"] == (8 if m <= 8 else 16 if m <= 16 else 32)
        x_steps = tiles.mma_x_steps(config["BLOCK_M"], -(-steps // config["SPLIT_K"]))  # raises where x does not fit
        assert x_steps * config["BLOCK_M"] * 128 * 2 <= tiles.MMA_SHARED_X_BYTES
    # every row count finds a tile where K split 16 ways leaves at most 64 KB of x a program (for up to 65536 rows of
    # w, 16 splits of 256-row programs stay within the search's 4096 programs)
    most = 16 if m <= 16 else 8  # steps of x a program can hold
    assert bool(configs) == (m <= 8 or -(-steps // 16) <= most)
    # and every split of K that leaves each program a multiple of four steps (W4A16's scales four steps a load)
    splits = {config["SPLIT_K"] for config in configs}
    for per in (4, 8, 16):
        if steps % per == 0 and steps // per <= (8 if m <= 8 else 16) and (m <= 8 or per <= most):
            assert steps // per in splits


@pytest.mark.parametrize("group_size,rows,dtype,block_m,why", [
    (64, 2, torch.bfloat16, 8, "groups of 128"), (128, 33, torch.bfloat16, 8, "at most 32 rows"),
    (128, 2, torch.float32, 8, "fp16 or bf16"), (128, 2, torch.bfloat16, 64, "8, 16 or 32 rows of x"),
    (128, 20, torch.bfloat16, 32, "split K further")])
def test_mma_refuses_what_it_cannot_take_before_any_work(group_size, rows, dtype, block_m, why):
    if block_m != 8 and not RUNS:
        pytest.skip("the tile's checks follow the device's (the path is refused first)")
    x = torch.randn(rows, 4096, dtype=dtype, device=DEVICE)
    qdata, scale, zero = _weight(64, 4096, torch.bfloat16, "float")
    config = _config(block_m=block_m)
    with pytest.raises(ValueError, match=why):
        w4a16.launch(x, qdata, scale, zero, group_size, None, config)


def test_mma_is_refused_off_gpu_and_never_searched():
    if RUNS:
        pytest.skip("the path runs here")
    x = torch.randn(2, 256, dtype=torch.bfloat16, device=DEVICE)
    assert "compute capability 8.0" in w4a16.mma_refusal(x, torch.zeros(4, 128, dtype=torch.uint8), 128)
    assert not any(c["path"] == "mma" for c in w4a16.candidate_configs(2, 4096, 4096, 128, torch.bfloat16,
                                                                       torch.device(DEVICE)))


def test_a_stored_mma_choice_the_inputs_cannot_take_runs_the_generic_path(monkeypatch):
    # a table made on a GPU names the path; here (or for fp32 x) it cannot run: the default path answers instead
    x = torch.randn(2, 256, dtype=torch.float32, device=DEVICE)
    qdata, scale, zero = _weight(64, 256, torch.float32, "float")
    monkeypatch.setattr(autotune, "choose", lambda key, default, **kw: _config())
    got = w4a16.w4a16_linear_triton(x, qdata, scale, zero, 128)
    want = w4a16.w4a16_linear_ref(x, qdata, scale, zero, 128)
    assert float((got - want).norm() / want.norm()) <= tolerance(torch.float32)


@gpu_only
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (7, 200, 1024), (8, 130, 4096), (20, 72, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS[:3] + SHARED[1:2] + SHARED[3:4],
                         ids=lambda c: "-".join(str(v) for v in list(c.values())[1:]))
def test_mma_path_of_w8a16_and_nf4_matches_the_twins(m, n, k, dtype, config):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).to(DEVICE)
    s8 = (torch.rand(n, generator=g) * 1e-3 + 1e-4).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    want = w8a16.w8a16_linear_ref(x, q8, s8, bias).float()
    got = w8a16.w8a16_linear_triton(x, q8, s8, bias, config=config).float()
    assert float((got - want).norm() / want.norm()) <= tolerance(dtype)
    # NF4: random codes, a block scale a 64 codes, 4 blocks a scaler (k a multiple of 128: whole blocks a row)
    padded = -(-n * k // 256) * 256
    qdata = torch.randint(0, 256, (padded // 2,), dtype=torch.uint8, generator=g).to(DEVICE)
    scaler_q = torch.randint(-127, 128, (padded // 64,), dtype=torch.int8, generator=g).to(DEVICE)
    factor = torch.full((padded // 256,), 12700.0, device=DEVICE)
    mean = torch.tensor(0.02, device=DEVICE)
    want = nf4.nf4_linear_ref(x, qdata, scaler_q, factor, mean, n, k, 64, 4, bias).float()
    got = nf4.nf4_linear_triton(x, qdata, scaler_q, factor, mean, n, k, 64, 4, bias, config=config).float()
    assert float((got - want).norm() / want.norm()) <= tolerance(dtype)
