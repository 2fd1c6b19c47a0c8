"""Bad input to quantize and eval: a clear message, exit status 2, and no output file left behind."""
import pytest

pytest.importorskip("transformers")

from aofunc.cli.main import main  # noqa: E402

from .hf_models import TEXT, write  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv):
    capsys.readouterr()
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def quantize(capsys, model_dir, out, *extra, method="rtn", scheme="int8wo"):
    return run(capsys, "quantize", model_dir, "--method", method, "--scheme", scheme, "--out", out, "--no-progress",
               *extra)


def test_model_dir_without_config_or_weights(tmp_path, llama, capsys):
    out = tmp_path / "q.safetensors"
    status, err = quantize(capsys, tmp_path / "missing", out)
    assert status == 2 and "is not a directory" in err
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    status, err = quantize(capsys, no_config, out)
    assert status == 2 and "has no config.json" in err
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((llama / "config.json").read_text())
    status, err = quantize(capsys, no_weights, out)
    assert status == 2 and "has no weights" in err
    status, err = run(capsys, "eval", no_weights, "--text", llama / "config.json")
    assert status == 2 and "has no weights" in err
    assert not out.exists()


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"  \n\n", "is empty"),
                                             (b"\x89PNG\r\n\x1a\n\x00\x00", "is not text"),
                                             (b"caf\xe9 latin-1", "is not UTF-8 text")])
def test_calibration_file_empty_or_not_text(tmp_path, llama, capsys, content, message):
    bad = tmp_path / "calib.bin"
    bad.write_bytes(content)
    out = tmp_path / "q.safetensors"
    status, err = quantize(capsys, llama, out, "--calib", bad, method="gptq", scheme="int4")
    assert status == 2 and message in err and "--calib" in err
    assert not out.exists()
    status, err = run(capsys, "eval", llama, "--text", bad)
    assert status == 2 and message in err and "--text" in err


def test_calibration_directory_empty_or_with_a_binary_file(tmp_path, llama, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    out = tmp_path / "q.safetensors"
    status, err = quantize(capsys, llama, out, "--calib", folder, method="wanda", scheme="2:4")
    assert status == 2 and "holds no files" in err
    (folder / "a.py").write_text(TEXT)
    (folder / "b.bin").write_bytes(b"\x00\x01\x02")
    status, err = quantize(capsys, llama, out, "--calib", folder, method="wanda", scheme="2:4")
    assert status == 2 and "b.bin" in err and "is not text" in err
    assert not out.exists()


def test_existing_output_is_refused_unless_forced(tmp_path, llama, calib, capsys):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    status, err = quantize(capsys, llama, out)
    assert status == 2 and "exists; pass --force" in err
    assert out.read_bytes() == b"keep me"
    status, _ = quantize(capsys, llama, out, "--force")
    assert status == 0 and out.read_bytes() != b"keep me"
    status, err = quantize(capsys, llama, tmp_path)
    assert status == 2 and "is a directory" in err
    status, err = quantize(capsys, llama, tmp_path / "no" / "such" / "dir.safetensors")
    assert status == 2 and "does not exist" in err


@pytest.mark.parametrize("argv,message", [
    (["--method", "awq", "--scheme", "int4"], "invalid choice: 'awq'"),
    (["--method", "rtn", "--scheme", "int3"], "invalid choice: 'int3'"),
])
def test_unknown_method_or_scheme(tmp_path, llama, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(llama), *argv, "--out", str(tmp_path / "q.safetensors")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method,scheme,extra,message", [
    ("gptq", "nf4", [], "--method gptq does not take --scheme nf4; it takes: int4, 8da4w"),
    ("smoothquant", "int4", [], "--method smoothquant does not take --scheme int4"),
    ("magnitude", "int8wo", [], "--method magnitude does not take --scheme int8wo"),
    ("gptq", "int4", [], "--method gptq calibrates on text: give --calib"),
    ("rtn", "nf4", ["--group-size", "64"], "--group-size applies to int4 and 8da4w only"),
    ("rtn", "int4", ["--group-size", "100"], "--group-size must be one of 32, 64, 128, 256"),
    ("rtn", "int4", ["--seq-len", "0"], "--seq-len must be >= 1"),
    ("rtn", "8da4w", ["--zero-point", "int"], "--zero-point applies to --scheme int4 only, not --scheme 8da4w"),
    ("rtn", "nf4", ["--zero-point", "none"], "--zero-point applies to --scheme int4 only, not --scheme nf4"),
])
def test_bad_method_scheme_pairs_and_options(tmp_path, llama, capsys, method, scheme, extra, message):
    out = tmp_path / "q.safetensors"
    status, err = quantize(capsys, llama, out, *extra, method=method, scheme=scheme)
    assert status == 2 and message in err
    assert not list(tmp_path.iterdir())


def test_failure_after_loading_leaves_no_partial_file(tmp_path, llama, capsys):
    one_token = tmp_path / "short.txt"
    one_token.write_text("x")
    out = tmp_path / "out" / "q.safetensors"
    out.parent.mkdir()
    status, err = quantize(capsys, llama, out, "--calib", one_token, method="gptq", scheme="int4")
    assert status == 2 and "at least 2 are needed" in err
    assert not list(out.parent.iterdir())


def test_eval_refuses_a_missing_or_malformed_qparams_file(tmp_path, llama, calib, capsys):
    status, err = run(capsys, "eval", llama, "--qparams", tmp_path / "none.safetensors", "--text", calib)
    assert status == 2 and "is not a file" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    status, err = run(capsys, "eval", llama, "--qparams", junk, "--text", calib, "--no-progress")
    assert status == 2 and "--qparams" in err and "not a readable safetensors file" in err
