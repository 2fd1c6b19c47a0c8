"""quantize/dequantize over whole models, run unmodified through functional_call."""
import sys

import pytest
import torch
from torch.func import functional_call

import aofunc
from aofunc import Rule, Spec
from tests.models import ALL_SCHEMES, Conv1D, is_detached_alias, tiny_transformer

ALL_WEIGHTS = r".*\.weight"


def spec_for(scheme, **kwargs):
    return Spec([Rule(r".*norm.*", None), Rule(ALL_WEIGHTS, scheme, **kwargs)])


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
def test_a_small_transformer_runs_quantized_through_functional_call(scheme):
    model = tiny_transformer()
    params = dict(model.named_parameters())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids)
        qparams = aofunc.quantize(params, spec_for(scheme, transposed=False), model=model, example=ids)
        y = functional_call(model, qparams, (ids,))
        y_dequantized = functional_call(model, aofunc.dequantize(qparams), (ids,))
    quantized = {n for n, t in qparams.items() if isinstance(t, aofunc.QTensor)}
    assert {"embed.weight", "layers.0.qkv.weight", "layers.0.proj.weight", "mix.weight"} <= quantized
    assert qparams["layers.1.proj.weight"].transposed  # detected from addmm(b, x, W)
    assert not qparams["layers.1.qkv.weight"].transposed
    bound = {"Int8WeightOnly": 30, "Int8Dynamic": 25}.get(type(scheme).__name__, 8)
    assert aofunc.sqnr(reference, y) > bound
    # activation quantization aside, the quantized model computes what its dequantized weights say
    assert aofunc.sqnr(y_dequantized, y) > (25 if type(scheme).__name__ in ("Int8Dynamic", "Int8DynamicInt4")
                                            else 60)
    assert aofunc.size_in_bytes(qparams) < aofunc.size_in_bytes(params)


def test_quantize_is_pure_and_deterministic():
    model = tiny_transformer()
    params = dict(model.named_parameters())
    before = {n: t.detach().clone() for n, t in params.items()}
    a = aofunc.quantize(params, spec_for(aofunc.Int4WeightOnly(32)))
    b = aofunc.quantize(params, spec_for(aofunc.Int4WeightOnly(32)))
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert list(a) == list(params)
    for name in a:
        if isinstance(a[name], aofunc.QTensor):
            assert all(torch.equal(x, y) for x, y in zip(a[name].tensors.values(), b[name].tensors.values()))
        else:
            assert is_detached_alias(a[name], params[name])


def test_rule_transposed_quantizes_along_the_input_dimension():
    layer = Conv1D(64, 16)
    params = dict(layer.named_parameters())
    q = aofunc.quantize(params, Spec([Rule("weight", aofunc.Int4WeightOnly(32), transposed=True)]))
    assert q["weight"].shape == (64, 16) and q["weight"].scale.shape == (16, 2)  # groups run along the 64 inputs
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert aofunc.sqnr(layer(x), functional_call(layer, q, (x,))) > 15


def test_dequantize_restores_float_weights():
    params = {"w": torch.randn(8, 64), "b": torch.randn(8)}
    q = aofunc.quantize(params, Spec([Rule("w", aofunc.Int8WeightOnly())]))
    dq = aofunc.dequantize(q)
    assert type(dq["w"]) is torch.Tensor and is_detached_alias(dq["b"], q["b"])
    assert aofunc.sqnr(params["w"], dq["w"]) > 40


@pytest.mark.parametrize("bad, error, match", [
    ({"w": torch.tensor([[1.0, float("nan")]])}, ValueError, r"'w'.*non-finite"),
    ({"w": torch.tensor([[1.0, float("inf")]])}, ValueError, r"'w'.*non-finite"),
    ({"w": torch.ones(2, 2, dtype=torch.int32)}, TypeError, r"'w'.*not floating point"),
    ({"w": torch.ones(0, 4)}, ValueError, r"'w'.*empty"),
])
def test_bad_weights_are_refused_before_any_work(bad, error, match):
    params = {"a": torch.randn(4, 8), **bad}
    with pytest.raises(error, match=match):
        aofunc.quantize(params, Spec([Rule(".*", aofunc.Int8WeightOnly())]))


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="mapping"):
        aofunc.quantize([torch.randn(2, 2)], Spec([]))
    with pytest.raises(TypeError, match="aofunc.Spec"):
        aofunc.quantize({"w": torch.randn(2, 2)}, [Rule(".*", None)])
    with pytest.raises(ValueError, match="together"):
        aofunc.quantize({"w": torch.randn(2, 2)}, Spec([]), model=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="already quantized"):
        q = aofunc.quantize({"w": torch.randn(2, 32)}, Spec([Rule("w", aofunc.Int8WeightOnly())]))
        aofunc.quantize(q, Spec([Rule("w", aofunc.NF4())]))


def test_bf16_model_keeps_bf16_scales_and_outputs():
    model = tiny_transformer().to(torch.bfloat16)
    params = dict(model.named_parameters())
    ids = torch.randint(0, 96, (1, 8))
    q = aofunc.quantize(params, spec_for(aofunc.Int4WeightOnly(32)), model=model, example=ids)
    assert q["layers.0.up.weight"].scale.dtype == torch.bfloat16
    with torch.no_grad():
        assert functional_call(model, q, (ids,)).dtype == torch.bfloat16
    q32 = {n: t.to(torch.float32) for n, t in q.items()}
    assert q32["layers.0.up.weight"].scale.dtype == torch.float32


def test_quantize_refuses_a_pruning_scheme_before_any_work():
    with pytest.raises(TypeError, match=r"not a stored format.*aofunc.prune"):
        aofunc.quantize({"w": torch.randn(4, 8)}, Spec([Rule("w", aofunc.Sparse(pattern="2:4"))]))


def test_tied_names_get_one_quantized_weight_and_the_tied_model_runs():
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params["head.weight"] is params["embed.weight"]
    q = aofunc.quantize(params, Spec([Rule(r"embed\.weight", aofunc.Int8WeightOnly())]))  # a rule for one name
    assert isinstance(q["head.weight"], aofunc.QTensor) and q["head.weight"] is q["embed.weight"]
    with torch.no_grad():
        y = functional_call(model, q, (ids,))
        untied_names = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r"embed\.weight",
                                                                                   aofunc.Int8WeightOnly())]))
        assert torch.equal(y, functional_call(model, untied_names, (ids,)))
        assert torch.equal(aofunc.apply(model, q, ids), y)


def test_tied_names_are_quantized_once(monkeypatch):
    calls = []
    module = sys.modules["aofunc.quantize"]
    original = module.quantize_weight
    monkeypatch.setattr(module, "quantize_weight", lambda *args: calls.append(1) or original(*args))
    w = torch.randn(16, 64)
    q = aofunc.quantize({"a": w, "b": w, "c": torch.randn(16, 64)}, Spec([Rule(".*", aofunc.NF4())]))
    assert len(calls) == 2 and q["a"] is q["b"] and q["c"] is not q["a"]


def test_tied_names_with_different_rules_are_refused_naming_both():
    w = torch.randn(16, 64)
    for rules in ([Rule("head", None), Rule(".*", aofunc.Int8WeightOnly())],
                  [Rule("head", aofunc.NF4()), Rule(".*", aofunc.Int8WeightOnly())],
                  [Rule("head", aofunc.Int8WeightOnly(), transposed=True), Rule(".*", aofunc.Int8WeightOnly())]):
        with pytest.raises(ValueError, match=r"'embed' and 'head' are one tensor \(tied weights\)"):
            aofunc.quantize({"embed": w, "head": w}, Spec(rules))


def test_a_tied_weight_used_as_x_at_w_under_one_name_is_transposed_under_every_name():
    layer = Conv1D(64, 16)
    params = {"weight": layer.weight, "bias": layer.bias, "alias": layer.weight}
    q = aofunc.quantize(params, Spec([Rule("weight|alias", aofunc.Int8WeightOnly())]), model=layer,
                        example=torch.randn(2, 64))
    assert q["weight"] is q["alias"] and q["weight"].transposed
