"""The same contracts on a CUDA device: qlinear through the Triton kernels, models, compile, save/load."""
import pytest
import torch
from torch.func import functional_call

import aofunc
from aofunc import Rule, Spec
from aofunc.quantize import quantize_weight
from tests.models import ALL_SCHEMES, tiny_transformer
from tests.test_ops import TOLERANCE, reference_linear, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SCHEMES = ALL_SCHEMES + [aofunc.Int4WeightOnly(128), aofunc.Int8DynamicInt4(128)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("n, k", [(256, 512), (48, 288), (4096, 4096)])
def test_qlinear_on_cuda_equals_the_reference(scheme, dtype, m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    qw = quantize_weight(w, scheme)
    y = aofunc.qlinear(x.cuda(), qw.to("cuda"), bias.cuda())
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (m, n)
    expected = reference_linear(x, qw, bias)
    # the activation rounding of int8 schemes can differ by one step where x / s lands on a tie
    slack = 5e-3 if isinstance(scheme, (aofunc.Int8Dynamic, aofunc.Int8DynamicInt4)) else 0
    assert relative_error(y.cpu(), expected) <= TOLERANCE[dtype] + slack


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_cpu_and_cuda_agree_on_the_same_params(scheme):
    model = tiny_transformer().to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 9))
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", scheme)]),
                        model=model, example=ids)
    with torch.no_grad():
        cpu = functional_call(model, q, (ids,))
        gpu = functional_call(model.cuda(), {n: t.cuda() for n, t in q.items()}, (ids.cuda(),))
    assert aofunc.sqnr(cpu.float(), gpu.float().cpu()) > 30


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_compiled_model_on_cuda(scheme):
    torch._dynamo.reset()
    model = tiny_transformer().to(torch.bfloat16).cuda()
    ids = torch.randint(0, 96, (2, 9), device="cuda")
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", scheme)]),
                        model=model, example=ids)
    with torch.no_grad():
        eager = functional_call(model, q, (ids,))
        compiled = torch.compile(lambda qp, x: functional_call(model, qp, (x,)), fullgraph=True)(q, ids)
    assert aofunc.sqnr(eager.float(), compiled.float()) > 35


def test_load_onto_cuda_gives_identical_outputs(tmp_path):
    model = tiny_transformer().to(torch.float16)
    ids = torch.randint(0, 96, (1, 7))
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r".*norm.*", None),
                                                              Rule(r".*\.weight", aofunc.Int4WeightOnly(32))]),
                        model=model, example=ids)
    aofunc.save(q, tmp_path / "q.safetensors")
    loaded = aofunc.load(tmp_path / "q.safetensors", device="cuda")
    model = model.cuda()
    with torch.no_grad():
        a = functional_call(model, {n: t.cuda() for n, t in q.items()}, (ids.cuda(),))
        b = functional_call(model, loaded, (ids.cuda(),))
    assert torch.equal(a, b)


def test_nf4_lora_gradients_on_cuda():
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    base = quantize_weight(w, aofunc.NF4())
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    aofunc.qlinear(x, base).float().sum().backward()
    expected = base.dequantize().float().sum(0).expand(8, 512)
    assert relative_error(x.grad.float(), expected) < 1e-2


@pytest.mark.parametrize("zero_point", ["float", "int", "none"])
@pytest.mark.parametrize("m", [1, 64])
def test_act_order_int4_on_cuda_gathers_the_input_then_runs_the_kernels(zero_point, m):
    from tests.test_act_order import act_order_weight
    g = torch.Generator().manual_seed(m)
    w = torch.randn(256, 512, generator=g).to(torch.bfloat16)
    x = torch.randn(m, 512, generator=g).to(torch.bfloat16)
    q, _, _ = act_order_weight(w, aofunc.Int4WeightOnly(128, zero_point=zero_point))
    y = aofunc.qlinear(x.cuda(), q.to("cuda"))
    assert relative_error(y.cpu(), reference_linear(x, q, None)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("scheme", [aofunc.Int4WeightOnly(128), aofunc.Int8WeightOnly()], ids=repr)
@pytest.mark.parametrize("counts", [[0, 1, 0, 0, 0, 0, 1, 0], [0, 5, 1, 9, 0, 7, 6, 4], [40, 0, 33, 12, 0, 51, 20, 0]],
                         ids=["decode-1", "decode-16", "prefill"])
def test_grouped_kernels_at_mixtral_size_equal_their_twin(scheme, counts):
    # Mixtral-8x7B's down projection stack (8 experts of 4096 x 14336) and routings with empty experts: one token
    # (the GEMV, a program per row), sixteen and a prefill's worth (the tiles, K split or not); rows past the end zero
    from aofunc.kernels import w4a16, w8a16
    gen = torch.Generator(device="cuda").manual_seed(len(counts) + sum(counts))
    w = torch.randn(8, 4096, 14336, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    q = aofunc.quantize({"experts.w": w}, aofunc.Spec([aofunc.Rule("experts.w", scheme)]))["experts.w"]
    t = q.tensors
    x = torch.randn(sum(counts) + 3, 14336, device="cuda", dtype=torch.bfloat16, generator=gen)
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    if isinstance(scheme, aofunc.Int4WeightOnly):
        y = w4a16.w4a16_grouped_linear(x, t["qdata"], t["scale"], t["zero"], offs, 128)
        want = w4a16.w4a16_grouped_linear_ref(x, t["qdata"], t["scale"], t["zero"], offs, 128)
    else:
        y = w8a16.w8a16_grouped_linear(x, t["qdata"], t["scale"], offs)
        want = w8a16.w8a16_grouped_linear_ref(x, t["qdata"], t["scale"], offs)
    assert relative_error(y.float(), want.float()) <= TOLERANCE[torch.bfloat16]
    assert torch.equal(y[sum(counts):], torch.zeros_like(y[sum(counts):]))


@pytest.mark.parametrize("scheme", [aofunc.Int4WeightOnly(64), aofunc.Int4WeightOnly(64, zero_point="int"),
                                    aofunc.Int4WeightOnly(128, zero_point="none"), aofunc.Int8WeightOnly()],
                         ids=repr)
@pytest.mark.parametrize("counts", [[3, 0, 1, 12], [40, 25, 0, 64]])
def test_grouped_mm_over_quantized_experts_runs_one_kernel_on_cuda(scheme, counts):
    # transformers' grouped_mm experts: rows sorted by expert, per-expert counts from 0 up, rows past the last end
    # zero; eager, and compiled without a graph break
    w = torch.randn(4, 384, 256, device="cuda", dtype=torch.bfloat16)
    q = aofunc.quantize({"experts.w": w}, aofunc.Spec([aofunc.Rule("experts.w", scheme)]))["experts.w"]
    x = torch.randn(sum(counts) + 2, 256, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    rows = sum(counts)  # torch's own grouped_mm leaves the rows past the last end unwritten on CUDA
    want = torch._grouped_mm(x, q.dequantize().transpose(-2, -1), offs=offs)[:rows]
    y = torch._grouped_mm(x, q.transpose(-2, -1), offs=offs)
    assert aofunc.sqnr(want, y[:rows]) > 40 and torch.equal(y[rows:], torch.zeros_like(y[rows:]))
    compiled = torch.compile(lambda a, b, o: torch._grouped_mm(a, b.transpose(-2, -1), offs=o), fullgraph=True)
    assert aofunc.sqnr(want, compiled(x, q, offs)[:rows]) > 40
