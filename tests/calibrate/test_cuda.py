"""The calibrated transforms on a CUDA device, in bf16: everything stays on the device and GPTQ still beats
round-to-nearest; 2:4 Wanda weights convert to the semi-structured sparse layout where the card allows."""
import pytest
import torch
from torch.func import functional_call

import aofunc
from aofunc.calibrate.gptq_core import input_gram
from calib_models import correlated, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

INT4 = aofunc.Spec([aofunc.Rule(r".*norm.*", None), aofunc.Rule(r".*weight", aofunc.Int4WeightOnly(32))])


def test_input_gram_accumulates_in_fp32():
    x = torch.randn(4096, 64, device="cuda").to(torch.bfloat16)
    exact = x.double().T @ x.double()
    assert input_gram(x).dtype == torch.float32
    torch.testing.assert_close(input_gram(x).double(), exact, rtol=1e-5, atol=1e-3)


def test_gptq_on_cuda_in_bf16():
    model = tiny_llama().cuda().to(torch.bfloat16)
    params = dict(model.named_parameters())
    calib = [b.cuda().to(torch.bfloat16) for b in correlated(16).split(4)]
    test = correlated(8, seed=10).cuda().to(torch.bfloat16)
    with torch.no_grad():
        reference = model(test).float()

        def error(p):
            return float((functional_call(model, p, (test,)).float() - reference).norm())

        qparams = aofunc.gptq(params, calib, model=model, spec=INT4, progress=False)
        assert all(t.device.type == "cuda" for q in qparams.values() if isinstance(q, aofunc.QTensor)
                   for t in q.tensors.values())
        assert error(qparams) <= 0.8 * error(aofunc.quantize(params, INT4))


def test_smoothquant_and_wanda_on_cuda():
    model = tiny_llama().cuda()
    params = dict(model.named_parameters())
    calib = [b.cuda() for b in correlated(8, outliers=(3,)).split(4)]
    smooth = aofunc.smoothquant(params, calib, model=model, progress=False)
    with torch.no_grad():
        assert aofunc.sqnr(model(calib[0]), functional_call(model, smooth, (calib[0],))) > 25
    pruned = aofunc.wanda(params, calib, model=model, pattern="2:4", progress=False)
    w = pruned["layers.0.up.weight"].to(torch.float16)
    assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    if torch.cuda.get_device_capability() >= (8, 0):
        sparse = torch.sparse.to_sparse_semi_structured(w)
        x = torch.randn(32, w.shape[1], device="cuda", dtype=torch.float16)
        torch.testing.assert_close(torch.nn.functional.linear(x, sparse), torch.nn.functional.linear(x, w),
                                   rtol=1e-2, atol=1e-2)
