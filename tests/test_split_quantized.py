"""split_quantized / join_quantized: plain tensors into a compiled function, the QTensors rebuilt inside it."""
import pytest
import torch
from torch.func import functional_call

import aofunc
from aofunc import Rule, Spec


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))


def _tree(model, scheme, seed):
    torch.manual_seed(seed)
    params = {name: torch.randn_like(p) * 0.1 for name, p in model.named_parameters()}
    return aofunc.quantize(params, Spec([Rule(r".*\.weight", scheme)]))


def test_split_opens_qtensors_into_their_own_tensors_and_join_rebuilds_them():
    model = _model()
    q = _tree(model, aofunc.Int4WeightOnly(32), seed=1)
    tensors, layout = aofunc.split_quantized(q)
    assert all(not isinstance(t, aofunc.QTensor) for t in tensors.values())
    assert tensors["0.weight:qdata"] is q["0.weight"].qdata and tensors["0.bias"] is q["0.bias"]
    joined = aofunc.join_quantized(tensors, layout)
    assert set(joined) == set(q)
    for name, value in q.items():
        if isinstance(value, aofunc.QTensor):
            assert joined[name].scheme == value.scheme and joined[name].shape == value.shape
            assert torch.equal(joined[name].dequantize(), value.dequantize())
        else:
            assert joined[name] is value


def test_compiled_over_split_trees_equals_eager_and_follows_new_values():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _model()
    x = torch.randn(5, 64)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda t, layout, x: functional_call(model, aofunc.join_quantized(t, layout), (x,)),
                         backend=counter, fullgraph=True)
    for scheme in (aofunc.Int8WeightOnly(), aofunc.Int4WeightOnly(32)):
        for seed in (1, 2):  # new values of one layout: the same compiled code, the new tree's outputs
            q = _tree(model, scheme, seed)
            tensors, layout = aofunc.split_quantized(q)
            want = functional_call(model, q, (x,))
            assert torch.allclose(step(tensors, layout, x), want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2  # once per layout


def test_split_refuses_names_with_its_separator_and_join_unknown_layouts():
    q = {"a:b": torch.zeros(2)}
    with pytest.raises(ValueError, match="'a:b'"):
        aofunc.split_quantized(q)
    with pytest.raises(ValueError, match="unknown layout"):
        aofunc.join_quantized({}, "not a layout")
