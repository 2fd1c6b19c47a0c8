"""The CUDA kernels compile for Hopper (sm_90) with Triton's real code generator, on any machine: the interpreter
that the other kernel tests use on CPU does not run that path (the lazy loading of kernels and their helpers,
constexpr globals, inline assembly, the wgmma the GEMMs should use)."""
import subprocess
import sys

import pytest

SCRIPT = r'''
import inspect
import re
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aofunc.kernels import int8_int4, int_mm, nf4, triton_compat, w4a16, w8a16, w8a8

triton_compat.load()
W4 = dict(x_ptr="*bf16", q_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32",
          cnt_ptr="*i32", xs_ptr="*fp32", cs_ptr="*fp32")
NF4 = dict(x_ptr="*bf16", q_ptr="*i32", sq_ptr="*i8", f_ptr="*fp32", mean_ptr="*fp32", lut_ptr="*bf16",
           b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
W8 = dict(x_ptr="*bf16", q_ptr="*i32", s_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
# the W4A16 GEMM's 16-row fragment-ordered tile in packed pairs, on prepacked codes with integer zero points
W4_FRAGMENTS = dict(GROUP=128, BLOCK_M=16, BLOCK_N=64, SPLIT=True, HAS_BIAS=True, DOT_FP32=False, SWAP=True,
                    SPLIT_X=False, FULL_DQ=False, M_FAST=False, GATHER_X=True, PREFETCH=False, PAIRS=True, EVEN_K=True,
                    ZERO=1, PREPACKED=True, ROW_SCALE=True, COL_SCALE=False, CENTERED=False)
# the W4A16 GEMV: 256 codes a step, split K, per-group sums, vector loads of x, the coarse units
W4_GEMV_POINTERS = dict(W4, offs_ptr="*i32", rs_ptr="*fp32")
W4_GEMV = dict(GROUP=128, BLOCK_N=32, GROUPS=2, SPLIT=True, HAS_BIAS=False, EVEN_K=True, PREFETCH=False, REDUCE_W=True,
               COARSE=True, XVEC=True, LOOP_STAGES=3, ZERO=0, GROUPED=False, ROW_SCALE=False, PREPACKED=False,
               TWO_ROWS=False, QUANT_X=False, SCAN_BLOCK=1024)
CASES = [
    (w4a16._w4a16_gemm_kernel, dict(W4, rs_ptr="*fp32"),
     dict(GROUP=128, BLOCK_M=64, BLOCK_N=64, SPLIT=True, HAS_BIAS=True, DOT_FP32=False, SWAP=True, SPLIT_X=False,
          FULL_DQ=True, M_FAST=True, GATHER_X=False, PREFETCH=True, PAIRS=False, EVEN_K=False, ZERO=0,
          PREPACKED=False, ROW_SCALE=False, COL_SCALE=False, CENTERED=False), True),
    (w4a16._w4a16_gemm_kernel, dict(W4, rs_ptr="*fp32"), W4_FRAGMENTS, True),
    # 8da4w's fp16_gemm: fp16 pairs without zeros on x in the tile's order, rows and columns scaled
    (w4a16._w4a16_gemm_kernel, dict(W4, rs_ptr="*fp32", x_ptr="*fp16", s_ptr="*fp16", z_ptr="*fp16"),
     dict(W4_FRAGMENTS, BLOCK_M=64, BLOCK_N=128, SPLIT=False, ZERO=2, COL_SCALE=True), True),
    # the centered tile: no zeros with row scales (8da4w), then float zeros on a ragged K
    (w4a16._w4a16_gemm_kernel, dict(W4, rs_ptr="*fp32"),
     dict(W4_FRAGMENTS, SPLIT=False, HAS_BIAS=False, PAIRS=False, ZERO=2, PREPACKED=False, CENTERED=True), True),
    (w4a16._w4a16_gemm_kernel, dict(W4, rs_ptr="*fp32"),
     dict(W4_FRAGMENTS, PAIRS=False, EVEN_K=False, ZERO=0, PREPACKED=False, ROW_SCALE=False, CENTERED=True), True),
    # fp32 x: the centered tile's fp32 form (no tensor cores), float zeros through the group sums
    (w4a16._w4a16_gemm_kernel, dict(W4, rs_ptr="*fp32", x_ptr="*fp32", y_ptr="*fp32"),
     dict(W4_FRAGMENTS, DOT_FP32=True, PAIRS=False, ZERO=0, PREPACKED=False, ROW_SCALE=False, CENTERED=True), False),
    (w4a16._w4a16_grouped_kernel, dict(W4, offs_ptr="*i32"),
     dict(GROUP=128, BLOCK_M=16, BLOCK_N=64, SPLIT=True, DOT_FP32=False, SWAP=True, SPLIT_X=False, FULL_DQ=False,
          GATHER_X=True, PREFETCH=False, PAIRS=True, EVEN_K=True, ZERO=0, PREPACKED=False, CENTERED=False), True),
    (w4a16._w4a16_gemv_kernel, W4_GEMV_POINTERS,
     dict(W4_GEMV, ZERO=2, GROUPED=True, ROW_SCALE=True, PREPACKED=True), False),
    (w4a16._w4a16_gemv_kernel, W4_GEMV_POINTERS,
     dict(W4_GEMV, HAS_BIAS=True, LOOP_STAGES=4, ROW_SCALE=True, TWO_ROWS=True), False),
    (w4a16._w4a16_gemv_kernel, W4_GEMV_POINTERS,
     dict(W4_GEMV, SPLIT=False, HAS_BIAS=True, EVEN_K=False, PREFETCH=True, REDUCE_W=False, COARSE=False, XVEC=False,
          LOOP_STAGES=None, ZERO=1, TWO_ROWS=True), False),
    (w4a16._w4a16_gemv_kernel, W4_GEMV_POINTERS, dict(W4_GEMV, REDUCE_W=False, LOOP_STAGES=4), False),
    # 8da4w in one kernel: the GEMV quantizing its rows of x itself, one row and two a program
    (w4a16._w4a16_gemv_kernel, W4_GEMV_POINTERS, dict(W4_GEMV, HAS_BIAS=True, ZERO=2, QUANT_X=True), False),
    (w4a16._w4a16_gemv_kernel, W4_GEMV_POINTERS,
     dict(W4_GEMV, SPLIT=False, EVEN_K=False, REDUCE_W=False, COARSE=False, XVEC=False, LOOP_STAGES=None, ZERO=2,
          TWO_ROWS=True, QUANT_X=True, SCAN_BLOCK=2048), False),
    (int8_int4._exact_scales_kernel, dict(s_ptr="*bf16", p_ptr="*fp32", out_ptr="*fp16"), dict(BLOCK_G=128), False),
    (w4a16._w4a16_dequant_kernel, dict(q_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", w_ptr="*bf16"),
     dict(GROUP=128, BLOCK=1024, ZERO=0, PREPACKED=True), False),
    (nf4._nf4_dequant_kernel, dict(q_ptr="*i32", sq_ptr="*i8", f_ptr="*fp32", mean_ptr="*fp32", lut_ptr="*i32",
                                   w_ptr="*bf16"), dict(BLOCK=64, SCALER_BLOCK=256, WORDS=1024, USE_SHFL=True), False),
    (w8a16._w8a16_gemv_kernel, dict(W8, offs_ptr="*i32"),
     dict(BLOCK_N=64, BLOCK_W=64, SPLIT=True, HAS_BIAS=False, EVEN_K=True, GROUPED=True, XVEC=False,
          LOOP_STAGES=None), False),
    (w8a16._w8a16_gemv_kernel, dict(W8, offs_ptr="*i32"),
     dict(BLOCK_N=64, BLOCK_W=64, SPLIT=False, HAS_BIAS=True, EVEN_K=False, GROUPED=False, XVEC=True,
          LOOP_STAGES=3), False),
    (w8a16._w8a16_gemm_kernel, W8, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_W=32, SPLIT=False, HAS_BIAS=False,
                                        DOT_FP32=False, SWAP=True, M_FAST=False, GATHER_X=True, EVEN_K=True,
                                        BYTE_PRMT=True, X_ORDERED=True), True),
    (w8a16._w8a16_gemm_kernel, W8, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_W=32, SPLIT=True, HAS_BIAS=True,
                                        DOT_FP32=False, SWAP=True, M_FAST=False, GATHER_X=False, EVEN_K=False,
                                        BYTE_PRMT=True, X_ORDERED=False), True),
    (w8a16._w8a16_grouped_kernel, dict(W8, offs_ptr="*i32"),
     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_W=32, SPLIT=True, DOT_FP32=False, SWAP=True, GATHER_X=True, EVEN_K=False,
          BYTE_PRMT=True), True),
    (nf4._nf4_gemv_kernel, NF4, dict(BLOCK=64, SCALER_BLOCK=256, BLOCK_N=32, GROUPS=4, SPLIT=True, HAS_BIAS=True,
                                     EVEN_K=True, USE_SHFL=True, REDUCE_W=True, LOOP_STAGES=3), False),
    (nf4._nf4_gemv_kernel, NF4, dict(BLOCK=64, SCALER_BLOCK=256, BLOCK_N=32, GROUPS=4, SPLIT=True, HAS_BIAS=False,
                                     EVEN_K=True, USE_SHFL=True, REDUCE_W=False, LOOP_STAGES=3), False),
    (nf4._nf4_gemm_kernel, NF4, dict(BLOCK=64, SCALER_BLOCK=256, BLOCK_M=64, BLOCK_N=64, SPLIT=False, HAS_BIAS=False,
                                     DOT_FP32=False, SWAP=True, USE_SHFL=True, M_FAST=False, GATHER_X=True,
                                     PAIRS=False, X_ORDERED=False), True),
    (nf4._nf4_gemm_kernel, NF4, dict(BLOCK=64, SCALER_BLOCK=256, BLOCK_M=16, BLOCK_N=64, SPLIT=True, HAS_BIAS=True,
                                     DOT_FP32=False, SWAP=True, USE_SHFL=True, M_FAST=False, GATHER_X=True,
                                     PAIRS=True, X_ORDERED=True), True),
    (int_mm._int8_matmul_kernel, dict(a_ptr="*i8", b_ptr="*i8", c_ptr="*bf16", row_scale_ptr="*fp32",
                                      col_scale_ptr="*bf16", bias_ptr="*bf16", ws_ptr="*i32", cnt_ptr="*i32"),
     dict(SCALED=True, HAS_BIAS=True, EVEN_K=True, SPLIT=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
     True),
    # K split, int32 partials summed by the last split
    (int_mm._int8_matmul_kernel, dict(a_ptr="*i8", b_ptr="*i8", c_ptr="*bf16", row_scale_ptr="*fp32",
                                      col_scale_ptr="*bf16", bias_ptr="*bf16", ws_ptr="*i32", cnt_ptr="*i32"),
     dict(SCALED=True, HAS_BIAS=False, EVEN_K=False, SPLIT=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, GROUP_M=1),
     True),
    # the int8 GEMV: dp4a on word pairs, K split with int32 partials, a ragged K
    (int_mm._int8_gemv_kernel, dict(a_ptr="*i32", b_ptr="*i32", c_ptr="*bf16", row_scale_ptr="*fp32",
                                    col_scale_ptr="*bf16", bias_ptr="*bf16", ws_ptr="*i32", cnt_ptr="*i32"),
     dict(SCALED=True, HAS_BIAS=True, EVEN_K=False, SPLIT=True, DP4A=True, ROWS=1, BLOCK_N=32, BLOCK_W=64,
          LOOP_STAGES=3),
     False),
    # and four rows of A a program, each word of B loaded once for them
    (int_mm._int8_gemv_kernel, dict(a_ptr="*i32", b_ptr="*i32", c_ptr="*bf16", row_scale_ptr="*fp32",
                                    col_scale_ptr="*bf16", bias_ptr="*bf16", ws_ptr="*i32", cnt_ptr="*i32"),
     dict(SCALED=True, HAS_BIAS=False, EVEN_K=True, SPLIT=False, DP4A=True, ROWS=4, BLOCK_N=16, BLOCK_W=64,
          LOOP_STAGES=1),
     False),
    # the int8 GEMV quantizing its rows of x inside
    (w8a8._w8a8_gemv_kernel, dict(x_ptr="*bf16", act_ptr="*bf16", b_ptr="*i32", scale_ptr="*bf16", bias_ptr="*bf16",
                                  y_ptr="*bf16", ws_ptr="*i32", cnt_ptr="*i32"),
     dict(HAS_ACT=True, HAS_BIAS=True, EVEN_K=True, SPLIT=True, DP4A=True, ROWS=2, BLOCK_N=16, BLOCK_W=128,
          LOOP_STAGES=3),
     False),
    (w8a8._quantize_per_token_int8_kernel, dict(x_ptr="*bf16", act_ptr="*bf16", xq_ptr="*i8", s_ptr="*fp32"),
     dict(HAS_ACT=True, ONE_PASS=True, BLOCK_K=4096), False),
    (int8_int4._quantize_per_token_asym_int8_kernel, dict(x_ptr="*bf16", xq_ptr="*i8", s_ptr="*fp32", zp_ptr="*i32"),
     dict(EPS_=int8_int4.EPS, ONE_PASS=True, BLOCK_K=4096, CENTERED=False, ORDER=0, GROUP=32), False),
    (int8_int4._quantize_per_token_asym_int8_kernel, dict(x_ptr="*bf16", xq_ptr="*bf16", s_ptr="*fp32",
                                                          zp_ptr="*i32"),
     dict(EPS_=int8_int4.EPS, ONE_PASS=False, BLOCK_K=4096, CENTERED=True, ORDER=1, GROUP=32), False),
    # 8da4w's HALVES tile: x quantized into each group's halves, the weights' group sums, the int8 GEMM
    (int8_int4._quantize_per_token_asym_int8_kernel, dict(x_ptr="*bf16", xq_ptr="*i8", s_ptr="*fp32", zp_ptr="*i32"),
     dict(EPS_=int8_int4.EPS, ONE_PASS=True, BLOCK_K=4096, CENTERED=False, ORDER=2, GROUP=128), False),
    (int8_int4._group_code_sums_kernel, dict(w_ptr="*i32", out_ptr="*i32"), dict(WORDS=16, BLOCK_R=256), False),
    (int8_int4._int8_int4_halves_kernel,
     dict(xq_ptr="*i8", sx_ptr="*fp32", zp_ptr="*i32", q_ptr="*u8", scale_ptr="*bf16", wsum_ptr="*i32",
          bias_ptr="*bf16", y_ptr="*bf16"),
     dict(HAS_BIAS=True, ASM=True, GROUP=128, BLOCK_M=128, BLOCK_N=128, GROUP_M=8), True),
    (int8_int4._int8_int4_halves_kernel,
     dict(xq_ptr="*i8", sx_ptr="*fp32", zp_ptr="*i32", q_ptr="*u8", scale_ptr="*fp32", wsum_ptr="*i32",
          bias_ptr="*fp32", y_ptr="*fp32"),
     dict(HAS_BIAS=False, ASM=True, GROUP=64, BLOCK_M=64, BLOCK_N=64, GROUP_M=8), True),
]
for kernel, pointers, constexprs, tensor_cores in CASES:
    names = list(inspect.signature(kernel.fn).parameters)
    if "PDL" in names:  # launched as a programmatic dependent launch on sm_90: it waits for the kernel before it
        constexprs = dict(constexprs, PDL=True)
    signature = {p: pointers.get(p, "constexpr" if p in constexprs else "i32") for p in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    ptx = compiled.asm["ptx"]
    assert not tensor_cores or "wgmma" in ptx, f"{kernel.__name__}: no wgmma in its PTX"
    assert constexprs.get("DP4A") is not True or "dp4a.s32.s32" in ptx, f"{kernel.__name__}: no dp4a in its PTX"
    assert ("griddepcontrol.wait" in ptx) == ("PDL" in names), f"{kernel.__name__}: griddepcontrol.wait"

# the wgmma path (Gluon): W4A16's weight tile from registers straight to the MMA (no shared memory on its way), or
# stored to shared memory by stmatrix (A_SHARED), or with one MMA kept in flight while the next tile is built
# (IN_FLIGHT: a wait for all but one MMA in the loop); W8A16's bytes likewise, in fp16 and bf16, its words in 16-byte
# loads; 8da4w's fp16 operands without zeros, rows and columns scaled, a bf16 output; two warpgroups DECOUPLED
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from aofunc.kernels import wgmma

kernel = wgmma._wgmma_kernel
FORMS = [(4, "bf16", False, False, 4, False), (4, "bf16", True, False, 8, False), (4, "bf16", False, True, 4, False),
         (8, "bf16", False, False, 4, False), (8, "fp16", False, True, 8, False), (4, "fp16", False, False, 8, True)]
for bits, half, shared, in_flight, warps, scaled in FORMS:
    dtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[half]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[half]
    layout = gl.NVMMASharedLayout.get_default_for([64, 128], dtype)
    asm = w4a16.pairs_ptx(half) if bits == 4 else wgmma._BYTES_ASM[torch_dtype]
    constexprs = dict(BITS=bits, ZERO=0 if bits == 4 and not scaled else 2, HAS_BIAS=True, HAS_ROW=scaled,
                      HAS_COL=bits == 8 or scaled, BLOCK_M=64, BLOCK_N=128, STAGES=3, A_SHARED=shared,
                      IN_FLIGHT=in_flight, ASM=asm, MAGIC=1024.0 if half == "fp16" else 128.0, num_warps=warps,
                      PDL=True)
    pointers = dict(x_desc=f"tensordesc<{half}[64, 128],{layout!r}>", q_ptr="*i32", s_ptr=f"*{half}",
                    z_ptr=f"*{half}", b_ptr=f"*{half}", r_ptr="*fp32", c_ptr="*fp32" if scaled else f"*{half}",
                    y_ptr="*bf16" if scaled else f"*{half}")
    signature = {p: pointers.get(p, "constexpr" if p in constexprs else "i32") for p in kernel.arg_names}
    aligned = {(kernel.arg_names.index(p),): [["tt.divisibility", 16]] for p in ("q_ptr", "stride_qn")}
    source = GluonASTSource(kernel, signature, constexprs={(kernel.arg_names.index(p),): v
                                                           for p, v in constexprs.items()}, attrs=aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm["ptx"]
    form = f"wgmma path, {bits}-bit codes, A_SHARED={shared}, IN_FLIGHT={in_flight}, scaled={scaled}"
    assert "wgmma.mma_async" in ptx and ("stmatrix" in ptx) == shared and "griddepcontrol.wait" in ptx, form
    waits = set(re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx))
    assert waits == ({"0", "1"} if shared or in_flight else {"0"}), f"{form}: {waits}"
    assert bits == 4 or re.search(r"ld.global[^\n]*v4.b32", ptx), f"{form}: no 16-byte loads of the words"
# the DECOUPLED form: two warpgroups in partitions of their own (setmaxnreg), x's stages filled by a loading warp
kernel = wgmma._decoupled_kernel
for bits in (4, 8):
    layout = gl.NVMMASharedLayout.get_default_for([256, 128], gl.bfloat16)
    constexprs = dict(BITS=bits, ZERO=0 if bits == 4 else 2, HAS_BIAS=True, HAS_ROW=False, HAS_COL=bits == 8,
                      BLOCK_M=256, BLOCK_N=128, STAGES=2, MAGIC=128.0, WG_REGS=wgmma.DECOUPLED_REGS, num_warps=4,
                      PDL=bits == 4, ASM=w4a16.pairs_ptx("bf16") if bits == 4 else wgmma._BYTES_ASM[torch.bfloat16])
    pointers = dict(x_desc=f"tensordesc<bf16[256, 128],{layout!r}>", q_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16",
                    b_ptr="*bf16", r_ptr="*fp32", c_ptr="*bf16", y_ptr="*bf16")
    signature = {p: pointers.get(p, "constexpr" if p in constexprs else "i32") for p in kernel.arg_names}
    source = GluonASTSource(kernel, signature, constexprs={(kernel.arg_names.index(p),): v
                                                           for p, v in constexprs.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx and "stmatrix" not in ptx, f"DECOUPLED, {bits}-bit"
    assert ("griddepcontrol.wait" in ptx) == (bits == 4), f"DECOUPLED, {bits}-bit: griddepcontrol.wait"
# NF4 in both forms: its levels from byte permutes (14 a word), each pair times its block's scale (4 a word)
for kernel, warps in ((wgmma._wgmma_kernel, 4), (wgmma._decoupled_kernel, 4)):
    layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.float16)
    constexprs = dict(BITS=4, ZERO=wgmma.NF4_LEVELS.value, HAS_BIAS=True, HAS_ROW=False, HAS_COL=False,
                      BLOCK_M=128, BLOCK_N=128, STAGES=2, MAGIC=1024.0, ASM=wgmma._LEVELS_ASM[torch.float16],
                      num_warps=warps, PDL=False, **({"WG_REGS": wgmma.DECOUPLED_REGS} if kernel is wgmma._decoupled_kernel
                                          else dict(A_SHARED=False, IN_FLIGHT=False)))
    pointers = dict(x_desc=f"tensordesc<fp16[128, 128],{layout!r}>", q_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16",
                    b_ptr="*fp16", r_ptr="*fp32", c_ptr="*fp16", y_ptr="*fp16")
    signature = {p: pointers.get(p, "constexpr" if p in constexprs else "i32") for p in kernel.arg_names}
    source = GluonASTSource(kernel, signature, constexprs={(kernel.arg_names.index(p),): v
                                                           for p, v in constexprs.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm["ptx"]
    # a thread's words a step: 4 rows of 128 (in the decoupled form 2 rows of each warpgroup's 64), 4 words a row
    assert ptx.count("prmt.b32") == 14 * 16 and ptx.count("fma.rn.f16x2") == 4 * 16, kernel.__name__
# the mma path (Gluon, m16n8k16, also for sm_80): W4A16 as magic + code with x's sums from a second MMA (16 MMAs a
# 128-deep step for 16 rows of w a warp), the codes and x each in 16-byte loads, four steps an iteration, the scales
# and zeros four steps a load (8 bytes a row; no tail: the steps come in fours); NF4's levels with a tail of 3 steps;
# 16 rows of x through shared memory: the program's 16 steps of x copied in by cp.async (16 bytes a copy, no
# registers), one barrier, then each step's words read back in 16-byte loads, 32 MMAs a step
from aofunc.kernels import mma

kernel = mma._mma_kernel
for zero, half, asm, capability, four, block_m, x_steps in (
        (0, "bf16", mma._MAGIC_PAIRS_ASM[torch.bfloat16], 90, True, 8, 0),
        (wgmma.NF4_LEVELS.value, "fp16", wgmma._LEVELS_ASM[torch.float16], 80, False, 8, 0),
        (0, "bf16", mma._MAGIC_PAIRS_ASM[torch.bfloat16], 90, True, 16, 16)):
    constexprs = dict(BITS=4, ZERO=zero, HAS_BIAS=True, HAS_COL=False, BLOCK_M=block_m, BLOCK_N=64, ASM=asm,
                      MAGIC=1024.0 if half == "fp16" else 128.0, FOUR=four, num_warps=4, PDL=capability >= 90,
                      X_STEPS=x_steps)
    pointers = dict(x_ptr=f"*{half}", q_ptr="*i32", s_ptr=f"*{half}", z_ptr=f"*{half}", b_ptr=f"*{half}",
                    y_ptr=f"*{half}")
    signature = {p: pointers.get(p, "constexpr" if p in constexprs else "i32") for p in kernel.arg_names}
    aligned = {(kernel.arg_names.index(p),): [["tt.divisibility", 16]]
               for p in ("q_ptr", "stride_qn", "x_ptr", "stride_xm", "s_ptr", "z_ptr")}
    source = GluonASTSource(kernel, signature, constexprs={(kernel.arg_names.index(p),): v
                                                           for p, v in constexprs.items()}, attrs=aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=4)).asm["ptx"]
    steps = 4 if four else 4 + 3  # the loop's four and the tail's three
    assert ptx.count("mma.sync.aligned.m16n8k16") == steps * (16 if zero == 0 else 8) * block_m // 8, (zero, half)
    assert ptx.count("ld.global.v2.b32") == (8 if four else 0), (zero, half)  # 2 rows: scales, zeros; prologue and loop
    assert "wgmma.mma_async" not in ptx and ("griddepcontrol.wait" in ptx) == (capability >= 90), (zero, half)
    if x_steps:  # 16 rows of 64 words a step over 128 threads: 2 copies of 16 bytes a thread a step
        assert len(re.findall(r"cp.async.c[ag].shared.global[^\n]*0x10, 0x10;", ptx)) == x_steps * 2, block_m
        assert len(re.findall(r"ld.shared.v4", ptx)) == steps * 8 and ptx.count("bar.sync") == 1, block_m
    else:  # sm_80 has no dependent launches
        assert len(re.findall(r"ld.global[^\n]*v4", ptx)) >= steps * 2 and "ld.shared" not in ptx, (zero, half)
print("ok", len(CASES) + len(FORMS) + 7)
'''


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0 and "No module named 'triton" in done.stderr:
        pytest.skip("Triton is not installed")
    assert done.returncode == 0 and done.stdout.strip() == "ok 50", done.stderr[-3000:]
