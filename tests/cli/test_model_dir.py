"""Where MODEL_DIR comes from: a directory, or a model id in the local Hugging Face cache read offline; and the
tokenizer, read only by the methods and options that tokenize text."""
import hashlib
import os
import socket

import pytest

pytest.importorskip("transformers")

from aofunc.cli.main import main  # noqa: E402

from .hf_models import TEXT, write  # noqa: E402

MODEL_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write("llama", tmp_path_factory.mktemp("hf") / "llama")


def fill_hub_cache(cache, model_dir, model_id=MODEL_ID):
    """Lays out ``model_dir``'s files in ``cache`` as huggingface_hub does: blobs named by their hash, refs/main
    naming the commit, and the snapshot's files as relative links to the blobs."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / file.name)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network is not to be used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(capsys, *argv):
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_model_id_in_the_local_cache_works_offline(tmp_path, llama, monkeypatch, capsys, no_network, variable):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hub" if variable == "HF_HUB_CACHE" else tmp_path / "home" / "hub"
    monkeypatch.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else cache.parent))
    fill_hub_cache(cache, llama)
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-llama" is no directory here
    out = tmp_path / "q.safetensors"
    status, printed, err = run(capsys, "quantize", MODEL_ID, "--method", "rtn", "--scheme", "int8wo", "--out", out,
                               "--no-progress")
    assert status == 0, err
    assert out.is_file() and "wrote" in printed
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    status, printed, err = run(capsys, "eval", MODEL_ID, "--qparams", out, "--text", text, "--seq-len", "32",
                               "--no-progress")
    assert status == 0, err
    assert "perplexity" in printed


def test_a_model_id_the_cache_lacks_is_refused(tmp_path, llama, monkeypatch, capsys, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fill_hub_cache(tmp_path / "hub", llama)
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, "quantize", "tiny-org/other-llama", "--method", "rtn", "--scheme", "int8wo",
                         "--out", tmp_path / "q.safetensors", "--no-progress")
    assert status == 2
    assert "'tiny-org/other-llama' is not a directory, nor the id of a model in the local Hugging Face cache" in err
    assert str(tmp_path / "hub") in err
    assert not (tmp_path / "q.safetensors").exists()


@pytest.fixture(scope="module")
def llama_without_tokenizer(llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "no-tokenizer"
    directory.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (llama / name).is_file():
            (directory / name).write_bytes((llama / name).read_bytes())
    return directory


@pytest.mark.parametrize("method,scheme", [("rtn", "int4"), ("magnitude", "2:4")])
def test_methods_without_calibration_need_no_tokenizer(tmp_path, llama_without_tokenizer, capsys, method, scheme):
    out = tmp_path / "q.safetensors"
    status, printed, err = run(capsys, "quantize", llama_without_tokenizer, "--method", method, "--scheme", scheme,
                               "--out", out, "--no-progress")
    assert status == 0, err
    assert out.is_file() and "on a fixed synthetic batch" in printed


def test_the_tokenizer_is_read_when_text_is_tokenized(tmp_path, llama_without_tokenizer, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "q.safetensors"
    for extra in (["--method", "gptq", "--scheme", "int4", "--calib", text],
                  ["--method", "rtn", "--scheme", "int4", "--eval-text", text]):
        status, _, err = run(capsys, "quantize", llama_without_tokenizer, *extra, "--out", out, "--no-progress")
        assert status == 2 and "its tokenizer files could not be loaded" in err
        assert not out.exists()
