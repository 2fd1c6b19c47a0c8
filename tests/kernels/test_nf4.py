"""NF4 kernels equal their fp32 twin; the linear has autograd in x and bias (Triton's interpreter on CPU)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aofunc.kernels import autotune, nf4
from aofunc.kernels.nf4 import NF4_LEVELS, nf4_dequantize, nf4_dequantize_ref, nf4_linear, nf4_linear_ref
from aofunc.kernels.tiles import interpreting

from tests.kernels.devices import DEVICE, LINEAR_DTYPES


def weight(n, k, block, scaler_block, device=DEVICE):
    chunk = block * scaler_block
    padded = -(-n * k // chunk) * chunk
    q = torch.randint(0, 256, (padded // 2,), dtype=torch.uint8, device=device)
    scaler_q = torch.randint(-128, 128, (padded // block,), dtype=torch.int8, device=device)
    factor = torch.rand(padded // chunk, device=device) * 100 + 50
    return q, scaler_q, factor, torch.tensor(0.05, device=device)


@pytest.mark.parametrize("m,n,k,block,scaler_block", [(1, 17, 64, 64, 4), (3, 9, 40, 16, 4), (2, 8, 256, 64, 2),
                                                      (1, 5, 30, 8, 3), (17, 6, 32, 32, 2), (5, 19, 64, 16, 3)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_kernels_equal_twin(m, n, k, block, scaler_block, x_dtype):
    tensors = weight(n, k, block, scaler_block)
    inputs = [t.clone() for t in tensors]
    x = torch.randn(m, k, device=DEVICE, dtype=x_dtype)
    b = torch.randn(n, device=DEVICE, dtype=x_dtype)
    args = (*tensors, n, k, block, scaler_block)
    want = nf4_linear_ref(x, *args, b)
    configs = [nf4.default_config(m, n, k, block, x_dtype, x.device), dict(path="dequant")]
    if nf4.gemv_fits(k, block) and m <= 3:
        configs.append(dict(path="gemv", BLOCK_N=8, GROUPS=2, SPLIT_K=3, num_warps=2, num_stages=1))
        configs.append(dict(path="gemv", BLOCK_N=8, GROUPS=2, SPLIT_K=2, REDUCE_W=True, LOOP_STAGES=3, num_warps=2,
                            num_stages=1))
        configs.append(dict(path="gemv", BLOCK_N=8, GROUPS=4, SPLIT_K=1, REDUCE_W=False, LOOP_STAGES=3, num_warps=1,
                            num_stages=1))
    if nf4.gemm_fits(k, block):
        for swap in (False, True):
            configs.append(dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=3, SWAP=swap, M_FAST=swap, num_warps=2,
                                num_stages=1))
        # the fragment-ordered levels (blocks of 32 and up; a smaller block runs the x-ordered tile)
        configs.append(dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, GATHER_X=True, num_warps=2,
                            num_stages=1))
        # and from byte permutes (CUDA, 16-bit x; the tile above elsewhere)
        configs.append(dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=1, SWAP=True, GATHER_X=True, PAIRS=True,
                            num_warps=2, num_stages=1))
        # on x copied into the fragment order
        configs.append(dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, GATHER_X=True, PERMUTE_X=True,
                            PAIRS=True, num_warps=2, num_stages=1))
    for config in configs:
        y = nf4.nf4_linear_triton(x, *args, b, config=config)
        assert y.dtype == x_dtype and y.shape == (m, n)
        assert autotune.relative_error(y, want) <= nf4.tolerance(x_dtype), config
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(nf4.nf4_dequantize_triton(*args, dtype), nf4_dequantize_ref(*args, dtype))
    for before, after in zip(inputs, tensors):
        assert torch.equal(before, after)


@pytest.mark.parametrize("n,k,block,scaler_block", [(2, 3, 2, 1), (3, 6, 2, 3), (7, 9, 6, 2), (5, 30, 10, 3),
                                                    (4, 64, 64, 2)])
def test_dequantize_equals_twin_on_any_layout(n, k, block, scaler_block):
    # blocks that are not whole words of codes (each code then finds its own scale), codes that do not fill their
    # last word (3 and 9 bytes), and codes that start inside a word (a view at byte offset 1)
    tensors = weight(n, k, block, scaler_block)
    args = (n, k, block, scaler_block)
    for dtype in LINEAR_DTYPES:
        want = nf4_dequantize_ref(*tensors, *args, dtype)
        assert torch.equal(nf4.nf4_dequantize_triton(*tensors, *args, dtype), want)
    shifted = torch.cat([tensors[0].new_zeros(1), tensors[0]])[1:]
    assert shifted.storage_offset() == 1
    assert torch.equal(nf4.nf4_dequantize_triton(shifted, *tensors[1:], *args, torch.float16),
                       nf4_dequantize_ref(*tensors, *args, torch.float16))


def test_x_in_tile_order_without_the_fragment_tile_is_refused():
    tensors = weight(8, 64, 64, 2)
    x = torch.randn(2, 64, device=DEVICE, dtype=torch.float16)
    config = dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=1, SWAP=True, PERMUTE_X=True, num_warps=2,
                  num_stages=1)
    with pytest.raises(ValueError, match="PERMUTE_X is a form of the GATHER_X tile"):
        nf4.nf4_linear_triton(x, *tensors, 8, 64, 64, 2, None, config=config)


def run_ptx(text: str, word: int, scales: int = 0, dtype=torch.bfloat16) -> list:
    """Run the level-pairs PTX (its few instructions: mov, and, shr, mul.lo, prmt, lop3, and the packed fma of its
    scaled form, on 16-bit floats of ``dtype``) on one word and a pair of scales, in Python."""
    regs = {"$4": word, "$5": word, "$6": scales}

    def value(operand):
        return regs[operand] if operand in regs else int(operand, 0)

    def prmt(a, b, c):
        source, out = a | b << 32, 0
        for i in range(4):
            nibble = c >> 4 * i & 15
            byte = source >> 8 * (nibble & 7) & 0xFF
            if nibble & 8:  # sign mode: the byte's bit 7 replicated
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << 8 * i
        return out

    def lop3(a, b, c, lut):
        return sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))

    def halves(a):
        return torch.tensor([a & 0xFFFF, a >> 16], dtype=torch.int32).to(torch.int16).view(dtype).double()

    def fma(a, b, c):  # each half a * b + c, exact in float64, rounded once to dtype
        out = (halves(a) * halves(b) + halves(c)).to(dtype).view(torch.int16).tolist()
        return out[0] & 0xFFFF | (out[1] & 0xFFFF) << 16

    ops = {"mov.b32": lambda a: a, "and.b32": lambda a, b: a & b, "shr.u32": lambda a, b: a >> b,
           "mul.lo.u32": lambda a, b: a * b & 0xFFFFFFFF, "prmt.b32": prmt, "lop3.b32": lop3,
           "fma.rn.bf16x2": fma, "fma.rn.f16x2": fma}
    for line in text.splitlines():
        op, _, rest = line.rstrip(";").partition(" ")
        if op in ops:
            dest, *args = [a.strip() for a in rest.split(",")]
            regs[dest] = ops[op](*map(value, args))
    return [regs[f"${b}"] for b in range(4)]


@settings(max_examples=200)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_level_pairs_ptx_gives_the_rounded_levels(dtype, words):
    # pair b of a word: code 2b (byte b's high nibble) in the low half, code 2b + 1 in the high half
    text = str(getattr(nf4.LEVEL_PAIRS_BF16 if dtype == torch.bfloat16 else nf4.LEVEL_PAIRS_FP16, "value"))
    bits = torch.tensor(NF4_LEVELS).to(dtype).view(torch.int16).tolist()
    for word in words + [c * 0x11111111 for c in range(16)]:
        codes = [word >> 8 * b + 4 - 4 * j & 15 for b in range(4) for j in (0, 1)]
        want = [bits[codes[2 * b]] & 0xFFFF | (bits[codes[2 * b + 1]] & 0xFFFF) << 16 for b in range(4)]
        assert run_ptx(text, word) == want, hex(word)


@settings(max_examples=50)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=2),
       scale=st.floats(1e-4, 1.0, allow_subnormal=False))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_level_pairs_ptx_multiplies_each_rounded_level_by_the_scale_once(dtype, words, scale):
    # the wgmma path's form (kernels/wgmma.py): each 16-bit level times the 16-bit scale of its block, rounded once
    text = nf4.level_pairs_ptx(dtype, scaled=True)
    s16 = torch.tensor(scale).to(dtype)
    pair = (s16.view(torch.int16).item() & 0xFFFF) * 0x10001
    levels = torch.tensor(NF4_LEVELS).to(dtype)
    for word in words + [c * 0x11111111 for c in range(16)]:
        codes = [word >> 8 * b + 4 - 4 * j & 15 for b in range(4) for j in (0, 1)]
        want = (levels[codes].double() * s16.double()).to(dtype).view(torch.int16).tolist()
        want = [want[2 * b] & 0xFFFF | (want[2 * b + 1] & 0xFFFF) << 16 for b in range(4)]
        assert run_ptx(text, word, pair, dtype) == want, hex(word)


def test_block_scales_kernel_rounds_the_twin_s_scales_once():
    # [n, k / block] in x's dtype, blocks of rows that start on whole blocks; the padding's blocks left out
    tensors = weight(5, 128, 64, 4)
    exact = nf4.nf4_block_scales_ref(*tensors[1:], 4)[:10].view(5, 2)
    for dtype in (torch.bfloat16, torch.float16):
        got = nf4.block_scales_triton(*tensors[1:], 5, 128, 64, 4, dtype)
        assert got.dtype == dtype and got.shape == (5, 2)
        if dtype == torch.bfloat16 and interpreting():
            # Triton's interpreter casts fp32 to bf16 toward zero (a GPU rounds to nearest): within a step of bf16
            assert torch.equal(got, exact.to(dtype)) or float(((got.float() - exact) / exact).abs().max()) < 2**-7
        else:
            assert torch.equal(got, exact.to(dtype))


def test_twin_follows_the_format_math():
    # two blocks of 2 (block_size=2, scaler_block_size=2): s = q / f + mean
    codes = torch.tensor([0, 15, 7, 9], dtype=torch.uint8)
    q = codes[0::2] << 4 | codes[1::2]
    scaler_q, factor, mean = torch.tensor([4, -2], dtype=torch.int8), torch.tensor([2.0]), torch.tensor(0.5)
    w = nf4_dequantize_ref(q, scaler_q, factor, mean, 2, 2, 2, 2, torch.float32)
    s = [4 / 2 + 0.5, -2 / 2 + 0.5]
    assert w.tolist() == [[NF4_LEVELS[0] * s[0], NF4_LEVELS[15] * s[0]], [NF4_LEVELS[7] * s[1], NF4_LEVELS[9] * s[1]]]


def test_autograd_in_x_and_bias():
    tensors = weight(8, 64, 64, 2, device="cpu")
    args = (*tensors, 8, 64, 64, 2)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    grad_y = torch.randn(3, 8)
    nf4_linear(x, *args, b).backward(grad_y)
    w = nf4_dequantize_ref(*args, torch.float32)
    torch.testing.assert_close(x.grad, grad_y @ w)
    torch.testing.assert_close(b.grad, grad_y.sum(0))
    torch.library.opcheck(torch.ops.aofunc.nf4_linear.default, (x.detach(), *args, b.detach()))
    torch.library.opcheck(torch.ops.aofunc.nf4_dequantize.default, (*args, torch.float16))
    assert torch.equal(nf4_dequantize(*args, torch.float32), w)


@pytest.mark.skipif(DEVICE == "cpu", reason="real sizes and bf16 run on the GPU only")
def test_real_sizes_bf16():
    tensors = weight(4096, 4096, 64, 256)
    args = (*tensors, 4096, 4096, 64, 256)
    for m in (1, 2, 5, 16, 64):
        x = torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        y = nf4_linear(x, *args, None)
        assert autotune.relative_error(y, nf4_linear_ref(x, *args, None)) <= nf4.tolerance(torch.bfloat16)
        y.float().sum().backward()
        w = nf4_dequantize_ref(*args, torch.float32)
        assert autotune.relative_error(x.grad, (torch.ones(m, 4096, device=DEVICE) @ w).to(x.dtype)) <= 1e-2


@pytest.mark.skipif(DEVICE == "cpu", reason="the byte-permute levels run on CUDA only")
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [5, 16, 64])
def test_level_pairs_tile_sums_like_the_shuffled_levels(m, x_dtype):
    # the same levels in the same order: the same sums, bit for bit
    tensors = weight(512, 1024, 64, 256)
    args = (*tensors, 512, 1024, 64, 256)
    x = torch.randn(m, 1024, device=DEVICE, dtype=x_dtype)
    tile = dict(path="gemm", BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, SPLIT_K=2, SWAP=True, GATHER_X=True,
                num_warps=4, num_stages=3)
    y = nf4.nf4_linear_triton(x, *args, None, config=dict(tile, PAIRS=True))
    assert torch.equal(y, nf4.nf4_linear_triton(x, *args, None, config=tile))
    assert torch.equal(y, nf4.nf4_linear_triton(x, *args, None, config=dict(tile, PAIRS=True, PERMUTE_X=True)))
    assert autotune.relative_error(y, nf4_linear_ref(x, *args, None)) <= nf4.tolerance(x_dtype)


@pytest.mark.parametrize("bad,match", [
    (dict(qdata=torch.zeros(3, dtype=torch.uint8)), "qdata must be"),
    (dict(scaler_q=torch.zeros(4, dtype=torch.float32)), "scaler_q must be"),
    (dict(scaler_factor=torch.ones(2)), "scaler_factor must be"),
    (dict(scaler_mean=torch.ones(1)), "scaler_mean must be"),
    (dict(block_size=3), "block_size must be even"),
])
def test_bad_input_names_the_argument(bad, match):
    q, scaler_q, factor, mean = weight(8, 64, 64, 2, device="cpu")
    args = dict(qdata=q, scaler_q=scaler_q, scaler_factor=factor, scaler_mean=mean, n=8, k=64, block_size=64,
                scaler_block_size=2, dtype=torch.float32)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        nf4_dequantize_ref(**args)
