"""apply: functional_call that refuses unknown keys and handles tied weights."""
import pytest
import torch

import aofunc
from aofunc import Rule, Spec
from tests.models import tiny_transformer


def test_apply_equals_functional_call():
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 6))
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r"layers\..*\.(up|down)\.weight",
                                                                   aofunc.Int8WeightOnly())]))
    with torch.no_grad():
        assert torch.equal(aofunc.apply(model, q, ids), torch.func.functional_call(model, q, (ids,)))


def test_unknown_keys_are_refused_with_a_suggestion():
    model = tiny_transformer()
    params = dict(model.named_parameters())
    params["layers.0.up.weigth"] = params.pop("layers.0.up.weight")
    with pytest.raises(KeyError, match=r"'layers.0.up.weigth' \(did you mean 'layers.0.up.weight'\?\)"):
        aofunc.apply(model, params, torch.zeros(1, 2, dtype=torch.long))


def test_tied_weights_take_the_value_given_for_either_name():
    model = tiny_transformer()
    ids = torch.randint(0, 96, (1, 5))
    params = dict(model.named_parameters())
    assert "head.weight" not in params  # tied to embed.weight
    q = aofunc.quantize(params, Spec([Rule(r"embed\.weight", aofunc.Int8WeightOnly())]))
    with torch.no_grad():
        y = aofunc.apply(model, q, ids)
        by_other_name = aofunc.apply(model, {**{k: v for k, v in q.items() if k != "embed.weight"},
                                             "head.weight": q["embed.weight"]}, ids)
    assert torch.equal(y, by_other_name)
    assert model.head.weight is model.embed.weight and not isinstance(model.embed.weight, aofunc.QTensor)


def test_the_model_is_left_exactly_as_it_was():
    model = tiny_transformer()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r".*\.weight", aofunc.NF4())]))
    with torch.no_grad():
        aofunc.apply(model, q, torch.randint(0, 96, (1, 4)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(p, aofunc.QTensor) for p in model.parameters())


def test_apply_refuses_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        aofunc.apply(lambda x: x, {}, 1)
