"""The fold: what update sees, the state paths and their reductions, re-iterable batches, and bad input."""
import pytest
import torch
import torch.nn as nn

import aofunc
from aofunc.calibrate.batches import Reiterable, peek
from aofunc.calibrate.fold import leaves_with_paths, reduction_for


def _sum_of_squares():
    return aofunc.Calibration(
        init=lambda params: {"sq": torch.zeros(4), "rows": torch.zeros((), dtype=torch.int64)},
        update=lambda state, seen: {"sq": state["sq"] + sum(x.square().sum(0) for x in seen["weight"]),
                                    "rows": state["rows"] + sum(x.shape[0] for x in seen["weight"])},
        finalize=lambda state, params: state)


def test_update_sees_every_call_as_token_rows():
    fc = nn.Linear(4, 3)
    batches = [torch.randn(2, 5, 4), torch.randn(7, 4), (torch.randn(1, 4),)]
    state = aofunc.fold(_sum_of_squares(), dict(fc.named_parameters()), batches, model=fc, progress=False)
    rows = torch.cat([b.reshape(-1, 4) for b in batches[:2]] + [batches[2][0]])
    assert int(state["rows"]) == 18
    torch.testing.assert_close(state["sq"], rows.square().sum(0))


def test_names_restrict_what_update_sees():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    seen = []
    calibration = aofunc.Calibration(lambda p: 0, lambda s, captured: seen.append(sorted(captured)) or s,
                                     lambda s, p: s)
    aofunc.fold(calibration, dict(model.named_parameters()), [torch.randn(3, 4)], model=model, names=["1.weight"],
                progress=False)
    assert seen == [["1.weight"]]


def test_pure_function_model_and_dict_batches():
    def f(params, batch):
        return torch.nn.functional.linear(batch["x"], params["w"])

    calibration = aofunc.Calibration(lambda p: torch.zeros(4), lambda s, seen: s + torch.cat(seen["w"]).sum(0),
                                     lambda s, p: s)
    out = aofunc.fold(calibration, {"w": torch.randn(3, 4)}, [{"x": torch.ones(2, 4)}], model=f, progress=False)
    torch.testing.assert_close(out, torch.full((4,), 2.0))


def test_state_paths_and_reductions():
    from typing import NamedTuple

    class State(NamedTuple):
        absmax: dict
        count: torch.Tensor

    state = State({"layers.0.q.weight": torch.zeros(2)}, torch.zeros(()))
    paths = [p for p, _ in leaves_with_paths(state)]
    assert paths == ["absmax.layers.0.q.weight", "count"]
    reduce = {"absmax": "max", "absmax.layers.0.q": "sum"}
    assert reduction_for("absmax.layers.0.q.weight", reduce) == "sum"     # the longest key wins
    assert reduction_for("absmax.layers.0.qq.weight", reduce) == "max"    # a key is a '.'-prefix, not a string one
    assert reduction_for("count", reduce) == "sum"
    assert [p for p, _ in leaves_with_paths([torch.zeros(1), {"a": torch.zeros(1)}])] == ["0", "1.a"]


def test_bad_reduce_is_refused():
    fc = nn.Linear(4, 2)
    bad = aofunc.Calibration(lambda p: 0, lambda s, c: s, lambda s, p: s, reduce={"x": "mean"})
    with pytest.raises(ValueError, match="reduce"):
        aofunc.fold(bad, dict(fc.named_parameters()), [torch.randn(1, 4)], model=fc)


def test_empty_batches():
    fc = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="empty"):
        aofunc.fold(_sum_of_squares(), dict(fc.named_parameters()), [], model=fc, progress=False)
    with pytest.raises(ValueError, match="empty"):
        aofunc.fold(_sum_of_squares(), dict(fc.named_parameters()), iter([]), model=fc, progress=False)


def test_rejected_batch_names_its_index():
    fc = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="batch 1") as info:
        aofunc.fold(_sum_of_squares(), dict(fc.named_parameters()), [torch.randn(2, 4), torch.randn(2, 5)],
                    model=fc, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_forward_that_ignores_the_params():
    fc = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="does not use the given params"):
        aofunc.fold(_sum_of_squares(), {"other.weight": torch.randn(2, 4)}, [torch.randn(1, 4)], model=fc)
    with pytest.raises(ValueError, match="no linear-like call"):
        aofunc.fold(_sum_of_squares(), {"w": torch.randn(2, 4)}, [torch.randn(1, 4)],
                    model=lambda params, x: x * 2, progress=False)


def test_bad_arguments():
    fc = nn.Linear(4, 2)
    params = dict(fc.named_parameters())
    with pytest.raises(TypeError, match="Calibration"):
        aofunc.fold((lambda p: 0, lambda s, c: s, lambda s, p: s), params, [torch.randn(1, 4)], model=fc)
    with pytest.raises(TypeError, match="iterable"):
        aofunc.fold(_sum_of_squares(), params, 3, model=fc)
    with pytest.raises(KeyError, match="names not in params"):
        aofunc.fold(_sum_of_squares(), params, [torch.randn(1, 4)], model=fc, names=["nope"])
    with pytest.raises(TypeError, match="model must be"):
        aofunc.fold(_sum_of_squares(), params, [torch.randn(1, 4)], model=3)


def test_reiterable_batches():
    assert list(Reiterable([1, 2], "m")) == [1, 2] and Reiterable([1, 2], "m").first == 1
    source = Reiterable(lambda: iter([3, 4]), "m")
    assert list(source) == [3, 4] and list(source) == [3, 4]
    with pytest.raises(TypeError, match="one-shot iterator"):
        Reiterable((b for b in [1, 2]), "gptq")
    with pytest.raises(ValueError, match="empty"):
        Reiterable(lambda: iter([]), "gptq")
    first, rest = peek((b for b in [5, 6]), "m")
    assert first == 5 and list(rest) == [5, 6]


def test_fold_leaves_params_untouched():
    fc = nn.Linear(4, 2)
    params = dict(fc.named_parameters())
    before = {k: v.clone() for k, v in params.items()}
    aofunc.fold(_sum_of_squares(), params, [torch.randn(3, 4)], model=fc, progress=False)
    assert all(torch.equal(params[k], before[k]) for k in params)
