"""SmoothQuant: the reference SQNR, outlier channels, the exact float fold into LayerNorm/RMSNorm found from the
calls, q/k/v sharing one smoothing vector, act_scale where nothing can absorb it, purity and bad input."""
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import aofunc
from aofunc.calibrate.input_groups import Scaler, recording_inputs
from aofunc.calibrate.selection import recording_usage, select
from aofunc.calibrate.smoothquant import smoothquant_calibration, group_scales, smoothed, smoothing_scale
from calib_models import correlated, gpt2_block, tiny_llama
from tests.models import is_detached_alias

W8A8 = aofunc.Spec([aofunc.Rule(r".*weight", aofunc.Int8Dynamic())])


def _run(model, params, x):
    with torch.no_grad():
        return functional_call(model, params, (x,))


def test_reference_sqnr_at_alpha_quarter():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = 9 * torch.randn(8, 16, 64) + 10
    qparams = aofunc.smoothquant(dict(linear.named_parameters()), [x], model=linear, alpha=0.25, progress=False)
    assert aofunc.sqnr(_run(linear, dict(linear.named_parameters()), x), _run(linear, qparams, x)) >= 40


def test_outlier_channels_smoothed_beat_plain_w8a8_widely():
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    params = dict(linear.named_parameters())
    x = torch.randn(8, 16, 64)
    x[..., [3, 17, 40]] *= 50
    reference = _run(linear, params, x)
    smooth = aofunc.sqnr(reference, _run(linear, aofunc.smoothquant(params, [x], model=linear, progress=False), x))
    plain = aofunc.sqnr(reference, _run(linear, aofunc.quantize(params, W8A8), x))
    assert smooth >= plain + 6


def test_smoothing_scale_formula():
    act, weight = torch.tensor([4.0, 9.0, 0.0, 1.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    torch.testing.assert_close(smoothing_scale(act, weight, 0.5), torch.tensor([2.0, 1.5, 1.0, 1.0]))
    torch.testing.assert_close(smoothing_scale(torch.tensor([1e-12]), torch.tensor([1.0]), 1.0),
                               torch.tensor([1e-5]))


def _plan(model, params, x, alpha=0.5):
    with torch.no_grad(), recording_usage(params) as usage, recording_inputs(params) as groups_of:
        model(x)
    rules = select(params, None, aofunc.Int8Dynamic(), usage, "smoothquant", (aofunc.Int8Dynamic,))
    groups = groups_of(list(rules))
    state = aofunc.fold(smoothquant_calibration(rules), params, [x], model=model, names=list(rules), progress=False)
    return rules, groups, group_scales(params, rules, groups, state.absmax, alpha)


@pytest.mark.parametrize("make", [gpt2_block, tiny_llama])
def test_folded_float_model_computes_the_same_function(make):
    model = make()
    params = dict(model.named_parameters())
    x = correlated(4, outliers=(5, 9))
    rules, groups, scales = _plan(model, params, x)
    folded = [g for g in groups if g.scaler is not None]
    assert folded and all(not (s == 1).all() for s in scales)
    smooth, carried = smoothed(params, rules, [g for g in groups if g.scaler is not None],
                               [s for g, s in zip(groups, scales) if g.scaler is not None])
    assert not carried
    changed = {n for n in params if not torch.equal(smooth[n], params[n])}
    assert {g.scaler.weight for g in folded} <= changed
    torch.testing.assert_close(_run(model, smooth, x), _run(model, params, x), rtol=1e-4, atol=1e-4)


def test_groups_found_from_the_calls():
    model = gpt2_block()
    params = dict(model.named_parameters())
    _, groups, _ = _plan(model, params, correlated(2))
    by_linears = {g.linears: g.scaler for g in groups}
    assert by_linears == {("attn.weight",): Scaler("ln1.weight", "ln1.bias"), ("proj.weight",): None,
                          ("up.weight",): Scaler("ln2.weight", "ln2.bias"), ("down.weight",): None}
    model = tiny_llama(layers=1)
    _, groups, _ = _plan(model, dict(model.named_parameters()), correlated(2))
    by_linears = {g.linears: g.scaler for g in groups}
    assert by_linears[("layers.0.attn.q.weight", "layers.0.attn.k.weight", "layers.0.attn.v.weight")] \
        == Scaler("layers.0.attn_norm.weight")
    assert by_linears[("layers.0.gate.weight", "layers.0.up.weight")] == Scaler("layers.0.mlp_norm.weight")
    assert by_linears[("head.weight",)] == Scaler("norm.weight")
    assert by_linears[("inp.weight",)] is None


def test_qkv_share_one_smoothing_vector_folded_into_the_norm():
    model = tiny_llama(layers=1)
    params = dict(model.named_parameters())
    x = correlated(4, outliers=(5,))
    qparams = aofunc.smoothquant(params, [x], model=model, progress=False)
    s = params["layers.0.attn_norm.weight"] / qparams["layers.0.attn_norm.weight"]
    for proj in "qkv":
        name = f"layers.0.attn.{proj}.weight"
        assert "act_scale" not in qparams[name].tensors
        ratio = qparams[name].dequantize() / params[name]
        # each column of W * s comes back within int8 rounding of s
        torch.testing.assert_close(ratio.median(dim=0).values, s, rtol=0.02, atol=0.0)
    assert aofunc.sqnr(_run(model, params, x), _run(model, qparams, x)) > 30


def test_norm_whose_output_is_used_elsewhere_is_not_folded():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            h = self.norm(x)
            return self.fc(h) + h  # the norm's output also reaches the residual

    torch.manual_seed(0)
    model = Leaky()
    params = dict(model.named_parameters())
    x = correlated(2, outliers=(3,))
    qparams = aofunc.smoothquant(params, [x], model=model, progress=False)
    assert is_detached_alias(qparams["norm.weight"], params["norm.weight"])
    assert is_detached_alias(qparams["norm.bias"], params["norm.bias"])
    assert "act_scale" in qparams["fc.weight"].tensors
    assert aofunc.sqnr(_run(model, params, x), _run(model, qparams, x)) > 30


def test_pure_and_deterministic():
    model = gpt2_block()
    params = dict(model.named_parameters())
    before = {n: t.clone() for n, t in params.items()}
    x = correlated(4, outliers=(5,))
    a = aofunc.smoothquant(params, x.split(2), model=model, progress=False)
    b = aofunc.smoothquant(params, iter(x.split(2)), model=model, progress=False)
    assert all(torch.equal(params[n], before[n]) for n in params)
    for n in params:
        if isinstance(a[n], aofunc.QTensor):
            assert all(torch.equal(s, t) for s, t in zip(a[n].tensors.values(), b[n].tensors.values()))
        else:
            assert torch.equal(a[n], b[n])
    assert a["ln1.weight"] is not params["ln1.weight"]


def test_bad_input():
    linear = nn.Linear(8, 4)
    params = dict(linear.named_parameters())
    x = [torch.randn(2, 8)]
    for alpha in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="alpha"):
            aofunc.smoothquant(params, x, model=linear, alpha=alpha)
    with pytest.raises(TypeError, match="Int8Dynamic"):
        aofunc.smoothquant(params, x, model=linear, spec=aofunc.Spec([aofunc.Rule("weight",
                                                                                  aofunc.Int8WeightOnly())]))
    with pytest.raises(ValueError, match="empty"):
        aofunc.smoothquant(params, [], model=linear)
    with pytest.raises(ValueError, match="batch 0"):
        aofunc.smoothquant(params, [torch.randn(2, 5)], model=linear)
    with pytest.raises(ValueError, match="batch 1"):
        aofunc.smoothquant(params, [torch.randn(2, 8), torch.randn(2, 5)], model=linear, progress=False)
    with pytest.raises(ValueError, match="does not use the given params"):
        aofunc.smoothquant({"w": torch.randn(4, 8)}, x, model=linear)
