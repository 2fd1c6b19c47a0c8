"""W4A16 kernels equal their fp32 twin (Triton's interpreter on CPU, the real kernels on a GPU)."""
import pytest
import torch
import triton
import triton.language as tl

from aofunc.kernels import autotune, tiles, triton_compat, w4a16
from aofunc.kernels.packing import unpack_uint4
from aofunc.kernels.w4a16 import w4a16_dequantize, w4a16_dequantize_ref, w4a16_linear, w4a16_linear_ref

from tests.kernels.devices import DEVICE, gpu_only


def weight(n, k, g, dtype=torch.float32, device=DEVICE, grid="float"):
    """Random codes, scales and zeros of one grid: float zeros, uint8 zero points ("int") or none stored."""
    kp = -(-k // g) * g
    q = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, device=device)
    scale = (torch.rand(n, kp // g, device=device) * 0.1 + 0.01).to(dtype)
    if grid == "int":
        return q, scale, torch.randint(0, 16, (n, kp // g), dtype=torch.uint8, device=device)
    if grid == "none":
        return q, scale, None
    return q, scale, (torch.randn(n, kp // g, device=device) * 0.1).to(dtype)


def run_all_paths(m, n, k, g, x_dtype, w_dtype, bias, strided, grid="float"):
    q, scale, zero = weight(n, k, g, w_dtype, grid=grid)
    x = torch.randn(m, 2 * k if strided else k, device=DEVICE, dtype=x_dtype)
    x = x[:, ::2] if strided else x
    b = torch.randn(n, device=DEVICE, dtype=x_dtype) if bias else None
    inputs = [t.clone() for t in (x, q, scale, zero) if t is not None]
    want = w4a16_linear_ref(x, q, scale, zero, g, b)
    configs = [w4a16.default_config(m, n, k, g, x_dtype, x.device), dict(path="dequant"),
               dict(path="gemv", BLOCK_N=8, GROUPS=2, SPLIT_K=3, PREFETCH=True, num_warps=2, num_stages=1),
               dict(path="gemv", BLOCK_N=8, GROUPS=2, SPLIT_K=2, PREFETCH=False, REDUCE_W=True, num_warps=2,
                    num_stages=1),
               dict(path="gemv", BLOCK_N=8, GROUPS=2, SPLIT_K=2, PREFETCH=True, REDUCE_W=True, COARSE=True,
                    num_warps=2, num_stages=1),
               dict(path="gemv", BLOCK_N=8, GROUPS=1, SPLIT_K=1, PREFETCH=False, COARSE=True, XVEC=True, num_warps=2,
                    num_stages=1),
               dict(path="gemv", BLOCK_N=8, GROUPS=1, SPLIT_K=2, PREFETCH=False, REDUCE_W=True, COARSE=True,
                    LOOP_STAGES=3, num_warps=2, num_stages=1),
               dict(path="gemv", BLOCK_N=8, GROUPS=2, SPLIT_K=2, PREFETCH=False, COARSE=True, XVEC=True,
                    LOOP_STAGES=3, num_warps=1, num_stages=1),
               # two rows of x a program (a second row past M is not stored): fine units and strided x, then coarse
               dict(path="gemv", BLOCK_N=8, GROUPS=2, SPLIT_K=2, PREFETCH=True, TWO_ROWS=True, num_warps=2,
                    num_stages=1),
               dict(path="gemv", BLOCK_N=8, GROUPS=1, SPLIT_K=1, REDUCE_W=True, COARSE=True, XVEC=True, TWO_ROWS=True,
                    num_warps=2, num_stages=1),
               dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, num_warps=2, num_stages=1),
               dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=1, SWAP=False, num_warps=2, num_stages=1)]
    configs += [dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=split, SWAP=swap, FULL_DQ=True, M_FAST=m_fast,
                     num_warps=2, num_stages=1) for swap, split, m_fast in ((True, 2, True), (False, 1, False))]
    configs += [dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=split, SWAP=swap, GATHER_X=True, PREFETCH=prefetch,
                     num_warps=2, num_stages=1) for swap, split, prefetch in ((True, 2, True), (False, 1, False))]
    configs += [dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=3, SWAP=True, FULL_DQ=True, PREFETCH=True,
                     num_warps=2, num_stages=1)]
    # the centered tile (code - 8, then scales and zeros per group), both orientations, scales a step ahead
    configs += [dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=split, SWAP=swap, GATHER_X=True, CENTERED=True,
                     PREFETCH=prefetch, num_warps=2, num_stages=1)
                for swap, split, prefetch in ((True, 2, True), (False, 1, False))]
    if g >= w4a16.SPLIT_X_MIN_GROUP:
        configs += [dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=3, SWAP=swap, SPLIT_X=True, FULL_DQ=full,
                         num_warps=2, num_stages=1) for swap in (False, True) for full in (False, True)]
    for config in configs:
        if config["path"] == "gemv" and m > 3:
            continue  # one program per row of x: slow under the interpreter and not a path used for large M
        y = w4a16.w4a16_linear_triton(x, q, scale, zero, g, b, config=config)
        assert y.dtype == x_dtype and y.shape == (m, n)
        err = autotune.relative_error(y, want)
        assert err <= w4a16.tolerance(x_dtype), (config, err)
    for before, after in zip(inputs, [t for t in (x, q, scale, zero) if t is not None]):
        assert torch.equal(before, after)  # inputs are never modified


@pytest.mark.parametrize("m,n,k,g", [(1, 17, 40, 32), (3, 33, 64, 32), (17, 31, 100, 64), (2, 8, 256, 128),
                                     (1, 9, 256, 256), (18, 20, 300, 128)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_kernels_equal_twin(m, n, k, g, x_dtype):
    run_all_paths(m, n, k, g, x_dtype, torch.float32, bias=True, strided=False)


@pytest.mark.parametrize("grid", ["int", "none"])
@pytest.mark.parametrize("m,n,k,g", [(1, 17, 40, 32), (3, 33, 64, 32), (18, 20, 300, 128)])
def test_integer_and_symmetric_grids_equal_twin(m, n, k, g, grid):
    # zero points (uint8) and no zero at all: the kernels derive the float zero themselves
    run_all_paths(m, n, k, g, torch.float16, torch.float16, bias=True, strided=False, grid=grid)


@pytest.mark.parametrize("m", [1, 3])
def test_strided_x_mixed_weight_dtype_no_bias(m):
    run_all_paths(m, 24, 96, 32, torch.float16, torch.bfloat16, bias=False, strided=True)


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter gets bf16 tl.dot wrong (triton issue 11584)")
def test_bf16_activations():
    run_all_paths(5, 40, 200, 64, torch.bfloat16, torch.bfloat16, bias=True, strided=False)


@pytest.mark.parametrize("x_dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("m,k,g,grid", [(2, 256, 128, "float"), (5, 300, 64, "int"), (16, 512, 32, "none"),
                                         (40, 1024, 256, "float"), (7, 512, 128, "int")])
def test_fragment_order_and_packed_pairs(m, k, g, grid, x_dtype):
    # The GEMM's fragment-ordered tile with x's columns gathered, in fp32 and (on CUDA, weights in x's dtype) in
    # packed 16-bit pairs, and the centered tile (code - 8, then scales and zeros per group), on each grid, also
    # with x copied into the tile's order first (PERMUTE_X); ragged K takes the masked loads, x is strided. Sizes
    # stay small on CPU, where the interpreter runs.
    n = 192 if DEVICE == "cuda" else 24
    q, scale, zero = weight(n, k, g, x_dtype, grid=grid)
    x = torch.randn(m, 2 * k, device=DEVICE, dtype=x_dtype)[:, ::2]
    b = torch.randn(n, device=DEVICE, dtype=x_dtype)
    x_before = x.clone()
    want = w4a16_linear_ref(x, q, scale, zero, g, b)
    for block_n, warps, split, form in ((64, 4, 1, "PAIRS"), (128, 8, 3, "PAIRS"), (64, 4, 2, None),
                                        (64, 4, 1, "CENTERED"), (128, 8, 3, "CENTERED")):
        for permute_x in (False, True):
            config = dict(path="gemm", BLOCK_M=16 if m <= 16 else 64, BLOCK_N=block_n, SPLIT_K=split, SWAP=True,
                          GATHER_X=True, PERMUTE_X=permute_x, num_warps=warps, num_stages=3,
                          **({form: True} if form else {}))
            y = w4a16.w4a16_linear_triton(x, q, scale, zero, g, b, config=config)
            assert autotune.relative_error(y, want) <= w4a16.tolerance(x_dtype), config
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("m", [0, 3])
def test_x_in_fragment_order_takes_fp32_and_empty_x(m):
    # PERMUTE_X GEMMs (W4A16 and W8A16) on fp32 x, strided, and on no rows at all: the twin's values, y [m, n]
    from aofunc.kernels import w8a16
    q, scale, zero = weight(24, 100, 32)
    x = torch.randn(m, 200, device=DEVICE)[:, ::2]
    config = dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, GATHER_X=True, PERMUTE_X=True,
                  num_warps=2, num_stages=1)
    for form in (dict(PAIRS=True), dict(CENTERED=True)):
        y = w4a16.w4a16_linear_triton(x, q, scale, zero, 32, None, config=dict(config, **form))
        assert y.shape == (m, 24) and autotune.relative_error(y, w4a16_linear_ref(x, q, scale, zero, 32)) <= 1e-5
    q8 = torch.randint(-128, 128, (24, 96), dtype=torch.int8, device=DEVICE)
    s8 = torch.rand(24, device=DEVICE) * 0.01
    x8 = x[:, :96]
    y = w8a16.w8a16_linear_triton(x8, q8, s8, None, config=dict(config, BLOCK_W=8))
    assert y.shape == (m, 24) and autotune.relative_error(y, w8a16.w8a16_linear_ref(x8, q8, s8)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,kp", [(3, 64, 64), (2, 40, 64), (0, 96, 128), (5, 300, 320)])
def test_x_in_fragment_order_is_the_column_map(m, k, kp, dtype):
    # PERMUTE_X's copy of x: padded with zeros to kp columns, then column c holds column fragment_order[c]
    x = torch.randn(m, 2 * k, device=DEVICE).to(dtype)[:, ::2]
    padded = torch.cat([x, x.new_zeros(m, kp - k)], dim=1)
    out = tiles.fragment_ordered_x(x, kp)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, padded[:, w4a16.fragment_order(kp).to(x.device)])


def test_group_sums_are_each_groups_sum():
    x = torch.randn(3, 300, device=DEVICE, dtype=torch.float16)
    sums = w4a16.group_sums(x, 64)
    want = torch.stack([x[:, i:i + 64].double().sum(1) for i in range(0, 300, 64)], dim=1)
    assert sums.dtype == torch.float32 and sums.shape == (3, 5)
    assert torch.allclose(sums.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("m,k,g,grid", [(2, 256, 128, "float"), (5, 300, 64, "int"), (16, 256, 32, "none")])
def test_prepacked_codes_read_x_in_its_own_order(m, k, g, grid, x_dtype):
    # codes stored in fragment order: the GATHER_X tile then holds column c's code in column c, x is not gathered;
    # the GEMV reads the same codes and gathers x instead
    n = 192 if DEVICE == "cuda" else 24
    q, scale, zero = weight(n, k, g, x_dtype, grid=grid)
    x = torch.randn(m, k, device=DEVICE, dtype=x_dtype)
    want = w4a16_linear_ref(x, q, scale, zero, g, None)
    packed = w4a16.prepack_fragments(q)
    assert packed.shape == q.shape and not torch.equal(packed, q)
    assert torch.equal(unpack_uint4(packed).sort(-1).values, unpack_uint4(q).sort(-1).values)  # the same codes
    gemv = [dict(path="gemv", BLOCK_N=16, GROUPS=2, SPLIT_K=2, REDUCE_W=True, XVEC=xvec, COARSE=True, PREPACKED=True,
                 num_warps=2, num_stages=1) for xvec in (True, False)] + [dict(path="dequant", PREPACKED=True)]
    for pairs, split in ((True, 1), (False, 2)):
        config = dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SPLIT_K=split, SWAP=True, GATHER_X=True, PAIRS=pairs,
                      PREPACKED=True, num_warps=4, num_stages=3)
        for config in [config] + (gemv if pairs else []):  # the GEMV and the dequantization read it too
            y = w4a16.launch(x, packed, scale, zero, g, None, config)
            assert autotune.relative_error(y, want) <= w4a16.tolerance(x_dtype), config
    for form in (dict(), dict(GATHER_X=True, PAIRS=True), dict(GATHER_X=True, FULL_DQ=True)):
        with pytest.raises(ValueError, match="CENTERED is a form of the GATHER_X tile"):
            w4a16.launch(x, q, scale, zero, g, None, dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, SWAP=True,
                                                          CENTERED=True, num_warps=4, num_stages=3, **form))
    with pytest.raises(ValueError, match="GATHER_X form only"):
        w4a16.launch(x, packed, scale, zero, g, None, dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SPLIT_K=1,
                                                          SWAP=True, PREPACKED=True, num_warps=4, num_stages=3))
    for form in (dict(GATHER_X=True, PREPACKED=True), dict(FULL_DQ=True)):  # x copied into fragment order twice
        with pytest.raises(ValueError, match="PERMUTE_X is a form of the GATHER_X tile"):
            w4a16.launch(x, packed, scale, zero, g, None, dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SPLIT_K=1,
                                                              SWAP=True, PERMUTE_X=True, num_warps=4, num_stages=3,
                                                              **form))


def test_fragment_tiles_smaller_than_a_tensor_core_tile_a_warp_are_refused(monkeypatch):
    # compiled for a GPU (not the interpreter), a GATHER_X tile needs a 16 x 8 MMA tile for each warp: smaller ones
    # are refused by every launcher before any work, and the tuners never offer them
    from aofunc.kernels import nf4, w8a16
    monkeypatch.setattr(tiles, "interpreting", lambda: False)
    q, scale, zero = weight(16, 64, 32, torch.float16, device="cpu")
    x = torch.randn(2, 64, dtype=torch.float16)
    small = dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=1, SWAP=True, GATHER_X=True, num_warps=4, num_stages=3)
    with pytest.raises(ValueError, match="a GATHER_X tile needs BLOCK_N \\* BLOCK_M >= 128 \\* num_warps"):
        w4a16.launch(x, q, scale, zero, 32, None, dict(small, PAIRS=True))
    with pytest.raises(ValueError, match="GATHER_X tile needs"):
        w8a16.launch(x, torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, dtype=torch.float16), None,
                     dict(small, BLOCK_W=8))
    assert tiles.fragment_tile_fits(dict(small, num_warps=2)) and tiles.fragment_tile_fits(dict(small, GATHER_X=False))
    for m in (2, 16, 64, 256):
        for pool in (w4a16.candidate_configs(m, 4096, 4096, 128, torch.bfloat16, torch.device("cpu")),
                     w8a16.candidate_configs(m, 4096, 4096, torch.bfloat16, torch.device("cpu")),
                     nf4.candidate_configs(m, 4096, 4096, 64, torch.bfloat16, torch.device("cpu"))):
            assert all(tiles.fragment_tile_fits(c) for c in pool)
            assert any(c.get("GATHER_X") for c in pool)


def test_packed_pairs_on_weights_without_zeros_run_centered(monkeypatch):
    # the launcher's choice of tile form (as on CUDA, where PAIRS applies): with no zeros stored, a configuration
    # asking for packed pairs gets the centered tile unless it says CENTERED=False, or its tile has more than 64 rows
    # of x; with zeros it keeps the pairs
    monkeypatch.setattr(w4a16, "interpreting", lambda: False)
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    scale = torch.rand(8, 2).to(torch.bfloat16)
    zero = torch.randn(8, 2).to(torch.bfloat16)

    def forms(zero, block_m=16, **config):
        f = w4a16.tile_forms(dict(GATHER_X=True, PAIRS=True, BLOCK_M=block_m, BLOCK_N=64, num_warps=4, **config), x,
                             scale, zero, 128)
        return f["PAIRS"], f["CENTERED"]

    assert forms(None) == (False, True)
    assert forms(None, block_m=64) == (False, True)
    assert forms(None, block_m=128) == (True, False)
    assert forms(None, CENTERED=False) == (True, False)
    assert forms(zero) == (True, False)
    assert forms(zero.to(torch.float16)) == (False, False)  # pairs need one 16-bit dtype: the fp32 fragment tile


def test_prepacking_twice_gives_the_codes_back():
    # the fragment order is its own inverse, and every 32 columns keep their own codes
    q = torch.randint(0, 256, (3, 5, 96), dtype=torch.uint8)
    packed = w4a16.prepack_fragments(q)
    assert torch.equal(w4a16.prepack_fragments(packed), q)
    codes, moved = unpack_uint4(q), unpack_uint4(packed)
    for b in range(0, 192, 32):
        assert torch.equal(codes[..., b:b + 32].sort(-1).values, moved[..., b:b + 32].sort(-1).values)


@triton.jit
def _store_fragment_columns(out_ptr, COLUMNS: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, COLUMNS), tiles.fragment_columns(COLUMNS))


def test_fragment_order_is_the_kernels_column_map():
    # the host's permutation and the kernel's fragment_columns are one map: a bit permutation within 32 columns
    order = w4a16.fragment_order(256)
    assert sorted(order.tolist()) == list(range(256))
    assert all(set(order[b:b + 32].tolist()) == set(range(b, b + 32)) for b in range(0, 256, 32))
    triton_compat.load()

    out = torch.empty(256, dtype=torch.int32, device=DEVICE)
    _store_fragment_columns[(1,)](out, COLUMNS=256)
    assert torch.equal(out.cpu().long(), order)


def test_split_k_repeats_exactly():
    q, scale, zero = weight(16, 256, 32)
    x = torch.randn(2, 256, device=DEVICE)
    for config in (dict(path="gemv", BLOCK_N=8, GROUPS=1, SPLIT_K=4, PREFETCH=False, num_warps=2, num_stages=1),
                   dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=4, SWAP=True, FULL_DQ=True, num_warps=2,
                        num_stages=1)):
        first = w4a16.w4a16_linear_triton(x, q, scale, zero, 32, None, config=config)
        second = w4a16.w4a16_linear_triton(x, q, scale, zero, 32, None, config=config)
        assert torch.equal(first, second), config


@pytest.mark.parametrize("grid", ["float", "int", "none"])
def test_dequantize_equals_twin(grid):
    q, scale, zero = weight(9, 70, 32, grid=grid)
    for dtype in (torch.float32, torch.float16):
        # (q - 8) * scale + zero: a fused multiply-add on the GPU may round the last bit differently
        torch.testing.assert_close(w4a16_dequantize(q, scale, zero, 32, 70, dtype),
                                   w4a16_dequantize_ref(q, scale, zero, 32, 70, dtype))
        # codes in fragment order come out in column order all the same
        torch.testing.assert_close(w4a16_dequantize(w4a16.prepack_fragments(q), scale, zero, 32, 70, dtype,
                                                    prepacked=True),
                                   w4a16_dequantize_ref(q, scale, zero, 32, 70, dtype))


def test_twin_follows_the_format_math():
    # one row, one group of 32: codes 0..15 then 15..0; w = (code - 8) * scale + zero
    codes = torch.cat([torch.arange(16), torch.arange(15, -1, -1)]).to(torch.uint8)
    q = (codes[0::2] << 4 | codes[1::2]).reshape(1, 16)
    scale, zero = torch.tensor([[0.5]]), torch.tensor([[2.0]])
    w = w4a16_dequantize_ref(q, scale, zero, 32, 30, torch.float32)
    assert torch.equal(w[0], ((codes[:30].float() - 8) * 0.5 + 2.0))
    x = torch.zeros(1, 30)
    x[0, 3] = 1.0
    assert w4a16_linear_ref(x, q, scale, zero, 32, torch.tensor([1.0])).item() == (3 - 8) * 0.5 + 2.0 + 1.0


def test_custom_op_and_fake():
    q, scale, zero = weight(8, 64, 32, device="cpu")
    x = torch.randn(3, 64)
    assert torch.equal(w4a16_linear(x, q, scale, zero, 32, None), w4a16_linear_ref(x, q, scale, zero, 32, None))
    torch.library.opcheck(torch.ops.aofunc.w4a16_linear.default, (x, q, scale, zero, 32, None))


@pytest.mark.parametrize("bad,match", [
    (dict(group_size=48), "group_size"),
    (dict(x=torch.randn(2, 3, 64)), "x must be a 2-D"),
    (dict(qdata=torch.zeros(8, 16, dtype=torch.uint8)), "qdata must be uint8"),
    (dict(scale=torch.ones(8, 3)), "scale must be"),
    (dict(zero=torch.ones(8, 2, dtype=torch.int32)), "zero must be"),
    (dict(bias=torch.ones(7)), "bias must be"),
])
def test_bad_input_names_the_argument(bad, match):
    q, scale, zero = weight(8, 64, 32, device="cpu")
    args = dict(x=torch.randn(2, 64), qdata=q, scale=scale, zero=zero, group_size=32, bias=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        w4a16.w4a16_linear_triton(**args)
    with pytest.raises(ValueError, match=match):
        w4a16_linear_ref(**args)


@triton.jit
def _code_units_kernel(q_ptr, out_ptr, one_bits, COARSE: tl.constexpr):
    # out[j, i] = the fp32 unit of code j of word i, through the helper the GEMV uses
    offs = tl.arange(0, 256)
    q = tl.load(q_ptr + offs)
    for j in tl.static_range(8):
        if COARSE:
            u = w4a16.coarse_unit(q, j, one_bits)
        else:
            u = w4a16.unit_plus_code(q, j, one_bits)
        tl.store(out_ptr + j * 256 + offs, u)


@pytest.mark.parametrize("coarse", [False, True])
def test_code_units_are_exact(coarse):
    # every code of random words (and all-zero / all-ones words) decodes to 1 + code * step exactly
    words = torch.randint(-2**31, 2**31 - 1, (256,), dtype=torch.int64)
    words[:2] = torch.tensor([0, -1])
    q = words.to(torch.int32).to(DEVICE)
    out = torch.empty(8, 256, dtype=torch.float32, device=DEVICE)
    triton_compat.load()  # this test's own kernel calls aofunc's helpers: they must be the compiled ones
    _code_units_kernel[(1,)](q, out, w4a16.ONE_BITS.value, COARSE=coarse)
    codes = unpack_uint4(q.view(torch.uint8).view(256, 4)).view(256, 8).T.double().cpu()  # [8, 256]
    if coarse:
        step = torch.tensor([2.0**-11, 2.0**-7] * 4, dtype=torch.float64)[:, None]
    else:
        step = torch.full((8, 1), 1 / 16, dtype=torch.float64)
    assert torch.equal(out.double().cpu(), 1 + codes * step)


def expert_stack(experts, n, k, g, dtype, grid):
    parts = [weight(n, k, g, dtype, grid=grid) for _ in range(experts)]
    q, scale = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return q, scale, None if grid == "none" else torch.stack([p[2] for p in parts])


@pytest.mark.parametrize("grid", ["float", "int", "none"])
@pytest.mark.parametrize("counts,tail", [([0, 5, 17], 3), ([16, 0, 1, 20], 0), ([0, 0, 0], 4), ([1, 0, 2, 0], 1)])
def test_grouped_kernel_equals_twin(counts, tail, grid):
    # rows sorted by expert, per-expert counts from 0 up (tiles straddle no expert), rows past the last end zero
    x_dtype = torch.float16
    n, k, g = 24, 100, 32  # 24 rows of w: a whole and a part 16-row tile, part of a 32-row one
    q, scale, zero = expert_stack(len(counts), n, k, g, x_dtype, grid)
    x = torch.randn(sum(counts) + tail, k, device=DEVICE, dtype=x_dtype)
    offs = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    want = w4a16.w4a16_grouped_linear_ref(x, q, scale, zero, offs, g)
    assert torch.equal(want[sum(counts):], torch.zeros_like(want[sum(counts):]))
    for config in (None, dict(BLOCK_M=16, BLOCK_N=16, SWAP=True, GATHER_X=True, PAIRS=True, num_warps=2,
                              num_stages=1),
                   dict(BLOCK_M=16, BLOCK_N=32, SWAP=True, FULL_DQ=True, PREFETCH=True, num_warps=2, num_stages=1),
                   dict(BLOCK_M=16, BLOCK_N=16, SWAP=False, num_warps=2, num_stages=1),
                   # K split three ways over four groups: the last split has no step and adds zeros
                   dict(BLOCK_M=16, BLOCK_N=16, SPLIT_K=3, SWAP=True, GATHER_X=True, PAIRS=True, num_warps=2,
                        num_stages=1),
                   # a GEMV program per row through its expert (the default up to a row an expert)
                   dict(path="gemv", BLOCK_N=16, GROUPS=2, SPLIT_K=2, REDUCE_W=True, XVEC=True, COARSE=True,
                        num_warps=2, num_stages=1),
                   dict(path="gemv", BLOCK_N=32, GROUPS=1, SPLIT_K=1, num_warps=1, num_stages=1)):
        y = w4a16.w4a16_grouped_linear_triton(x, q, scale, zero, offs, g, config=config)
        assert y.shape == want.shape and y.dtype == x_dtype
        assert autotune.relative_error(y, want) <= w4a16.tolerance(x_dtype), config
        assert torch.equal(y[sum(counts):], want[sum(counts):])


@gpu_only
@pytest.mark.parametrize("m", [2, 3])
def test_two_rows_a_program_at_a_real_size(m):
    # the decode default's tiles with two rows of x a program, compiled for the card (the interpreter runs the rest)
    q, scale, zero = weight(14336, 4096, 128, torch.bfloat16)
    x = torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16)
    config = dict(w4a16.gemv_config(m, 14336, 4096, 128, x.device), TWO_ROWS=True)
    y = w4a16.w4a16_linear_triton(x, q, scale, zero, 128, config=config)
    assert autotune.relative_error(y, w4a16_linear_ref(x, q, scale, zero, 128)) <= w4a16.tolerance(torch.bfloat16)


def test_two_rows_a_program_are_refused_for_a_stack_of_experts():
    # the rows of a program would belong to different experts
    q, scale, zero = expert_stack(2, 16, 64, 32, torch.float16, "float")
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.float16)
    offs = torch.tensor([2, 4], device=DEVICE, dtype=torch.int32)
    with pytest.raises(ValueError, match="TWO_ROWS"):
        w4a16.w4a16_grouped_linear_triton(x, q, scale, zero, offs, 32, config=dict(
            path="gemv", BLOCK_N=16, GROUPS=1, SPLIT_K=1, TWO_ROWS=True, num_warps=2, num_stages=1))


def test_grouped_kernel_clamps_malformed_offsets():
    # offsets past the rows of x, or falling back: no read or write outside x and y, every row a defined value
    q, scale, zero = expert_stack(3, 24, 64, 32, torch.float16, "float")
    x = torch.randn(10, 64, device=DEVICE, dtype=torch.float16)
    offs = torch.tensor([6, 2, 50], device=DEVICE, dtype=torch.int32)
    y = w4a16.w4a16_grouped_linear_triton(x, q, scale, zero, offs, 32)
    clamped = torch.tensor([6, 6, 10], device=DEVICE, dtype=torch.int32)
    assert autotune.relative_error(y, w4a16.w4a16_grouped_linear_ref(x, q, scale, zero, clamped, 32)) <= 2e-3


@pytest.mark.parametrize("bad,match", [
    (dict(offs=torch.tensor([1, 2], dtype=torch.int32)), "offs must be"),
    (dict(offs=torch.tensor([1.0, 2.0, 3.0])), "offs must be"),
    (dict(qdata=torch.zeros(8, 32, dtype=torch.uint8)), "qdata must be a stack"),
    (dict(scale=torch.ones(2, 8, 2)), "scale must be"),
])
def test_grouped_bad_input_names_the_argument(bad, match):
    q, scale, zero = expert_stack(3, 8, 64, 32, torch.float32, "float")
    args = dict(x=torch.randn(4, 64), qdata=q.cpu(), scale=scale.cpu(), zero=zero.cpu(),
                offs=torch.tensor([1, 2, 4], dtype=torch.int32), group_size=32)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        w4a16.w4a16_grouped_linear_ref(**args)
