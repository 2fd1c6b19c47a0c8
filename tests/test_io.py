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
    assert header["version"] == 4 and header["aliases"] == {}
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
    (lambda t, h: h.update(version=7), r"file version 7; this release of aofunc reads versions 1, 2, 3, 4 "),
    (lambda t, h: h.update(version="2"), r"file version '2'; .* reads versions 1, 2, 3, 4 "),
    (lambda t, h: h.update(version=5), r"file version 5; this release of aofunc reads versions 1, 2, 3, 4 "),
    (lambda t, h: h.pop("version"), r"file version None"),
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


# ---------------------------------------------------------------------------------------------- versions and ties

def version_1_file(path, tree):
    """A file laid out as aofunc wrote it before aliases (file version 1): every name stored, by hand."""
    tensors, described = {}, {}
    for name, t in tree.items():
        if isinstance(t, aofunc.QTensor):
            described[name] = {"scheme": t.scheme.to_dict(), "shape": list(t.shape), "dtype": str(t.dtype)[6:],
                               "transposed": t.transposed}
            tensors.update({f"{name}.{s}": v.contiguous() for s, v in t.tensors.items()})
        else:
            tensors[name] = t.contiguous()
    write_raw(path, tensors, {"version": 1, "params": described})


#: the schemes version 1 and 2 files could hold: every int4 grid but tinygemm's came with version 3
VERSION_1_SCHEMES = [s for s in ALL_SCHEMES if getattr(s, "zero_point", "float") == "float"]


@pytest.mark.parametrize("scheme", VERSION_1_SCHEMES, ids=lambda s: type(s).__name__)
def test_version_1_files_load_as_they_always_did(tmp_path, scheme):
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    q = aofunc.quantize(dict(model.named_parameters()),
                        Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", scheme)]), model=model, example=ids)
    version_1_file(tmp_path / "v1.safetensors", q)
    aofunc.save(q, tmp_path / "v2.safetensors")
    old, new = aofunc.load(tmp_path / "v1.safetensors"), aofunc.load(tmp_path / "v2.safetensors")
    assert list(old) == list(new)
    assert_same_tree(q, old)
    assert_same_tree(old, new)
    with torch.no_grad():
        expected = functional_call(model, q, (ids,))
        assert torch.equal(functional_call(model, old, (ids,)), expected)
        assert torch.equal(functional_call(model, new, (ids,)), expected)


def test_tied_names_are_stored_once_and_named_in_the_header(tmp_path):
    q = quantized_tree(aofunc.Int4WeightOnly(32))
    tree = {"w": q["w"], "w_tied": q["w"], "b": q["b"], "b_tied": q["b"]}
    aofunc.save(tree, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert set(f.keys()) == {"w.qdata", "w.scale", "w.zero", "b"}
        header = json.loads(f.metadata()["aofunc"])
    assert header["aliases"] == {"w_tied": "w", "b_tied": "b"} and set(header["params"]) == {"w"}
    loaded = aofunc.load(tmp_path / "t.safetensors")
    assert loaded["w_tied"] is loaded["w"] and loaded["b_tied"] is loaded["b"]
    assert_same_tree(tree, loaded)


def test_a_tied_model_runs_from_a_file(tmp_path):
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    q = aofunc.quantize(dict(model.named_parameters(remove_duplicate=False)),
                        Spec([Rule(r".*norm.*", None), Rule(r".*\.weight", aofunc.Int8WeightOnly())]),
                        model=model, example=ids)
    assert q["head.weight"] is q["embed.weight"]
    aofunc.save(q, tmp_path / "tied.safetensors")
    loaded = aofunc.load(tmp_path / "tied.safetensors")
    assert loaded["head.weight"] is loaded["embed.weight"]
    with torch.no_grad():
        assert torch.equal(functional_call(model, loaded, (ids,)), functional_call(model, q, (ids,)))


@st.composite
def tied_trees(draw):
    """{name: value} where several names may hold one plain tensor or one QTensor."""
    count = draw(st.integers(1, 4))
    values = []
    for i in range(count):
        kind = draw(st.sampled_from(["plain", "bf16", *range(len(ALL_SCHEMES))]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        if kind == "plain":
            values.append(torch.randn(draw(st.integers(1, 5)), 3, generator=g))
        elif kind == "bf16":
            values.append(torch.randn(4, generator=g).to(torch.bfloat16))
        else:
            w = torch.randn(8, 40, generator=g)
            values.append(aofunc.quantize({"w": w}, Spec([Rule("w", ALL_SCHEMES[kind])]))["w"])
    owners = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=8))
    return {f"p{i}": values[owner] for i, owner in enumerate(owners)}


@given(tied_trees())
def test_save_then_load_keeps_values_and_ties(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("ties") / "t.safetensors"
    aofunc.save(tree, path)
    loaded = aofunc.load(path)
    assert set(loaded) == set(tree)
    assert_same_tree(tree, loaded)
    for a in tree:
        for b in tree:
            assert (loaded[a] is loaded[b]) == (tree[a] is tree[b]), (a, b)
    # and a loaded tree saves to a file that loads to the same tree again
    aofunc.save(loaded, path)
    again = aofunc.load(path)
    assert_same_tree(loaded, again)
    assert all((again[a] is again[b]) == (tree[a] is tree[b]) for a in tree for b in tree)


def tied_file_parts():
    tensors, header = good_file_parts()
    header["version"] = 2
    header["aliases"] = {"w_tied": "w", "b_tied": "b"}
    return tensors, header


def test_a_version_2_file_written_by_hand_loads_with_its_ties(tmp_path):
    tensors, header = tied_file_parts()
    write_raw(tmp_path / "ok.safetensors", tensors, header)
    loaded = aofunc.load(tmp_path / "ok.safetensors")
    assert loaded["w_tied"] is loaded["w"] and loaded["b_tied"] is loaded["b"]


@pytest.mark.parametrize("corrupt, match", [
    (lambda t, h: h.pop("aliases"), r"version 2 header needs an 'aliases' table"),
    (lambda t, h: h.update(aliases=["w"]), r"version 2 header needs an 'aliases' table"),
    (lambda t, h: h["aliases"].update(x="missing"), r"alias 'x' points at 'missing', which the file does not store"),
    (lambda t, h: h["aliases"].update(x="w.qdata"), r"alias 'x' points at 'w.qdata', which the file does not store"),
    (lambda t, h: h["aliases"].update(x="w_tied"), r"alias 'x' points at 'w_tied', which is an alias too"),
    (lambda t, h: h["aliases"].update(b="w"), r"alias 'b' is itself stored"),
    (lambda t, h: h["aliases"].update(w="b"), r"alias 'w' is itself stored"),
    (lambda t, h: h["aliases"].update({"w.scale": "b"}), r"alias 'w.scale' is itself stored"),
    (lambda t, h: h["aliases"].update(x=3), r"alias 'x' must name a stored parameter by a string"),
])
def test_malformed_aliases_are_refused_naming_the_alias(tmp_path, corrupt, match):
    tensors, header = tied_file_parts()
    corrupt(tensors, header)
    write_raw(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=match):
        aofunc.load(tmp_path / "bad.safetensors")


def test_save_refuses_a_quantized_name_under_another_quantized_name(tmp_path):
    q = quantized_tree(aofunc.Int8WeightOnly())
    with pytest.raises(ValueError, match=r"'w.inner' collides with the stored tensors of 'w'"):
        aofunc.save({"w": q["w"], "w.inner": q["t"]}, tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------------------------- what save accepts, load reads

def _old_file(path):
    """A good file at `path`, and its bytes: a refused save must leave it as it was."""
    aofunc.save({"old": torch.arange(3.0)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("tree, match", [
    (lambda q: {"__metadata__": torch.zeros(2)}, r"'__metadata__' is reserved by safetensors"),
    (lambda q: {"a": q["w"], "a.qdata": q["t"]}, r"'a.qdata' collides with the stored tensors of 'a'"),
    (lambda q: {"a.qdata": torch.zeros(2), "a": q["w"]}, r"'a.qdata' collides with the stored tensors of 'a'"),
    (lambda q: {"m": torch.empty(3, device="meta")}, r"'m' is on the meta device"),
    (lambda q: {"s": torch.eye(2).to_sparse()}, r"'s' has the torch.sparse_coo layout"),
])
def test_save_refuses_trees_no_file_holds_and_keeps_the_old_file(tmp_path, tree, match):
    path = tmp_path / "q.safetensors"
    before = _old_file(path)
    with pytest.raises(ValueError, match=match):
        aofunc.save(tree(quantized_tree(aofunc.Int8WeightOnly())), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]
    assert torch.equal(aofunc.load(path)["old"], torch.arange(3.0))


def test_load_refuses_a_plain_tensor_under_a_quantized_name(tmp_path):
    tensors, header = good_file_parts()
    tensors["w"] = torch.zeros(24, 80)
    write_raw(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=r"'w' is both a quantized weight of the header .* and a plain tensor"):
        aofunc.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("shape, transposed, match", [
    ([24, 80, 2, 2], False, r"'w': shape \[24, 80, 2, 2\] is not a quantized weight's"),
    ([24, 80, 1, 1], True, r"'w': shape \[24, 80, 1, 1\] is not a quantized weight's"),
    ([24, 80], "yes", r"'w': 'transposed' must be true or false"),
    ([24, True], False, r"'w': shape \[24, True\] is not a 2-D, 3-D \(stacked experts\) or 4-D shape"),
    ([24, 80, 1], False, r"'w': shape \[24, 80, 1\] is a stack of experts, which file version 1 does not have"),
])
def test_load_refuses_shapes_a_quantized_weight_cannot_have(tmp_path, shape, transposed, match):
    tensors, header = good_file_parts()
    header["params"]["w"].update(shape=shape, transposed=transposed)
    write_raw(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=match):
        aofunc.load(tmp_path / "bad.safetensors")


def test_load_refuses_an_alias_among_a_quantized_weights_tensors(tmp_path):
    tensors, header = tied_file_parts()
    header["aliases"]["w.inner"] = "b"
    write_raw(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=r"alias 'w.inner' sits among the stored tensors of 'w'"):
        aofunc.load(tmp_path / "bad.safetensors")


def test_load_names_a_device_this_machine_lacks(tmp_path):
    aofunc.save({"b": torch.zeros(2)}, tmp_path / "q.safetensors")
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=rf"load: device '{device}' is not available on this machine"):
        aofunc.load(tmp_path / "q.safetensors", device=device)
    with pytest.raises(ValueError, match=r"device='meta' holds no values"):
        aofunc.load(tmp_path / "q.safetensors", device="meta")


_NAME_PARTS = ["a", "w", "qdata", "scale", "zero", "act_scale", "scaler_q", "__metadata__", ""]


@st.composite
def adversarial_trees(draw):
    """Trees whose names may nest under a QTensor's stored names or be reserved, with ties and odd tensors."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    values = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["f32", "bf16", "int64", "bool", "0-d", "empty", "meta", "q", "q-t", "q-conv",
                                          "q-stack", "q-stack-t"]))
        if kind == "f32":
            values.append(torch.randn(2, 3, generator=g))
        elif kind == "bf16":
            values.append(torch.randn(5, generator=g).to(torch.bfloat16))
        elif kind == "int64":
            values.append(torch.randint(-9, 9, (4,), generator=g))
        elif kind == "bool":
            values.append(torch.rand(3, generator=g) > 0.5)
        elif kind == "0-d":
            values.append(torch.tensor(2.5))
        elif kind == "empty":
            values.append(torch.zeros(0, 3))
        elif kind == "meta":
            values.append(torch.empty(2, device="meta"))
        else:
            scheme = draw(st.sampled_from(ALL_SCHEMES))
            shape = {"q": (8, 40), "q-t": (40, 8), "q-conv": (8, 40, 1, 1), "q-stack": (2, 8, 40),
                     "q-stack-t": (2, 40, 8)}[kind]
            w = torch.randn(*shape, generator=g)
            transposed = kind.endswith("-t")
            values.append(aofunc.quantize({"w": w}, Spec([Rule("w", scheme, transposed=transposed)]))["w"])
    names = draw(st.lists(st.lists(st.sampled_from(_NAME_PARTS), min_size=1, max_size=3).map(".".join),
                          min_size=1, max_size=6, unique=True))
    return {name: values[draw(st.integers(0, len(values) - 1))] for name in names}


@given(adversarial_trees())
def test_every_tree_save_accepts_loads_back_as_it_was(tmp_path_factory, tree):
    directory = tmp_path_factory.mktemp("any")
    path = directory / "q.safetensors"
    before = _old_file(path)
    try:
        aofunc.save(tree, path)
    except ValueError:
        assert path.read_bytes() == before and [p.name for p in directory.iterdir()] == ["q.safetensors"]
        return
    loaded = aofunc.load(path)
    assert set(loaded) == set(tree)
    assert_same_tree(tree, loaded)
    assert all((loaded[a] is loaded[b]) == (tree[a] is tree[b]) for a in tree for b in tree)


# ---------------------------------------------------------------------------------------------- int4 grids (version 3)

def int4_grid_file_parts(zero_point):
    q = quantized_tree(aofunc.Int4WeightOnly(32, zero_point=zero_point), torch.bfloat16)
    tensors = {f"w.{name}": t for name, t in q["w"].tensors.items()}
    header = {"version": 3, "aliases": {},
              "params": {"w": {"scheme": q["w"].scheme.to_dict(), "shape": [24, 80], "dtype": "bfloat16",
                               "transposed": False}}}
    return tensors, header


@pytest.mark.parametrize("zero_point, stored", [("int", {"qdata", "scale", "zero"}), ("none", {"qdata", "scale"})])
def test_int4_grids_are_stored_as_file_version_3_describes(tmp_path, zero_point, stored):
    path = tmp_path / "q.safetensors"
    q = quantized_tree(aofunc.Int4WeightOnly(32, zero_point=zero_point), torch.bfloat16)
    aofunc.save(q, path)
    with safe_open(str(path), "pt") as f:
        assert {key for key in f.keys() if key.startswith("w.")} == {f"w.{name}" for name in stored}
        header = json.loads(f.metadata()["aofunc"])
        if zero_point == "int":
            zero = f.get_tensor("w.zero")
            assert zero.dtype == torch.uint8 and zero.shape == (24, 3) and int(zero.max()) <= 15
    assert header["version"] == 4
    assert header["params"]["w"]["scheme"] == {"type": "Int4WeightOnly", "group_size": 32, "zero_point": zero_point}
    loaded = aofunc.load(path)
    assert_same_tree(q, loaded)
    assert loaded["w"].scheme == aofunc.Int4WeightOnly(32, zero_point=zero_point)
    assert torch.equal(loaded["w"].dequantize(), q["w"].dequantize())


@pytest.mark.parametrize("zero_point, corrupt, match", [
    ("int", lambda t: t.update({"w.zero": t["w.zero"].to(torch.bfloat16)}),
     r"'w'.*'w.zero' is BF16\[24, 3\], expected U8\[24, 3\] for Int4WeightOnly\(group_size=32, zero_point='int'\)"),
    ("int", lambda t: t.update({"w.zero": t["w.zero"][:, :2].contiguous()}), r"'w'.*'w.zero' is U8\[24, 2\]"),
    ("int", lambda t: t.pop("w.zero"), r"'w'.*'w.zero' is missing"),
    ("none", lambda t: t.update({"w.zero": torch.zeros(24, 3, dtype=torch.uint8)}),
     r"'w'.*unexpected stored tensors \['w.zero'\]"),
    ("float", lambda t: t.update({"w.zero": t["w.zero"].to(torch.uint8)}), r"'w'.*'w.zero' is U8\[24, 3\], expected BF16"),
])
def test_a_zero_that_does_not_fit_the_grid_is_refused_naming_the_parameter(tmp_path, zero_point, corrupt, match):
    tensors, header = int4_grid_file_parts(zero_point)
    corrupt(tensors)
    write_raw(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=match):
        aofunc.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("version", [1, 2])
def test_an_int4_grid_in_a_version_1_or_2_file_is_refused(tmp_path, version):
    tensors, header = int4_grid_file_parts("int")
    header["version"] = version
    write_raw(tmp_path / "old.safetensors", tensors, header)
    with pytest.raises(ValueError, match=rf"'w'.*zero_point, which file version {version} does not have"):
        aofunc.load(tmp_path / "old.safetensors")


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_the_tinygemm_grid_reads_the_same_from_every_version(tmp_path, version):
    tensors, header = int4_grid_file_parts("float")
    assert header["params"]["w"]["scheme"] == {"type": "Int4WeightOnly", "group_size": 32}
    header["version"] = version
    if version == 1:
        del header["aliases"]
    write_raw(tmp_path / "f.safetensors", tensors, header)
    loaded = aofunc.load(tmp_path / "f.safetensors")["w"]
    assert loaded.scheme == aofunc.Int4WeightOnly(32) and loaded.scheme.zero_point == "float"
    assert all(torch.equal(loaded.tensors[name[2:]], t) for name, t in tensors.items())
    x = torch.randn(3, 80, dtype=torch.bfloat16)
    assert torch.equal(aofunc.qlinear(x, loaded), aofunc.qlinear(x, quantized_tree(aofunc.Int4WeightOnly(32),
                                                                                   torch.bfloat16)["w"]))
