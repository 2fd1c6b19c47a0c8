"""The route table: one default path per (format, rows of x, constraints), and the launchers follow it."""
import math

import pytest
import torch

from aofunc.kernels import int8_int4, nf4, selector, w4a16, w8a8, w8a16
from aofunc.kernels.selector import Problem, default_path

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_every_format_ends_in_a_route_for_any_m():
    for fmt in {r.format for r in selector.ROUTES}:
        last = [r for r in selector.ROUTES if r.format == fmt][-1]
        assert math.isinf(last.m_max), fmt
        assert default_path(fmt, Problem(10**6, 8, 8, torch.float32, CUDA, 64)) == last.path


def test_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="'w3a16'"):
        default_path("w3a16", Problem(1, 8, 8, torch.float16, CUDA))


@pytest.mark.parametrize("m,dtype,device,want", [
    (1, torch.float32, CUDA, "gemv"), (2, torch.bfloat16, CUDA, "gemm"), (128, torch.float16, CUDA, "gemm"),
    (257, torch.bfloat16, CUDA, "dequant"), (2, torch.float32, CUDA, "dequant"), (2, torch.float32, CPU, "gemm")])
def test_int4_and_int8_routes(m, dtype, device, want):
    for fmt in ("w4a16", "w8a16"):
        assert default_path(fmt, Problem(m, 64, 256, dtype, device, 128)) == want


@pytest.mark.parametrize("fmt,block", [("w4a16", 128), ("w8a16", 0)])
def test_weight_only_gemm_hands_over_to_dequant_past_128_rows(fmt, block):
    assert default_path(fmt, Problem(128, 64, 256, torch.bfloat16, CUDA, block)) == "gemm"
    assert default_path(fmt, Problem(129, 64, 256, torch.bfloat16, CUDA, block)) == "dequant"


@pytest.mark.parametrize("fmt,block", [("w4a16", 128), ("w8a16", 0)])
def test_wide_weights_keep_the_gemm_to_256_rows(fmt, block):
    for m, n, dtype, want in ((129, 8192, torch.bfloat16, "gemm"), (256, 28672, torch.float16, "gemm"),
                              (257, 8192, torch.bfloat16, "dequant"), (200, 4096, torch.bfloat16, "dequant"),
                              (200, 8192, torch.float32, "dequant")):
        assert default_path(fmt, Problem(m, n, 4096, dtype, CUDA, block)) == want, (m, n, dtype)
    # and the default takes x copied into the tile's order there
    default = (w4a16.default_config(200, 8192, 4096, 128, torch.bfloat16, CPU) if fmt == "w4a16"
               else w8a16.default_config(200, 8192, 4096, torch.bfloat16, CPU))
    assert default["path"] == "gemm" and default["PERMUTE_X"] and default["GATHER_X"]


def test_8da4w_routes_past_64_rows():
    for m, n, dtype, want in ((64, 8192, torch.bfloat16, "gemm"), (128, 8192, torch.bfloat16, "gemm"),
                              (129, 16384, torch.bfloat16, "fp16_gemm"),
                              (64, 4096, torch.float32, "two_pass"), (65, 4096, torch.float32, "fp16_gemm"),
                              (4096, 28672, torch.float32, "fp16_gemm"), (128, 4096, torch.float32, "fp16_gemm"),
                              (256, 28672, torch.float16, "fp16_gemm"), (257, 16384, torch.float16, "fp16_gemm"),
                              (513, 4096, torch.float16, "dequant")):
        assert default_path("8da4w", Problem(m, n, 4096, dtype, CUDA, 128)) == want, (m, n, dtype)
    # the HALVES tile from 129 to 512 rows of weights narrower than 16384, in groups of 64 codes and up
    for m, n, block, want in ((129, 4096, 128, "halves"), (512, 14336, 64, "halves"), (256, 16384, 128, "fp16_gemm"),
                              (300, 4096, 32, "dequant"), (200, 4096, 32, "fp16_gemm")):
        for dtype in (torch.bfloat16, torch.float32):
            assert default_path("8da4w", Problem(m, n, 4096, dtype, CUDA, block)) == want, (m, n, block)
    halves = int8_int4.default_config(300, 4096, 4096, 128, torch.bfloat16, torch.bfloat16, CPU)
    assert halves["HALVES"] and halves == int8_int4.halves_candidates(300, 128)[0]
    default = int8_int4.default_config(300, 16384, 4096, 128, torch.bfloat16, torch.bfloat16, CPU)
    assert default["path"] == "fp16_gemm" and default["PAIRS"] and default["PERMUTE_X"] and not default["CENTERED"]


def test_w8a8_few_rows_take_the_int8_gemv():
    for m, n, want in ((1, 28672, "gemv"), (2, 28672, "gemv"), (3, 28672, "two_pass"), (4, 4096, "gemv"),
                       (5, 4096, "two_pass")):
        assert default_path("w8a8", Problem(m, n, 4096, torch.bfloat16, CUDA)) == want, (m, n)
    # one program for all rows; K is split only while the programs are too few for the card (4 "multiprocessors"
    # for CPU tensors)
    assert w8a8.default_config(3, CPU, 4096, 4096)["ROWS"] == 4
    # one row is quantized inside the GEMV, more by the quantization kernel first
    assert w8a8.default_config(1, CPU, 4096, 4096)["FUSED"] and not w8a8.default_config(2, CPU, 4096, 4096)["FUSED"]
    assert w8a8.default_config(1, CPU, 4096, 4096)["SPLIT_K"] == 1
    assert w8a8.default_config(1, CPU, 16, 4096)["SPLIT_K"] == 4  # 8 steps of K, 2 a split at least


def test_nf4_constraints_send_odd_shapes_to_dequant():
    assert default_path("nf4", Problem(1, 8, 128, torch.float16, CUDA, 64)) == "gemv"
    assert default_path("nf4", Problem(1, 8, 100, torch.float16, CUDA, 64)) == "dequant"  # K not whole blocks
    assert default_path("nf4", Problem(2, 8, 96, torch.float16, CUDA, 48)) == "dequant"  # block not a power of 2
    assert default_path("nf4", Problem(2, 8, 128, torch.float16, CUDA, 64)) == "gemm"


@pytest.mark.parametrize("m", [1, 2, 16, 64, 200, 256, 300, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_launchers_default_to_the_table(m, dtype):
    for device in (CPU, CUDA) if torch.cuda.is_available() else (CPU,):  # launch sizing reads the card
        assert w4a16.default_config(m, 64, 512, 128, dtype, device)["path"] == \
            default_path("w4a16", Problem(m, 64, 512, dtype, device, 128))
        assert w8a16.default_config(m, 64, 512, dtype, device)["path"] == \
            default_path("w8a16", Problem(m, 64, 512, dtype, device))
        assert nf4.default_config(m, 64, 512, 64, dtype, device)["path"] == \
            default_path("nf4", Problem(m, 64, 512, dtype, device, 64))
        w8a8_default = w8a8.default_config(m, device, 64, 512, dtype)
        w8a8_path = w8a8_default.get("path") or ("fused" if w8a8_default["FUSED"] else "two_pass")
        assert w8a8_path == default_path("w8a8", Problem(m, 64, 512, dtype, device))


def test_routes_table_lists_every_route_with_its_range():
    text = selector.routes_table()
    assert len(text.splitlines()) == 2 + len(selector.ROUTES)
    assert "| w4a16 | gemv | 1 |" in text
    assert "| w4a16 | gemm | 2 to 128 |" in text
    assert "| w4a16 | gemm | 129 to 256 | wide weights" in text
    assert "| w4a16 | dequant | 129 and up |" in text
    assert "| 8da4w | gemm | 2 to 128 |" in text and "| 8da4w | two_pass | 5 to 64 |" in text  # fp32 x from 5
    assert "| 8da4w | fp16_gemm | 65 to 256 | any x |" in text
    assert "| 8da4w | halves | 129 to 512 | groups of 64 codes and up, N < 16384" in text
    assert "| 8da4w | dequant | 65 and up |" in text and "| 8da4w | fp16_gemm | 257 and up | wide weights" in text


@pytest.mark.parametrize("module", ["w4a16", "w8a16", "nf4", "w8a8", "int8_int4"])
def test_every_format_module_exposes_the_same_functions(module):
    import importlib

    mod = importlib.import_module(f"aofunc.kernels.{module}")
    for name in ("default_config", "candidate_configs", "launch", f"{module}_linear_ref", f"{module}_linear"):
        assert callable(getattr(mod, name, None)), f"aofunc.kernels.{module} lacks {name}"
