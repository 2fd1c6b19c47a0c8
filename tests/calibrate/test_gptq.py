"""GPTQ over models: quality against round-to-nearest, sequential blocks in execution order with their keyword
inputs replayed, op by op without blocks, orientation, purity, determinism and bad input."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import aofunc
from aofunc.calibrate.blocks import probe
from calib_models import TinyLlama, correlated, gpt2_block, tiny_llama
from tests.models import is_detached_alias

INT4 = aofunc.Spec([aofunc.Rule(r".*norm.*", None), aofunc.Rule(r".*weight", aofunc.Int4WeightOnly(32))])


def _error(model, qparams, x, reference):
    with torch.no_grad():
        return float((functional_call(model, qparams, (x,)) - reference).norm())


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    calib = list(correlated(16, seed=0).split(4))
    test = correlated(8, seed=10)
    return model, dict(model.named_parameters()), calib, test, model(test)


@pytest.fixture(scope="module")
def llama_gptq(llama):
    model, params, calib, _, _ = llama
    return aofunc.gptq(params, calib, model=model, spec=INT4, progress=False)


def test_gptq_beats_round_to_nearest_and_act_order_is_no_worse(llama, llama_gptq):
    model, params, calib, test, reference = llama
    rtn = _error(model, aofunc.quantize(params, INT4), test, reference)
    plain = _error(model, llama_gptq, test, reference)
    ordered = _error(model, aofunc.gptq(params, calib, model=model, spec=INT4, act_order=True, progress=False),
                     test, reference)
    assert plain <= 0.8 * rtn
    assert ordered <= plain


def test_int8_dynamic_int4(llama):
    model, params, calib, test, reference = llama
    spec = aofunc.Spec([aofunc.Rule(r".*norm.*", None), aofunc.Rule(r".*weight", aofunc.Int8DynamicInt4(32))])
    qparams = aofunc.gptq(params, calib, model=model, spec=spec, progress=False)
    assert all(qparams[n].scheme == aofunc.Int8DynamicInt4(32) for n in params if n.endswith("q.weight"))
    assert _error(model, qparams, test, reference) <= 0.8 * _error(model, aofunc.quantize(params, spec), test,
                                                                  reference)


def test_default_spec_takes_linear_weights_only(llama, llama_gptq):
    model, params, calib, _, _ = llama
    qparams = aofunc.gptq(params, calib[:1], model=model, progress=False)
    quantized = {n for n, t in qparams.items() if isinstance(t, aofunc.QTensor)}
    assert quantized == {n for n, t in params.items() if t.dim() == 2}
    assert all(qparams[n].scheme == aofunc.Int4WeightOnly(128) for n in quantized)
    assert all(is_detached_alias(qparams[n], params[n]) for n in params if n not in quantized)


def test_embeddings_are_excluded_by_default():
    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 64)
            self.fc = nn.Linear(64, 64)

        def forward(self, ids):
            return self.fc(self.embed(ids))

    torch.manual_seed(0)
    model = Embedded()
    qparams = aofunc.gptq(dict(model.named_parameters()), [torch.randint(0, 50, (4, 8))], model=model,
                          progress=False)
    assert isinstance(qparams["fc.weight"], aofunc.QTensor) and not isinstance(qparams["embed.weight"],
                                                                              aofunc.QTensor)


def test_blocks_are_taken_in_execution_order_with_keyword_inputs():
    class Reversed(TinyLlama):
        def forward(self, x):
            self.layers = nn.ModuleList(reversed(self.layers))  # declared 0..n-1, run n-1..0
            try:
                return super().forward(x)
            finally:
                self.layers = nn.ModuleList(reversed(self.layers))

    torch.manual_seed(0)
    model = Reversed(layers=3).eval()
    params = dict(model.named_parameters())
    usage, structure = probe(model, params, correlated(2), None, "gptq")
    assert [path for path, _ in structure.blocks] == ["layers.2", "layers.1", "layers.0"]
    assert structure.chained and structure.carried == ("arg", 0)
    assert usage.contexts["inp.weight"] == {"pre"} and usage.contexts["head.weight"] == {"post"}
    assert usage.contexts["layers.1.down.weight"] == {"layers.1"}


def test_more_than_ten_blocks_are_not_sorted_by_name():
    model = tiny_llama(layers=11, d=32, hidden=32, out=16)
    _, structure = probe(model, dict(model.named_parameters()), correlated(1, d=32), None, "gptq")
    assert [path for path, _ in structure.blocks] == [f"layers.{i}" for i in range(11)]


def test_chained_replay_equals_running_the_model_to_each_block(llama, llama_gptq):
    """Replaying captured inputs block by block gives exactly what re-running the quantized model gives."""
    class FreshMask(TinyLlama):
        def forward(self, x):
            t = x.shape[1]
            head_dim = x.shape[-1] // self.heads
            angles = torch.arange(t, dtype=x.dtype)[:, None] * torch.linspace(0.1, 1, head_dim, dtype=x.dtype)
            rope = (angles.cos(), angles.sin())
            x = self.inp(x)
            for layer in self.layers:
                x = layer(x, rope, mask=torch.ones(t, t, dtype=torch.bool).tril())  # a new mask for each block
            return self.head(self.norm(x))

    model, params, calib, _, _ = llama
    fresh = FreshMask()
    fresh.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="running the model up to it"):
        rerun = aofunc.gptq(params, calib, model=fresh.eval(), spec=INT4, progress=False)
    for name, t in llama_gptq.items():
        if isinstance(t, aofunc.QTensor):
            assert all(torch.equal(a, b) for a, b in zip(t.tensors.values(), rerun[name].tensors.values())), name


def test_offload_gives_the_same_result(llama, llama_gptq):
    model, params, calib, _, _ = llama
    offloaded = aofunc.gptq(params, calib, model=model, spec=INT4, offload=True, progress=False)
    assert all(torch.equal(offloaded[n].qdata, llama_gptq[n].qdata) for n in params
               if isinstance(llama_gptq[n], aofunc.QTensor))


def test_named_blocks(llama, llama_gptq):
    model, params, calib, _, _ = llama
    named = aofunc.gptq(params, calib, model=model, spec=INT4, blocks="layers", progress=False)
    assert torch.equal(named["layers.1.down.weight"].qdata, llama_gptq["layers.1.down.weight"].qdata)


def test_model_without_blocks_and_pure_function_go_op_by_op():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    params = dict(seq.named_parameters())
    spec = aofunc.Spec([aofunc.Rule(r".*weight", aofunc.Int4WeightOnly(32))])
    calib, test = list(correlated(8).split(2)), correlated(4, seed=3)
    with torch.no_grad():
        reference = seq(test)

    def pure(p, x):
        for i in (0, 2, 4):
            x = F.linear(x, p[f"{i}.weight"], p[f"{i}.bias"])
            x = F.gelu(x) if i < 4 else x
        return x

    by_module = aofunc.gptq(params, calib, model=seq, spec=spec, progress=False)
    by_function = aofunc.gptq(params, calib, model=pure, spec=spec, progress=False)
    for name in ("0.weight", "2.weight", "4.weight"):
        assert torch.equal(by_module[name].qdata, by_function[name].qdata)
    assert _error(seq, by_module, test, reference) <= 0.8 * _error(seq, aofunc.quantize(params, spec), test,
                                                                   reference)


def test_weights_stored_in_out_and_shared_inputs():
    """GPT-2's Conv1D ([in, out], used as addmm) is quantized along its input dimension."""
    model = gpt2_block()
    params = dict(model.named_parameters())
    spec = aofunc.Spec([aofunc.Rule(r"(attn|proj|up|down)\.weight", aofunc.Int4WeightOnly(32))])
    calib, test = list(correlated(8).split(2)), correlated(4, seed=3)
    qparams = aofunc.gptq(params, calib, model=model, spec=spec, progress=False)
    assert qparams["attn.weight"].transposed and qparams["attn.weight"].shape == params["attn.weight"].shape
    rtn = aofunc.quantize(params, spec, model=model, example=test)
    with torch.no_grad():
        reference = model(test)
    assert _error(model, qparams, test, reference) < _error(model, rtn, test, reference)


def test_bf16_tiny_calibration_and_dead_channels_stay_finite():
    model = tiny_llama().to(torch.bfloat16)
    x = correlated(1, t=2).to(torch.bfloat16)
    x[..., 7] = 0
    qparams = aofunc.gptq(dict(model.named_parameters()), [x], model=model, spec=INT4, progress=False)
    assert qparams["layers.0.attn.q.weight"].scale.dtype == torch.bfloat16
    assert all(torch.isfinite(t.dequantize().float()).all() for t in qparams.values()
               if isinstance(t, aofunc.QTensor))
    assert torch.isfinite(functional_call(model, qparams, (x,)).float()).all()


def test_pure_deterministic_and_leaves_the_model_as_it_was(llama, llama_gptq):
    model, params, calib, _, _ = llama
    before = {n: t.clone() for n, t in params.items()}
    again = aofunc.gptq(params, calib, model=model, spec=INT4, progress=False)
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert all(torch.equal(model.get_parameter(n), before[n]) for n in params)
    for name, t in llama_gptq.items():
        if isinstance(t, aofunc.QTensor):
            assert all(torch.equal(a, b) for a, b in zip(t.tensors.values(), again[name].tensors.values()))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_progress_bar_and_silence(llama, capsys):
    model, params, calib, _, _ = llama
    aofunc.gptq(params, calib[:1], model=model, spec=INT4, progress=False)
    assert capsys.readouterr().err == ""
    aofunc.gptq(params, calib[:1], model=model, spec=INT4, progress=True)
    assert "gptq" in capsys.readouterr().err


def test_callable_batches_are_reread(llama, llama_gptq):
    model, params, calib, _, _ = llama
    qparams = aofunc.gptq(params, lambda: iter(calib), model=model, spec=INT4, progress=False)
    assert torch.equal(qparams["head.weight"].qdata, llama_gptq["head.weight"].qdata)


def test_bad_input(llama):
    model, params, calib, _, _ = llama
    with pytest.raises(TypeError, match="one-shot iterator"):
        aofunc.gptq(params, (b for b in calib), model=model, progress=False)
    with pytest.raises(ValueError, match="empty"):
        aofunc.gptq(params, [], model=model, progress=False)
    with pytest.raises(ValueError, match="batch 1"):
        aofunc.gptq(params, [calib[0], torch.randn(2, 3, 5)], model=model, spec=INT4, progress=False)
    with pytest.raises(ValueError, match="batch 0"):
        aofunc.gptq(params, [torch.randn(2, 3, 5)], model=model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", aofunc.SpecWarning)
        with pytest.raises(ValueError, match="selects no weight"):
            aofunc.gptq(params, calib, model=model, spec=aofunc.Spec([aofunc.Rule("nothing", None)]),
                        progress=False)
    with pytest.raises(ValueError, match="does not use the given params"):
        aofunc.gptq({"w": torch.randn(4, 4)}, calib, model=model, progress=False)
    with pytest.raises(ValueError, match="no linear-like call"):
        aofunc.gptq({"w": torch.randn(4, 4)}, calib, model=lambda p, x: x + 1, progress=False)
    with pytest.raises(TypeError, match="Int4WeightOnly or Int8DynamicInt4"):
        aofunc.gptq(params, calib, model=model, spec=aofunc.Spec([aofunc.Rule(r".*q\.weight",
                                                                              aofunc.Int8WeightOnly())]))
    with pytest.raises(ValueError, match="blocksize"):
        aofunc.gptq(params, calib, model=model, blocksize=0)
    with pytest.raises(ValueError, match="percdamp"):
        aofunc.gptq(params, calib, model=model, percdamp=float("nan"))
    with pytest.raises(ValueError, match="not a submodule"):
        aofunc.gptq(params, calib, model=model, blocks="model.layers", progress=False)
    with pytest.raises(TypeError, match="function"):
        aofunc.gptq(params, calib, model=lambda p, x: x, blocks="layers", progress=False)
    nan = dict(params)
    nan["layers.0.up.weight"] = torch.full_like(params["layers.0.up.weight"], float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        aofunc.gptq(nan, calib, model=model, spec=INT4, progress=False)


def test_weights_reading_one_input_are_grouped():
    model = tiny_llama(layers=1)
    usage, _ = probe(model, dict(model.named_parameters()), correlated(2), None, "gptq")
    same = {}
    for name in usage.order:
        same.setdefault(usage.first_input[name], []).append(name.split(".")[-2])
    assert sorted(same.values()) == sorted([["inp"], ["q", "k", "v"], ["o"], ["gate", "up"], ["down"], ["head"]])
    seq = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(16, 16), nn.GELU())))
    usage, structure = probe(seq, dict(seq.named_parameters()), torch.randn(8, 16), None, "gptq")
    assert structure is None and len(set(usage.first_input.values())) == 4
