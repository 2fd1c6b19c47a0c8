"""Data-parallel calibration: two gloo processes, each folding half of the batches, return what one process
folding all of them returns (sums of small integers and maxima are exact, so the results are equal)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import aofunc
from calib_models import correlated, tiny_llama

WORLD = 2


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(-3, 4, (6, 64), generator=g).float() for _ in range(4)]


def _plain(qparams):
    return {name: dict(t.tensors) if isinstance(t, aofunc.QTensor) else t for name, t in qparams.items()}


def _calibrate(rank_slice):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    params = dict(linear.named_parameters())
    batches = _batches()[rank_slice]
    llama = tiny_llama(layers=2, d=32, hidden=64, out=16)
    llama_batches = list(correlated(4, t=8, d=32).split(1))[rank_slice]
    int4 = aofunc.Spec([aofunc.Rule(r".*norm.*", None), aofunc.Rule(r".*weight", aofunc.Int4WeightOnly(32))])
    return {
        "gptq": _plain(aofunc.gptq(params, batches, model=linear, progress=False)),
        "wanda": aofunc.wanda(params, batches, model=linear, progress=False),
        "smoothquant": _plain(aofunc.smoothquant(dict(llama.named_parameters()), llama_batches, model=llama,
                                                 progress=False)),
        "gptq_blocks": _plain(aofunc.gptq(dict(llama.named_parameters()), llama_batches, model=llama, spec=int4,
                                          progress=False)),
    }


def _worker(rank, path):
    dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(_calibrate(slice(rank, None, WORLD)), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_equal(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    else:
        assert torch.equal(a, b), where


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process_over_all_batches(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _calibrate(slice(None))
    for name in ("gptq", "wanda", "smoothquant"):
        _assert_equal(ranks[0][name], single[name], name)
        _assert_equal(ranks[1][name], single[name], name)
    # GPTQ through blocks: later blocks see float sums, so every rank agrees (the Hessians are all-reduced)
    _assert_equal(ranks[0]["gptq_blocks"], ranks[1]["gptq_blocks"], "gptq_blocks")
    # and the rank result quantizes like one process does, up to rare one-step code differences
    for name, t in single["gptq_blocks"].items():
        if isinstance(t, dict):
            codes = aofunc.primitives.unpack_uint4(t["qdata"]).float()
            other = aofunc.primitives.unpack_uint4(ranks[0]["gptq_blocks"][name]["qdata"]).float()
            assert (codes - other).abs().max() <= 1 and (codes != other).float().mean() <= 0.01, name
