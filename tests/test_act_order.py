"""Act-order int4: a weight carrying `perm`, its input columns' order. The codes and groups run along the permuted
columns, the layer computes y = x[..., perm] @ w_stored.T (+ bias), and dequantize gives the original order."""
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import aofunc
from aofunc.quantize import quantize_weight
from tests.test_ops import FLOATS, TOLERANCE, reference_linear, relative_error

GRIDS = [aofunc.Int4WeightOnly(32, zero_point=z) for z in ("float", "int", "none")]


def act_order_weight(w: torch.Tensor, scheme, seed: int = 0):
    """(the act-order QTensor of w [N, K], perm, the ordinary QTensor of w[:, perm] it is built from)."""
    k = w.shape[1]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    stored = quantize_weight(w[:, perm.long()].contiguous(), scheme)
    q = aofunc.QTensor(scheme, {**stored.tensors, "perm": perm}, tuple(w.shape), w.dtype)
    return q, perm, stored


@pytest.mark.parametrize("scheme", GRIDS, ids=repr)
def test_dequantize_puts_the_columns_back_in_their_original_order(scheme):
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(0))
    q, perm, stored = act_order_weight(w, scheme)
    dq = q.dequantize()
    expected = torch.empty_like(dq)
    for j, column in enumerate(perm.tolist()):  # column j of the stored weight is input column perm[j]
        expected[:, column] = stored.dequantize()[:, j]
    assert torch.equal(dq, expected)
    assert torch.equal(dq[:, perm.long()], stored.dequantize())
    assert aofunc.sqnr(w, dq) > 15  # still w, quantized
    assert torch.equal(aofunc.dequantize({"w": q})["w"], dq)


@pytest.mark.parametrize("scheme", GRIDS, ids=repr)
@pytest.mark.parametrize("x_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("n", [32, 24])  # 32: the packed CPU kernel for a few rows; 24: the dequantized path
@pytest.mark.parametrize("m", [1, 4, 9])
def test_qlinear_with_perm_equals_dequantize_then_linear(scheme, x_dtype, n, m):
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, 200, generator=g).to(x_dtype)
    x = torch.randn(m, 200, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g).to(x_dtype)
    q, perm, stored = act_order_weight(w, scheme, seed=m)
    y = aofunc.qlinear(x, q, bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    assert relative_error(y, reference_linear(x, q, bias)) <= TOLERANCE[x_dtype]
    assert relative_error(y, F.linear(x.double(), q.dequantize().double(), bias.double())) <= TOLERANCE[x_dtype]
    # exactly what the ordinary weight gives on the gathered input
    assert torch.equal(y, aofunc.qlinear(x[:, perm.long()], stored, bias))
    assert torch.equal(F.linear(x, q, bias), y)


@settings(deadline=None, max_examples=30)
@given(scheme=st.sampled_from(GRIDS + [aofunc.Int4WeightOnly(64, zero_point="int")]), n=st.integers(1, 40),
       k=st.integers(1, 150), lead=st.sampled_from([(), (1,), (3,), (2, 5)]), dtype=st.sampled_from(FLOATS),
       with_bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_qlinear_with_perm_any_shape(scheme, n, k, lead, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    q, _, _ = act_order_weight(w, scheme, seed)
    y = aofunc.qlinear(x, q, bias)
    assert y.shape == (*lead, n) and relative_error(y, reference_linear(x, q, bias)) <= TOLERANCE[dtype]


def test_gradients_embedding_and_moves_follow_the_original_order():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q, perm, _ = act_order_weight(w, aofunc.Int4WeightOnly(32, zero_point="int"))
    x = torch.randn(3, 64, requires_grad=True)
    aofunc.qlinear(x, q).sum().backward()
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(3, 64), atol=1e-5)
    ids = torch.tensor([[3, 0], [15, 3]])
    assert torch.equal(F.embedding(ids, q), q.dequantize()[ids])
    half = q.to(torch.bfloat16)
    assert half.perm.dtype == torch.int32 and torch.equal(half.perm, perm)
    unpermuted = half.with_tensors({name: t for name, t in half.tensors.items() if name != "perm"})
    assert torch.equal(half.dequantize()[:, perm.long()], unpermuted.dequantize())
    assert q.scheme.bits_per_weight(16, 64, torch.float32) == aofunc.Int4WeightOnly(32, "int").bits_per_weight(
        16, 64, torch.float32)


def test_a_stack_of_act_order_experts_runs_each_expert_in_its_own_order():
    g = torch.Generator().manual_seed(2)
    experts = [act_order_weight(torch.randn(32, 64, generator=g), GRIDS[1], seed=e)[0] for e in range(3)]
    stack = aofunc.QTensor(GRIDS[1], {name: torch.stack([q.tensors[name] for q in experts])
                                      for name in experts[0].tensors}, (3, 32, 64), torch.float32)
    assert stack.perm.shape == (3, 64)
    for e, q in enumerate(experts):
        assert torch.equal(stack[e].dequantize(), q.dequantize())
    x = torch.randn(7, 64, generator=g)
    offs = torch.tensor([2, 5, 7], dtype=torch.int32)
    y = torch._grouped_mm(x, stack.transpose(-2, -1), offs=offs)
    assert torch.equal(y[2:5], aofunc.qlinear(x[2:5], experts[1]))
    assert relative_error(y, torch._grouped_mm(x, stack.dequantize().transpose(-2, -1), offs=offs)) <= 1e-4


# ---------------------------------------------------------------------------------------------- files

@pytest.mark.parametrize("scheme", GRIDS, ids=repr)
def test_save_then_load_keeps_the_perm(tmp_path, scheme):
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, perm, _ = act_order_weight(w, scheme)
    path = tmp_path / "q.safetensors"
    aofunc.save({"layers.0.up.weight": q, "b": torch.ones(2)}, path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["aofunc"])
        stored = f.get_tensor("layers.0.up.weight.perm")
    assert header["version"] == 4 and stored.dtype == torch.int32 and torch.equal(stored, perm)
    loaded = aofunc.load(path)["layers.0.up.weight"]
    assert loaded.tensors.keys() == q.tensors.keys()
    assert all(torch.equal(loaded.tensors[name], t) for name, t in q.tensors.items())
    x = torch.randn(3, 80, dtype=torch.bfloat16)
    assert torch.equal(aofunc.qlinear(x, loaded), aofunc.qlinear(x, q))
    assert torch.equal(loaded.dequantize(), q.dequantize())


def test_a_stack_with_perm_round_trips(tmp_path):
    stack = aofunc.quantize({"experts.up": torch.randn(2, 16, 64)},
                            aofunc.Spec([aofunc.Rule("experts.up", GRIDS[2])]))["experts.up"]
    perm = torch.stack([torch.randperm(64), torch.arange(64).flip(0)]).to(torch.int32)
    stack = stack.with_tensors({**stack.tensors, "perm": perm})
    aofunc.save({"experts.up": stack}, tmp_path / "moe.safetensors")
    loaded = aofunc.load(tmp_path / "moe.safetensors")["experts.up"]
    assert torch.equal(loaded.perm, perm) and torch.equal(loaded[1].dequantize(), stack[1].dequantize())


def perm_file_parts(version=4):
    q, _, _ = act_order_weight(torch.randn(24, 80), GRIDS[1])
    tensors = {f"w.{name}": t for name, t in q.tensors.items()}
    header = {"version": version, "aliases": {},
              "params": {"w": {"scheme": q.scheme.to_dict(), "shape": [24, 80], "dtype": "float32",
                               "transposed": False}}}
    return tensors, header


@pytest.mark.parametrize("corrupt, match", [
    (lambda t, h: t.update({"w.perm": t["w.perm"].long()}), r"'w'.*'w.perm' is I64\[80\], expected I32\[80\]"),
    (lambda t, h: t.update({"w.perm": t["w.perm"][:79].contiguous()}), r"'w'.*'w.perm' is I32\[79\]"),
    (lambda t, h: t.update({"w.perm": torch.zeros(80, dtype=torch.int32)}),
     r"'w': its 'perm' is not a permutation of the 80 input columns"),
    (lambda t, h: h.update(version=3), r"'w': it stores a 'perm' \(act-order\), which file version 3 does not have"),
])
def test_a_bad_perm_in_a_file_is_refused_naming_the_parameter(tmp_path, corrupt, match):
    tensors, header = perm_file_parts()
    corrupt(tensors, header)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"aofunc": json.dumps(header)})
    with pytest.raises(ValueError, match=match):
        aofunc.load(tmp_path / "bad.safetensors")


def test_save_pretrained_refuses_a_perm_naming_the_parameter(tmp_path):
    from aofunc.pretrained import ExportError, save_pretrained

    q, _, _ = act_order_weight(torch.randn(16, 64), GRIDS[1])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"'layers.0.up.weight' carries an act-order input permutation"):
        save_pretrained({"layers.0.up.weight": q}, tmp_path / "out", base=tmp_path / "base")
