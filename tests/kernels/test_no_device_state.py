"""Kernels keep no tensors between calls but the split-K arrival counters (tiles.ARRIVALS), which every launch leaves
zeroed, which a stream has of its own, and which are never made while a CUDA graph is being captured.

Any other tensor kept in a module global (a lazily made split-K workspace, a cached table) would land in a
CUDA-graph pool when first made during capture, and would be shared by launches on several streams.
"""
import sys

import torch

from aofunc.kernels import int8_int4, int_mm, nf4, w4a16, w8a8, w8a16

from aofunc.kernels import tiles
from aofunc.kernels.tiles import ArrivalCounters

from tests.kernels.devices import DEVICE, gpu_only


def tensors_in(value, seen) -> list:
    """Every tensor reachable from value through dicts, lists, tuples and sets."""
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.items() for part in item for t in tensors_in(part, seen)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [t for item in value for t in tensors_in(item, seen)]
    return []


def run_every_launcher():
    torch.manual_seed(0)
    x = torch.randn(3, 128, device=DEVICE)
    q4 = torch.randint(0, 256, (32, 64), dtype=torch.uint8, device=DEVICE)
    s4 = torch.rand(32, 4, device=DEVICE) * 0.1
    z4 = torch.randn(32, 4, device=DEVICE) * 0.1
    for config in (dict(path="gemv", BLOCK_N=8, GROUPS=1, SPLIT_K=2, PREFETCH=False, num_warps=2, num_stages=1),
                   dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, FULL_DQ=True, num_warps=2,
                        num_stages=1),
                   dict(path="dequant")):
        w4a16.w4a16_linear_triton(x[:1] if config["path"] == "gemv" else x, q4, s4, z4, 32, config=config)
    q8 = torch.randint(-128, 128, (32, 128), dtype=torch.int8, device=DEVICE)
    s8 = torch.rand(32, device=DEVICE) * 0.01
    for config in (dict(path="gemv", BLOCK_N=8, BLOCK_W=4, SPLIT_K=2, num_warps=2, num_stages=1),
                   dict(path="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_W=4, SPLIT_K=2, SWAP=True, num_warps=2,
                        num_stages=1),
                   dict(path="dequant")):
        w8a16.w8a16_linear_triton(x[:1] if config["path"] == "gemv" else x, q8, s8, config=config)
    n, k, block, scaler_block = 32, 128, 64, 4
    qn = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=DEVICE)
    sq = torch.randint(-128, 128, (n * k // block,), dtype=torch.int8, device=DEVICE)
    factor = torch.rand(n * k // block // scaler_block, device=DEVICE) * 100 + 10
    mean = torch.tensor(0.01, device=DEVICE)
    for config in (dict(path="gemv", BLOCK_N=8, GROUPS=1, SPLIT_K=2, num_warps=2, num_stages=1),
                   dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, num_warps=2, num_stages=1),
                   dict(path="dequant")):
        nf4.nf4_linear_triton(x[:1] if config["path"] == "gemv" else x, qn, sq, factor, mean, n, k, block,
                              scaler_block, config=config)
    w8a8.w8a8_linear_triton(x, q8, s8, None, None)
    w8a8.quantize_per_token_int8_triton(x, None)
    int8_int4.int8_int4_linear_triton(x, q4, s4, 32, None)
    int_mm.int_mm_triton(q8[:16, :], q8.t().contiguous()[:, :16].contiguous())


def test_no_kernel_module_keeps_a_tensor():
    run_every_launcher()
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("aofunc.kernels") and m is not None]
    assert len(modules) >= 8
    found = {name: len(tensors_in(value, set())) for m in modules for name, value in vars(m).items()
             if not name.startswith("__") and tensors_in(value, set())}
    assert found == {}


def test_every_split_k_launch_leaves_its_counters_zeroed():
    run_every_launcher()
    kept = list(tiles.ARRIVALS._regions.values()) + [block for block, _ in tiles.ARRIVALS._blocks.values()]
    assert kept, "the split-K launches above took no counters"
    for counters in kept:
        assert counters.dtype == torch.int32 and not counters.any()


def test_a_stream_keeps_its_counters_and_a_longer_launch_gets_more():
    counters = ArrivalCounters()
    device = torch.device(DEVICE)
    first = counters.take(device, 4)
    assert first.numel() == 4 and not first.any()
    assert counters.take(device, 7).data_ptr() == first.data_ptr()  # the same stream's, again
    longer = counters.take(device, ArrivalCounters.REGION + 1)
    assert longer.numel() == ArrivalCounters.REGION + 1 and not longer.any()
    assert counters.take(device, 4).data_ptr() == longer.data_ptr()


@gpu_only
def test_streams_never_share_counters_and_a_captured_launch_takes_counters_of_its_own():
    counters = ArrivalCounters()
    device = torch.device("cuda", torch.cuda.current_device())
    here = counters.take(device, 8)
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        there = counters.take(device, 8)
    assert here.data_ptr() != there.data_ptr()
    block, _ = counters._blocks[device]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a = counters.take(device, 8)
        b = counters.take(device, 8)
    taken = {t.data_ptr() for t in (a, b)}
    assert len(taken) == 2 and here.data_ptr() not in taken and there.data_ptr() not in taken
    assert all(block.data_ptr() <= p < block.data_ptr() + block.numel() * 4 for p in taken)
    assert counters._blocks[device][1] == 16


@gpu_only
def test_a_split_k_launch_replayed_from_a_graph_gives_the_eager_bits_every_time():
    torch.manual_seed(0)
    x = torch.randn(3, 128, device="cuda")
    q = torch.randint(0, 256, (32, 64), dtype=torch.uint8, device="cuda")
    scale = torch.rand(32, 4, device="cuda") * 0.1
    zero = torch.randn(32, 4, device="cuda") * 0.1
    config = dict(path="gemm", BLOCK_M=16, BLOCK_N=16, SPLIT_K=2, SWAP=True, FULL_DQ=True, num_warps=2, num_stages=1)
    eager = w4a16.w4a16_linear_triton(x, q, scale, zero, 32, config=config)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a warm-up off the capturing stream, as CUDA graphs ask
        w4a16.w4a16_linear_triton(x, q, scale, zero, 32, config=config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16.w4a16_linear_triton(x, q, scale, zero, 32, config=config)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
    block, taken = tiles.ARRIVALS._blocks[x.device]
    assert taken > 0 and not block.any()
