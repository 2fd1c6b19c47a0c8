"""Every scheme under every torch.compile mode on a two-block Llama decoder with a static KV cache (CUDA only):
compiled output equal to eager on the first call, no CUDA-graph pool errors, no recompilation for new values."""
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import aofunc
from aofunc import Rule, Spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from llama import LlamaShape, random_llama  # noqa: E402

SHAPE = LlamaShape(dim=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=512, max_seq=64)
SCHEMES = [aofunc.Int8WeightOnly(), aofunc.Int8Dynamic(), aofunc.Int4WeightOnly(64), aofunc.Int8DynamicInt4(64),
           aofunc.NF4()]
MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: type(s).__name__)
def test_every_mode_matches_eager_and_follows_new_values(scheme, mode):
    torch._dynamo.reset()
    model = random_llama(SHAPE)
    spec = Spec([Rule(r".*(wq|wk|wv|wo|w1|w2|w3|output)\.weight", scheme)])
    trees = [aofunc.quantize({n: p.detach() * scale for n, p in model.named_parameters()}, spec)
             for scale in (1.0, 1.5)]
    tok = torch.tensor([[7]], device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    step = torch.compile(lambda p, t, i: functional_call(model, p, (t, i)), mode=mode, fullgraph=True)
    with torch.no_grad():
        for call, tree in enumerate(trees + trees):
            want = functional_call(model, tree, (tok, pos)).clone()
            torch.compiler.cudagraph_mark_step_begin()
            with torch._dynamo.config.patch(error_on_recompile=call > 0):
                got = step(tree, tok, pos).clone()
            assert relative_error(got, want) < 2e-2, (call, relative_error(got, want))
    first, second = (functional_call(model, t, (tok, pos)) for t in trees)
    assert relative_error(first, second) > 0.1  # the trees differ enough that a stale result would show
