"""python -m aofunc demo --quick: every method runs on the shipped model and the outputs are written."""
import json
import math

import pytest

from aofunc.cli.main import main
from aofunc.demo import report
from aofunc.demo.methods import METHODS, by_name


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = main(["demo", "--quick", "--device", "cpu", "--out", str(out), "--no-progress"])
    return status, out


def test_quick_demo_runs_every_method(quick, capsys):
    status, out = quick
    numbers = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in numbers["results"]}
    assert [r["method"] for r in numbers["results"]] == [m.name for m in METHODS]
    assert {name: r["error"] for name, r in rows.items() if r["error"]} == {}
    assert status == 0
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and 1 < r["perplexity"] < 256
        assert r["decode_tokens_per_second"] is None  # measured on a GPU only
    # bits per weight of the block linears (fp32 model): the formats' exact storage costs
    assert rows["float"]["bits_per_weight"] == 32
    assert rows["rtn-int8wo"]["bits_per_weight"] == pytest.approx(8 + 32 / 256, rel=0.02)  # one fp32 scale per row
    assert rows["rtn-int4"]["bits_per_weight"] == pytest.approx(4 + 64 / 128, rel=0.01)  # fp32 scale + zero per 128
    assert rows["rtn-8da4w"]["bits_per_weight"] == pytest.approx(4 + 32 / 32, rel=0.01)  # fp32 scale per 32
    assert rows["magnitude-2:4"]["bits_per_weight"] == 32  # pruned weights are stored dense
    assert rows["rtn-int4"]["size_bytes"] < rows["rtn-int8wo"]["size_bytes"] < rows["float"]["size_bytes"]
    # even on the tiny budget, the shipped model tells these apart
    assert rows["wanda-2:4"]["perplexity"] < rows["magnitude-2:4"]["perplexity"]
    assert rows["rtn-int8wo"]["perplexity"] < rows["rtn-int4"]["perplexity"]


def test_quick_demo_writes_a_plot_or_says_why_not(quick):
    _, out = quick
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "perplexity_vs_bits.png").exists()
    else:
        assert (out / "perplexity_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_table_lists_failures_after_the_numbers():
    results = [
        {"method": "float", "bits_per_weight": 32.0, "size_bytes": 1000, "perplexity": 2.0, "quantize_seconds": 0.0,
         "decode_tokens_per_second": None, "error": None},
        {"method": "rtn-int4", "bits_per_weight": 4.5, "size_bytes": 200, "perplexity": 2.2, "quantize_seconds": 0.5,
         "decode_tokens_per_second": None, "error": None},
        {"method": "rtn-nf4", "error": "ValueError: boom"},
    ]
    lines = report.table(results).splitlines()
    assert lines[0].split() == ["method", "bits/weight", "size", "(bytes)", "perplexity", "vs", "float", "quantize", "(s)"]
    assert lines[3].split() == ["rtn-int4", "4.50", "200", "2.2000", "+10.00%", "0.50"]
    assert lines[4].split() == ["rtn-nf4", "failed:", "ValueError:", "boom"]


def test_bad_demo_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method"):
        by_name(["int3"])
    assert main(["demo", "--methods", "int3", "--out", str(tmp_path)]) == 2
    assert "--methods" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_plot_puts_dense_pruned_methods_apart_and_colours_each_method():
    from aofunc.demo.report import COLOURS, plot_panels

    results = [dict(method="float", bits_per_weight=32.0, perplexity=2.0),
               dict(method="rtn-int4", bits_per_weight=4.25, perplexity=2.2),
               dict(method="rtn-nf4", bits_per_weight=4.1, perplexity=2.1),
               dict(method="wanda-2:4", bits_per_weight=32.0, perplexity=2.7)]
    panels = plot_panels(results)
    assert [(title, [r["method"] for r in rs]) for rs, title in panels] == [
        ("quantized formats", ["rtn-int4", "rtn-nf4"]), ("pruned, stored dense", ["wanda-2:4"])]
    assert plot_panels(results[:3]) == [(results[1:3], "quantized formats")]
    assert len(set(COLOURS)) == len(COLOURS) >= 12  # the demo's methods each get their own colour


def test_demo_methods_are_named_as_the_command_lines_method_and_scheme():
    from aofunc.cli.quantize import METHODS as CLI_METHODS
    from aofunc.demo.methods import FORMER_NAMES, METHODS, by_name

    for method in METHODS:
        if method.name == "float" or method.name == "wanda-50%":
            continue  # the unquantized baseline; unstructured Wanda has no --scheme of its own
        cli_method, scheme = method.name.split("-", 1)
        assert scheme.removesuffix("-act") in CLI_METHODS[cli_method], method.name
    assert [m.name for m in by_name(["int4-rtn", "nf4"])] == ["rtn-int4", "rtn-nf4"]  # former names still work
    assert set(FORMER_NAMES.values()) <= {m.name for m in METHODS}
