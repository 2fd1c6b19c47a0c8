"""The capture mode: linear-like calls by parameter name, with their inputs and orientation."""
import torch

import aofunc
from aofunc.capture import detect_transposed
from tests.models import tiny_transformer


def test_record_shapes_lists_every_linear_like_call():
    model = tiny_transformer()
    params = dict(model.named_parameters())
    ids = torch.randint(0, 96, (2, 7))
    shapes = aofunc.record_shapes(model, params, ids)
    assert shapes["layers.0.qkv.weight"] == [(2, 7, 64)]
    assert shapes["layers.0.proj.weight"] == [(14, 64)]  # Conv1D flattens before addmm
    assert shapes["mix.weight"] == [(2, 7, 1, 64)]       # a 1x1 conv: pixels, channels last
    assert shapes["embed.weight"] == [(2, 7, 64)]        # used by the tied head
    assert "layers.0.qkv.bias" not in shapes


def test_capture_inputs_gives_what_each_linear_reads():
    model = tiny_transformer()
    params = dict(model.named_parameters())
    ids = torch.randint(0, 96, (2, 7))
    seen = {}
    model.layers[0].up.register_forward_pre_hook(lambda m, args: seen.setdefault("up", args[0]))
    captured = aofunc.capture_inputs(model, params, ids, names=["layers.0.up.weight"])
    assert list(captured) == ["layers.0.up.weight"]
    (x,) = captured["layers.0.up.weight"]
    assert torch.equal(x, seen["up"].reshape(-1, 64))


def test_detect_transposed_sees_addmm_use():
    model = tiny_transformer()
    flags = detect_transposed(model, dict(model.named_parameters()), torch.randint(0, 96, (1, 3)))
    assert flags["layers.0.proj.weight"] and not flags["layers.0.qkv.weight"] and not flags["mix.weight"]


def test_capture_works_with_a_pure_function_model():
    params = {"w": torch.randn(3, 4)}
    captured = aofunc.capture_inputs(lambda p, x: torch.nn.functional.linear(x, p["w"]), params, torch.ones(5, 4))
    assert captured["w"][0].shape == (5, 4)
