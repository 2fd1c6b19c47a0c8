"""save_pretrained: compressed-tensors model directories that transformers loads, decompressing to exactly what
aofunc.dequantize gives; everything else refused before anything is written."""
import json
import os

import pytest
import torch

pytest.importorskip("compressed_tensors")

import aofunc  # noqa: E402
from aofunc.pretrained import ExportError, pack_int32, save_pretrained, unpack_int32  # noqa: E402

EXPORTABLE = [aofunc.Int4WeightOnly(32, zero_point="int"), aofunc.Int4WeightOnly(32, zero_point="none"),
              aofunc.Int4WeightOnly(64, zero_point="none"), aofunc.Int8WeightOnly(), aofunc.Int8Dynamic()]
LAYERS = r"model\.layers\..*_proj\.weight"


def quantized(params, scheme, dtype=torch.float32):
    spec = aofunc.Spec([aofunc.Rule(LAYERS, scheme)])
    return aofunc.quantize({name: p.to(dtype) for name, p in params.items()}, spec)


def load_hf(out, scheme, dtype=None):
    """The exported directory loaded by transformers. compressed-tensors' packed int4 zero points load only when
    transformers decompresses at load time (see docs/file-format.md); the other formats load either way."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if isinstance(scheme, aofunc.Int4WeightOnly) and scheme.zero_point == "int":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(out, **kwargs)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_and_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(0, 2**bits, (6, 40), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(codes, bits)
    assert torch.equal(unpack_int32(packed, bits, 40), codes)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(packed, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([6, 40])).long(), signed.long())
    assert torch.equal(pack_int32(codes.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("scheme", EXPORTABLE, ids=str)
def test_transformers_loads_the_export_exactly(llama_dir, llama_params, tmp_path, scheme):
    model, params = llama_params
    qparams = quantized(params, scheme)
    out = save_pretrained(qparams, tmp_path / "out", base=llama_dir)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing left beside it
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / file).is_file(), file
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == ("int-quantized" if isinstance(scheme, aofunc.Int8Dynamic) else "pack-quantized")
    (group,) = config["config_groups"].values()
    assert sorted(group["targets"]) == sorted(n[:-len(".weight")] for n in qparams
                                              if isinstance(qparams[n], aofunc.QTensor))
    if isinstance(scheme, aofunc.Int8Dynamic):
        assert group["input_activations"]["dynamic"] is True
        assert group["input_activations"]["strategy"] == "token"

    hf = load_hf(out, scheme)
    expected = aofunc.dequantize(qparams)
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(input_ids=x).logits  # decompresses the weights on the first call when not done at load
        reference = aofunc.apply(model, expected, input_ids=x).logits
    loaded = dict(hf.named_parameters())
    for name, w in expected.items():
        assert torch.equal(loaded[name], w), name
    if not isinstance(scheme, aofunc.Int8Dynamic):  # W8A8 quantizes activations in transformers, aofunc apart
        assert torch.equal(got, reference)


@pytest.mark.parametrize("scheme", EXPORTABLE[:2] + EXPORTABLE[3:], ids=str)
def test_bfloat16_export_keeps_the_dtype_and_decompresses_exactly(llama_dir, llama_params, tmp_path, scheme):
    qparams = quantized(llama_params[1], scheme, torch.bfloat16)
    out = save_pretrained(qparams, tmp_path / "out", base=llama_dir)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = load_hf(out, scheme)
    with torch.no_grad():
        hf(input_ids=torch.zeros(1, 4, dtype=torch.long))
    loaded = dict(hf.named_parameters())
    for name, w in aofunc.dequantize(qparams).items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], w), name


def test_large_exports_are_sharded_with_an_index(llama_dir, llama_params, tmp_path):
    scheme = aofunc.Int4WeightOnly(32, zero_point="none")
    qparams = quantized(llama_params[1], scheme)
    out = save_pretrained(qparams, tmp_path / "out", base=llama_dir, max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert all((out / f).is_file() for f in files)
    hf = load_hf(out, scheme)
    with torch.no_grad():
        hf(input_ids=torch.zeros(1, 4, dtype=torch.long))
    loaded = dict(hf.named_parameters())
    for name, w in aofunc.dequantize(qparams).items():
        assert torch.equal(loaded[name], w), name


@pytest.mark.parametrize("scheme, words", [
    (aofunc.NF4(), "zero_point='int'"),
    (aofunc.Int4WeightOnly(32), "zero_point='int'"),
    (aofunc.Int8DynamicInt4(32), "zero_point='none'"),
], ids=str)
def test_unexportable_schemes_are_refused_naming_the_choice(llama_dir, llama_params, tmp_path, scheme, words):
    qparams = quantized(llama_params[1], scheme)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight") as e:
        save_pretrained(qparams, tmp_path / "out", base=llama_dir)
    assert words in str(e.value)
    assert os.listdir(tmp_path) == []


def test_pruned_or_float_trees_and_smoothed_weights_are_refused(llama_dir, llama_params, tmp_path):
    params = llama_params[1]
    pruned = aofunc.prune(params, aofunc.Spec([aofunc.Rule(LAYERS, aofunc.Sparse(pattern="2:4"))]))
    with pytest.raises(ExportError, match="no quantized weight.*Int4WeightOnly"):
        save_pretrained(pruned, tmp_path / "out", base=llama_dir)
    qparams = quantized(params, aofunc.Int8Dynamic())
    name = "model.layers.0.mlp.up_proj.weight"
    w = qparams[name]
    qparams[name] = w.with_tensors({**w.tensors, "act_scale": torch.ones(w.shape[1])})
    with pytest.raises(ExportError, match=r"up_proj\.weight.*act_scale"):
        save_pretrained(qparams, tmp_path / "out", base=llama_dir)
    assert os.listdir(tmp_path) == []


def test_whole_groups_and_one_format(llama_dir, llama_params, tmp_path):
    params = llama_params[1]
    qparams = quantized(params, aofunc.Int4WeightOnly(128, zero_point="int"))  # K = 64 is not whole groups
    with pytest.raises(ExportError, match=r"K = 64.*group_size 128"):
        save_pretrained(qparams, tmp_path / "out", base=llama_dir)
    mixed = aofunc.quantize(params, aofunc.Spec([aofunc.Rule(r".*mlp.*weight", aofunc.Int8Dynamic()),
                                                 aofunc.Rule(LAYERS, aofunc.Int8WeightOnly())]))
    with pytest.raises(ExportError, match="one format"):
        save_pretrained(mixed, tmp_path / "out", base=llama_dir)
    assert os.listdir(tmp_path) == []


def test_out_dir_overwrite_base_and_format(llama_dir, llama_params, tmp_path):
    qparams = quantized(llama_params[1], aofunc.Int8WeightOnly())
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        save_pretrained(qparams, out, base=llama_dir)
    assert os.listdir(out) == ["old.txt"]
    save_pretrained(qparams, out, base=llama_dir, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(ExportError, match="no config.json"):
        save_pretrained(qparams, tmp_path / "other", base=tmp_path)
    with pytest.raises(ExportError, match="format must be one of 'compressed-tensors'"):
        save_pretrained(qparams, tmp_path / "other", base=llama_dir, format="gguf")
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.xfail(reason="transformers 5.24 with compressed-tensors 0.20.1 builds the compressed module with an "
                          "unpacked int4 zero point [N, K/g] while the format packs it [N/8, K/g]; loading with "
                          "CompressedTensorsConfig(dequantize=True) works", strict=False)
def test_integer_zero_points_load_without_dequantize(llama_dir, llama_params, tmp_path):
    from transformers import AutoModelForCausalLM

    qparams = quantized(llama_params[1], aofunc.Int4WeightOnly(32, zero_point="int"))
    AutoModelForCausalLM.from_pretrained(save_pretrained(qparams, tmp_path / "out", base=llama_dir))


# ---------------------------------------------------------------------------------------------- act-order

def act_order(qparams, seed=0):
    """The tree with each int4 weight given an act-order `perm` (the columns grouped in a shuffled order, each
    group's columns ascending, as load_pretrained gives them): a valid act-order weight of other values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in qparams.items():
        if isinstance(w, aofunc.QTensor):
            k, g = w.shape[1], w.scheme.group_size
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[torch.randperm(k, generator=gen)] = torch.arange(k) // g
            w = w.with_tensors({**w.tensors, "perm": torch.sort(g_idx, stable=True).indices.to(torch.int32)})
        out[name] = w
    return out


def write_act_order_ct(llama_dir, qparams, out):
    """An act-order int4 tree in compressed-tensors' act-order form (weights arg actorder "group", a weight_g_idx
    per weight), as compressed-tensors before 0.20 wrote it; save_pretrained refuses to write it (see below)."""
    from safetensors.torch import save_file

    from aofunc.pretrained import _export_tensors, _weights_args

    tensors, targets, schemes, dtypes = {}, [], set(), set()
    for name, w in qparams.items():
        if isinstance(w, aofunc.QTensor):
            targets.append(name[:-len(".weight")])
            tensors.update(_export_tensors(targets[-1], w, "pack-quantized"))
            schemes.add(w.scheme)
            dtypes.add(w.dtype)
        else:
            tensors[name] = w.contiguous()
    (scheme,), (dtype,) = schemes, dtypes
    weights = _weights_args(4, "group", scheme.group_size, scheme.zero_point == "none", actorder="group")
    config = json.loads((llama_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": targets, "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": [], "kv_cache_scheme": None}
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (llama_dir / file).is_file():
            (out / file).write_bytes((llama_dir / file).read_bytes())
    return out


@pytest.mark.parametrize("zero_point", ["int", "none"])
def test_the_act_order_form_decompresses_by_its_g_idx_to_dequantize(llama_dir, llama_params, tmp_path,
                                                                     zero_point):
    from safetensors.torch import load_file

    qparams = act_order(quantized(llama_params[1], aofunc.Int4WeightOnly(32, zero_point=zero_point)))
    tensors = load_file(write_act_order_ct(llama_dir, qparams, tmp_path / "out") / "model.safetensors")
    for name, w in aofunc.dequantize(qparams).items():
        if not isinstance(qparams[name], aofunc.QTensor):
            continue
        module = name[:-len(".weight")]
        n, k = w.shape
        g_idx = tensors[f"{module}.weight_g_idx"].long()
        assert tensors[f"{module}.weight_g_idx"].dtype == torch.int32
        assert torch.equal(torch.bincount(g_idx), torch.full((k // 32,), 32))
        q = unpack_int32(tensors[f"{module}.weight_packed"], 4, k) - 8  # model column order
        zp = (unpack_int32(tensors[f"{module}.weight_zero_point"].t(), 4, n).t() - 8 if zero_point == "int"
              else torch.zeros(n, k // 32, dtype=torch.int64))
        scale = tensors[f"{module}.weight_scale"]
        # compressed-tensors' act-order decompression: each column by its group's scale and zero point
        assert torch.equal((q - zp[:, g_idx]).to(scale.dtype) * scale[:, g_idx], w), name


def test_act_order_weights_are_refused_naming_compressed_tensors(llama_dir, llama_params, tmp_path):
    qparams = act_order(quantized(llama_params[1], aofunc.Int4WeightOnly(32, zero_point="none")))
    with pytest.raises(ExportError, match=r"q_proj\.weight' carries an act-order.*compressed-tensors 0\.20 removed"):
        save_pretrained(qparams, tmp_path / "out", base=llama_dir)
    assert os.listdir(tmp_path) == []


@pytest.mark.xfail(reason="compressed-tensors 0.20 removed act-order groups: QuantizationArgs refuse actorder "
                          "'group' (the weight_g_idx form), so transformers 5.24 cannot load the act-order export; "
                          "save_pretrained refuses act-order weights until a loader reads that form again",
                   strict=False)
@pytest.mark.parametrize("zero_point", ["int", "none"])
def test_transformers_loads_the_act_order_form_exactly(llama_dir, llama_params, tmp_path, zero_point):
    model, params = llama_params
    scheme = aofunc.Int4WeightOnly(32, zero_point=zero_point)
    qparams = act_order(quantized(params, scheme))
    hf = load_hf(write_act_order_ct(llama_dir, qparams, tmp_path / "out"), scheme)
    expected = aofunc.dequantize(qparams)
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(input_ids=x).logits
        reference = aofunc.apply(model, expected, input_ids=x).logits
    loaded = dict(hf.named_parameters())
    for name, w in expected.items():
        assert torch.equal(loaded[name], w), name
    assert torch.equal(got, reference)
