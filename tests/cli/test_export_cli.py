"""quantize --format compressed-tensors: a model directory transformers loads, or a clear refusal (status 2)
with nothing written."""
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

import torch  # noqa: E402

from aofunc.cli.main import main  # noqa: E402

from .hf_models import write  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write("llama", tmp_path_factory.mktemp("hf") / "llama")


def quantize(capsys, model_dir, out, *extra):
    capsys.readouterr()
    status = main(["quantize", str(model_dir), "--method", "rtn", "--out", str(out), "--no-progress",
                   "--format", "compressed-tensors", *map(str, extra)])
    return status, capsys.readouterr()


@pytest.mark.parametrize("extra", [("--scheme", "int4", "--group-size", "32", "--zero-point", "none"),
                                   ("--scheme", "int8wo"), ("--scheme", "int8dq")], ids=lambda e: e[1])
def test_quantize_writes_a_directory_transformers_loads(llama, tmp_path, capsys, extra):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    status, captured = quantize(capsys, llama, out, *extra)
    assert status == 0, captured.err
    assert f"wrote {out}" in captured.out
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = hf(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits
    assert torch.isfinite(logits).all()
    assert (out / "tokenizer.json").is_file()
    status, captured = quantize(capsys, llama, out, *extra)
    assert status == 2 and "exists; pass --force" in captured.err
    assert quantize(capsys, llama, out, *extra, "--force")[0] == 0


@pytest.mark.parametrize("extra, words", [
    (("--scheme", "int4", "--group-size", "32"), "--zero-point int"),
    (("--scheme", "nf4"), "--format compressed-tensors writes --scheme int4, int8wo, int8dq"),
    (("--scheme", "8da4w"), "not --scheme 8da4w"),
    (("--scheme", "int4", "--zero-point", "int"), "group_size 128"),  # K = 64 holds no whole group of 128
])
def test_unexportable_choices_are_refused_before_writing(llama, tmp_path, capsys, extra, words):
    status, captured = quantize(capsys, llama, tmp_path / "out", *extra)
    assert status == 2 and words in captured.err
    assert os.listdir(tmp_path) == []


def test_an_existing_file_is_not_a_directory_to_write(llama, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"")
    status, captured = quantize(capsys, llama, out, "--scheme", "int8wo", "--force")
    assert status == 2 and "writes a directory" in captured.err
