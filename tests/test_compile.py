"""Quantized models under torch.compile(fullgraph=True): every format, and no recompiles for new qparams."""
import pytest
import torch
from torch.func import functional_call

import aofunc
from aofunc import Rule, Spec
from tests.models import ALL_SCHEMES, tiny_transformer


class CountingBackend:
    """aot_eager that counts how many graphs it compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)


def quantized(model, scheme, seed, ids):
    params = {n: p.detach() * (1 + 0.01 * seed) for n, p in model.named_parameters()}
    return aofunc.quantize(params, Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", scheme)]),
                           model=model, example=ids)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: type(s).__name__)
def test_fullgraph_compile_matches_eager_and_does_not_recompile(scheme):
    torch._dynamo.reset()
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    backend = CountingBackend()
    run = torch.compile(lambda qp, x: functional_call(model, qp, (x,)), fullgraph=True, backend=backend)
    for seed in range(3):
        q = quantized(model, scheme, seed, ids)
        with torch.no_grad():
            eager = functional_call(model, q, (ids,))
            compiled = run(q, ids)
        assert aofunc.sqnr(eager, compiled) > 60
    assert backend.graphs == 1


#: a module-level model, as in a script: dynamo treats a global module's own nn.Parameters as constants of the graph
MLP = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))


def test_one_compiled_function_follows_each_tree_it_is_given():
    """A tree holding the module's own nn.Parameters used to be baked into the compiled graph: a later tree's
    biases were silently replaced by the first's. Trees from aofunc hold aliases, so each call sees its own tree."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    spec = Spec([Rule(r"\d\.weight", aofunc.Int8WeightOnly())])
    trees = [aofunc.quantize(dict(MLP.named_parameters()), spec),
             aofunc.quantize({name: p.detach() for name, p in other.named_parameters()}, spec)]
    assert not torch.equal(trees[0]["0.bias"], trees[1]["0.bias"])
    assert not torch.equal(trees[0]["2.weight"].qdata, trees[1]["2.weight"].qdata)
    x = torch.randn(4, 32)
    run = torch.compile(lambda p, inputs: functional_call(MLP, p, (inputs,)), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for tree in trees + trees[:1]:
            torch.testing.assert_close(run(tree, x), functional_call(MLP, tree, (x,)), rtol=1e-5, atol=1e-6)


def test_compile_with_parameters_that_require_grad():
    torch._dynamo.reset()
    model = tiny_transformer()
    ids = torch.randint(0, 96, (1, 6))
    q = aofunc.quantize(dict(model.named_parameters()),
                        Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", aofunc.Int8WeightOnly())]),
                        model=model, example=ids)
    run = torch.compile(lambda qp, x: functional_call(model, qp, (x,)), fullgraph=True, backend="aot_eager")
    y = run(q, ids)
    y.sum().backward()  # the float leaves of the tree (biases, norms) get gradients: they are what to optimize
    assert q["layers.0.up.bias"].requires_grad and q["layers.0.up.bias"].grad is not None
    assert q["layers.0.norm1.weight"].grad is not None
    assert model.layers[0].up.bias.grad is None  # the tree's leaves are aliases, not the module's Parameters
    assert q["layers.0.up.bias"].data_ptr() == model.layers[0].up.bias.data_ptr()


def test_inductor_smoke():
    torch._dynamo.reset()
    model = tiny_transformer()
    ids = torch.randint(0, 96, (1, 6))
    q = aofunc.quantize(dict(model.named_parameters()),
                        Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", aofunc.Int4WeightOnly(32))]),
                        model=model, example=ids)
    with torch.no_grad():
        run = torch.compile(lambda qp, x: functional_call(model, qp, (x,)), fullgraph=True)
        assert aofunc.sqnr(functional_call(model, q, (ids,)), run(q, ids)) > 40
