"""load_pretrained: aofunc files, compressed-tensors directories (save_pretrained's read back equal) and GPTQ
checkpoints packed here by the published v1 rules, each repacked into aofunc's layouts; bad input refused naming
the file."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("compressed_tensors")

import aofunc  # noqa: E402
from aofunc.pretrained import ImportFormatError, load_pretrained, save_pretrained  # noqa: E402

from .test_export import EXPORTABLE, act_order, quantized, write_act_order_ct  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def assert_same_tree(got, expected):
    assert set(got) == set(expected)
    for name, w in expected.items():
        g = got[name]
        if isinstance(w, aofunc.QTensor):
            assert isinstance(g, aofunc.QTensor), name
            assert g.scheme == w.scheme and tuple(g.shape) == tuple(w.shape) and g.dtype == w.dtype, name
            assert set(g.tensors) == set(w.tensors), name
            for part, t in w.tensors.items():
                assert g.tensors[part].dtype == t.dtype and torch.equal(g.tensors[part], t), (name, part)
                assert g.tensors[part].data_ptr() % 64 == 0, (name, part)  # where the kernels want it
        else:
            assert not isinstance(g, aofunc.QTensor) and g.dtype == w.dtype and torch.equal(g, w), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", EXPORTABLE, ids=str)
def test_exported_then_imported_equals_the_original(llama_dir, llama_params, tmp_path, scheme, dtype):
    qparams = quantized(llama_params[1], scheme, dtype)
    out = save_pretrained(qparams, tmp_path / "out", base=llama_dir, max_shard_size=60_000)
    assert_same_tree(load_pretrained(out), qparams)


def test_aofunc_files_and_directories_holding_one(llama_params, tmp_path):
    qparams = quantized(llama_params[1], aofunc.Int4WeightOnly(32))
    (tmp_path / "d").mkdir()
    aofunc.save(qparams, tmp_path / "d" / "q.safetensors")
    assert_same_tree(load_pretrained(tmp_path / "d" / "q.safetensors"), qparams)
    assert_same_tree(load_pretrained(tmp_path / "d"), qparams)


# ---------------------------------------------------------------------------------------------- GPTQ (v1)

def pack_gptq_v1(w: torch.Tensor, g: int, sym: bool, seed: int, act_order: bool = False):
    """AutoGPTQ's v1 tensors for a float weight [N, K] (round to nearest on each group): qweight int32 [K/8, N],
    qzeros int32 [K/g, N/8] holding zero - 1, scales fp16 [K/g, N], g_idx int32 [K]; and the codes and zeros.

    With `act_order` (desc_act), the groups are taken over the columns in a shuffled order, as GPTQ's act-order
    takes them: g_idx[c] is the group of column c, and qweight keeps the codes in the original column order."""
    n, k = w.shape
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(k)
    groups = w.float()[:, order].reshape(n, k // g, g)
    if sym:
        scale = (groups.abs().amax(-1) / 7.5).clamp(min=1e-5)
        zero = torch.full_like(scale, 8)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-5)
        zero = torch.round(-lo / scale).clamp(1, 15)  # v1 cannot store a zero point of 0
    scale = scale.half()
    ordered = torch.round(groups / scale.float()[..., None] + zero[..., None]).clamp(0, 15).long().reshape(n, k)
    codes = torch.empty_like(ordered)
    codes[:, order] = ordered  # back in the original column order
    intweight = codes.t().contiguous()  # [K, N]
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qweight |= intweight[j::8] << (4 * j)
    stored_zero = (zero.long() - 1).t().contiguous()  # [K/g, N]
    qzeros = torch.zeros(k // g, n // 8, dtype=torch.int64)
    for j in range(8):
        qzeros |= (stored_zero[:, j::8] & 0xF) << (4 * j)
    as_int32 = lambda x: torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)  # noqa: E731
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)
    return {"qweight": as_int32(qweight), "qzeros": as_int32(qzeros), "scales": scale.t().contiguous(),
            "g_idx": g_idx}


def unpack_gptq_v1(t: dict, dtype=torch.float16) -> torch.Tensor:
    """The float weight [N, K] of v1 tensors, by AutoGPTQ's rule w = scales[g_idx] * (q - (zeros + 1))."""
    qweight = t["qweight"].long() & 0xFFFFFFFF
    q = torch.stack([(qweight >> (4 * j)) & 0xF for j in range(8)], dim=1).reshape(-1, qweight.shape[1])  # [K, N]
    qzeros = t["qzeros"].long() & 0xFFFFFFFF
    z = torch.stack([(qzeros >> (4 * j)) & 0xF for j in range(8)], dim=2).reshape(qzeros.shape[0], -1) + 1
    g_idx = t["g_idx"].long()
    w = (q.float() - z[g_idx].float()) * t["scales"][g_idx].float()
    return w.t().contiguous().to(dtype)


def write_gptq(llama_dir, params, directory, sym: bool, g: int = 32, edit=None, act_order: bool = False):
    """A GPTQ v1 checkpoint of the tiny Llama: every projection packed, the rest in float16."""
    directory.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": act_order,
                                     "sym": sym, "checkpoint_format": "gptq"}
    config["dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(config))
    tensors, dense = {}, {}
    for i, (name, p) in enumerate(params.items()):
        module = name[:-len(".weight")]
        if module.rsplit(".", 1)[-1] in PROJ:
            packed = pack_gptq_v1(p, g, sym, i, act_order)
            tensors.update({f"{module}.{key}": t for key, t in packed.items()})
            dense[name] = unpack_gptq_v1(packed)
        else:
            tensors[name] = p.half().contiguous()
            dense[name] = tensors[name]
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
    return dense


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gptq_checkpoints_read_as_their_independent_unpacking(llama_dir, llama_params, tmp_path, sym, act_order):
    model, params = llama_params
    dense = write_gptq(llama_dir, params, tmp_path / "gptq", sym, act_order=act_order)
    tree = load_pretrained(tmp_path / "gptq")
    expected_grid = "none" if sym else "int"
    for name, w in dense.items():
        got = tree[name]
        if isinstance(got, aofunc.QTensor):
            assert got.scheme == aofunc.Int4WeightOnly(32, zero_point=expected_grid)
            assert got.dtype == torch.float16
            assert ("perm" in got.tensors) == act_order, name
            if act_order:  # each group's columns side by side, in their order
                g_idx = load_file(tmp_path / "gptq" / "model.safetensors")[name[:-len("weight")] + "g_idx"]
                perm = got.perm.long()
                assert got.perm.dtype == torch.int32 and torch.equal(perm.sort().values, torch.arange(w.shape[1]))
                assert torch.equal(g_idx[perm], torch.arange(w.shape[1], dtype=torch.int32) // 32)
                assert not torch.equal(perm, torch.arange(w.shape[1]))
            got = got.dequantize()
        assert torch.equal(got, w), name
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    tree = {k: v.to(torch.float32) for k, v in tree.items()}  # the fp32 model runs the imported weights
    with torch.no_grad():
        got = aofunc.apply(model, tree, input_ids=x).logits  # through aofunc's int4 path
        reference = aofunc.apply(model, aofunc.dequantize(tree), input_ids=x).logits
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_an_act_order_checkpoint_saves_and_loads_as_it_imported(llama_dir, llama_params, tmp_path):
    write_gptq(llama_dir, llama_params[1], tmp_path / "act", sym=False, act_order=True)
    tree = load_pretrained(tmp_path / "act")
    aofunc.save(tree, tmp_path / "q.safetensors")
    assert_same_tree(aofunc.load(tmp_path / "q.safetensors"), tree)


@pytest.mark.parametrize("bad", [torch.zeros(64, dtype=torch.int32), torch.arange(64, dtype=torch.int32) % 3,
                                 torch.full((64,), -1, dtype=torch.int32)], ids=["one-group", "uneven", "negative"])
def test_a_g_idx_that_groups_no_columns_is_refused_by_name(llama_dir, llama_params, tmp_path, bad):
    key = "model.layers.1.mlp.up_proj.g_idx"

    def broken(tensors):
        tensors[key] = bad

    write_gptq(llama_dir, llama_params[1], tmp_path / "bad", sym=False, edit=broken)
    with pytest.raises(ImportFormatError, match=rf"model\.safetensors: '{key}' is not a grouping"):
        load_pretrained(tmp_path / "bad")


def ct_act_order(llama_dir, params, directory, edit=None, actorder="group"):
    """A compressed-tensors act-order checkpoint (actorder "group", weight_g_idx) of asymmetric int4 g32, its
    tensors passed through `edit` and its weights arg actorder set to `actorder`."""
    qparams = act_order(quantized(params, aofunc.Int4WeightOnly(32, zero_point="int")))
    write_act_order_ct(llama_dir, qparams, directory)
    if edit is not None:
        tensors = load_file(directory / "model.safetensors")
        edit(tensors)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = actorder
    (directory / "config.json").write_text(json.dumps(config))
    return qparams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("zero_point", ["int", "none"])
def test_compressed_tensors_act_order_exported_then_imported_equals_the_original(llama_dir, llama_params, tmp_path,
                                                                                  zero_point, dtype):
    model, params = llama_params
    qparams = act_order(quantized(params, aofunc.Int4WeightOnly(32, zero_point=zero_point), dtype))
    tree = load_pretrained(write_act_order_ct(llama_dir, qparams, tmp_path / "ct"))
    assert_same_tree(tree, qparams)
    assert all("perm" in w.tensors for w in tree.values() if isinstance(w, aofunc.QTensor))
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    tree = {k: v.to(torch.float32) for k, v in tree.items()}
    with torch.no_grad():
        got = aofunc.apply(model, tree, input_ids=x).logits
        reference = aofunc.apply(model, aofunc.dequantize(tree), input_ids=x).logits
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_an_act_order_gptq_checkpoint_reads_back_from_compressed_tensors_form(llama_dir, llama_params, tmp_path):
    write_gptq(llama_dir, llama_params[1], tmp_path / "gptq", sym=False, act_order=True)
    tree = load_pretrained(tmp_path / "gptq")
    assert_same_tree(load_pretrained(write_act_order_ct(llama_dir, tree, tmp_path / "ct")), tree)


def test_weight_actorder_and_a_column_order_g_idx_read_as_plain_groups(llama_dir, llama_params, tmp_path):
    qparams = quantized(llama_params[1], aofunc.Int4WeightOnly(32, zero_point="int"))
    out = save_pretrained(qparams, tmp_path / "w", base=llama_dir)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "weight"
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight_g_idx"
    tensors[key] = torch.full((64,), -1, dtype=torch.int32)  # compressed-tensors' uninitialised g_idx
    tensors["model.layers.0.mlp.down_proj.weight_g_idx"] = torch.arange(128, dtype=torch.int32) // 32
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert_same_tree(load_pretrained(out), qparams)


@pytest.mark.parametrize("bad", [torch.zeros(64, dtype=torch.int32), torch.arange(64, dtype=torch.int32) % 3,
                                 torch.cat([torch.full((32,), -1), torch.zeros(32)]).to(torch.int32),
                                 torch.arange(64, dtype=torch.float32) // 32], ids=["one-group", "uneven",
                                                                                    "partly-unset", "float"])
def test_a_weight_g_idx_that_groups_no_columns_is_refused_by_name(llama_dir, llama_params, tmp_path, bad):
    key = "model.layers.1.mlp.up_proj.weight_g_idx"

    def broken(tensors):
        tensors[key] = bad

    ct_act_order(llama_dir, llama_params[1], tmp_path / "bad", edit=broken)
    with pytest.raises(ImportFormatError, match=rf"model\.safetensors: '{key}' is (not a grouping|torch\.float32)"):
        load_pretrained(tmp_path / "bad")


def test_act_order_without_g_idx_or_on_int8_is_refused_by_name(llama_dir, llama_params, tmp_path):
    key = "model.layers.1.self_attn.o_proj.weight_g_idx"
    ct_act_order(llama_dir, llama_params[1], tmp_path / "missing", edit=lambda tensors: tensors.pop(key))
    with pytest.raises(ImportFormatError, match=rf"'{key}' is missing \(actorder 'group'"):
        load_pretrained(tmp_path / "missing")
    ct_act_order(llama_dir, llama_params[1], tmp_path / "odd", actorder="sideways")
    with pytest.raises(ImportFormatError, match="actorder 'sideways'"):
        load_pretrained(tmp_path / "odd")
    out = save_pretrained(quantized(llama_params[1], aofunc.Int8WeightOnly()), tmp_path / "int8", base=llama_dir)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.arange(64, dtype=torch.int32) // 32
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ImportFormatError, match=r"up_proj\.weight_g_idx' orders the columns of an int8"):
        load_pretrained(out)


# ---------------------------------------------------------------------------------------------- bad input

def test_a_directory_without_config_json(llama_dir, tmp_path):
    (tmp_path / "d").mkdir()
    shutil.copy(llama_dir / "model.safetensors", tmp_path / "d" / "model.safetensors")
    with pytest.raises(ImportFormatError, match=r"d has no config\.json"):
        load_pretrained(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("qconfig", [None, {"quant_method": "awq", "bits": 4}, {"quant_method": "gptq", "bits": 8}],
                         ids=["none", "awq", "gptq8"])
def test_an_unsupported_quantization_config_lists_the_supported_formats(llama_dir, tmp_path, qconfig):
    directory = tmp_path / "d"
    shutil.copytree(llama_dir, directory)
    if qconfig is not None:
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"] = qconfig
        (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportFormatError, match=r"config\.json.*Supported: .*compressed-tensors.*GPTQ"):
        load_pretrained(directory)


def test_shapes_that_disagree_with_the_config_name_the_file(llama_dir, llama_params, tmp_path):
    key = "model.layers.0.self_attn.o_proj.scales"

    def wrong_groups(tensors):
        tensors[key] = tensors[key][:1].contiguous()

    write_gptq(llama_dir, llama_params[1], tmp_path / "gptq", sym=True, edit=wrong_groups)
    with pytest.raises(ImportFormatError, match=rf"model\.safetensors: '{key}' is torch.float16 \[1, 64\], "
                                                r"expected .*\[2, 64\].*groups of 32"):
        load_pretrained(tmp_path / "gptq")

    qparams = quantized(llama_params[1], aofunc.Int4WeightOnly(32, zero_point="int"))
    out = save_pretrained(qparams, tmp_path / "ct", base=llama_dir)
    config = json.loads((out / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["group_size"] = 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportFormatError, match=r"model\.safetensors: '.*weight_scale' is .*groups of 64"):
        load_pretrained(out)
