"""Data-parallel calibration of stacked experts: two gloo processes, each folding half of the batches, build the
per-expert GPTQ Hessians one process builds over all of them (sums of small integers are exact, so equal)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import optree

import aofunc

WORLD, EXPERTS = 2, 4


class Experts(nn.Module):
    """Four experts of [N=16, K=32] run as transformers' grouped_mm experts run them."""

    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(EXPERTS, 16, 32, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, offs):
        return F.grouped_mm(x, self.up.transpose(-2, -1), offs=offs)


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        counts = torch.randint(0, 5, (EXPERTS,), generator=g)
        x = torch.randint(-3, 4, (int(counts.sum()), 32), generator=g).float()
        out.append((x, counts.cumsum(0).to(torch.int32)))
    return out


def _hessians(rank_slice):
    model = Experts()
    params = dict(model.named_parameters())
    rules = {"up": aofunc.Rule("up", aofunc.Int4WeightOnly(32))}
    gptq = aofunc.gptq_calibration(rules)
    keep = aofunc.Calibration(gptq.init, gptq.update, lambda state, params: state, gptq.reduce)
    state = aofunc.fold(keep, params, _batches()[rank_slice], model=model, progress=False)
    return optree.tree_leaves(state, namespace="aofunc")


def _worker(rank, path):
    dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(_hessians(slice(rank, None, WORLD)), os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_build_the_per_expert_hessians_of_one_process_over_all_batches(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    single = _hessians(slice(None))
    shapes = sorted(tuple(t.shape) for t in single)
    assert (EXPERTS, 32, 32) in shapes and (EXPERTS,) in shapes  # Σ x xᵀ and the token count, per expert
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got) == len(single)
        for a, b in zip(got, single):
            assert torch.equal(a, b), rank
