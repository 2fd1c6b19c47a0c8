"""Calibration per expert: GPTQ, Wanda and SmoothQuant see, for stacked experts, the rows routed to each expert."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import aofunc
from aofunc import Rule, Spec
from aofunc.calibrate.gptq_core import hessian
from aofunc.formats.qtensor import canonical

pytest.importorskip("transformers")
from tests.test_experts import tiny_moe  # noqa: E402

EXPERTS = 4
GATE_UP, DOWN = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


def routed_rows(model, data):
    """{expert: (rows gate_up_proj received, rows down_proj received)} in layer 0, recomputed from the router's
    choice seen by a hook on the experts module and the experts' own weights."""
    experts = model.model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_hook(lambda module, args, out: seen.append((args[0], args[1])))
    with torch.no_grad():
        for batch in data:
            model(batch)
    handle.remove()
    out = {}
    for e in range(EXPERTS):
        x = torch.cat([hidden[(index == e).any(-1)] for hidden, index in seen])
        with torch.no_grad():
            gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            out[e] = (x, experts.act_fn(gate) * up)
    return out


def routed(model):
    """(the model's params as detached tensors, calibration batches, each expert's routed rows)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    data = batches()
    return params, data, routed_rows(model, data)


def starved_moe():
    """A tiny Mixtral whose router sends every token to the same two experts (all logits equal): the model, its
    params, batches, each expert's rows, and the experts no token reaches."""
    model = tiny_moe("mixtral", "grouped_mm")
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.zero_()
    params, data, rows = routed(model)
    return model, params, data, rows, [e for e in range(EXPERTS) if rows[e][0].shape[0] == 0]


def state_of(calibration, params, data, model, names):
    keep = aofunc.Calibration(calibration.init, calibration.update, lambda state, params: state, calibration.reduce)
    return aofunc.fold(keep, params, data, model=model, names=names, progress=False)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_gptq_quantizes_each_expert_with_the_hessian_of_its_own_tokens(implementation):
    model = tiny_moe("mixtral", implementation)
    params, data, rows = routed(model)
    scheme = aofunc.Int4WeightOnly(32)
    rules = {name: Rule(name, scheme) for name in (GATE_UP, DOWN)}
    qparams = aofunc.fold(aofunc.gptq_calibration(rules), params, data, model=model, names=list(rules),
                          progress=False)
    for name, which in ((GATE_UP, 0), (DOWN, 1)):
        q = qparams[name]
        assert isinstance(q, aofunc.QTensor) and q.stacked and q.shape == params[name].shape
        for e in range(EXPERTS):
            x = rows[e][which].float()
            assert x.shape[0] > 0
            H = hessian(x.T @ x, torch.tensor(x.shape[0]))
            expected = aofunc.gptq_quantize_weight(canonical(params[name][e], False), H, scheme)
            single = aofunc.QTensor(scheme, expected, params[name][e].shape, params[name].dtype, False)
            got = q[e]
            codes_equal = (got.tensors["qdata"] == single.tensors["qdata"]).float().mean()
            assert codes_equal > 0.99, (name, e)
            assert aofunc.sqnr(single.dequantize(), got.dequantize()) > 40, (name, e)


def test_an_expert_no_token_reaches_is_quantized_to_nearest_with_a_warning_naming_it():
    model, params, data, rows, empty = starved_moe()
    busy = [e for e in range(EXPERTS) if e not in empty]
    assert len(empty) == 2
    scheme = aofunc.Int4WeightOnly(32)
    spec = Spec([Rule(r".*experts\..*", scheme)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qparams = aofunc.gptq(params, data, model=model, spec=spec, progress=False)
    messages = [str(w.message) for w in caught]
    for name in (GATE_UP, DOWN):
        assert any(f"expert(s) {empty} of {name!r} received no calibration token" in m for m in messages), messages
    assert not any("model.layers.1" in m for m in messages), messages
    nearest = aofunc.quantize(params, spec)
    for name in (GATE_UP, DOWN):
        for e in empty:
            for key, t in qparams[name][e].tensors.items():
                assert torch.equal(t, nearest[name][e].tensors[key]), (name, e, key)
        for e in busy:
            assert not torch.equal(qparams[name][e].tensors["qdata"], nearest[name][e].tensors["qdata"])


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_wanda_and_smoothquant_statistics_are_per_expert_over_its_own_tokens(implementation):
    model = tiny_moe("mixtral", implementation)
    params, data, rows = routed(model)
    names = [GATE_UP, DOWN]
    wanda = state_of(aofunc.wanda_calibration({n: Rule(n, aofunc.Sparse(0.5)) for n in names}), params, data,
                     model, names)
    smooth = state_of(aofunc.smoothquant_calibration({n: Rule(n, aofunc.Int8Dynamic()) for n in names}), params,
                      data, model, names)
    for name, which in ((GATE_UP, 0), (DOWN, 1)):
        assert wanda.sq_sum[name].shape == smooth.absmax[name].shape == (EXPERTS, 64)
        for e in range(EXPERTS):
            x = rows[e][which].float()
            assert torch.allclose(wanda.sq_sum[name][e], x.square().sum(0), rtol=1e-4, atol=1e-6)
            assert torch.allclose(smooth.absmax[name][e], x.abs().amax(0), rtol=1e-5, atol=1e-7)


def test_gptq_on_a_tiny_moe_has_a_smaller_output_error_than_round_to_nearest():
    model = tiny_moe("mixtral", "grouped_mm")
    params = {name: p.detach() for name, p in model.named_parameters()}
    spec = Spec([Rule(r".*experts\..*", aofunc.Int4WeightOnly(32))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every expert receives tokens
        gptq = aofunc.gptq(params, batches(8), model=model, spec=spec, progress=False)
    rtn = aofunc.quantize(params, spec)
    held_out = torch.cat(batches(4, seed=1))
    with torch.no_grad():
        reference = model(held_out).logits
        error = {label: (aofunc.apply(model, q, held_out).logits - reference).square().mean()
                 for label, q in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < error["rtn"], error
