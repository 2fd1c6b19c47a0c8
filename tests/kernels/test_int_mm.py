"""int_mm: exact int8 @ int8 -> int32 on every shape and layout; the Triton kernel equals the float64 twin.

Runs the Triton kernel on CUDA when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aofunc.kernels.int_mm import (
    cublas_int_mm_is_exact,
    gemv_candidates,
    int8_gemv_triton,
    int8_matmul_triton,
    int_mm,
    int_mm_ref,
    int_mm_triton,
    tma_compatible,
)

from tests.kernels.devices import DEVICE, ON_GPU, gpu_only


def _int8(*shape, device=DEVICE, generator=None):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator).to(device)


def _exact(a, b):
    """The integer product computed in int64 on the CPU: the ground truth."""
    return (a.cpu().long() @ b.cpu().long()).to(torch.int32)


# The edges of torch._int_mm's CUDA constraints (M > 16, K and N multiples of 8) and of the kernel's tiles.
EDGE_SHAPES = [(1, 1, 1), (1, 3, 5), (2, 8, 8), (16, 16, 16), (17, 16, 16), (17, 24, 8), (33, 40, 7),
               (20, 9, 13), (64, 64, 64), (5, 0, 3), (0, 8, 8), (4, 8, 0)]


@pytest.mark.parametrize("m,k,n", EDGE_SHAPES)
@pytest.mark.parametrize("layout", ["row-major", "b transposed", "a sliced"])
def test_triton_and_op_equal_exact_product(m, k, n, layout):
    g = torch.Generator().manual_seed(m * 10007 + k * 101 + n)
    if layout == "a sliced":
        a = _int8(m, 2 * k, generator=g)[:, ::2]
    else:
        a = _int8(m, k, generator=g)
    b = _int8(n, k, generator=g).t() if layout == "b transposed" else _int8(k, n, generator=g)
    want = _exact(a, b)
    assert torch.equal(int_mm_ref(a, b).cpu(), want)
    assert torch.equal(int_mm_triton(a, b).cpu(), want)
    assert torch.equal(int_mm(a, b).cpu(), want)
    assert torch.equal(torch.ops.aofunc.int_mm(a, b).cpu(), want)


def test_extreme_values_are_exact():
    # |C| = 128 * 128 * 64 = 2**20: every product at its largest magnitude.
    a = torch.full((18, 64), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((64, 24), -128, dtype=torch.int8, device=DEVICE)
    assert torch.equal(int_mm_triton(a, b).cpu(), torch.full((18, 24), 2 ** 20, dtype=torch.int32))
    b[:, 1::2] = 127
    assert torch.equal(int_mm(a, b).cpu(), _exact(a, b))


def test_inputs_are_not_modified():
    a, b = _int8(20, 24), _int8(24, 16)
    a0, b0 = a.clone(), b.clone()
    int_mm(a, b)
    int_mm_triton(a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_scaled_epilogue_rounds_like_torch():
    g = torch.Generator().manual_seed(3)
    a, b = _int8(21, 40, generator=g), _int8(40, 19, generator=g)
    row = torch.rand(21, generator=g).to(DEVICE) * 1e-3
    col = torch.rand(19, generator=g).to(DEVICE, torch.float16)
    bias = torch.randn(19, generator=g).to(DEVICE, torch.float16)
    y = int8_matmul_triton(a, b, row_scale=row, col_scale=col, bias=bias, out_dtype=torch.float16)
    want = (int_mm_ref(a, b).float() * row[:, None] * col.float()[None, :]).to(torch.float16) + bias
    assert y.dtype == torch.float16
    assert torch.equal(y, want)


@pytest.mark.parametrize("m,k,n,split", [(1, 200, 40, 2), (20, 64, 24, 3), (33, 100, 17, 4), (5, 40, 8, 8)])
def test_split_k_equals_exact_product(m, k, n, split):
    """K split among programs (ragged K; more splits than steps for the last shape): the int32 partials sum
    exactly, also past fp32's 2**24, then the scaled epilogue rounds as without a split."""
    g = torch.Generator().manual_seed(m + k + n + split)
    a, b = _int8(m, k, generator=g), _int8(k, n, generator=g)
    a[0], b[:, 0] = -128, -128  # the largest products
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1,
              "SPLIT_K": split}
    assert torch.equal(int8_matmul_triton(a, b, config=config).cpu(), _exact(a, b))
    row = torch.rand(m, generator=g).to(DEVICE) * 1e-3
    col = torch.rand(n, generator=g).to(DEVICE, torch.float16)
    bias = torch.randn(n, generator=g).to(DEVICE, torch.float16)
    want = int8_matmul_triton(a, b, row_scale=row, col_scale=col, bias=bias, out_dtype=torch.float16,
                              config=dict(config, SPLIT_K=1))
    assert torch.equal(int8_matmul_triton(a, b, row_scale=row, col_scale=col, bias=bias, out_dtype=torch.float16,
                                          config=config), want)


def test_split_k_partials_sum_in_int32():
    # 4096 products near 2**14 in four splits: C near 2**26 with bits fp32 partial sums would round away
    a = torch.full((1, 4096), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((4096, 16), -128, dtype=torch.int8, device=DEVICE)
    a[0, 0], b[0, 1] = -127, -127
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 1,
              "SPLIT_K": 4}
    c = int8_matmul_triton(a, b, config=config).cpu()
    assert c[0, 0] == 2 ** 26 - 128 and c[0, 1] == 2 ** 26 - 255


GEMV = {"path": "gemv", "BLOCK_N": 16, "BLOCK_W": 4, "SPLIT_K": 1, "LOOP_STAGES": 1, "num_warps": 4,
        "num_stages": 1}


@pytest.mark.parametrize("m,k,n,split,rows", [(1, 64, 24, 1, 1), (1, 61, 17, 3, 1), (3, 40, 40, 2, 1), (2, 3, 5, 1, 1),
                                              (1, 33, 16, 8, 1), (2, 0, 4, 1, 1), (0, 8, 8, 1, 1), (3, 61, 17, 3, 4),
                                              (5, 40, 24, 1, 2), (2, 64, 40, 2, 2), (0, 8, 8, 1, 4)])
def test_gemv_equals_exact_product(m, k, n, split, rows):
    """The int8 GEMV (B given as [N, K]): int32 sums equal the exact product for ragged K (not whole words, not
    whole steps), splits of K (more than steps for one shape), programs of several rows of A (rows past M
    included), and extreme bytes; its scaled epilogue rounds as the GEMM's does."""
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n + split)
    a, b = _int8(m, k, generator=g), _int8(n, k, generator=g)
    if m and k:
        a[0], b[0] = -128, -128  # the largest products
        b[-1] = 127
    config = dict(GEMV, SPLIT_K=split, ROWS=rows)
    assert torch.equal(int8_gemv_triton(a, b, config=config).cpu(), _exact(a, b.t()))
    row = torch.rand(m, generator=g).to(DEVICE) * 1e-3
    col = torch.rand(n, generator=g).to(DEVICE, torch.float16)
    bias = torch.randn(n, generator=g).to(DEVICE, torch.float16)
    y = int8_gemv_triton(a, b, row_scale=row, col_scale=col, bias=bias, out_dtype=torch.float16, config=config)
    want = (_exact(a, b.t()).to(DEVICE).float() * row[:, None] * col.float()[None, :]).to(torch.float16) + bias
    assert y.dtype == torch.float16 and torch.equal(y, want)


def test_gemv_sums_past_fp32_integers_and_reads_strided_operands():
    # 4096 products near 2**14 in four splits: sums near 2**26, whose low bits fp32 partials would lose; A a row
    # of a wider matrix, B's rows a slice (both copied into whole words)
    a = torch.full((2, 8192), -128, dtype=torch.int8, device=DEVICE)[:, ::2]
    b = torch.full((16, 4096), -128, dtype=torch.int8, device=DEVICE)
    a[0, 0], b[1, 0] = -127, -127
    c = int8_gemv_triton(a, b[:, :4095], config=dict(GEMV, BLOCK_W=64, SPLIT_K=4)).cpu()
    assert c[0, 0] == 2 ** 26 - 128 - 2 ** 14 and c[0, 1] == 2 ** 26 - 255 - 2 ** 14
    assert torch.equal(c, _exact(a[:, :4095], b[:, :4095].t()))


@given(st.integers(1, 5), st.integers(1, 64), st.integers(1, 40), st.sampled_from([1, 2, 3]),
       st.sampled_from([4, 8]), st.sampled_from([1, 2, 4]), st.integers(0, 2**31 - 1))
def test_gemv_law_sums_are_exact_and_inputs_unchanged(m, k, n, split, block_w, rows, seed):
    """For any small shape, split, step and rows a program: the GEMV's int32 sums equal the exact product, twice
    the same, and neither operand changes."""
    g = torch.Generator().manual_seed(seed)
    a, b = _int8(m, k, generator=g), _int8(n, k, generator=g)
    before = (a.clone(), b.clone())
    config = dict(GEMV, BLOCK_W=block_w, SPLIT_K=split, ROWS=rows)
    c = int8_gemv_triton(a, b, config=config)
    assert torch.equal(c.cpu(), _exact(a, b.t()))
    assert torch.equal(int8_gemv_triton(a, b, config=config), c)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_gemv_candidates_are_valid_launches():
    for m, rows in ((1, {1}), (2, {1, 2}), (3, {1, 4}), (4, {1, 4}), (5, {1})):
        configs = gemv_candidates(m)
        assert len(configs) == len({tuple(sorted(c.items())) for c in configs}) >= 40
        assert all(c["path"] == "gemv" and c["SPLIT_K"] in (1, 2, 4) for c in configs)
        assert {c.get("ROWS", 1) for c in configs} == rows, m


def test_default_splits_k_only_where_tiles_are_few():
    from aofunc.kernels.int_mm import default_config
    cuda = torch.device("cuda")
    if torch.cuda.is_available():
        assert default_config(1, cuda, 4096, 4096).get("SPLIT_K", 1) > 1  # 64 tiles of 16 x 64
        assert "SPLIT_K" not in default_config(1, cuda, 28672, 8192)  # 448 tiles
        assert "SPLIT_K" not in default_config(256, cuda, 4096, 4096)
    assert "SPLIT_K" not in default_config(1, torch.device("cpu"), 4096, 4096)  # the interpreter's tile


@pytest.mark.parametrize("m,k,n,split", [(20, 64, 24, 1), (33, 48, 17, 1), (5, 32, 40, 1), (20, 160, 24, 3),
                                         (33, 48, 17, 2)])
def test_descriptor_path_equals_exact_product(m, k, n, split):
    """The tensor-descriptor kernel (zero-filled ragged tiles) on the weight layout, with and without scales, K
    whole or split among programs (5 steps in 3 splits, the last of one step; 2 in 2, the second ragged)."""
    g = torch.Generator().manual_seed(m + k + n)
    a, w = _int8(m, k, generator=g), _int8(n, k, generator=g)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 3,
              "TMA": True, "SPLIT_K": split}
    assert tma_compatible(a, w.t())
    assert torch.equal(int8_matmul_triton(a, w.t(), config=config).cpu(), _exact(a, w.t()))
    row = torch.rand(m, generator=g).to(DEVICE) * 1e-3
    col = torch.rand(n, generator=g).to(DEVICE, torch.float16)
    y = int8_matmul_triton(a, w.t(), row_scale=row, col_scale=col, out_dtype=torch.float16, config=config)
    assert torch.equal(y, (int_mm_ref(a, w.t()).float() * row[:, None] * col.float()[None, :]).to(torch.float16))


def test_tma_configurations_run_the_generic_kernel_before_hopper(monkeypatch):
    from aofunc.kernels import tiles
    from aofunc.kernels.int_mm import has_tma
    cuda = torch.device("cuda")
    monkeypatch.setattr(tiles, "capability", lambda device: (8, 0) if device.type == "cuda" else (0, 0))
    assert not has_tma(cuda) and has_tma(torch.device("cpu"))
    monkeypatch.setattr(tiles, "capability", lambda device: (9, 0) if device.type == "cuda" else (0, 0))
    assert has_tma(cuda)
    if ON_GPU:  # an A100-class card as the H200 sees it: the TMA tile runs as pointer loads, exactly
        monkeypatch.setattr(tiles, "capability", lambda device: (8, 0) if device.type == "cuda" else (0, 0))
        a, w = _int8(300, 256), _int8(200, 256)
        config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
                  "TMA": True}
        assert torch.equal(int8_matmul_triton(a, w.t(), config=config).cpu(), _exact(a, w.t()))


def test_cublas_constraints():
    a, b = torch.empty(17, 16, dtype=torch.int8), torch.empty(16, 8, dtype=torch.int8)
    assert cublas_int_mm_is_exact(a, b)
    assert not cublas_int_mm_is_exact(a[:16], b)  # M must exceed 16
    assert not cublas_int_mm_is_exact(torch.empty(17, 12, dtype=torch.int8), torch.empty(12, 8, dtype=torch.int8))
    assert not cublas_int_mm_is_exact(a, torch.empty(16, 12, dtype=torch.int8))  # N must be a multiple of 8
    assert not cublas_int_mm_is_exact(a, torch.empty(8, 16, dtype=torch.int8).t())  # transposed b
    assert not cublas_int_mm_is_exact(torch.empty(16, 17, dtype=torch.int8).t(), b)  # transposed a


@pytest.mark.parametrize("a,b,match", [
    (torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int8), "a must be int8"),
    (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int32), "b must be int8"),
    (torch.zeros(2, 3, 1, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), "a must be 2-D"),
    (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8), r"a.shape\[1\] must equal"),
])
def test_bad_input_is_refused(a, b, match):
    for fn in (int_mm, int_mm_ref, int_mm_triton):
        with pytest.raises((TypeError, ValueError), match=match):
            fn(a, b)


def test_op_registration():
    a, b = torch.randint(-128, 128, (5, 8), dtype=torch.int8), torch.randint(-128, 128, (8, 3), dtype=torch.int8)
    torch.library.opcheck(torch.ops.aofunc.int_mm.default, (a, b))
    with torch._subclasses.FakeTensorMode():
        out = int_mm(torch.empty(5, 8, dtype=torch.int8), torch.empty(8, 3, dtype=torch.int8))
        assert out.shape == (5, 3) and out.dtype == torch.int32


@gpu_only
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 14336, 4096), (17, 4096, 14336), (2048, 4096, 4096),
                                   (2048, 14336, 4096), (100, 4100, 1000)])
def test_real_sizes_on_gpu(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a, b = _int8(m, k, generator=g), _int8(n, k, generator=g)
    want = int_mm_ref(a, b.t())
    assert torch.equal(int_mm_triton(a, b.t()), want)  # weight layout: b is [N, K] transposed
    assert torch.equal(int_mm(a, b.t()), want)
    assert torch.equal(int_mm(a, b.t().contiguous()), want)  # torch._int_mm where it is exact


@pytest.mark.parametrize("n", [1, 16, 17])
def test_int_mm_is_exact_on_cpu_for_a_single_column_of_k(n):
    a = torch.randint(-128, 128, (5, 1), dtype=torch.int8)
    b = torch.randint(-128, 128, (1, n), dtype=torch.int8)
    assert torch.equal(int_mm(a, b), (a.long() @ b.long()).to(torch.int32))


def test_programmatic_dependent_launch_only_on_compute_capability_9_and_up(monkeypatch):
    from aofunc.kernels import tiles

    assert tiles.pdl_options(torch.device("cpu")) == {}
    if ON_GPU:
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        assert tiles.pdl_options(torch.device("cuda")) == ({"PDL": True, "launch_pdl": True} if hopper else {})
    cuda = torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for card, launched in (((8, 0), {}), ((9, 0), {"PDL": True, "launch_pdl": True})):
        monkeypatch.setattr(tiles, "capability", lambda device, card=card: card)
        assert tiles.pdl_options(cuda) == launched
        # a configuration's PDL=False launches plainly; the knob is taken out of the configuration, nothing else
        config = {"PDL": False, "BLOCK_N": 64}
        assert tiles.pdl_options(cuda, config) == {} and config == {"BLOCK_N": 64}
        config = {"BLOCK_N": 64}
        assert tiles.pdl_options(cuda, config) == launched and config == {"BLOCK_N": 64}
