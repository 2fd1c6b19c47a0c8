"""The Sparse scheme and magnitude pruning: exact sparsity, N:M runs, ties, orientation, purity, bad input."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aofunc
from aofunc.calibrate.sparse import prune_mask
from tests.models import is_detached_alias


def test_sparse_scheme_values():
    assert aofunc.Sparse() == aofunc.Sparse(0.5, None, "row")
    assert aofunc.Sparse(pattern="2:4").sparsity == 0.5
    assert aofunc.Sparse(pattern="1:4").sparsity == 0.75
    assert aofunc.Sparse(0.75, "1:4") == aofunc.Sparse(pattern="1:4")
    assert aofunc.Sparse(pattern="2:4").n_m == (2, 4)
    assert hash(aofunc.Sparse(0.3)) == hash(aofunc.Sparse(0.3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=0.5, pattern="1:4"), "conflicts"), (dict(pattern="4:4"), "N:M"), (dict(pattern="2-4"), "N:M"),
    (dict(pattern="0:4"), "N:M"), (dict(sparsity=1.0), r"\[0, 1\)"), (dict(sparsity=-0.1), r"\[0, 1\)"),
    (dict(sparsity="half"), r"\[0, 1\)"), (dict(per="column"), "per"),
])
def test_sparse_scheme_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aofunc.Sparse(**kwargs)


def test_quantize_refuses_the_pruning_scheme():
    with pytest.raises(TypeError, match="not a stored format"):
        aofunc.quantize({"w": torch.randn(4, 8)}, aofunc.Spec([aofunc.Rule("w", aofunc.Sparse())]))


def test_two_four_reference():
    spec = aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(pattern="2:4"))])
    pruned = aofunc.prune({"w": torch.arange(1.0, 9.0).reshape(1, 8)}, spec)["w"]
    assert torch.equal(pruned, torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]]))


@given(n=st.integers(1, 8), runs=st.integers(1, 8), seed=st.integers(0, 2**16),
       pattern=st.sampled_from(["2:4", "1:4", "4:8", "1:2"]))
def test_every_run_of_m_keeps_exactly_n(n, runs, seed, pattern):
    kept, m = map(int, pattern.split(":"))
    w = torch.randn(n, runs * m, generator=torch.Generator().manual_seed(seed))
    mask = prune_mask(w.abs(), aofunc.Sparse(pattern=pattern))
    assert (mask.reshape(n, runs, m).sum(-1) == m - kept).all()
    # the kept ones are the largest of their run
    run_abs = w.abs().reshape(n, runs, m)
    kept_min = run_abs.masked_fill(mask.reshape(n, runs, m), float("inf")).amin(-1)
    pruned_max = run_abs.masked_fill(~mask.reshape(n, runs, m), -1).amax(-1)
    assert (kept_min >= pruned_max).all()


@given(n=st.integers(1, 12), k=st.integers(1, 40), seed=st.integers(0, 2**16),
       sparsity=st.floats(0, 0.95), per=st.sampled_from(["row", "layer"]))
def test_exact_sparsity(n, k, seed, sparsity, per):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    pruned = aofunc.prune({"w": w}, aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(sparsity, per=per))]))["w"]
    zeros = (pruned == 0)
    if per == "row":
        assert (zeros.sum(1) == int(k * sparsity)).all()
    else:
        assert int(zeros.sum()) == int(n * k * sparsity)
    assert torch.equal(pruned[~zeros], w[~zeros])
    # nothing pruned is larger than anything kept, within a row or within the layer
    rows = list(zip(w.abs(), zeros)) if per == "row" else [(w.abs(), zeros)]
    for values, pruned_here in rows:
        if pruned_here.any() and (~pruned_here).any():
            assert values[pruned_here].max() <= values[~pruned_here].min()


def test_ties_prune_the_earlier_index():
    mask = prune_mask(torch.ones(2, 4), aofunc.Sparse(0.5))
    assert mask.tolist() == [[True, True, False, False]] * 2


def test_transposed_rule_prunes_along_the_input_dimension():
    w = torch.arange(1.0, 9.0).reshape(8, 1)  # stored [in, out]
    spec = aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(pattern="2:4"), transposed=True)])
    assert aofunc.prune({"w": w}, spec)["w"].reshape(-1).tolist() == [0, 0, 3, 4, 0, 0, 7, 8]


def test_dtype_shape_and_purity():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    before = w.clone()
    params = {"w": w, "b": torch.randn(8)}
    out = aofunc.prune(params, aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(pattern="2:4"))]))
    assert out["w"].dtype == torch.bfloat16 and out["w"].shape == (8, 16)
    assert torch.equal(w, before) and is_detached_alias(out["b"], params["b"])


def test_bad_input():
    w = {"w": torch.randn(4, 6)}
    with pytest.raises(ValueError, match="not a multiple of M = 4"):
        aofunc.prune(w, aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(pattern="2:4"))]))
    with pytest.raises(TypeError, match="Sparse rules"):
        aofunc.prune(w, aofunc.Spec([aofunc.Rule("w", aofunc.Int8WeightOnly())]))
    with pytest.raises(TypeError, match="Spec"):
        aofunc.prune(w, aofunc.Sparse())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", aofunc.SpecWarning)
        with pytest.raises(ValueError, match="selects no weight"):
            aofunc.prune(w, aofunc.Spec([aofunc.Rule("x", aofunc.Sparse())]))
    with pytest.raises(TypeError, match="floating point"):
        aofunc.prune({"w": torch.ones(4, 8, dtype=torch.int32)}, aofunc.Spec([aofunc.Rule("w", aofunc.Sparse())]))


def test_semi_structured_refuses_what_it_cannot_convert_by_name():
    from aofunc.calibrate.sparse import is_two_four
    pruned = aofunc.prune({"w": torch.randn(8, 16)}, aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(pattern="2:4"))]))
    assert is_two_four(pruned["w"]) and not is_two_four(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"'w'.*not on a CUDA device"):
        aofunc.semi_structured(pruned, names=["w"])
    with pytest.raises(KeyError, match="'v'"):
        aofunc.semi_structured(pruned, names=["v"])
    assert is_detached_alias(aofunc.semi_structured(pruned)["w"], pruned["w"])  # nothing convertible on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_semi_structured_weights_run_in_f_linear_on_cuda():
    w = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    pruned = aofunc.prune({"w": w}, aofunc.Spec([aofunc.Rule("w", aofunc.Sparse(pattern="2:4"))]))
    sparse = aofunc.semi_structured(pruned)["w"]
    assert type(sparse) is not torch.Tensor
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.nn.functional.linear(x, sparse), x @ pruned["w"].t(), rtol=2e-3, atol=2e-2)


def test_prune_default_spec_halves_every_2d_weight_and_keeps_the_rest():
    params = {"fc.weight": torch.arange(1., 9.).reshape(2, 4), "fc.bias": torch.ones(2), "emb": torch.ones(3, 4)}
    out = aofunc.prune(params, progress=False)
    assert torch.equal(out["fc.weight"], torch.tensor([[0., 0., 3., 4.], [0., 0., 7., 8.]]))
    assert torch.equal(out["fc.bias"], params["fc.bias"]) and torch.equal(out["emb"], params["emb"])


@pytest.mark.parametrize("transform", ["prune", "quantize", "gptq", "smoothquant", "wanda"])
def test_progress_takes_true_false_or_none_only(transform):
    fn = getattr(aofunc, transform)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        if transform == "prune":
            fn({"w": torch.randn(4, 8)}, progress="yes")
        elif transform == "quantize":
            fn({"w": torch.randn(4, 8)}, aofunc.Spec([aofunc.Rule("w", aofunc.Int8WeightOnly())]), progress="yes")
        else:
            model = torch.nn.Linear(8, 4)
            fn(dict(model.named_parameters()), [torch.randn(2, 8)], model=model, progress="yes")


def test_progress_none_shows_no_bar_when_stderr_is_not_a_terminal(capsys):
    from aofunc.progress import show_progress

    assert show_progress(None, True, "x") is False  # pytest captures stderr: not a terminal
    assert show_progress(True, False, "x") is True and show_progress(False, True, "x") is False
