"""QTensor: the aten ops it answers, the ones it refuses, pytree and compile plumbing."""
import optree
import pytest
import torch

import aofunc
from aofunc.formats import QTensor
from aofunc.quantize import quantize_weight
from tests.models import ALL_SCHEMES


@pytest.fixture(params=ALL_SCHEMES, ids=lambda s: type(s).__name__)
def qweight(request):
    torch.manual_seed(0)
    return quantize_weight(torch.randn(32, 64, dtype=torch.bfloat16), request.param)


def test_dequantize_matches_the_scheme(qweight):
    assert torch.equal(qweight.dequantize(), qweight.scheme.dequantize(qweight.tensors, 32, 64, torch.bfloat16))
    assert qweight.shape == (32, 64) and qweight.dtype == torch.bfloat16 and not qweight.requires_grad


def test_detach_and_clone_keep_the_values(qweight):
    for copy in (qweight.detach(), qweight.clone()):
        assert isinstance(copy, QTensor) and copy.scheme == qweight.scheme
        assert torch.equal(copy.dequantize(), qweight.dequantize())
    clone = qweight.clone()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.tensors.values(), qweight.tensors.values()))


def test_to_dtype_changes_the_logical_dtype_and_the_float_tensors(qweight):
    w32 = qweight.to(torch.float32)
    assert isinstance(w32, QTensor) and w32.dtype == torch.float32
    for name, t in w32.tensors.items():
        original = qweight.tensors[name]
        if name in qweight.scheme.float_names:
            assert t.dtype == torch.float32 and torch.equal(t, original.float())
        else:
            assert t.dtype == original.dtype
    # bf16 scales are exact in fp32: the same weight, now without the final rounding to bf16
    assert torch.equal(w32.dequantize().to(torch.bfloat16), qweight.dequantize())
    with pytest.raises(TypeError, match="floating point"):
        qweight.to(torch.int8)


def test_to_device_keeps_everything(qweight):
    moved = qweight.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.dequantize(), qweight.dequantize())


def test_t_flips_the_orientation(qweight):
    t = qweight.t()
    assert isinstance(t, QTensor) and t.shape == (64, 32) and t.transposed
    assert torch.equal(t.dequantize(), qweight.dequantize().t())
    assert torch.equal(t.t().dequantize(), qweight.dequantize())


def test_any_other_op_is_a_clear_error(qweight):
    with pytest.raises(NotImplementedError, match=type(qweight.scheme).__name__ + r".*aten.add"):
        qweight + 1
    with pytest.raises(NotImplementedError, match="dequantize"):
        torch.sum(qweight)


def test_optree_flattens_to_plain_tensors_in_the_aofunc_namespace(qweight):
    tree = {"w": qweight, "b": torch.zeros(3)}
    leaves, spec = optree.tree_flatten(tree, namespace="aofunc")
    assert all(type(leaf) is torch.Tensor for leaf in leaves)
    assert len(leaves) == len(qweight.tensors) + 1
    rebuilt = optree.tree_unflatten(spec, leaves)
    assert torch.equal(rebuilt["w"].dequantize(), qweight.dequantize())
    # outside the namespace a QTensor is a leaf, and torch's own pytree does not open it
    assert len(optree.tree_leaves(tree)) == 2
    assert len(torch.utils._pytree.tree_leaves(tree)) == 2


def test_tensor_flatten_round_trip(qweight):
    names, ctx = qweight.__tensor_flatten__()
    rebuilt = QTensor.__tensor_unflatten__({n: getattr(qweight, n) for n in names}, ctx, None, None)
    assert torch.equal(rebuilt.dequantize(), qweight.dequantize())
    assert "QTensor(" in qweight._stable_hash_for_caching()


def test_repr_names_the_scheme(qweight):
    assert type(qweight.scheme).__name__ in repr(qweight)


def test_size_in_bytes_counts_stored_tensors(qweight):
    expected = sum(t.numel() * t.element_size() for t in qweight.tensors.values())
    assert aofunc.size_in_bytes({"w": qweight, "tied": qweight}) == expected


def test_compiled_functions_read_quantized_weights_in_place(qweight):
    # The compiler's own reader of mark_static_address: weights marked so are not copied into CUDA-graph buffers
    # on every call under mode="reduce-overhead", and the mark survives copies, moves and casts.
    from torch._dynamo.utils import get_static_address_type

    for w in (qweight, qweight.detach(), qweight.to(torch.float16), qweight.clone()):
        assert get_static_address_type(w) == "unguarded"


def test_values_are_readable_only_outside_tracing():
    # host reads of offsets and indices are skipped while any stage of torch.compile traces (dynamo, or the fake
    # tensors of AOT tracing that torch.compiler.is_compiling() does not flag in every torch release)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from aofunc.formats.qtensor import values_readable
    t = torch.arange(4)
    assert values_readable(t)
    with FakeTensorMode() as mode:
        assert not values_readable(mode.from_tensor(t))
    assert not torch.compile(lambda x: torch.tensor(values_readable(x)), fullgraph=True, backend="eager")(t)


def test_flattening_for_compiled_code_reads_no_tensor_property():
    # compiled code unwraps every QTensor input on each call: its flatten context is built once, and size/stride
    # queries take the first branch of __torch_function__
    import aofunc.formats.qtensor as qt
    q = aofunc.quantize({"w": torch.randn(64, 64)}, aofunc.Spec([aofunc.Rule("w", aofunc.Int4WeightOnly(32))]))["w"]
    names, context = q.__tensor_flatten__()
    assert names == list(q._names) and context is q.__tensor_flatten__()[1]
    assert context == (q.scheme, (64, 64), torch.float32, False)
    assert qt._METADATA >= {torch.Tensor.size, torch.Tensor.stride, torch.Tensor.shape.__get__}
    assert q.size() == (64, 64) and q.stride() == (64, 1) and q.dim() == 2
