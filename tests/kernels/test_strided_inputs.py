"""Every kernel path gives the same y whatever strides its inputs are held in.

The kernels index a weight's scale, zero and bias tensors with the row strides they are given; any other layout (a
column-major scale, a bias that is every other element of a larger tensor) must be made contiguous before the launch,
never read as if it were. Each case runs one configuration on the contiguous tensors and on views of the same values
held in other strides, and asks for the same bits.
"""
import pytest
import torch

from aofunc.kernels import int8_int4, nf4, w4a16, w8a8, w8a16
from tests.kernels.devices import DEVICE, ON_GPU

N, K = 40, 128
ROWS = (1, 5, 300)
# W8A8 and 8da4w take the configuration of 5 and of 200 rows at 300 rows under the interpreter: 300 runs on GPUs only
INT8_ROWS = (1, 5, 300) if ON_GPU else (1, 5)


def _strided(t):
    """t's values in a view with other strides: its last two dimensions transposed in memory, or every other element
    of a buffer for 1-D."""
    if t is None or t.dim() == 0:
        return t
    if t.dim() == 1:
        out = torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2]
    else:
        out = torch.empty(*t.shape[:-2], t.shape[-1], t.shape[-2], dtype=t.dtype, device=t.device).transpose(-1, -2)
    return out.copy_(t)


def _same_for_strided(run, tensors):
    """run(*tensors) with the contiguous tensors, then with each one strided in turn: the same y each time."""
    want = run(*tensors)
    for i in range(len(tensors)):
        changed = list(tensors)
        changed[i] = _strided(changed[i])
        assert torch.equal(run(*changed), want), i


def _x(m, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, K, generator=g) * 2).to(DEVICE, torch.bfloat16)


def _floats(*shape, seed, low=1e-3, span=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) * span + low).to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("zero", ["none", "float", "uint8"])
def test_w4a16(m, zero):
    g = torch.Generator().manual_seed(m)
    qdata = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g).to(DEVICE)
    scale = _floats(N, K // 64, seed=1)
    z = {"none": None, "float": _floats(N, K // 64, seed=2, low=-0.1, span=0.2),
         "uint8": torch.randint(0, 16, (N, K // 64), dtype=torch.uint8, generator=g).to(DEVICE)}[zero]
    config = w4a16.default_config(m, N, K, 64, torch.bfloat16, torch.device(DEVICE))
    _same_for_strided(lambda x, q, s, z_, b: w4a16.w4a16_linear_triton(x, q, s, z_, 64, b, config=config),
                      (_x(m, 3), qdata, scale, z, _floats(N, seed=4, low=-1, span=2)))


@pytest.mark.parametrize("m", ROWS)
def test_w8a16(m):
    g = torch.Generator().manual_seed(m)
    qdata = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g).to(DEVICE)
    config = w8a16.default_config(m, N, K, torch.bfloat16, torch.device(DEVICE))
    _same_for_strided(lambda x, q, s, b: w8a16.w8a16_linear_triton(x, q, s, b, config=config),
                      (_x(m, 5), qdata, _floats(N, seed=6), _floats(N, seed=7, low=-1, span=2)))


@pytest.mark.parametrize("m", ROWS)
def test_nf4(m):
    block, scaler_block = 64, 2
    g = torch.Generator().manual_seed(m)
    qdata = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g).to(DEVICE)
    scaler_q = torch.randint(-128, 128, (N * K // block,), dtype=torch.int8, generator=g).to(DEVICE)
    factor = (torch.rand(N * K // (block * scaler_block), generator=g) * 100 + 50).to(DEVICE)
    mean = torch.tensor(0.05, device=DEVICE)
    config = nf4.default_config(m, N, K, block, torch.bfloat16, torch.device(DEVICE))
    _same_for_strided(lambda x, q, sq, f, b: nf4.nf4_linear_triton(x, q, sq, f, mean, N, K, block, scaler_block, b,
                                                                   config=config),
                      (_x(m, 8), qdata, scaler_q, factor, _floats(N, seed=9, low=-1, span=2)))


@pytest.mark.parametrize("m", INT8_ROWS)
def test_w8a8(m):
    g = torch.Generator().manual_seed(m)
    qdata = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).to(DEVICE)
    config = w8a8.default_config(m, torch.device(DEVICE), N, K, torch.bfloat16)
    _same_for_strided(lambda x, q, s, b, a: w8a8.w8a8_linear_triton(x, q, s, b, a, config),
                      (_x(m, 10), qdata, _floats(N, seed=11), _floats(N, seed=12, low=-1, span=2),
                       _floats(K, seed=13, low=0.5, span=1)))


@pytest.mark.parametrize("m", INT8_ROWS + (100, 200))
def test_8da4w(m):
    g = torch.Generator().manual_seed(m)
    qdata = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g).to(DEVICE)
    config = int8_int4.default_config(m, N, K, 64, torch.bfloat16, torch.bfloat16, torch.device(DEVICE))
    _same_for_strided(lambda x, q, s, b: int8_int4.int8_int4_linear_triton(x, q, s, 64, b, config),
                      (_x(m, 14), qdata, _floats(N, K // 64, seed=15), _floats(N, seed=16, low=-1, span=2)))


@pytest.mark.parametrize("fmt", ["w4a16", "w8a16"])
@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_stacked_experts(fmt, path):
    experts = 3
    g = torch.Generator().manual_seed(len(fmt) + len(path))
    x = _x(8, 17)
    offs = torch.tensor([3, 3, 8], dtype=torch.int32, device=DEVICE)
    config = (dict(path="gemv", **{k: v for k, v in w4a16.gemv_config(1, N, K, 64, torch.device(DEVICE)).items()
                                   if k != "path"})
              if path == "gemv" and fmt == "w4a16" else None)
    if fmt == "w4a16":
        qdata = torch.randint(0, 256, (experts, N, K // 2), dtype=torch.uint8, generator=g).to(DEVICE)
        config = config or w4a16.grouped_config(8, experts, N, K, 64, torch.device(DEVICE))
        _same_for_strided(lambda x_, q, s, o: w4a16.w4a16_grouped_linear_triton(x_, q, s, None, o, 64, config=config),
                          (x, qdata, _floats(experts, N, K // 64, seed=18), offs))
    else:
        qdata = torch.randint(-128, 128, (experts, N, K), dtype=torch.int8, generator=g).to(DEVICE)
        if path == "gemv":
            config = dict(path="gemv", **{k: v for k, v in w8a16.gemv_config(1, N, K, torch.device(DEVICE)).items()
                                          if k != "path"})
        config = config or w8a16.grouped_config(8, experts, N, K, torch.device(DEVICE))
        _same_for_strided(lambda x_, q, s, o: w8a16.w8a16_grouped_linear_triton(x_, q, s, o, config=config),
                          (x, qdata, _floats(experts, N, seed=19), offs))
