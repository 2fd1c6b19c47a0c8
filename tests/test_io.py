"""save/load: safetensors with a JSON description; malformed files are refused naming the parameter."""
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch.func import functional_call

import aofunc
from aofunc import Rule, Spec
from tests.models import ALL_SCHEMES, tiny_transformer


def quantized_tree(scheme, dtype=torch.float32):
    torch.manual_seed(0)
    params = {"w": torch.randn(24, 80).to(dtype), "t": torch.randn(80, 16).to(dtype), "b": torch.randn(24)}
    return aofunc.quantize(params, Spec([Rule("w", scheme), Rule("t", scheme, transposed=True)]))


def assert_same_tree(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for name in a:
        if isinstance(a[name], aofunc.QTensor):
            assert isinstance(b[name], aofunc.QTensor)
            assert (a[name].scheme, a[name].shape, a[name].dtype, a[name].transposed) == \
                   (b[name].scheme, b[name].shape, b[name].dtype, b[name].transposed)
            assert a[name].tensors.keys() == b[name].tensors.keys()
            assert all(torch.equal(x, y) for x, y in zip(a[name].tensors.values(), b[name].tensors.values()))
        else:
            assert torch.equal(a[name], b[name])


@given(st.sampled_from(ALL_SCHEMES), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_save_load_round_trip(tmp_path_factory, scheme, dtype):
    path = tmp_path_factory.mktemp("io") / "q.safetensors"
    q = quantized_tree(scheme, dtype)
    aofunc.save(q, path)
    assert_same_tree(q, aofunc.load(path))


def test_file_layout_follows_the_design(tmp_path):
    path = tmp_path / "q.safetensors"
    aofunc.save(quantized_tree(aofunc.Int4WeightOnly(32)), path)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"w.qdata", "w.scale", "w.zero", "t.qdata", "t.scale", "t.zero", "b"}
        header = json.loads(f.metadata()["aofunc"])
    assert header["version"] == 1
    assert header["params"]["w"] == {"scheme": {"type": "Int4WeightOnly", "group_size": 32}, "shape": [24, 80],
                                     "dtype": "float32", "transposed": False}
    assert header["params"]["t"]["transposed"] is True


def test_a_loaded_model_gives_bit_identical_outputs_in_a_fresh_process(tmp_path):
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    q = aofunc.quantize(dict(model.named_parameters()),
                        Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", aofunc.Int4WeightOnly(32))]),
                        model=model, example=ids)
    with torch.no_grad():
        expected = functional_call(model, q, (ids,))
    aofunc.save(q, tmp_path / "model.safetensors")
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = f"""
import torch, aofunc
from torch.func import functional_call
from tests.models import tiny_transformer
data = torch.load({str(tmp_path / "io.pt")!r})
q = aofunc.load({str(tmp_path / "model.safetensors")!r})
with torch.no_grad():
    y = functional_call(tiny_transformer(seed=123), q, (data["ids"],))
assert torch.equal(y, data["expected"]), (y - data["expected"]).abs().max()
print("identical")
"""
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout


def test_load_onto_a_device(tmp_path):
    aofunc.save(quantized_tree(aofunc.NF4()), tmp_path / "q.safetensors")
    q = aofunc.load(tmp_path / "q.safetensors", device="cpu")
    assert all(t.device.type == "cpu" for t in aofunc.tree.leaves(q))


def write_raw(path, tensors, header):
    save_file(tensors, str(path), metadata={"aofunc": json.dumps(header)} if header is not None else None)


def good_file_parts():
    q = quantized_tree(aofunc.Int8WeightOnly())
    tensors = {"w.qdata": q["w"].qdata, "w.scale": q["w"].scale, "b": q["b"]}
    header = {"version": 1, "params": {"w": {"scheme": {"type": "Int8WeightOnly"}, "shape": [24, 80],
                                             "dtype": "float32", "transposed": False}}}
    return tensors, header


@pytest.mark.parametrize("corrupt, match", [
    (lambda t, h: t.pop("w.scale"), r"'w'.*'w.scale' is missing"),
    (lambda t, h: t.update({"w.qdata": torch.zeros(24, 81, dtype=torch.int8)}), r"'w'.*'w.qdata' is I8\[24, 81\]"),
    (lambda t, h: t.update({"w.qdata": torch.zeros(24, 80, dtype=torch.uint8)}), r"'w'.*'w.qdata' is U8"),
    (lambda t, h: t.update({"w.extra": torch.zeros(1)}), r"'w'.*unexpected stored tensors \['w.extra'\]"),
    (lambda t, h: h["params"]["w"].update(shape=[24]), r"'w'.*shape"),
    (lambda t, h: h["params"]["w"].update(dtype="int8"), r"'w'.*floating point dtype"),
    (lambda t, h: h["params"]["w"].update(scheme={"type": "Int3"}), r"'w'.*unknown scheme"),
    (lambda t, h: h["params"]["w"].pop("scheme"), r"'w'.*needs scheme"),
    (lambda t, h: h.update(version=7), r"version 7"),
    (lambda t, h: h.pop("params"), r"no 'params'"),
])
def test_malformed_files_are_refused_naming_the_problem(tmp_path, corrupt, match):
    tensors, header = good_file_parts()
    corrupt(tensors, header)
    write_raw(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=match):
        aofunc.load(tmp_path / "bad.safetensors")


def test_files_that_are_not_aofunc_files_are_refused(tmp_path):
    write_raw(tmp_path / "plain.safetensors", {"x": torch.zeros(2)}, None)
    with pytest.raises(ValueError, match="not written by aofunc.save"):
        aofunc.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        aofunc.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        aofunc.load(tmp_path / "missing.safetensors")


def test_save_refuses_colliding_names_and_leaves_no_partial_file(tmp_path):
    q = quantized_tree(aofunc.Int8WeightOnly())
    with pytest.raises(ValueError, match="collides"):
        aofunc.save({**q, "w.qdata": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_handles_tensors_sharing_memory(tmp_path):
    base = torch.randn(4, 4)
    aofunc.save({"a": base, "b": base[1:]}, tmp_path / "s.safetensors")
    loaded = aofunc.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded["a"], base) and torch.equal(loaded["b"], base[1:])
