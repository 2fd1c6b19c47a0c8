"""The fold: what update sees, the state paths and their reductions, re-iterable batches, and bad input."""
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---------------------------------------------------------------------------------------------- non-finite inputs

class _Stack(nn.Module):
    """Repeated blocks that read the raw input, so GPTQ runs block by block on it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _calibrated(method, model, params, batches):
    if method == "smoothquant":
        return aofunc.smoothquant(params, batches, model=model, progress=False)
    if method == "wanda":
        return aofunc.wanda(params, batches, model=model, progress=False)
    spec = aofunc.Spec([aofunc.Rule(r".*weight", aofunc.Int4WeightOnly(32))])
    return aofunc.gptq(params, batches, model=model, spec=spec, progress=False)


@given(method=st.sampled_from(["smoothquant", "wanda", "gptq", "gptq-blocks"]),
       count=st.integers(1, 4), data=st.data(), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
@settings(max_examples=20)
def test_non_finite_calibration_inputs_are_refused_at_the_first_batch_showing_them(method, count, data, value):
    bad = data.draw(st.integers(0, count - 1), label="first bad batch")
    later = data.draw(st.booleans(), label="a later batch bad too")
    torch.manual_seed(0)
    if method == "gptq-blocks":
        model, first = _Stack().eval(), "layers.0.0.weight"
    else:
        model, first = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval(), "0.weight"
    params = dict(model.named_parameters())
    before = {name: t.clone() for name, t in params.items()}
    batches = [torch.randn(2, 8, 64) for _ in range(count)]
    batches[bad][1, data.draw(st.integers(0, 7)), data.draw(st.integers(0, 63))] = value
    if later and bad + 1 < count:
        batches[bad + 1][0, 0, 0] = float("nan")
    kind = "NaN" if value != value else "Inf"
    with pytest.raises(ValueError, match=rf"{method.split('-')[0]}: the calibration input of '{re.escape(first)}' "
                                         rf"on batch {bad} holds {kind}"):
        _calibrated(method.split("-")[0], model, params, batches)
    assert all(torch.equal(params[name], before[name]) for name in params)


def test_fold_refuses_non_finite_inputs_before_update_sees_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    calibration = aofunc.Calibration(lambda p: 0, lambda s, captured: seen.append(sorted(captured)) or s,
                                     lambda s, p: s)
    batches = [torch.ones(3, 4), torch.full((3, 4), 1e30)]   # finite input, but the first linear's output overflows
    with torch.no_grad():
        model[0].weight.fill_(1e10)
    with pytest.raises(ValueError, match=r"calibrate: the calibration input of '2.weight' on batch 1 holds Inf"):
        aofunc.fold(calibration, dict(model.named_parameters()), batches, model=model, progress=False)
    assert len(seen) == 1
