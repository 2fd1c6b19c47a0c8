"""aofunc.tune: bad input, no GPU, and (on CUDA) a search per key of the tree that the kernels then use."""
import pytest
import torch

import aofunc
from aofunc import Rule, Spec
from aofunc.kernels import autotune


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AOFUNC_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    autotune.forget()
    yield tmp_path
    autotune.forget()


def small_tree():
    params = {"a.weight": torch.randn(64, 256), "b.weight": torch.randn(64, 256), "b.bias": torch.randn(64)}
    return aofunc.quantize(params, Spec([Rule(r".*\.weight", aofunc.Int4WeightOnly(128))]))


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="qparams"):
        aofunc.tune([1, 2])
    with pytest.raises(ValueError, match="ms"):
        aofunc.tune(small_tree(), ms=(0,))
    with pytest.raises(ValueError, match="ms"):
        aofunc.tune(small_tree(), ms=())
    with pytest.raises(TypeError, match="x_dtype"):
        aofunc.tune(small_tree(), x_dtype=torch.int8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU answer")
def test_without_a_gpu_nothing_is_tuned_and_a_warning_says_so():
    with pytest.warns(UserWarning, match="no CUDA device"):
        assert aofunc.tune(small_tree()) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tune_searches_each_key_once_and_the_kernels_use_the_winners(tmp_path):
    tree = {k: v.to("cuda") for k, v in small_tree().items()}
    assert aofunc.tune(tree, ms=(1, 3)) == {"Int4WeightOnly": 2}  # two weights of one shape: one key per M bucket
    assert aofunc.tune(tree, ms=(1, 3)) == {"Int4WeightOnly": 0}  # stored, checked, kept
    assert (tmp_path / "kernels.json").exists()
    assert aofunc.tune(tree, ms=(1,), retune=True) == {"Int4WeightOnly": 1}
    with pytest.warns(UserWarning, match="no quantized"):
        assert aofunc.tune({"w": torch.randn(4, device="cuda")}) == {}
