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
