"""Stacked experts: a 3-D weight [E, N, K] quantized as one QTensor, indexed by expert, run as MoE models run it."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import aofunc
from aofunc import Rule, Spec
from tests.models import ALL_SCHEMES

SCHEME_IDS = [repr(s) for s in ALL_SCHEMES]


def stack_spec(scheme, **kwargs):
    return Spec([Rule(r".*experts\..*", scheme, **kwargs)])


def quantize_one(w, scheme, transposed=False, name="experts.w"):
    return aofunc.quantize({name: w}, stack_spec(scheme, transposed=transposed))[name]


def same_stored(a, b):
    return a.tensors.keys() == b.tensors.keys() and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.tensors.values(), b.tensors.values()))


# ---------------------------------------------------------------------------------------------- the format

@given(scheme=st.sampled_from(ALL_SCHEMES), experts=st.integers(1, 4), n=st.integers(1, 24),
       k=st.integers(1, 80), transposed=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2 ** 16))
def test_an_expert_of_the_stack_is_that_expert_quantized_alone_and_a_view(scheme, experts, n, k, transposed, dtype,
                                                                           seed):
    w = torch.randn(experts, n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if transposed:
        w = w.transpose(1, 2).contiguous()
    q = quantize_one(w, scheme, transposed)
    assert q.shape == w.shape and q.dtype == dtype and q.stacked and q.transposed == transposed
    singles = [aofunc.quantize({"w": w[e]}, Spec([Rule("w", scheme, transposed=transposed)]))["w"]
               for e in range(experts)]
    for e, single in enumerate(singles):
        for index in (e, e - experts, torch.tensor(e)):
            got = q[index]
            assert got.shape == single.shape and got.transposed == transposed and not got.stacked
            assert same_stored(got, single)
            for name, t in got.tensors.items():  # a view: same storage, no copy of the codes
                assert t.untyped_storage().data_ptr() == q.tensors[name].untyped_storage().data_ptr()
    # every stored tensor is the expert's with a leading E
    for name, t in q.tensors.items():
        assert t.shape == (experts, *singles[0].tensors[name].shape)
    # dequantize of the stack is the stack of each expert's
    expected = torch.stack([single.dequantize() for single in singles])
    assert torch.equal(q.dequantize(), expected)
    assert torch.equal(aofunc.dequantize({"experts.w": q})["experts.w"], expected)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=SCHEME_IDS)
def test_an_index_tensor_gathers_experts_and_the_stack_moves_and_copies(scheme):
    w = torch.randn(5, 16, 64)
    q = quantize_one(w, scheme)
    ids = torch.tensor([3, 0, 3, -1])
    gathered = q[ids]
    assert gathered.shape == (4, 16, 64) and gathered.stacked
    for i, e in enumerate(ids.tolist()):
        assert same_stored(gathered[i], q[e])
    assert torch.equal(gathered.dequantize(), q.dequantize()[ids])
    assert torch.equal(q[1:4].dequantize(), q.dequantize()[1:4])
    assert [t.shape for t in q.unbind(0)] == [torch.Size([16, 64])] * 5
    for moved in (q.detach(), q.clone(), q.to("cpu")):
        assert isinstance(moved, aofunc.QTensor) and moved.shape == q.shape and same_stored(moved, q)
    clone = q.clone()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.tensors.values(), q.tensors.values()))
    half = q.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.stacked
    assert torch.allclose(half.dequantize().float(), q.dequantize(), rtol=1e-2, atol=1e-2)
    swapped = q.transpose(-2, -1)
    assert swapped.shape == (5, 64, 16) and swapped.transposed
    assert torch.equal(swapped.dequantize(), q.dequantize().transpose(-2, -1))
    assert torch.equal(swapped.mT.dequantize(), q.dequantize())


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=SCHEME_IDS)
def test_sizes_of_a_stack_count_every_expert_and_meta_stacks_have_the_real_layout(scheme):
    w = torch.randn(3, 32, 64)
    q = quantize_one(w, scheme)
    meta = quantize_one(w.to("meta"), scheme)
    assert meta.is_meta and {k: (t.shape, t.dtype) for k, t in meta.tensors.items()} == {
        k: (t.shape, t.dtype) for k, t in q.tensors.items()}
    assert aofunc.size_in_bytes({"w": q}) == aofunc.size_in_bytes({"w": meta}) == 3 * aofunc.size_in_bytes(
        {"w": quantize_one(w[0], scheme)})


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=SCHEME_IDS)
def test_grouped_mm_bmm_and_indexed_linears_compute_what_the_dequantized_experts_say(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 48, 64, generator=g)
    q = quantize_one(w, scheme)
    dq = q.dequantize()
    x = torch.randn(11, 64, generator=g)
    offs = torch.tensor([3, 3, 8, 11], dtype=torch.int32)
    dynamic = type(scheme).__name__ in ("Int8Dynamic", "Int8DynamicInt4")
    bound = 25 if dynamic else 60
    y = torch._grouped_mm(x, q.transpose(-2, -1), offs=offs)
    assert aofunc.sqnr(torch._grouped_mm(x, dq.transpose(-2, -1), offs=offs), y) > bound
    assert torch.equal(y[3:8], F.linear(x[3:8], q[2]))  # each group runs as its expert's F.linear
    y = F.grouped_mm(x, q.transpose(-2, -1), offs=offs)
    assert aofunc.sqnr(torch._grouped_mm(x, dq.transpose(-2, -1), offs=offs), y) > bound
    ids = torch.tensor([1, 0, 3, 3, 2])
    xs = x[:5]
    assert torch.allclose(torch.bmm(q[ids], xs.unsqueeze(-1)), torch.bmm(dq[ids], xs.unsqueeze(-1)), atol=1e-5)
    assert torch.allclose(torch.bmm(xs.unsqueeze(1), q[ids].transpose(-2, -1)),
                          torch.bmm(xs.unsqueeze(1), dq[ids].transpose(-2, -1)), atol=1e-5)
    assert aofunc.sqnr(F.linear(x, dq[1]), F.linear(x, q[1])) > bound
    assert torch.allclose(x @ q[2].t(), F.linear(x, q[2]), atol=1e-5)


def test_a_stack_stored_transposed_runs_grouped_mm_on_its_own_layout():
    w = torch.randn(3, 64, 32)  # [E, K, N], as GPT-OSS stores its experts
    q = quantize_one(w, aofunc.Int4WeightOnly(32), transposed=True)
    assert q.scale.shape == (3, 32, 2)  # groups along the 64 inputs
    x = torch.randn(7, 64)
    offs = torch.tensor([2, 5, 7], dtype=torch.int32)
    y = torch._grouped_mm(x, q, offs=offs)
    assert aofunc.sqnr(torch._grouped_mm(x, q.dequantize(), offs=offs), y) > 60


# ---------------------------------------------------------------------------------------------- spec and orientation

def test_the_spec_takes_stacked_experts_and_keeps_warning_about_convolution_kernels():
    params = {"moe.experts.gate_up_proj": torch.randn(4, 32, 16), "conv.weight": torch.randn(8, 4, 3),
              "moe.experts.down_proj": torch.randn(4, 16, 16)}
    spec = Spec([Rule(r".*", aofunc.Int8WeightOnly())])
    with pytest.warns(aofunc.SpecWarning, match="conv.weight.*named like a convolution"):
        q = aofunc.quantize(params, spec)
    assert q["moe.experts.gate_up_proj"].stacked and q["moe.experts.down_proj"].stacked
    assert not isinstance(q["conv.weight"], aofunc.QTensor)
    assert set(spec.report(params).skipped) == {"conv.weight"}


class GroupedExperts(nn.Module):
    """Experts stored [E, K, N] and run as grouped_mm(x, W), or as bmm / indexed F.linear with W [E, N, K]."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        shape = (3, 32, 16) if how == "grouped_in_out" else (3, 16, 32)
        self.experts_w = nn.Parameter(torch.randn(*shape) * 0.2)

    def forward(self, x):  # x [6, 32], two rows per expert
        ids = torch.tensor([0, 0, 1, 1, 2, 2])
        if self.how == "grouped_in_out":
            return torch._grouped_mm(x, self.experts_w, offs=torch.tensor([2, 4, 6], dtype=torch.int32))
        if self.how == "grouped_out_in":
            return F.grouped_mm(x, self.experts_w.transpose(-2, -1), offs=torch.tensor([2, 4, 6], dtype=torch.int32))
        if self.how == "bmm":
            return torch.bmm(self.experts_w[ids], x.unsqueeze(-1)).squeeze(-1)
        return torch.cat([F.linear(x[2 * e:2 * e + 2], self.experts_w[e]) for e in range(3)])


@pytest.mark.parametrize("how", ["grouped_in_out", "grouped_out_in", "bmm", "linear"])
def test_the_orientation_of_stacked_experts_is_found_from_the_model(how):
    model = GroupedExperts(how)
    params = dict(model.named_parameters())
    x = torch.randn(6, 32)
    q = aofunc.quantize(params, Spec([Rule("experts_w", aofunc.Int4WeightOnly(32))]), model=model, example=x)
    assert q["experts_w"].transposed == (how == "grouped_in_out")
    assert q["experts_w"].scale.shape == (3, 16, 1)  # groups along the 32 inputs either way
    with torch.no_grad():
        y = aofunc.apply(model, q, x)
        assert aofunc.sqnr(aofunc.apply(model, aofunc.dequantize(q), x), y) > 60


class ConvKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 4, 3))

    def forward(self, x):
        return F.conv1d(x, self.kernel)


def test_a_3d_weight_the_model_uses_in_a_convolution_is_kept_with_a_warning():
    model = ConvKernel()
    params = dict(model.named_parameters())
    with pytest.warns(aofunc.SpecWarning, match="'kernel'.*convolution"):
        q = aofunc.quantize(params, Spec([Rule("kernel", aofunc.Int8WeightOnly())]), model=model,
                            example=torch.randn(1, 4, 10))
    assert not isinstance(q["kernel"], aofunc.QTensor)


# ---------------------------------------------------------------------------------------------- bad input

def test_an_expert_index_out_of_range_names_the_parameter():
    q = quantize_one(torch.randn(4, 16, 32), aofunc.Int8WeightOnly(), name="layers.0.experts.down_proj")
    for bad in (4, -5, torch.tensor(7), torch.tensor([0, 4]), torch.tensor([-6, 1])):
        with pytest.raises(IndexError, match=r"'layers.0.experts.down_proj'.*4 experts"):
            q[bad]


def test_a_stack_whose_leading_dimension_disagrees_is_refused_naming_the_parameter():
    q = quantize_one(torch.randn(4, 16, 32), aofunc.Int4WeightOnly(32), name="moe.experts.up")
    with pytest.raises(ValueError, match=r"'moe.experts.up'.*4 experts.*'scale' has shape \[3, 16, 1\]"):
        aofunc.QTensor(q.scheme, {**q.tensors, "scale": q.scale[:3]}, q.shape, q.dtype, param_name="moe.experts.up")
    with pytest.raises(ValueError, match=r"'moe.experts.up' holds 4 experts, but offs"):
        torch._grouped_mm(torch.randn(5, 32), q.transpose(-2, -1), offs=torch.tensor([2, 5], dtype=torch.int32))

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Parameter(torch.randn(3, 16, 32))

        def forward(self, x):
            return F.linear(x, self.up[0])

    wrong = quantize_one(torch.randn(4, 16, 32), aofunc.Int8WeightOnly())
    with pytest.raises(ValueError, match=r"'up' is a stack of 4 quantized experts.*\(3, 16, 32\)"):
        aofunc.apply(Experts(), {"up": wrong}, torch.randn(2, 32))


# ---------------------------------------------------------------------------------------------- transformers models

def tiny_moe(kind, implementation):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, experts_implementation=implementation)
    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64, decoder_sparse_step=1)
        model = transformers.Qwen2MoeForCausalLM(config)
    assert model.config._experts_implementation == implementation
    return model.eval()


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_transformers_moe_models_run_with_quantized_experts(kind, implementation):
    model = tiny_moe(kind, implementation)
    params = dict(model.named_parameters())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for scheme in ALL_SCHEMES:
        qparams = aofunc.quantize(params, Spec([Rule(r".*experts\..*", scheme)]), model=model, example=ids)
        stacks = {name: t for name, t in qparams.items() if isinstance(t, aofunc.QTensor)}
        assert len(stacks) == 4 and all(t.stacked and not t.transposed for t in stacks.values())
        with torch.no_grad():
            y = aofunc.apply(model, qparams, ids).logits
            y_dequantized = aofunc.apply(model, aofunc.dequantize(qparams), ids).logits
            reference = model(ids).logits
        dynamic = type(scheme).__name__ in ("Int8Dynamic", "Int8DynamicInt4")
        assert aofunc.sqnr(y_dequantized, y) > (25 if dynamic else 60), scheme
        assert aofunc.sqnr(reference, y) > 20, scheme
        assert aofunc.size_in_bytes(stacks) < sum(params[name].numel() * 4 for name in stacks)


# ---------------------------------------------------------------------------------------------- files (version 4)

@settings(deadline=None, max_examples=40)
@given(scheme=st.sampled_from(ALL_SCHEMES), experts=st.integers(1, 3), n=st.integers(1, 20), k=st.integers(1, 72),
       transposed=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), tied=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_save_then_load_is_the_identity_on_stacked_experts(tmp_path_factory, scheme, experts, n, k, transposed, dtype,
                                                           tied, seed):
    w = torch.randn(experts, n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if transposed:
        w = w.transpose(1, 2).contiguous()
    q = quantize_one(w, scheme, transposed, name="layers.0.experts.up")
    tree = {"norm.weight": torch.ones(3), "layers.0.experts.up": q}
    if tied:
        tree["layers.1.experts.up"] = q
    path = tmp_path_factory.mktemp("moe") / "moe.safetensors"
    aofunc.save(tree, path)
    loaded = aofunc.load(path)
    assert set(loaded) == set(tree) and torch.equal(loaded["norm.weight"], tree["norm.weight"])
    got = loaded["layers.0.experts.up"]
    assert isinstance(got, aofunc.QTensor) and got.stacked
    assert (got.scheme, got.shape, got.dtype, got.transposed) == (q.scheme, q.shape, q.dtype, q.transposed)
    assert same_stored(got, q)
    assert (loaded.get("layers.1.experts.up") is got) == tied
    for e in range(experts):  # indexing the loaded stack gives the expert it held before saving
        assert same_stored(got[e], q[e]) and got[e].shape == q[e].shape and got[e].transposed == transposed
        assert torch.equal(got[e].dequantize(), q[e].dequantize())
    assert torch.equal(got.dequantize(), q.dequantize())


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=SCHEME_IDS)
def test_a_stack_is_stored_as_file_version_4_describes(tmp_path, scheme):
    q = quantize_one(torch.randn(3, 16, 64), scheme, name="moe.experts.down")
    path = tmp_path / "moe.safetensors"
    aofunc.save({"moe.experts.down": q}, path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["aofunc"])
        stored = {key: f.get_tensor(key) for key in f.keys()}
    assert header["version"] == 4
    assert header["params"]["moe.experts.down"] == {"scheme": scheme.to_dict(), "shape": [3, 16, 64],
                                                    "dtype": "float32", "transposed": False}
    single = q[0].scheme.stored(16, 64, torch.float32)
    assert {key: (tuple(t.shape), t.dtype) for key, t in stored.items()} == {
        f"moe.experts.down.{name}": ((3, *shape), dtype) for name, (shape, dtype) in single.items()
        if name in q.tensors}


def stacked_file_parts():
    q = quantize_one(torch.randn(3, 16, 64), aofunc.Int4WeightOnly(32), name="moe.experts.down")
    tensors = {f"moe.experts.down.{name}": t.contiguous() for name, t in q.tensors.items()}
    header = {"version": 4, "aliases": {}, "params": {"moe.experts.down": {
        "scheme": q.scheme.to_dict(), "shape": [3, 16, 64], "dtype": "float32", "transposed": False}}}
    return tensors, header


@pytest.mark.parametrize("corrupt, match", [
    (lambda t, h: t.update({"moe.experts.down.scale": t["moe.experts.down.scale"][0].contiguous()}),
     r"'moe.experts.down'.*'moe.experts.down.scale' is F32\[16, 2\], expected F32\[3, 16, 2\] for a stack of 3 "
     r"experts of Int4WeightOnly\(group_size=32\)"),
    (lambda t, h: t.update({"moe.experts.down.qdata": t["moe.experts.down.qdata"][:2].contiguous()}),
     r"'moe.experts.down'.*'moe.experts.down.qdata' is U8\[2, 16, 32\], expected U8\[3, 16, 32\]"),
    (lambda t, h: h["params"]["moe.experts.down"].update(shape=[4, 16, 64]),
     r"'moe.experts.down'.*'moe.experts.down.qdata' is U8\[3, 16, 32\], expected U8\[4, 16, 32\]"),
    (lambda t, h: t.pop("moe.experts.down.zero"), r"'moe.experts.down'.*'moe.experts.down.zero' is missing"),
    (lambda t, h: h.update(version=3), r"'moe.experts.down': shape \[3, 16, 64\] is a stack of experts, which "
                                       r"file version 3 does not have \(stacked experts came with version 4\)"),
])
def test_a_stored_stack_that_disagrees_with_its_header_is_refused_naming_the_parameter(tmp_path, corrupt, match):
    tensors, header = stacked_file_parts()
    corrupt(tensors, header)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"aofunc": json.dumps(header)})
    with pytest.raises(ValueError, match=match):
        aofunc.load(tmp_path / "bad.safetensors")


def test_a_transformers_moe_model_runs_from_a_file(tmp_path):
    model = tiny_moe("mixtral", "grouped_mm")
    params = dict(model.named_parameters())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    qparams = aofunc.quantize(params, Spec([Rule(r".*experts\..*", aofunc.Int4WeightOnly(32))]), model=model,
                              example=ids)
    aofunc.save(qparams, tmp_path / "moe.safetensors")
    loaded = aofunc.load(tmp_path / "moe.safetensors")
    with torch.no_grad():
        assert torch.equal(aofunc.apply(model, loaded, ids).logits, aofunc.apply(model, qparams, ids).logits)
