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


# ---------------------------------------------------------------------------------------------- edge inputs

@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
def test_weight_dtypes_without_a_format_are_refused_naming_the_supported_ones(dtype, scheme):
    with pytest.raises(TypeError, match=rf"quantize: 'w' is {str(dtype)[6:]}, but quantize takes float32, "
                                        r"float16, bfloat16 weights"):
        aofunc.quantize({"w": torch.randn(4, 64).to(dtype)}, Spec([Rule("w", scheme)]))


def test_pruning_takes_float64_and_refuses_float8_and_non_finite_weights_naming_prune():
    spec = Spec([Rule("w", aofunc.Sparse(pattern="2:4"))])
    w = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(1, 8)
    assert aofunc.prune({"w": w}, spec)["w"].dtype == torch.float64
    with pytest.raises(TypeError, match=r"prune: 'w' is float8_e4m3fn, but prune takes float32, float16, bfloat16, "
                                        r"float64 weights"):
        aofunc.prune({"w": w.to(torch.float8_e4m3fn)}, spec)
    with pytest.raises(ValueError, match=r"prune: 'w' has non-finite values \(NaN or Inf\); refusing to prune it"):
        aofunc.prune({"w": torch.full((4, 8), float("nan"))}, spec)


def test_an_nf4_block_too_large_for_memory_is_refused_when_made():
    with pytest.raises(ValueError, match=r"NF4: block_size \* scaler_block_size = 274877906944 weights"):
        aofunc.NF4(block_size=2**30)
    assert aofunc.NF4(block_size=4096, scaler_block_size=4096).block_size == 4096


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("transposed", [False, True])
def test_meta_weights_quantize_to_meta_qtensors_of_the_right_size(scheme, transposed):
    shape = (128, 48) if transposed else (48, 128)
    spec = Spec([Rule("w", scheme, transposed=transposed)])
    real = aofunc.quantize({"w": torch.randn(*shape), "b": torch.randn(48)}, spec)
    meta = aofunc.quantize({"w": torch.empty(*shape, device="meta"), "b": torch.empty(48, device="meta")}, spec)
    q = meta["w"]
    assert isinstance(q, aofunc.QTensor) and q.device.type == "meta" and q.is_meta
    assert (q.scheme, q.shape, q.dtype, q.transposed) == (real["w"].scheme, real["w"].shape, real["w"].dtype,
                                                          real["w"].transposed)
    assert {name: (t.shape, t.dtype) for name, t in q.tensors.items()} == \
        {name: (t.shape, t.dtype) for name, t in real["w"].tensors.items()}
    assert all(t.is_meta for t in q.tensors.values())
    assert aofunc.size_in_bytes(meta) == aofunc.size_in_bytes(real)


def test_a_tree_giving_tied_names_different_tensors_is_refused_naming_them():
    model = tiny_transformer()
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params["head.weight"] is params["embed.weight"]
    params["head.weight"] = params["head.weight"].detach().clone()
    ids = torch.randint(0, 96, (2, 6))
    match = r"the model ties \['embed.weight', 'head.weight'\] .* gives 'embed.weight' and 'head.weight' different"
    with pytest.raises(ValueError, match=match) as info:
        aofunc.quantize(params, spec_for(aofunc.Int8WeightOnly()), model=model, example=ids)
    assert "tie_weights" not in str(info.value)
    with pytest.raises(ValueError, match=match):
        aofunc.capture_inputs(model, params, ids)
    with pytest.raises(ValueError, match="wanda: " + match):
        aofunc.wanda(params, [ids], model=model, progress=False)
    del params["head.weight"]   # one of the tied names alone is fine: the other follows it
    assert "embed.weight" in aofunc.capture_inputs(model, params, ids)
