"""Trees a transform returns: detached aliases for what passes through (never the module's own nn.Parameters), one
object per underlying tensor, so tied names stay tied."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

import aofunc
from aofunc import Rule, Spec
from aofunc.calibrate.wanda import wanda_calibration
from aofunc.tree import detached_aliases, share_tied, tied_groups, unique_by_tensor
from tests.models import is_detached_alias, tiny_transformer


# ------------------------------------------------------------------------------------------------ the helpers

@given(st.lists(st.integers(0, 3), min_size=1, max_size=8), st.lists(st.booleans(), min_size=4, max_size=4))
def test_detached_aliases_keep_storage_and_requires_grad_and_one_object_per_tensor(owners, grads):
    tensors = [nn.Parameter(torch.randn(3, 2), requires_grad=g) if i % 2 else torch.randn(3, 2).requires_grad_(g)
               for i, g in enumerate(grads)]
    params = {f"p{i}": tensors[owner] for i, owner in enumerate(owners)}
    out = detached_aliases(params)
    assert list(out) == list(params)
    for name, t in params.items():
        assert is_detached_alias(out[name], t)
    for a in params:
        for b in params:
            assert (out[a] is out[b]) == (params[a] is params[b])
    assert all(params[f"p{i}"] is tensors[owner] for i, owner in enumerate(owners))  # the input is untouched


def test_aliases_are_read_in_place_by_compiled_functions():
    # the compiler's own reader of mark_static_address: CUDA graphs under reduce-overhead do not copy these
    from torch._dynamo.utils import get_static_address_type

    plain = torch.randn(3)
    alias = detached_aliases({"p": nn.Parameter(torch.randn(3)), "t": plain})
    assert get_static_address_type(alias["p"]) == "unguarded" and get_static_address_type(alias["t"]) == "unguarded"
    assert get_static_address_type(plain) is None  # the caller's tensor is not marked


def test_an_alias_is_a_new_autograd_leaf_on_the_same_memory():
    p = nn.Parameter(torch.ones(4))
    alias = detached_aliases({"p": p})["p"]
    assert alias.is_leaf and alias.requires_grad and not isinstance(alias, nn.Parameter)
    (alias * 3).sum().backward()
    assert alias.grad is not None and p.grad is None
    with torch.no_grad():
        alias.add_(1)  # an optimizer's step on the alias is a step on the module's parameter
    assert torch.equal(p, torch.full((4,), 2.0))


def test_quantized_and_other_subclass_leaves_are_kept_as_they_are():
    q = aofunc.quantize({"w": torch.randn(8, 32)}, Spec([Rule("w", aofunc.Int8WeightOnly())]))["w"]
    out = detached_aliases({"w": q, "v": q})
    assert out["w"] is q and out["v"] is q


def test_tied_groups_unique_by_tensor_and_share_tied():
    a, b = torch.randn(2), torch.randn(2)
    params = {"x": a, "y": b, "z": a, "w": a}
    assert tied_groups(params) == [["x", "z", "w"]]
    assert unique_by_tensor(params, ["z", "x", "y", "w"]) == ["z", "y"]
    out = share_tied({"x": a, "y": b, "z": torch.zeros(2), "w": a}, params, ["z"])
    assert out["x"] is out["z"] is out["w"] and out["y"] is b


# ------------------------------------------------------------------------------------------------ every transform

class Mlp(nn.Module):
    """A norm feeding two linears with biases (something for every transform to take and to pass through)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def _int8_weights():
    return Spec([Rule(r"(up|down)\.weight", aofunc.Int8WeightOnly())])


def _two_four():
    return Spec([Rule(r"(up|down)\.weight", aofunc.Sparse(pattern="2:4"))])


def _rules(scheme):
    return {name: Rule(name, scheme) for name in ("up.weight", "down.weight")}


def _through_a_file(params, model, batches, tmp_path):
    aofunc.save(aofunc.quantize(params, _int8_weights()), tmp_path / "q.safetensors")
    return aofunc.load(tmp_path / "q.safetensors")


TRANSFORMS = {
    "quantize": lambda p, m, b, tmp: aofunc.quantize(p, _int8_weights()),
    "quantize with model": lambda p, m, b, tmp: aofunc.quantize(p, _int8_weights(), model=m, example=b[0]),
    "dequantize": lambda p, m, b, tmp: aofunc.dequantize(p),
    "dequantize quantized": lambda p, m, b, tmp: aofunc.dequantize(aofunc.quantize(p, _int8_weights())),
    "gptq": lambda p, m, b, tmp: aofunc.gptq(p, b, model=m, progress=False,
                                             spec=Spec([Rule(r"(up|down)\.weight", aofunc.Int4WeightOnly(32))])),
    "smoothquant": lambda p, m, b, tmp: aofunc.smoothquant(p, b, model=m, progress=False),
    "wanda": lambda p, m, b, tmp: aofunc.wanda(p, b, model=m, pattern="2:4", progress=False),
    "prune": lambda p, m, b, tmp: aofunc.prune(p, _two_four()),
    "semi_structured": lambda p, m, b, tmp: aofunc.semi_structured(p),
    "fold gptq_calibration": lambda p, m, b, tmp: aofunc.fold(
        aofunc.gptq_calibration(_rules(aofunc.Int4WeightOnly(32))), p, b, model=m, progress=False),
    "fold wanda_calibration": lambda p, m, b, tmp: aofunc.fold(
        wanda_calibration(_rules(aofunc.Sparse(pattern="2:4"))), p, b, model=m, progress=False),
    "load": _through_a_file,
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_no_transform_returns_the_modules_own_parameters(transform, tmp_path):
    torch.manual_seed(0)
    model = Mlp()
    model.norm.bias.requires_grad_(False)  # requires_grad is kept either way
    params = dict(model.named_parameters())
    before = {name: t.detach().clone() for name, t in params.items()}
    batches = [torch.randn(8, 64) for _ in range(2)]
    out = TRANSFORMS[transform](params, model, batches, tmp_path)
    assert set(out) == set(params)
    assert not any(isinstance(t, nn.Parameter) for t in out.values())
    if transform != "load":  # a file gives new tensors
        on_input_memory = [name for name, t in out.items() if type(t) is not aofunc.QTensor
                           and t.data_ptr() == params[name].data_ptr()]
        assert {"up.bias", "down.bias"} <= set(on_input_memory)
        assert all(is_detached_alias(out[name], params[name]) for name in on_input_memory)
    assert all(params[name] is p for name, p in model.named_parameters())
    assert all(torch.equal(params[name], before[name]) for name in params)


def test_a_tree_with_tied_names_stays_tied_through_every_transform():
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params["head.weight"] is params["embed.weight"]
    int4 = Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", aofunc.Int4WeightOnly(32))])
    trees = {
        "quantize": aofunc.quantize(params, int4, model=model, example=ids),
        "dequantize": aofunc.dequantize(aofunc.quantize(params, int4, model=model, example=ids)),
        "gptq default spec": aofunc.gptq(params, [ids], model=model, progress=False),
        "gptq": aofunc.gptq(params, [ids], model=model, spec=int4, progress=False),
        "wanda": aofunc.wanda(params, [ids], model=model, progress=False),
        "prune": aofunc.prune(params, Spec([Rule(r"(embed|head)\.weight", aofunc.Sparse(0.5))])),
    }
    with torch.no_grad():
        reference = model(ids)
        for what, tree in trees.items():
            assert tree["head.weight"] is tree["embed.weight"], what
            assert aofunc.sqnr(reference, functional_call(model, tree, (ids,))) > 5, what
    assert isinstance(trees["gptq"]["head.weight"], aofunc.QTensor)
