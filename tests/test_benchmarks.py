"""Benchmark results as data: benchmarks/common.py's record_rows merges rows into a card's results file, and
benchmarks/render.py makes the generated tables of the benchmarks page from such files. CPU only, no GPU."""
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import their helpers as top-level modules

import common  # noqa: E402
import render  # noqa: E402

CARD = "NVIDIA H200"


def linear(fmt="w4a16", k=4096, n=4096, m=1, aofunc_us=8.0, **extra):
    row = {"kind": "linear", "format": fmt, "K": k, "N": n, "M": m, "x_dtype": "bfloat16", "bf16_us": 16.0,
           "aofunc_us": aofunc_us, "path": "gemv", "peer": "tinygemm", "peer_us": 7.2, "timing": "cold_us",
           "commit": "abc1234"}
    return {**row, **extra}


def decode(variant="int4", mode="manual-graphs", tps=300.0, kind="decode"):
    return {"kind": kind, "variant": variant, "batch": 1, "layers": 32, "mode": mode, "tokens_per_s": tps,
            "bf16_tokens_per_s": 150.0, "commit": "abc1234"}


def read(path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------ record_rows

def test_record_rows_writes_the_card_and_its_rows(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    returned = common.record_rows([linear(m=2), linear(m=1)], card=CARD, path=path)
    assert returned == path
    data = read(path)
    assert data["card"] == "NVIDIA H200"
    assert [r["M"] for r in data["rows"]] == [1, 2]  # sorted by key
    assert data["rows"][0] == linear(m=1)
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed, not left behind


def test_a_row_with_the_same_key_replaces_the_old_one_and_others_are_appended(tmp_path):
    path = tmp_path / "card.json"
    common.record_rows([linear(m=1, aofunc_us=8.0), linear(m=16, aofunc_us=14.0), decode("bf16", tps=150.0)],
                       card=CARD, path=path)
    common.record_rows([linear(m=1, aofunc_us=7.5, path="gemm"), linear(m=4, aofunc_us=11.0),
                        linear(fmt="nf4", m=1, aofunc_us=13.0)], card=CARD, path=path)
    rows = read(path)["rows"]
    assert [(r["kind"], r.get("format"), r.get("M"), r.get("aofunc_us")) for r in rows] == [
        ("decode", None, None, None),
        ("linear", "nf4", 1, 13.0),
        ("linear", "w4a16", 1, 7.5),
        ("linear", "w4a16", 4, 11.0),
        ("linear", "w4a16", 16, 14.0),
    ]
    assert rows[2]["path"] == "gemm"  # the whole row is replaced, not only the time
    assert rows[0] == decode("bf16", tps=150.0)  # another kind stays as it was


def test_every_key_field_tells_rows_apart(tmp_path):
    path = tmp_path / "card.json"
    base = linear()
    variants = [base, {**base, "K": 8192}, {**base, "N": 28672}, {**base, "x_dtype": "float16"},
                {**base, "format": "w8a16"}]
    common.record_rows(variants, card=CARD, path=path)
    assert len(read(path)["rows"]) == 5
    models = [decode(), decode(mode="eager"), decode(kind="prefill"), {**decode(), "batch": 4},
              {**decode(), "layers": 2}, decode("nf4")]
    common.record_rows(models, card=CARD, path=path)
    common.record_rows([decode(tps=301.0)], card=CARD, path=path)  # replaces the first only
    rows = read(path)["rows"]
    assert len(rows) == 11
    assert sorted(r["tokens_per_s"] for r in rows if r["kind"] != "linear") == [300.0] * 5 + [301.0]


def test_moe_rows_may_leave_key_fields_out(tmp_path):
    path = tmp_path / "card.json"
    moe = {"kind": "moe", "format": "w4a16", "experts": 8, "top_k": 2, "K": 4096, "N": 14336, "M": 16,
           "x_dtype": "bfloat16", "aofunc_us": 50.0}
    common.record_rows([moe, {**moe, "M": 32}], card=CARD, path=path)
    common.record_rows([{**moe, "aofunc_us": 45.0}], card=CARD, path=path)
    assert [(r["M"], r["aofunc_us"]) for r in read(path)["rows"]] == [(16, 45.0), (32, 50.0)]


def test_a_bad_row_raises_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "card.json"
    common.record_rows([linear()], card=CARD, path=path)
    before = path.read_text()
    incomplete = linear()
    del incomplete["x_dtype"]
    with pytest.raises(ValueError, match="x_dtype"):
        common.record_rows([linear(m=2), incomplete], card=CARD, path=path)
    with pytest.raises(ValueError, match="unknown kind"):
        common.record_rows([{"kind": "attention", "M": 1}], card=CARD, path=path)
    assert path.read_text() == before


def test_the_file_is_one_row_a_line_key_fields_first(tmp_path):
    path = tmp_path / "card.json"
    common.record_rows([linear(m=1), linear(m=2)], card=CARD, path=path)
    lines = path.read_text().splitlines()
    assert lines[1] == ' "card": "NVIDIA H200",'
    assert lines[3].strip().startswith('{"kind": "linear", "format": "w4a16", "K": 4096, "N": 4096, "M": 1, '
                                       '"x_dtype": "bfloat16", "aofunc_us": 8.0, "bf16_us": 16.0')
    assert len(lines) == 7


def test_the_default_file_is_named_by_the_device_slug():
    assert common.results_path("NVIDIA H100 80GB HBM3") == BENCHMARKS / "results" / "nvidia-h100-80gb-hbm3.json"
    assert common.results_path("NVIDIA H200").name == "nvidia-h200.json"


def test_timing_names_the_odd_one_out():
    assert common.timing_of(bf16="cold_us", aofunc="cold_us", peer=None) == "cold_us"
    assert common.timing_of(bf16="cold_us", aofunc="cold_us", peer="do_bench") == "cold_us; peer: do_bench"


def test_the_commit_is_a_short_hash_or_none():
    commit = common.git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", commit)


# ------------------------------------------------------------------------------------ rows of the benchmarks

def test_bench_kernels_rows_name_the_path_and_the_preferred_peer():
    import bench_kernels

    times = {"bf16": (16.04, "cold_us"), "aofunc": (8.011, "cold_us"), "tinygemm": None,
             "torchao": (7.6, "do_bench")}
    row = bench_kernels.linear_row("w4a16", 4096, 4096, 1, times, {"path": "gemv", "BLOCK_N": 32, "tuned": True})
    assert common.row_key(row) == ("linear", "w4a16", 4096, 4096, 1, "bfloat16")
    assert (row["bf16_us"], row["aofunc_us"], row["path"], row["tuned"]) == (16.04, 8.01, "gemv", True)
    assert row["peer"] == common.torchao_name() and row["peer"].startswith("torchao")
    assert (row["peer_us"], row["timing"]) == (7.6, "cold_us; peer: do_bench")
    times["tinygemm"] = (7.4, "cold_us")
    row = bench_kernels.linear_row("w4a16", 4096, 4096, 1, times, {"path": "gemv"})
    assert (row["peer"], row["peer_us"], row["timing"], row["tuned"]) == ("tinygemm", 7.4, "cold_us", False)
    row = bench_kernels.linear_row("nf4", 4096, 4096, 2, times, {"path": "gemm"})
    assert (row["peer"], row["peer_us"]) == (None, None)


def test_decode_rows_carry_the_bf16_speed_of_their_kind():
    import decode as decode_bench
    from llama import LlamaShape

    times = {"decode": (298.456, {"tokens": 200}), "prefill": (None, {"prompt": 512})}
    rows = decode_bench.model_rows("int4", LlamaShape(layers=2), "manual-graphs", times,
                                   {"decode": 146.4, "prefill": 9000.0})
    assert len(rows) == 1  # a failed measurement gives no row
    assert common.row_key(rows[0]) == ("decode", "int4", 1, 2, "manual-graphs")
    assert (rows[0]["tokens_per_s"], rows[0]["bf16_tokens_per_s"], rows[0]["tokens"]) == (298.46, 146.4, 200)


# -------------------------------------------------------------------------------------------------- render.py

EXPECTED_W4A16 = """### w4a16

activations bfloat16; commit abc1234; tinygemm is `aten._weight_int4pack_mm` on the same codes.

| K×N | M | bf16 µs | aofunc µs | bf16/aofunc | path | peer | peer µs | peer/aofunc |
|---|---|---|---|---|---|---|---|---|
| 4096×4096 | 1 | 16.0 | 8.0 | 2.00 | gemv (tuned) | tinygemm | 7.2 | 0.90 |
| 4096×4096 | 16 | 16.0 | 12.8 | 1.25 | gemm | — | — | — |
| 8192×28672 | 1 | 160.0 | 50.0 | 3.20 | gemv | tinygemm | 60.0 | 1.20 |"""

EXPECTED_DECODE = """| kind | variant | batch | layers | mode | prompt | tokens/s | bf16 tokens/s | × bf16 |
|---|---|---|---|---|---|---|---|---|
| decode | bf16 | 1 | 32 | manual-graphs | — | 150.0 | 150.0 | 1.00 |
| decode | int4 | 1 | 32 | manual-graphs | — | 300.0 | 150.0 | 2.00 |
| decode | int4 | 1 | 32 | reduce-overhead | — | 330.0 | 150.0 | 2.20 |
| prefill | int4 | 1 | 32 | manual-graphs | 512 | 6000.0 | 8000.0 | 0.75 |"""

HAND_WRITTEN = """# Benchmarks

## Kernels: weight-only

Card: NVIDIA H100 80GB HBM3. Measured by hand, kept as history.

## GPTQ

Hand-written prose.
"""


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    rows = [linear(m=1, tuned=True), linear(m=16, aofunc_us=12.8, path="gemm", peer=None, peer_us=None),
            linear(k=8192, n=28672, m=1, aofunc_us=50.0, bf16_us=160.0, peer_us=60.0),
            linear(fmt="w8a8", m=2048, aofunc_us=80.0, bf16_us=90.0, path="quantize+gemm", peer="torch._int_mm",
                   peer_us=300.0),
            linear(fmt="w8a16", m=16, aofunc_us=14.0, path="gemm", peer="torchao 0.17", peer_us=600.0),
            decode("int4"), decode("bf16", tps=150.0), decode("int4", mode="reduce-overhead", tps=330.0),
            {**decode("int4", kind="prefill", tps=6000.0), "bf16_tokens_per_s": 8000.0, "prompt": 512}]
    common.record_rows(rows, card=CARD, path=folder / "nvidia-h200.json")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(HAND_WRITTEN)
    return folder, doc


def test_render_writes_one_table_per_format_and_one_for_decode(results):
    folder, doc = results
    assert render.render(folder, doc) == ["Linear: NVIDIA H200", "Targets: NVIDIA H200", "Decode: NVIDIA H200"]
    text = doc.read_text()
    assert text.startswith(HAND_WRITTEN.rstrip())  # hand-written sections stay, first
    linear_body = text.split("## Linear: NVIDIA H200\n\n", 1)[1].split("\n## ", 1)[0]
    assert linear_body.startswith(
        "Generated from `benchmarks/results/nvidia-h200.json` by `benchmarks/render.py`; do not edit by hand.")
    assert EXPECTED_W4A16 in linear_body
    assert linear_body.index("### w4a16") < linear_body.index("### w8a16") < linear_body.index("### w8a8")
    assert ("### w8a16\n\nactivations bfloat16; commit abc1234; torchao is its `quantize_` on an `nn.Linear`, "
            "compiled with `torch.compile`.\n\n") in linear_body
    assert "| 4096×4096 | 16 | 16.0 | 14.0 | 1.14 | gemm | torchao 0.17 | 600.0 | 42.86 |" in linear_body
    assert ("| 4096×4096 | 2048 | 90.0 | 80.0 | 1.12 | quantize+gemm | torch._int_mm | 300.0 | 3.75 |"
            in linear_body)
    decode_body = text.split("## Decode: NVIDIA H200\n\n", 1)[1]
    assert decode_body.startswith("Generated from `benchmarks/results/nvidia-h200.json`")
    assert EXPECTED_DECODE in decode_body


def test_render_again_replaces_its_sections_and_drops_those_without_results(results):
    folder, doc = results
    render.render(folder, doc)
    once = doc.read_text()
    render.render(folder, doc)
    assert doc.read_text() == once  # idempotent
    path = folder / "nvidia-h200.json"
    kept = [r for r in common.load_results(path)["rows"] if r["kind"] == "linear"]
    path.write_text(common.dump_results(CARD, kept))
    common.record_rows([linear(m=1, aofunc_us=4.0, tuned=True)], card=CARD, path=path)
    assert render.render(folder, doc) == ["Linear: NVIDIA H200", "Targets: NVIDIA H200"]
    text = doc.read_text()
    assert "## Decode: NVIDIA H200" not in text
    assert "| 4096×4096 | 1 | 16.0 | 4.0 | 4.00 | gemv (tuned) | tinygemm | 7.2 | 1.80 |" in text
    assert "## Kernels: weight-only\n\nCard: NVIDIA H100 80GB HBM3. Measured by hand, kept as history." in text
    assert re.findall(r"^## (.*)$", text, re.M) == ["Kernels: weight-only", "GPTQ", "Linear: NVIDIA H200",
                                                    "Targets: NVIDIA H200"]


# ceilings: the weight read at 2 * 8192 * 28672 bytes / 160 µs (the fastest bf16 weight read), bf16's
# multiply-adds at W8A8's bf16 row (2 * 2048 * 4096**2 / 90 µs), int8's at its own 80 µs; e.g. W4A16 4096 x 4096
# reads 0.53125 * 4096**2 bytes in 3.04 µs: 16 / 3.04 = 5.27, and W8A16 16 / 5.71 = 2.80
EXPECTED_TARGETS = """| format | M | target | 4096×4096 | 8192×28672 | met | reachable |
|---|---|---|---|---|---|---|
| w4a16 | 1 | ≥ 3.0 | 2.00 ✓ [≥ 2.0] (5.27) | 3.20 ✓ (3.76) | 2 of 2 | 2 |
| w4a16 | 16 | ≥ 2.5 | 1.25 (5.27) | — | 0 of 1 | 1 |
| w8a16 | 16 | ≥ 1.6 | 1.14 (2.80) | — | 0 of 1 | 1 |
| w8a8 | 2048 | ≥ 1.4 | 1.12 (1.12) | — | 0 of 1 | 0 |"""


def test_targets_mark_the_ratios_that_meet_them_by_shape(results):
    folder, doc = results
    render.render(folder, doc)
    body = doc.read_text().split("## Targets: NVIDIA H200\n\n", 1)[1].split("\n## ", 1)[0]
    assert body.startswith("Generated from `benchmarks/results/nvidia-h200.json`")
    # 4096 x 4096 at one row has its own target, 2.0, met exactly; rows without a target (none here) are left out
    assert EXPECTED_TARGETS in body
    assert body.rstrip().endswith("on this card none does.")


def test_targets_take_bf16_x_only_and_a_shape_s_own_figure():
    rows = [linear(m=1, aofunc_us=8.1), linear(m=1, aofunc_us=1.0, x_dtype="float16"),
            linear(fmt="w8a16", m=1, aofunc_us=11.0, bf16_us=16.0), linear(fmt="w8a16", k=8192, n=28672, m=64,
                                                                           aofunc_us=100.0, bf16_us=130.0)]
    table = render.target_table(rows)
    # the fp16 row's 16x does not count; W8A16 at 64 rows takes as long to do its multiply-adds at the bf16 rate
    # of its own row as bf16 did (a ceiling of 1.00, not reachable for 1.3)
    assert "| w4a16 | 1 | ≥ 3.0 | 1.98 [≥ 2.0] (3.76) | — | 0 of 1 | 1 |" in table
    assert "| w8a16 | 1 | ≥ 1.8 | 1.45 ✓ [≥ 1.4] (2.00) | — | 1 of 1 | 1 |" in table
    assert "| w8a16 | 64 | ≥ 1.3 | — | 1.30 ✓ (1.00) | 1 of 1 | 0 |" in table
    assert render.target("w4a16", 1, 4096, 4096) == 2.0 and render.target("w4a16", 1, 4096, 14336) == 3.0
    assert render.target("w4a16", 2, 4096, 4096) is None


def test_ceilings_take_the_card_s_fastest_rates():
    rows = [linear(k=8192, n=28672, m=1, bf16_us=100.0), linear(m=2048, bf16_us=200.0),
            linear(fmt="w8a8", m=2048, aofunc_us=100.0, bf16_us=200.0, peer_us=None)]
    rates = render.card_rates(rows)
    assert rates == {"bytes": 2 * 8192 * 28672 / 100.0, "bf16": 2 * 2048 * 4096 ** 2 / 200.0,
                     "int8": 2 * 2048 * 4096 ** 2 / 100.0}
    # at 2048 rows the multiply-adds bound: bf16's own time for W4A16, half of it for 8da4w (int8 twice as fast)
    assert render.ceiling("w4a16", 2048, 4096, 4096, 200.0, rates) == pytest.approx(1.0)
    assert render.ceiling("8da4w", 2048, 4096, 4096, 200.0, rates) == pytest.approx(2.0)
    # at one row the bytes: a W8A16 weight is half bf16's
    assert render.ceiling("w8a16", 1, 8192, 28672, 100.0, rates) == pytest.approx(2.0)
    assert render.ceiling("fp8", 1, 8192, 28672, 100.0, rates) is None
    # no W8A8 rows: int8 at twice bf16's rate
    assert render.card_rates(rows[:2])["int8"] == 2 * rates["bf16"]


def test_jumps_list_each_time_above_its_bound_at_the_next_larger_m():
    rows = [linear(fmt="w8a16", k=4096, n=14336, m=m, aofunc_us=us)
            for m, us in ((2, 25.0), (4, 28.4), (8, 24.4), (16, 23.3), (32, 27.0))]
    rows += [linear(m=64, aofunc_us=21.0), linear(m=128, aofunc_us=20.0)]  # 1.05 times exactly: allowed
    rows += [linear(m=1, aofunc_us=9.0, x_dtype="float16"), linear(m=2, aofunc_us=8.0, x_dtype="float16")]
    # only the next larger M counts (25.0 at M = 2 is within bounds of 28.4 at M = 4)
    assert render.jumps(rows) == ["w4a16 4096×4096 (float16): 9.0 µs at M = 1, 8.0 at M = 2",
                                  "w8a16 4096×14336 (bfloat16): 28.4 µs at M = 4, 24.4 at M = 8"]


def test_render_cli_takes_the_folder_and_the_doc(results, capsys):
    folder, doc = results
    render.main(["--results", str(folder), "--doc", str(doc)])
    assert "wrote ## Linear: NVIDIA H200" in capsys.readouterr().out
    assert "## Decode: NVIDIA H200" in doc.read_text()


def test_moe_rows_carry_their_routing_and_render_as_one_table(tmp_path, monkeypatch):
    import bench_moe
    import torch

    offs = bench_moe.routed_offsets(32)
    assert offs.dtype == torch.int32 and offs.shape == (bench_moe.EXPERTS,)
    assert int(offs[-1]) == 32 * bench_moe.TOP_K and bool((offs[1:] >= offs[:-1]).all())
    monkeypatch.setattr(bench_moe, "git_commit", lambda: "abc1234")
    times = {"bf16": (100.0, "cold_us"), "aofunc": (40.0, "cold_us"), "loop": (90.0, "cold_us")}
    row = bench_moe.moe_row("w4a16", "down", 32, 4096, 14336, times)
    assert common.row_key(row) == ("moe", "w4a16", "down", 8, 2, 14336, 4096, 64, 32, "bfloat16")
    folder = tmp_path / "results"
    folder.mkdir()
    common.record_rows([row], card=CARD, path=folder / "nvidia-h200.json")
    doc = tmp_path / "benchmarks.md"
    assert render.render(folder, doc) == ["Stacked experts: NVIDIA H200"]
    assert "| w4a16 | down | 8 × 4096×14336 | 2 | 32 | 64 | 100.0 | 40.0 | 90.0 | 2.50 | grouped |" in doc.read_text()
    # with the other product of the layer measured too, a row for the whole layer sums the two
    up = bench_moe.moe_row("w4a16", "gate_up", 32, 28672, 4096, {"bf16": (200.0, "cold_us"),
                                                                   "aofunc": (60.0, "cold_us"),
                                                                   "loop": (150.0, "cold_us")})
    common.record_rows([up], card=CARD, path=folder / "nvidia-h200.json")
    render.render(folder, doc)
    assert "| w4a16 | layer | 8 × both | 2 | 32 | 64 | 300.0 | 100.0 | 240.0 | 3.00 | grouped |" in doc.read_text()


def test_generate_harness_records_a_row_per_variant(tmp_path):
    # the script's --tiny smoke run (small shapes, no compile) on the CPU; the measurement itself needs a GPU
    pytest.importorskip("transformers")
    import generate

    out = tmp_path / "card.json"
    generate.main(["--tiny", "--layers", "1", "--prompt", "4", "--new-tokens", "3", "--variants", "int4,bf16",
                   "--results", str(out)])
    rows = common.load_results(out)["rows"]
    assert [(r["kind"], r["variant"], r["layers"], r["mode"], r["tokens"]) for r in rows] == [
        ("generate", "bf16", 1, "eager-static", 3), ("generate", "int4", 1, "eager-static", 3)]
    assert rows[1]["bf16_tokens_per_s"] == rows[0]["tokens_per_s"] > 0
    assert all(r["prefill_ms"] > 0 and isinstance(r["step_ms"], float) for r in rows)  # where the time went


def test_benchmark_llama_decodes_a_batch_with_its_own_cache_rows():
    # decode.py --batch B: B sequences a step, each with its own rows of the static KV cache
    import torch
    from llama import LlamaShape, random_llama
    shape = LlamaShape(dim=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=100, max_seq=16, batch=3)
    model = random_llama(shape, device="cpu", dtype=torch.float32)
    tokens = torch.tensor([[1], [2], [3]])
    with torch.no_grad():
        logits = model(tokens, torch.zeros(1, dtype=torch.long))
    assert logits.shape == (3, 1, 100)
    one = random_llama(LlamaShape(dim=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=100, max_seq=16),
                       device="cpu", dtype=torch.float32)
    with torch.no_grad():  # the same weights (same seed): sequence 1 of the batch equals it decoded alone
        alone = one(tokens[1:2], torch.zeros(1, dtype=torch.long))
    assert torch.allclose(logits[1:2], alone, atol=1e-5)


def test_the_one_row_sweep_times_gemv_candidates_of_every_format():
    # the shipped tables' one-row winners come from this list, for every format (the tuner's own W8A16 grid)
    import torch
    import sweep_gemm
    from aofunc.kernels import w8a16
    device = torch.device("cpu")
    for fmt in ("w4a16", "w8a16", "nf4"):
        pool = sweep_gemm.candidates(fmt, 1, 4096, 4096, device)
        # NF4 also weighs its 16-row GEMM tile there
        assert pool and all(c["path"] == "gemv" or (fmt == "nf4" and c["path"] == "gemm") for c in pool), fmt
        assert any(c["path"] == "gemv" for c in pool)
    searched = w8a16.candidate_configs(1, 4096, 4096, torch.bfloat16, device)
    assert all(c in searched for c in sweep_gemm.candidates("w8a16", 1, 4096, 4096, device))


# ------------------------------------------------------------------------------------------------ bench_override

def test_override_settings_read_python_literals_and_refuse_what_is_not_name_equals_value():
    import argparse

    import bench_override

    assert bench_override.parse_setting("FOUR=False") == (("FOUR", False),)
    assert bench_override.parse_setting("STAGES=3") == (("STAGES", 3),)
    assert bench_override.parse_setting("SCALE=2.5") == (("SCALE", 2.5),)
    assert bench_override.parse_setting("path=gemm") == (("path", "gemm"),)  # not a literal: the text itself
    assert bench_override.parse_setting("EMPTY=") == (("EMPTY", ""),)
    assert bench_override.parse_setting("LOOP_STAGES=8;SPLIT_K=2") == (("LOOP_STAGES", 8), ("SPLIT_K", 2))
    assert bench_override.setting_text((("LOOP_STAGES", 8), ("path", "gemv"))) == "LOOP_STAGES=8;path='gemv'"
    for bad in ("FOUR", "=3", "2X=1", "A B=1", "A=1;", "A=1;B"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
            bench_override.parse_setting(bad)


def test_an_override_is_a_new_config_and_the_shipped_one_is_left_as_it_is():
    import bench_override

    config = {"path": "mma", "BLOCK_N": 64}
    assert bench_override.overridden(config, (("BLOCK_N", 128),)) == {"path": "mma", "BLOCK_N": 128}
    assert bench_override.overridden(config, (("FOUR", False),)) == {"path": "mma", "BLOCK_N": 64, "FOUR": False}
    assert bench_override.overridden(config, (("BLOCK_N", 32), ("SPLIT_K", 2))) == {"path": "mma", "BLOCK_N": 32,
                                                                                   "SPLIT_K": 2}
    assert config == {"path": "mma", "BLOCK_N": 64}


def test_override_outputs_are_compared_bit_for_bit():
    import torch

    import bench_override

    base = torch.tensor([1.0, -4.0, 2.0], dtype=torch.bfloat16)
    assert bench_override.difference(base.clone(), base) == "same bits"
    assert bench_override.difference(base + torch.tensor([0.0, 0.0, 0.5], dtype=torch.bfloat16), base) == \
        "differs by 1.2e-01"


def test_override_times_each_setting_on_the_keys_of_its_path_and_reports_failures(monkeypatch):
    import torch

    import bench_override
    from aofunc.kernels import autotune

    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=torch.bfloat16)

    def run(x, config):
        if config.get("BAD"):
            raise ValueError("BAD is not a parameter of this kernel")
        return x @ (w * config.get("SCALE", 1)).T

    def ours(fmt, n, k):
        return (run, lambda x: x @ w.T, lambda x: x.shape[0], {},
                lambda x: {"path": "mma" if x.shape[0] <= 2 else "gemm"})

    monkeypatch.setattr(bench_override, "ours", ours)
    monkeypatch.setattr(bench_override, "cold_us", lambda fn: (fn(), 10.0)[1])
    monkeypatch.setattr(autotune, "lookup", lambda key: None)
    settings = [(("SCALE", 1),), (("SCALE", 2),), (("BAD", True),)]
    lines = bench_override.compare(["w4a16"], ["8x6"], [1, 2, 4], settings, path="mma", device="cpu")
    assert [line.split(":")[0] for line in lines] == ["w4a16 8x6 M=1", "w4a16 8x6 M=2"]  # M=4 runs gemm
    cells = lines[0].split(" | ")
    assert cells[1] == "{'path': 'mma'} 10.0 (1.00x)"
    assert cells[2] == "SCALE=1 10.0 (1.00x, same bits)"
    assert cells[3].startswith("SCALE=2 10.0 (1.00x, differs by 1.0e+00")
    assert cells[4].startswith("BAD=True failed: BAD is not a parameter")


# ------------------------------------------------------------------------------------------------ bench_read

@pytest.mark.parametrize("step_major", [False, True])
@pytest.mark.parametrize("rows,chunk,ahead", [(4, 4, 2), (8, 2, 4)])
def test_read_kernel_reads_every_word_of_its_rows_once(step_major, rows, chunk, ahead):
    import torch

    import bench_read

    torch.manual_seed(0)
    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (16, 32), dtype=torch.int32)
    before = w.clone()
    got = bench_read.read_rows(w, rows, chunk, ahead, step_major)
    assert torch.equal(got, bench_read.expected(w, rows, chunk, step_major))
    assert torch.equal(w, before)
    if not step_major:  # a row's own words, in any order
        want = torch.zeros(16, dtype=torch.int32)
        for column in w.unbind(1):
            want ^= column
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="multiple of"):
        bench_read.read_rows(w[:15], rows, chunk, ahead, step_major)
