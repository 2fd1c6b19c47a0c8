"""Programmatic dependent launches (compute capability 9.0 and up): a kernel so launched may start before the kernel
ahead of it on the stream has ended, and must read nothing until it has waited for it.

On a Hopper GPU, every path that launches so is captured into a CUDA graph right after a copy that rewrites x, and
each replay must give the bits of a plain launch on the new x (a kernel that read x before its wait would see the
old one). The configuration's ``PDL=False`` is the plain launch. Off Hopper there is nothing to test here: the
launch options are empty (tests/kernels/test_int_mm.py checks that).
"""
import pytest
import torch

from aofunc.kernels import int8_int4, nf4, tiles, w4a16, w8a8, w8a16

ON_HOPPER = torch.cuda.is_available() and tiles.hopper_or_newer(torch.device("cuda"))
pytestmark = pytest.mark.skipif(not ON_HOPPER, reason="needs a GPU of compute capability 9.0 or later")

N, K = 320, 1024


def _weights():
    g = torch.Generator().manual_seed(0)
    q4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g).cuda()
    s4 = (torch.rand(N, K // 128, generator=g) * 0.02 + 1e-3).cuda()
    z4 = (torch.randn(N, K // 128, generator=g) * 0.05).cuda()
    q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g).cuda()
    s8 = (torch.rand(N, generator=g) * 1e-3 + 1e-4).cuda()
    qn = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g).cuda()
    sq = torch.randint(-127, 128, (N * K // 64,), dtype=torch.int8, generator=g).cuda()
    factor = torch.full((N * K // 256,), 12700.0, device="cuda")
    mean = torch.tensor(0.02, device="cuda")
    return q4, s4, z4, q8, s8, (qn, sq, factor, mean)


def _linears():
    """{format: linear(x, config) -> y} on random weights of N x K."""
    q4, s4, z4, q8, s8, (qn, sq, factor, mean) = _weights()

    def w4(x, config):
        return w4a16.w4a16_linear_triton(x, q4, s4.to(x.dtype), z4.to(x.dtype), 128, config=config)

    def w8(x, config):
        return w8a16.w8a16_linear_triton(x, q8, s8.to(x.dtype), config=config)

    def n4(x, config):
        return nf4.nf4_linear_triton(x, qn, sq, factor, mean, N, K, 64, 4, config=config)

    def a8(x, config):
        return w8a8.w8a8_linear_triton(x, q8, s8, None, None, config=config)

    def da4w(x, config):
        return int8_int4.int8_int4_linear_triton(x, q4, s4, 128, None, config=config)

    return {"w4a16": w4, "w8a16": w8, "nf4": n4, "w8a8": a8, "8da4w": da4w}


def _cases():
    """(path, rows of x, configuration) for every kernel launched as a dependent."""
    gemm = dict(path="gemm", BLOCK_M=16, BLOCK_N=64, SPLIT_K=2, SWAP=True, num_warps=4, num_stages=2)
    mma = dict(path="mma", BLOCK_M=8, BLOCK_N=64, SPLIT_K=2, num_warps=4)
    wg = dict(path="wgmma", BLOCK_M=64, BLOCK_N=64, STAGES=2, SPLIT_K=2, A_SHARED=False, num_warps=4)
    return [
        ("w4a16 gemv", 1, dict(path="gemv", BLOCK_N=16, GROUPS=1, SPLIT_K=2, num_warps=2, num_stages=1)),
        ("w4a16 gemm", 16, dict(gemm, FULL_DQ=True)),
        ("w4a16 mma", 4, mma),
        ("w4a16 wgmma", 64, wg),
        ("w4a16 wgmma decoupled", 128, dict(wg, BLOCK_M=128, BLOCK_N=128, DECOUPLED=True)),
        ("w8a16 gemv", 1, dict(path="gemv", BLOCK_N=16, BLOCK_W=16, SPLIT_K=2, num_warps=2, num_stages=1)),
        ("w8a16 gemm", 16, dict(gemm, BLOCK_W=16)),
        ("w8a16 mma", 4, mma),
        ("w8a16 wgmma", 64, wg),
        ("nf4 gemv", 1, dict(path="gemv", BLOCK_N=16, GROUPS=1, SPLIT_K=2, num_warps=2, num_stages=1)),
        ("nf4 gemm", 16, gemm),
        ("nf4 mma", 4, mma),
        ("nf4 wgmma", 64, wg),
        ("w8a8 fused gemv", 1, dict(path="gemv", FUSED=True, BLOCK_N=16, BLOCK_W=16, SPLIT_K=2, LOOP_STAGES=1,
                                    num_warps=2, num_stages=1)),
        ("w8a8 quantize + gemv", 4, dict(path="gemv", BLOCK_N=16, BLOCK_W=16, SPLIT_K=2, LOOP_STAGES=1, ROWS=4,
                                         num_warps=2, num_stages=1)),
        ("w8a8 quantize + gemm", 16, dict(FUSED=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=2, SPLIT_K=2,
                                          num_warps=4, num_stages=2)),
        ("8da4w quantize + gemm", 16, dict(gemm, FULL_DQ=True)),
        ("8da4w fused gemv", 1, dict(path="gemv", FUSED=True, BLOCK_N=16, GROUPS=1, SPLIT_K=2, num_warps=2,
                                     num_stages=1)),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, m, config", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_dependent_launch_after_a_write_of_x_gives_the_plain_launch_bits(name, m, config, dtype, monkeypatch):
    linear = _linears()[name.split()[0]]
    g = torch.Generator().manual_seed(m)
    old, new = (torch.randn(m, K, generator=g).to("cuda", dtype) for _ in range(2))
    x = old.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up off the capturing stream
        linear(x, config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(new)
        y = linear(x, config)
    replays = []
    for _ in range(3):
        x.copy_(old)
        graph.replay()
        torch.cuda.synchronize()
        replays.append(y.clone())
    monkeypatch.setattr(tiles, "hopper_or_newer", lambda device: False)  # every launch plain
    assert tiles.pdl_options(x.device) == {}
    want = linear(new, config)
    for got in replays:
        assert torch.equal(got, want), name
