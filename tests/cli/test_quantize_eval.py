"""quantize -> save -> load -> eval end to end on tiny Llama and GPT-2 checkpoints made here."""
import re

import pytest
import torch

pytest.importorskip("transformers")

import aofunc  # noqa: E402
from aofunc.cli import hf_model  # noqa: E402
from aofunc.cli.main import main  # noqa: E402

from .hf_models import TEXT, write  # noqa: E402

# (method, scheme, stored scheme type, least output SQNR in dB against the float model on the text)
CASES = [
    ("rtn", "int8wo", "Int8WeightOnly", 35),
    ("rtn", "int8dq", "Int8Dynamic", 30),
    ("rtn", "int4", "Int4WeightOnly", 14),
    ("rtn", "8da4w", "Int8DynamicInt4", 13),
    ("rtn", "nf4", "NF4", 13),
    ("gptq", "int4", "Int4WeightOnly", 14),
    ("gptq", "8da4w", "Int8DynamicInt4", 13),
    ("smoothquant", "int8dq", "Int8Dynamic", 30),
    ("wanda", "2:4", None, 3),
    ("magnitude", "2:4", None, 3),
]
BLOCK_LINEARS = {
    "llama": r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "gpt2": r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for kind in BLOCK_LINEARS:
        write(kind, root / kind)
    (root / "calib.txt").write_text(TEXT * 12)
    return root


def float_and_quantized_logits(model_dir, qfile, text):
    model, tokenizer = hf_model.load(model_dir, "cpu", torch.float32)
    ids = hf_model.windows(tokenizer, text, 64, "--text")[:4]
    params = {n: p.detach() for n, p in model.named_parameters()}
    qparams = dict(params) | aofunc.load(qfile)
    with torch.no_grad():
        ref = aofunc.apply(model, params, input_ids=ids, use_cache=False).logits
        out = aofunc.apply(model, qparams, input_ids=ids, use_cache=False).logits
    return ref, out, aofunc.load(qfile)


def quantize(workdir, kind, method, scheme, out, *extra):
    return main(["quantize", str(workdir / kind), "--method", method, "--scheme", scheme, "--calib",
                 str(workdir / "calib.txt"), "--out", str(out), "--seq-len", "64", "--calib-samples", "8",
                 "--no-progress", "--device", "cpu", *extra])  # the tests recompute on the CPU in fp32


@pytest.mark.parametrize("kind", list(BLOCK_LINEARS))
@pytest.mark.parametrize("method,scheme,stored,min_sqnr", CASES)
def test_quantize_save_load_eval(workdir, kind, method, scheme, stored, min_sqnr, capsys):
    out = workdir / f"{kind}-{method}-{scheme.replace(':', '')}.safetensors"
    extra = ["--group-size", "32"] if scheme in ("int4", "8da4w") else []
    assert quantize(workdir, kind, method, scheme, out, *extra) == 0
    assert out.is_file()
    ref, result, loaded = float_and_quantized_logits(workdir / kind, out, TEXT)
    targets = [n for n in loaded if re.fullmatch(BLOCK_LINEARS[kind], n)]
    assert len(targets) == 8 if kind == "gpt2" else 14
    for name in targets:
        w = loaded[name]
        if stored is None:  # pruned: dense, exactly 2 zeros in every 4 along the input dimension
            k_major = w.t() if kind == "gpt2" else w  # GPT-2's Conv1D stores [in, out]
            zeros = (k_major.reshape(k_major.shape[0], -1, 4) == 0).sum(-1)
            assert bool((zeros == 2).all()), name
        else:
            assert type(w.scheme).__name__ == stored, name
            assert w.transposed == (kind == "gpt2"), name  # orientation found by running the model
    # the embeddings and the output head stay in full precision
    assert not any(isinstance(t, aofunc.QTensor) for n, t in loaded.items() if n not in targets)
    assert float(aofunc.sqnr(ref, result)) >= min_sqnr

    capsys.readouterr()
    assert main(["eval", str(workdir / kind), "--qparams", str(out), "--text", str(workdir / "calib.txt"),
                 "--seq-len", "64", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"perplexity \d+\.\d+ over [\d,]+ predicted tokens", printed), printed


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("zero_point", ["int", "none"])
def test_zero_point_picks_the_int4_grid(workdir, method, zero_point, capsys):
    out = workdir / f"llama-{method}-int4-{zero_point}.safetensors"
    assert quantize(workdir, "llama", method, "int4", out, "--group-size", "32", "--zero-point", zero_point) == 0
    assert f"Int4WeightOnly(group_size=32, zero_point='{zero_point}')" in capsys.readouterr().out
    ref, result, loaded = float_and_quantized_logits(workdir / "llama", out, TEXT)
    targets = [n for n in loaded if re.fullmatch(BLOCK_LINEARS["llama"], n)]
    assert len(targets) == 14
    assert all(loaded[n].scheme == aofunc.Int4WeightOnly(32, zero_point=zero_point) for n in targets)
    assert all(("zero" in loaded[n].tensors) == (zero_point == "int") for n in targets)
    assert float(aofunc.sqnr(ref, result)) >= 14


def test_eval_reports_the_float_models_perplexity(workdir, capsys):
    assert main(["eval", str(workdir / "llama"), "--text", str(workdir / "calib.txt"), "--seq-len", "64",
                 "--max-windows", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 window(s) of 64; full precision" in printed
    # a randomly initialised model is close to a uniform guess over its 320 tokens
    ppl = float(re.search(r"perplexity (\S+)", printed)[1])
    assert 150 < ppl < 700


def test_gptq_beats_round_to_nearest_on_its_calibration_text(workdir):
    sqnr = {}
    for method in ("rtn", "gptq"):
        out = workdir / f"cmp-{method}.safetensors"
        assert quantize(workdir, "llama", method, "int4", out, "--group-size", "32") == 0
        ref, result, _ = float_and_quantized_logits(workdir / "llama", out, TEXT)
        sqnr[method] = float(aofunc.sqnr(ref, result))
    assert sqnr["gptq"] > sqnr["rtn"] + 1.0, sqnr


def test_a_file_for_another_model_is_refused(workdir, capsys):
    out = workdir / "gpt2-for-llama.safetensors"
    assert quantize(workdir, "gpt2", "rtn", "int8dq", out) == 0
    capsys.readouterr()
    assert main(["eval", str(workdir / "llama"), "--qparams", str(out), "--text", str(workdir / "calib.txt"),
                 "--no-progress"]) == 2
    assert "does not fit MODEL_DIR" in capsys.readouterr().err


def printed_sqnr(printed: str) -> float:
    return float(re.search(r"output SQNR (\S+) dB on ", printed)[1])


def sqnr_over(model_dir, qfile, ids) -> float:
    """The quantized model's logits against the float model's on token ids, all in one."""
    model, _ = hf_model.load(model_dir, "cpu", torch.float32, tokenizer=False)
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = aofunc.apply(model, params, input_ids=ids, use_cache=False).logits
        out = aofunc.apply(model, dict(params) | aofunc.load(qfile), input_ids=ids, use_cache=False).logits
    return float(aofunc.sqnr(ref, out))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_printed_sqnr_is_on_one_synthetic_batch_or_on_eval_text(workdir, method, capsys):
    out = workdir / f"sqnr-{method}.safetensors"
    capsys.readouterr()
    assert quantize(workdir, "llama", method, "int4", out, "--group-size", "32", "--force") == 0
    printed = capsys.readouterr().out
    assert "on a fixed synthetic batch (4 sequences of 64 random tokens" in printed, printed
    synthetic = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(0))
    assert printed_sqnr(printed) == pytest.approx(sqnr_over(workdir / "llama", out, synthetic), abs=0.051)

    eval_text = workdir / "calib.txt"
    assert quantize(workdir, "llama", method, "int4", out, "--group-size", "32", "--force",
                    "--eval-text", str(eval_text)) == 0
    printed = capsys.readouterr().out
    assert f"on --eval-text {eval_text} (8 window(s) of 64 tokens)" in printed, printed
    _, tokenizer = hf_model.load(workdir / "llama", "cpu", torch.float32)
    windows = hf_model.spread(hf_model.windows(tokenizer, TEXT * 12, 64, "--eval-text"), 8)
    assert windows.shape == (8, 64)
    assert printed_sqnr(printed) == pytest.approx(sqnr_over(workdir / "llama", out, windows), abs=0.051)


def test_no_progress_silences_the_loading_bar_of_transformers_too(workdir, capsys):
    from transformers.utils import logging as hf_logging

    out = workdir / "progress.safetensors"
    argv = ["quantize", str(workdir / "llama"), "--method", "rtn", "--scheme", "int8wo", "--out", str(out), "--force"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "Loading weights" in capsys.readouterr().err  # the bar this test is about, shown by default
    assert main([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()  # as it was before the command
