"""W8A16 kernels equal their fp32 twin (Triton's interpreter on CPU, the real kernels on a GPU)."""
import pytest
import torch

from aofunc.kernels import autotune, w8a16
from aofunc.kernels.w8a16 import w8a16_linear, w8a16_linear_ref

from tests.kernels.devices import DEVICE, gpu_only


def weight(n, k, dtype=torch.float32, device=DEVICE):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    return q, (torch.rand(n, device=device) * 0.01 + 1e-3).to(dtype)


def run_all_paths(m, n, k, x_dtype, w_dtype, bias, strided):
    q, scale = weight(n, k, w_dtype)
    x = torch.randn(m, 2 * k if strided else k, device=DEVICE, dtype=x_dtype)
    x = x[:, ::2] if strided else x
    b = torch.randn(n, device=DEVICE, dtype=x_dtype) if bias else None
    inputs = [t.clone() for t in (x, q, scale)]
    want = w8a16_linear_ref(x, q, scale, b)
    configs = [w8a16.default_config(m, n, k, x_dtype, x.device), dict(path="dequant"),
               dict(path="gemv", BLOCK_N=8, BLOCK_W=4, SPLIT_K=3, num_warps=2, num_stages=1),
               # x as contiguous vectors split by byte position, and the software-pipelined loop
               dict(path="gemv", BLOCK_N=8, BLOCK_W=4, SPLIT_K=2, XVEC=True, num_warps=2, num_stages=1),
               dict(path="gemv", BLOCK_N=8, BLOCK_W=8, SPLIT_K=1, XVEC=True, LOOP_STAGES=3, num_warps=2,
                    num_stages=1),
               dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=4, SPLIT_K=2, SWAP=True, num_warps=2, num_stages=1),
               dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=4, SPLIT_K=1, SWAP=False, M_FAST=True, num_warps=2,
                    num_stages=1),
               dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=4, SPLIT_K=2, SWAP=True, GATHER_X=True, num_warps=2,
                    num_stages=1),
               dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=8, SPLIT_K=1, SWAP=True, GATHER_X=True, num_warps=2,
                    num_stages=1),
               # loads masked along K whatever K is, bytes by shifts and masks on CUDA too (the slower forms)
               dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=8, SPLIT_K=2, SWAP=True, GATHER_X=True, EVEN_K=False,
                    BYTE_PRMT=False, num_warps=2, num_stages=1)]
    if k % 16 == 0:  # x copied into the fragment order first, then read as it lies
        configs += [dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=block_w, SPLIT_K=split, SWAP=True,
                         GATHER_X=True, PERMUTE_X=True, M_FAST=True, num_warps=2, num_stages=1)
                    for block_w, split in ((4, 2), (8, 1))]
    for config in configs:
        if config["path"] == "gemv" and m > 3:
            continue  # one program per row of x: slow under the interpreter and not a path used for large M
        y = w8a16.w8a16_linear_triton(x, q, scale, b, config=config)
        assert y.dtype == x_dtype and y.shape == (m, n)
        err = autotune.relative_error(y, want)
        assert err <= w8a16.tolerance(x_dtype), (config, err)
    for before, after in zip(inputs, (x, q, scale)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("m,n,k", [(1, 17, 40), (3, 33, 64), (17, 31, 102), (2, 8, 256), (1, 5, 7)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_kernels_equal_twin(m, n, k, x_dtype):
    run_all_paths(m, n, k, x_dtype, torch.float32, bias=True, strided=False)


@pytest.mark.parametrize("m", [1, 3])
def test_strided_x_mixed_weight_dtype_no_bias(m):
    run_all_paths(m, 24, 96, torch.float16, torch.bfloat16, bias=False, strided=True)


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter gets bf16 tl.dot wrong (triton issue 11584)")
def test_bf16_activations_and_real_sizes():
    run_all_paths(5, 40, 200, torch.bfloat16, torch.bfloat16, bias=True, strided=False)
    for m in (1, 16, 300):
        run_all_paths(m, 4096, 4096, torch.bfloat16, torch.bfloat16, bias=True, strided=False)


def test_x_in_fragment_order_is_the_tiles_column_map():
    # PERMUTE_X's copy of x: column c holds the column byte_fragment_columns gives c (16 * (c // 16) + ...)
    c = torch.arange(64)
    order = 16 * (c // 16) + 4 * ((c // 2) % 4) + 2 * ((c // 8) % 2) + c % 2
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(3, 128, device=DEVICE).to(dtype)[:, ::2]
        assert torch.equal(w8a16.byte_fragment_ordered_x(x), x[:, order.to(x.device)])
    q, scale = weight(8, 40)
    with pytest.raises(ValueError, match="PERMUTE_X is a form of the GATHER_X tile for K a multiple of 16"):
        w8a16.launch(torch.randn(2, 40, device=DEVICE), q, scale, None,
                     dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=4, SPLIT_K=1, SWAP=True, GATHER_X=True,
                          PERMUTE_X=True, num_warps=2, num_stages=1))


@gpu_only
def test_x_in_fragment_order_at_real_sizes():
    # the PERMUTE_X tiles the H200 table ships (4 warps), at 128 and 256 rows; 8 warps are refused
    q, scale = weight(4096, 4096, torch.bfloat16)
    for m in (100, 256):
        x = torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16)
        want = w8a16_linear_ref(x, q, scale)
        for block_m, block_n in ((128, 64), (64, 64), (128, 128)):
            config = dict(path="gemm", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=32, SPLIT_K=1, SWAP=True,
                          GATHER_X=True, PERMUTE_X=True, M_FAST=True, num_warps=4, num_stages=3)
            err = autotune.relative_error(w8a16.launch(x, q, scale, None, config), want)
            assert err <= w8a16.tolerance(x.dtype), (config, err)
        with pytest.raises(ValueError, match="PERMUTE_X tile runs on at most 4 warps"):
            w8a16.launch(x, q, scale, None, dict(config, num_warps=8))


def test_twin_follows_the_format_math():
    q = torch.tensor([[1, -2, 127, -128]], dtype=torch.int8)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    y = w8a16_linear_ref(x, q, torch.tensor([0.5]), torch.tensor([1.0]))
    assert y.tolist() == [[(1 - 2 + 127 - 128) * 0.5 + 1.0], [-128 * 0.5 + 1.0]]


def test_custom_op_and_fake():
    q, scale = weight(8, 64, device="cpu")
    x = torch.randn(3, 64)
    assert torch.equal(w8a16_linear(x, q, scale, None), w8a16_linear_ref(x, q, scale, None))
    torch.library.opcheck(torch.ops.aofunc.w8a16_linear.default, (x, q, scale, None))


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(2, 63)), "qdata must be int8"),
    (dict(qdata=torch.zeros(8, 64, dtype=torch.uint8)), "qdata must be int8"),
    (dict(scale=torch.ones(7)), "scale must be"),
    (dict(bias=torch.ones(8, 1)), "bias must be"),
])
def test_bad_input_names_the_argument(bad, match):
    q, scale = weight(8, 64, device="cpu")
    args = dict(x=torch.randn(2, 64), qdata=q, scale=scale, bias=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        w8a16.w8a16_linear_triton(**args)


@pytest.mark.parametrize("counts,tail,k", [([0, 5, 17], 3, 96), ([16, 0, 1, 20], 0, 70), ([0, 0, 0], 4, 64),
                                           ([1, 0, 2, 0], 1, 70)])
def test_grouped_kernel_equals_twin(counts, tail, k):
    # rows sorted by expert, per-expert counts from 0 up, K not a multiple of 4 (padded words), rows past the last
    # end zero
    n, experts = 24, len(counts)  # a whole and a part 16-row tile, part of a 32-row one
    q = torch.randint(-128, 128, (experts, n, k), dtype=torch.int8, device=DEVICE)
    scale = (torch.rand(experts, n, device=DEVICE) * 0.01 + 1e-3).to(torch.float16)
    x = torch.randn(sum(counts) + tail, k, device=DEVICE, dtype=torch.float16)
    offs = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    want = w8a16.w8a16_grouped_linear_ref(x, q, scale, offs)
    for config in (None, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_W=4, SWAP=True, GATHER_X=True, num_warps=2, num_stages=1),
                   dict(BLOCK_M=16, BLOCK_N=32, BLOCK_W=8, SWAP=False, GATHER_X=False, num_warps=2, num_stages=1),
                   dict(BLOCK_M=16, BLOCK_N=16, BLOCK_W=4, SPLIT_K=4, SWAP=True, GATHER_X=True, num_warps=2,
                        num_stages=1),
                   # a GEMV program per row through its expert (the default up to a row an expert)
                   dict(path="gemv", BLOCK_N=16, BLOCK_W=4, SPLIT_K=3, num_warps=2, num_stages=1)):
        y = w8a16.w8a16_grouped_linear_triton(x, q, scale, offs, config=config)
        assert y.shape == want.shape and y.dtype == x.dtype
        assert autotune.relative_error(y, want) <= w8a16.tolerance(x.dtype), config
        assert torch.equal(y[sum(counts):], want[sum(counts):])


def test_grouped_bad_input_names_the_argument():
    q = torch.zeros(3, 8, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="offs must be"):
        w8a16.w8a16_grouped_linear_ref(torch.randn(4, 64), q, torch.ones(3, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="scale must be"):
        w8a16.w8a16_grouped_linear_ref(torch.randn(4, 64), q, torch.ones(8), torch.tensor([1, 2, 4]))


@gpu_only
@pytest.mark.parametrize("form", [dict(XVEC=True), dict(XVEC=True, LOOP_STAGES=3)], ids=["xvec", "xvec-pipelined"])
def test_gemv_forms_at_a_real_size(form):
    # the one-row GEMV's vector-x forms compiled for the card (the interpreter runs the rest)
    q, scale = weight(14336, 4096, torch.bfloat16)
    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.bfloat16)
    config = dict(path="gemv", BLOCK_N=32, BLOCK_W=64, SPLIT_K=2, num_warps=4, num_stages=3, **form)
    y = w8a16.w8a16_linear_triton(x, q, scale, config=config)
    assert autotune.relative_error(y, w8a16_linear_ref(x, q, scale)) <= w8a16.tolerance(torch.bfloat16)
