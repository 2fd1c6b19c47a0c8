"""Wanda: the reference checks, exact sparsity and N:M runs on a model, better than magnitude pruning with outlier
input channels, purity and bad input."""
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import aofunc
from calib_models import correlated, tiny_llama
from tests.models import is_detached_alias


def test_two_four_reference_with_equal_input_norms():
    linear = nn.Linear(8, 1, bias=False)
    pruned = aofunc.wanda({"weight": torch.arange(1.0, 9.0).reshape(1, 8)}, [torch.ones(3, 8)], model=linear,
                          pattern="2:4", progress=False)
    assert pruned["weight"].tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_input_norms_decide_on_equal_weights():
    linear = nn.Linear(4, 1, bias=False)
    pruned = aofunc.wanda({"weight": torch.ones(1, 4)}, [torch.tensor([[100.0, 10.0, 1.0, 0.1]])], model=linear,
                          progress=False)
    assert pruned["weight"].tolist() == [[1, 1, 0, 0]]


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    params = dict(model.named_parameters())
    calib = list(correlated(8, outliers=(3, 20)).split(2))
    return model, params, calib


def test_every_weight_exactly_at_the_sparsity(llama):
    model, params, calib = llama
    for kwargs in (dict(sparsity=0.6), dict(sparsity=0.25, per="layer")):
        pruned = aofunc.wanda(params, calib, model=model, progress=False, **kwargs)
        for name, t in params.items():
            if t.dim() == 2:
                n, k = t.shape
                zeros = (pruned[name] == 0)
                if kwargs.get("per") == "layer":
                    assert int(zeros.sum()) == int(n * k * kwargs["sparsity"]), name
                else:
                    assert (zeros.sum(1) == int(k * kwargs["sparsity"])).all(), name
            else:
                assert is_detached_alias(pruned[name], t)


def test_two_four_runs_along_the_input_dimension(llama):
    model, params, calib = llama
    pruned = aofunc.wanda(params, calib, model=model, pattern="2:4", progress=False)
    for name, t in params.items():
        if t.dim() == 2:
            assert ((pruned[name] == 0).reshape(t.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_wanda_beats_magnitude_pruning_with_outlier_channels(llama):
    model, params, calib = llama
    test = correlated(4, seed=5, outliers=(3, 20))
    with torch.no_grad():
        reference = model(test)

        def error(p):
            return float((functional_call(model, p, (test,)) - reference).norm())

        for kwargs in (dict(), dict(pattern="2:4")):
            magnitude = aofunc.prune(params, aofunc.Spec([aofunc.Rule(r".*norm.*", None),
                                                          aofunc.Rule(r".*weight", aofunc.Sparse(**kwargs))]))
            wanda = aofunc.wanda(params, calib, model=model, progress=False, **kwargs)
            assert error(wanda) <= 0.8 * error(magnitude)


def test_pure_function_model_and_spec(llama):
    def f(p, x):
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, p["a"])), p["b"])

    params = {"a": torch.randn(16, 8), "b": torch.randn(4, 16)}
    before = {n: t.clone() for n, t in params.items()}
    spec = aofunc.Spec([aofunc.Rule("a", aofunc.Sparse(pattern="1:4"))])
    pruned = aofunc.wanda(params, [torch.randn(5, 8)], model=f, spec=spec, progress=False)
    assert ((pruned["a"] == 0).reshape(16, 2, 4).sum(-1) == 3).all()
    assert is_detached_alias(pruned["b"], params["b"])
    assert all(torch.equal(params[n], before[n]) for n in params)


def test_bad_input(llama):
    model, params, calib = llama
    with pytest.raises(ValueError, match="not both"):
        aofunc.wanda(params, calib, model=model, spec=aofunc.Spec([]), sparsity=0.5)
    with pytest.raises(ValueError, match="conflicts"):
        aofunc.wanda(params, calib, model=model, sparsity=0.6, pattern="2:4")
    with pytest.raises(ValueError, match="not a multiple of M = 8"):
        aofunc.wanda({"w": torch.randn(4, 12)}, [torch.randn(2, 12)],
                     model=lambda p, x: torch.nn.functional.linear(x, p["w"]), pattern="1:8")
    with pytest.raises(TypeError, match="Sparse"):
        aofunc.wanda(params, calib, model=model, spec=aofunc.Spec([aofunc.Rule(r".*q\.weight",
                                                                               aofunc.Int8Dynamic())]))
    with pytest.raises(ValueError, match="empty"):
        aofunc.wanda(params, iter([]), model=model)
    with pytest.raises(ValueError, match="batch 0"):
        aofunc.wanda(params, [torch.randn(2, 3, 5)], model=model)
