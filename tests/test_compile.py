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


def test_compile_with_parameters_that_require_grad():
    torch._dynamo.reset()
    model = tiny_transformer()
    ids = torch.randint(0, 96, (1, 6))
    q = aofunc.quantize(dict(model.named_parameters()),
                        Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", aofunc.Int8WeightOnly())]),
                        model=model, example=ids)
    run = torch.compile(lambda qp, x: functional_call(model, qp, (x,)), fullgraph=True, backend="aot_eager")
    y = run(q, ids)
    y.sum().backward()  # the float parameters (biases, norms) still get gradients
    assert q["layers.0.up.bias"] is model.layers[0].up.bias and q["layers.0.up.bias"].grad is not None
    assert q["layers.0.norm1.weight"].grad is not None


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
