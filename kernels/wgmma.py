"""W4A16, W8A16 and NF4 on Hopper's warpgroup MMA, written in Gluon: y^T = w @ x^T with the dequantized weight tile
as the MMA's left operand, straight from registers, and x's tiles brought by TMA into a ring of shared-memory
stages.

Each warpgroup holds 64 rows of w. A thread's share of the MMA's left operand for a 128-deep step is, for each of
its two rows, the columns 16s + 2t + {0, 1, 8, 9} (s = 0..7, t its lane within a quad). With x's columns permuted
to match (once a call), those are whole int32 words of the row that the thread loads itself:
- W4A16 (tiles.fragment_ordered_x): the 32 codes of words t, t + 4, t + 8 and t + 12 of the step's sixteen; two
  codes a packed multiply-add become bf16x2 (or f16x2) registers.
- W8A16 (bytes_ordered_x): the 32 bytes of words 8t .. 8t + 7 of the step's 32, two 16-byte loads; two bytes a
  byte permute become an exact bf16x2 (or f16x2) register, and the row's scale multiplies the sums at the end.
- NF4 (fragment_ordered_x, as W4A16): the same words; byte permutes look up two codes' levels a register, and a
  packed multiply by the scale of the word's block of 64 codes (precomputed a call, in x's dtype) finishes them.
The tile goes to the tensor cores without touching shared memory. Each step's MMA is waited for before the next
step's tile is written: the assembler Triton 3.6 bundles (CUDA 12.8's) can reuse the registers of an MMA still
reading them. With IN_FLIGHT (only with CUDA 13.3's assembler or later, tiles.mma_in_flight) one MMA runs while
the next step's tile is built in other registers; with A_SHARED the tile goes through two shared-memory buffers
instead and one MMA stays in flight. With DECOUPLED, two warpgroups take half the program's rows of w each in a
warp-specialized partition of their own, and a loading warp fills x's stages; each warpgroup hands a stage back
through a barrier of its own, so neither waits for the other, where the 8 warps of one program otherwise meet at
a barrier of all of them every step (refilling a stage both read). The measurements of each form are in
docs/benchmarks.md.

A configuration (``params``): BLOCK_M (64, 128 or 256 rows of x a tile), BLOCK_N (rows of w a tile, 64 a
warpgroup or more), STAGES (x's tiles in flight), SPLIT_K (programs sharing a tile's steps of K, their fp32
partial sums added in a fixed order), A_SHARED (the weight tile through shared memory, so one step's MMA runs
while the next is dequantized), IN_FLIGHT (optional: the same overlap with the tile in registers, taken only where
tiles.mma_in_flight allows it, else the MMAs are waited for one by one), DECOUPLED (optional: num_warps 4 a
warpgroup, BLOCK_N 128 or 256) and num_warps.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from aofunc.kernels import nf4, w4a16
from aofunc.kernels.tiles import (BLOCK_K_WGMMA, fragment_ordered_x, int32_words, mma_in_flight, pdl_options,
                                  split_output, split_total, unit_stride)

# Triton 3.6 names the TMA load async_copy_global_to_shared; later releases async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# and names its barrier of a partition's threads thread_barrier; later releases barrier
_thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK_K = BLOCK_K_WGMMA  # a step: 128 codes of a row, 16 words of 4-bit codes or 32 of bytes
STEP = gl.constexpr(BLOCK_K)
# the packed pairs' PTX (w4a16.fragment_tile_pairs) and its magic number, by x's dtype
_PAIRS_ASM = {torch.bfloat16: w4a16.pairs_ptx("bf16"), torch.float16: w4a16.pairs_ptx("fp16")}
_MAGIC = {torch.bfloat16: 128.0, torch.float16: 1024.0}
# NF4: the zero kind (ZERO) of its 4-bit codes, levels times a 16-bit scale a block of 64 codes (no zeros), and
# their PTX by x's dtype (nf4.level_pairs_ptx, each pair times its scales)
NF4_LEVELS: gl.constexpr = gl.constexpr(3)
_LEVELS_ASM = {dtype: nf4.level_pairs_ptx(dtype, scaled=True) for dtype in (torch.bfloat16, torch.float16)}
# the registers a thread of the DECOUPLED form's second warpgroup may hold (setmaxnreg; the loading warp's
# warpgroup keeps 24 and the first warpgroup takes what is left)
DECOUPLED_REGS = 208
# A word's four int8 bytes as two exact 16-bit pairs (bytes 0 and 1, then 2 and 3; the first of a pair in the low
# half). An xor makes every byte b + 128, unsigned. fp16: a byte permute puts it under the exponent of 1024 (whose
# step is 1) and one packed subtraction of 1152 leaves b. bf16 has a bit too few for that: the byte goes under the
# exponent of 2**23 in fp32, one subtraction leaves b, and the pairs are packed (exact: |b| <= 128 has 8 bits).
_BYTES_ASM = {
    torch.float16: ("{\n.reg .b32 t, h, m;\nmov.b32 h, 0x64646464;\nmov.b32 m, 0x64806480;\n"
                    "xor.b32 t, $2, 0x80808080;\nprmt.b32 $0, t, h, 0x4140;\nprmt.b32 $1, t, h, 0x4342;\n"
                    "sub.f16x2 $0, $0, m;\nsub.f16x2 $1, $1, m;\n}"),
    torch.bfloat16: ("{\n.reg .b32 t, m, f0, f1, f2, f3;\nmov.b32 m, 0x4B000000;\nxor.b32 t, $2, 0x80808080;\n"
                     + "".join(f"prmt.b32 f{j}, t, m, {0x7650 | j:#06x};\nsub.f32 f{j}, f{j}, 0f4B000080;\n"
                               for j in range(4))
                     + "cvt.rn.bf16x2.f32 $0, f1, f0;\ncvt.rn.bf16x2.f32 $1, f3, f2;\n}"),
}


@gluon.jit
def follow_previous(PDL: gl.constexpr):
    """Gluon's tiles.follow_previous: with PDL (the kernel launched with tiles.pdl_options), wait until the kernel
    before it on the stream is done and its writes are visible. A kernel calls it first."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def row_tile_bases(rows, num_warps):
    """(register bases, warp bases) of ``rows`` rows of w in the MMA's 16-row tiles: the warps on consecutive tiles,
    then each warp's further tiles (every 16 * num_warps rows) in its registers."""
    reg = []
    r = 16 * num_warps
    while r < rows:
        reg.append([r, 0])
        r *= 2
    warp = []
    r = 16
    while r < 16 * num_warps:
        warp.append([r, 0])
        r *= 2
    return reg, warp


@gluon.constexpr_function
def word_layout(rows, num_warps, bits, contiguous=False):
    """[rows, 4 * bits] int32 words of a step: warp w (of num_warps, 4 a warpgroup) and lane l hold rows
    16w + l // 4 and 8 more (and every 16 * num_warps rows after); 4-bit codes: words 4a + l % 4, a = 0..3, or
    with ``contiguous`` words 4 (l % 4) + a (one 16-byte load); bytes: words 8 (l % 4) + a, a = 0..7 (contiguous,
    for 16-byte loads)."""
    if bits == 4 and contiguous:
        reg, lane = [[0, 1], [0, 2], [8, 0]], [[0, 4], [0, 8]]
    elif bits == 4:
        reg, lane = [[8, 0], [0, 4], [0, 8]], [[0, 1], [0, 2]]
    else:
        reg, lane = [[0, 1], [0, 2], [0, 4], [8, 0]], [[0, 8], [0, 16]]
    tiles, warp = row_tile_bases(rows, num_warps)
    return gl.DistributedLinearLayout(reg + tiles, lane + [[1, 0], [2, 0], [4, 0]], warp, [], [rows, 4 * bits])


@gluon.jit
def _pairs_tile(q, s, z, off, ASM: gl.constexpr, dtype: gl.constexpr, A_LAYOUT: gl.constexpr,
                ROWS: gl.constexpr, CONTIGUOUS: gl.constexpr = False):
    """The dequantized [ROWS, STEP] tile in the MMA's left-operand layout from [ROWS, 16] words and [ROWS, 1]
    scale, zero and offset pairs: w4a16.fragment_tile_pairs in Gluon (a Gluon function cannot call a Triton one),
    with its PTX; here every layout is explicit and the last conversion is asserted to move no data."""
    q2 = gl.join(q, q)
    s = gl.broadcast(s, q)[0]
    z = gl.broadcast(z, q)[0]
    off = gl.broadcast(off, q)[0]
    s2 = gl.join(s, s)
    z2 = gl.join(z, z)
    off2 = gl.join(off, off)
    if dtype == gl.float16:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r", [q2, s2, z2, off2],
                                                   dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                                   is_pure=True, pack=2)
    else:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r", [q2, s2, z2, off2],
                                                   dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                                   is_pure=True, pack=2)
    return _fragment_tile(b0, b1, b2, b3, A_LAYOUT, ROWS, CONTIGUOUS)


@gluon.jit
def _levels_tile(q, s, ASM: gl.constexpr, dtype: gl.constexpr, A_LAYOUT: gl.constexpr, ROWS: gl.constexpr,
                 CONTIGUOUS: gl.constexpr = False):
    """NF4: the [ROWS, STEP] tile of levels times their block's scale in the MMA's left-operand layout, from
    [ROWS, 16] words and the [ROWS, 16] 16-bit scales of their blocks (words 0-7 of a step lie in its first block of
    64 codes, 8-15 in the second), with nf4.level_pairs_ptx's PTX: each code's level rounded to x's dtype, times
    the scale, rounded again."""
    q2 = gl.join(q, q)
    s2 = gl.join(s, s)
    if dtype == gl.float16:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r", [q2, s2],
                                                   dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                                   is_pure=True, pack=2)
    else:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r", [q2, s2],
                                                   dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                                   is_pure=True, pack=2)
    return _fragment_tile(b0, b1, b2, b3, A_LAYOUT, ROWS, CONTIGUOUS)


@gluon.jit
def _fragment_tile(b0, b1, b2, b3, A_LAYOUT: gl.constexpr, ROWS: gl.constexpr, CONTIGUOUS: gl.constexpr = False):
    """The [ROWS, STEP] tile in the MMA's left-operand layout from four [ROWS, 16] tensors of 16-bit pairs, bj[r, w]
    holding codes 2j and 2j + 1 of word w (the conversion is asserted to move no data): word 4a + t (word_layout)
    at columns 32a + 16 j2 + 8 j1 + 2t + j0 of the tile, or with CONTIGUOUS word 4t + a at the same columns, so that
    the codes of columns 32t .. 32t + 31 of the step lie where bytes_ordered_x puts x's."""
    t = gl.join(gl.join(b0, b1), gl.join(b2, b3))  # t[r, w, j0, j1, j2]: code 4 j2 + 2 j1 + j0 of word w
    t = gl.reshape(t, [ROWS, 4, 4, 2, 2, 2])
    if CONTIGUOUS:
        t = gl.permute(t, [0, 2, 5, 4, 1, 3])
    else:
        t = gl.permute(t, [0, 1, 5, 4, 2, 3])
    return gl.convert_layout(gl.reshape(t, [ROWS, STEP]), A_LAYOUT, assert_trivial=True)


@gluon.jit
def _bytes_tile(q, ASM: gl.constexpr, dtype: gl.constexpr, A_LAYOUT: gl.constexpr, ROWS: gl.constexpr):
    """The [ROWS, STEP] tile of int8 codes as exact 16-bit floats in the MMA's left-operand layout, from [ROWS, 32]
    words in word_layout's byte order: column 16s + 8 j1 + 2t + j0 is byte 2 j1 + j0 of word 8t + s."""
    q2 = gl.join(q, q)
    if dtype == gl.float16:
        b0, b1 = gl.inline_asm_elementwise(ASM, "=r,=r,r,r", [q2], dtype=(gl.float16, gl.float16), is_pure=True,
                                           pack=2)
    else:
        b0, b1 = gl.inline_asm_elementwise(ASM, "=r,=r,r,r", [q2], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
                                           pack=2)
    t = gl.reshape(gl.join(b0, b1), [ROWS, 4, 8, 2, 2])  # t[r, t, s, j0, j1]
    t = gl.permute(t, [0, 2, 4, 1, 3])
    return gl.convert_layout(gl.reshape(t, [ROWS, STEP]), A_LAYOUT, assert_trivial=True)


@gluon.jit
def _load_x(x_desc, ready, x_smem, off_m, first, step, n_steps, STAGES: gl.constexpr):
    """Start the TMA copy of x's tile for ``step`` (of this program's n_steps, from step ``first`` of K) into its
    stage; nothing past the last step."""
    stage = step % STAGES
    mbarrier.expect(ready.index(stage), x_desc.block_type.nbytes, pred=step < n_steps)
    _tma_load(x_desc, [off_m, (first + step) * STEP], ready.index(stage), x_smem.index(stage), pred=step < n_steps)


@gluon.jit
def _mma_in_flight(acc, a, step, x_desc, ready, x_smem, off_m, first, n_steps, STAGES: gl.constexpr):
    """Issue ``step``'s MMA on its tile ``a`` and x's stage once its copy has landed, then wait for the MMA before
    it (one stays in flight) and start the copy of x into the stage that MMA read."""
    stage = step % STAGES
    mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
    acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
    _load_x(x_desc, ready, x_smem, off_m, first, step + STAGES - 1, n_steps, STAGES)
    return acc


@gluon.jit
def _load(ptrs, mask, other):
    """gl.load under a mask, or of every pointer where the mask is None."""
    if mask is None:
        return gl.load(ptrs)
    else:
        return gl.load(ptrs, mask=mask, other=other)


@gluon.jit
def _step_loads(q_ptrs, s_ptrs, z_ptrs, step, mask, ZERO: gl.constexpr, BITS: gl.constexpr):
    """One step's words [ROWS, 4 * BITS] (under ``mask``, or every one where it is None); 4-bit codes: the group's
    scales and zeros [ROWS, 1] (the scales again where there are no zeros); NF4: each word's block scale [ROWS,
    16], again as zeros; bytes (a scale a row, applied at the end): the words again in their places."""
    q = _load(q_ptrs + step * (4 * BITS), mask, 0)
    if BITS == 8:
        s = q
        z = q
    elif ZERO == NF4_LEVELS:
        s = _load(s_ptrs + step * 2, mask, 0.0)
        z = s
    else:
        s = _load(s_ptrs + step, mask, 0.0)
        if ZERO == 2:
            z = s
        else:
            z = _load(z_ptrs + step, mask, 0)
    return q, s, z


@gluon.jit
def _step_tile(q, s, z, ZERO: gl.constexpr, ASM: gl.constexpr, MAGIC: gl.constexpr, dtype: gl.constexpr,
               A_LAYOUT: gl.constexpr, ROWS: gl.constexpr, BITS: gl.constexpr, CONTIGUOUS: gl.constexpr = False):
    """The step's dequantized tile: bytes as they are (_bytes_tile), NF4's levels (_levels_tile), or 4-bit codes in
    packed pairs with off and the float zero as in w4a16.pair_offsets: -(magic + 8) and z (float zeros),
    -(magic + zero point) and 0 (integer zero points), -(magic + 8) and 0 (none)."""
    if BITS == 8:
        a = _bytes_tile(q, ASM, dtype, A_LAYOUT, ROWS)
    elif ZERO == NF4_LEVELS:
        a = _levels_tile(q, s, ASM, dtype, A_LAYOUT, ROWS, CONTIGUOUS)
    else:
        sf = s.to(gl.float32)
        if ZERO == 0:
            off = (sf * 0.0 - (MAGIC + 8.0)).to(dtype)
            zf = z.to(dtype)
        elif ZERO == 1:
            off = (sf * 0.0 - MAGIC - z.to(gl.float32)).to(dtype)
            zf = (sf * 0.0).to(dtype)
        else:
            off = (sf * 0.0 - (MAGIC + 8.0)).to(dtype)
            zf = (sf * 0.0).to(dtype)
        a = _pairs_tile(q, s.to(dtype), zf, off, ASM, dtype, A_LAYOUT, ROWS, CONTIGUOUS)
    return a


@gluon.jit
def _row_pointers(q_ptr, s_ptr, z_ptr, off_w, first, N, stride_qn, stride_sn, stride_zn, ROWS: gl.constexpr,
                  BITS: gl.constexpr, ZERO: gl.constexpr, num_warps: gl.constexpr, CLAMP: gl.constexpr = False,
                  CONTIGUOUS: gl.constexpr = False):
    """(q_ptrs, s_ptrs, z_ptrs, mask) of rows off_w .. off_w + ROWS - 1 of w at step ``first``: the words of a
    step in word_layout, each row's scale and zero (NF4: each word's block scale), and which rows are in the
    weight; with CLAMP, rows past the weight's last read the last one instead (no mask needed); CONTIGUOUS: 4-bit
    codes in word_layout's contiguous order."""
    wl: gl.constexpr = word_layout(ROWS, num_warps, BITS, CONTIGUOUS)
    rows = off_w + gl.arange(0, ROWS, layout=gl.SliceLayout(1, wl))
    if CLAMP:
        rows = gl.minimum(rows, N - 1)
    words = gl.arange(0, 4 * BITS, layout=gl.SliceLayout(0, wl))
    q_ptrs = q_ptr + gl.expand_dims(rows, 1) * stride_qn + first * (4 * BITS) + gl.expand_dims(words, 0)
    if ZERO == NF4_LEVELS:  # two blocks of 64 codes a step
        s_ptrs = s_ptr + gl.expand_dims(rows, 1) * stride_sn + first * 2 + gl.expand_dims(words // 8, 0)
    else:
        s_ptrs = s_ptr + gl.expand_dims(rows, 1) * stride_sn + first
    z_ptrs = z_ptr + gl.expand_dims(rows, 1) * stride_zn + first
    return q_ptrs, s_ptrs, z_ptrs, gl.expand_dims(rows < N, 1)


@gluon.jit
def _program_tile(K, steps_per_split, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """(off_n, off_m, pid_k, first, n_steps): the program's first rows of w and of x, its split of K, the first of
    its steps and their number."""
    pid_k = gl.program_id(2)
    first = pid_k * steps_per_split
    n_steps = gl.minimum(gl.cdiv(K, STEP) - first, steps_per_split)
    return gl.program_id(0) * BLOCK_N, gl.program_id(1) * BLOCK_M, pid_k, first, n_steps


@gluon.jit
def _store_sums(acc, mma: gl.constexpr, y_ptr, b_ptr, r_ptr, c_ptr, off_n, off_m, pid_k, M, N, stride_ym, stride_ys,
                HAS_BIAS: gl.constexpr, HAS_ROW: gl.constexpr, HAS_COL: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr):
    """Store the [BLOCK_N, BLOCK_M] tile of fp32 sums (y^T, rows of w from off_n) as y's, times the scale of its
    row of w (HAS_COL) and of its row of x (HAS_ROW), plus the bias, in y's dtype; split K: split pid_k's partials."""
    n_out = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    m_out = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    if HAS_COL:  # a scale a row of w (an output column)
        acc = acc * gl.expand_dims(gl.load(c_ptr + n_out, mask=n_out < N, other=0.0).to(gl.float32), 1)
    if HAS_ROW:  # a scale a row of x
        acc = acc * gl.expand_dims(gl.load(r_ptr + m_out, mask=m_out < M, other=0.0), 0)
    if HAS_BIAS:
        acc = acc + gl.expand_dims(gl.load(b_ptr + n_out, mask=n_out < N, other=0.0).to(gl.float32), 1)
    y_ptrs = y_ptr + pid_k * stride_ys + gl.expand_dims(m_out, 0) * stride_ym + gl.expand_dims(n_out, 1)
    y_mask = gl.expand_dims(m_out < M, 0) & gl.expand_dims(n_out < N, 1)
    gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@gluon.jit
def _decoupled_rows(wg: gl.constexpr, x_smem, ready, empty, q_ptr, s_ptr, z_ptr, b_ptr, r_ptr, c_ptr, y_ptr, M, N,
                    off_n, off_m, first, n_steps, pid_k, stride_qn, stride_sn, stride_zn, stride_ym, stride_ys,
                    BITS: gl.constexpr, ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_ROW: gl.constexpr,
                    HAS_COL: gl.constexpr, BLOCK_M: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr,
                    ASM: gl.constexpr, MAGIC: gl.constexpr):
    """One warpgroup of the DECOUPLED form: rows wg * ROWS .. of the program's tile of w, each step's tile built
    in registers and multiplied by x's stage once the loader has filled it; the stage is handed back (empty) once
    this warpgroup's MMA on it is done, then its sums are stored. The other warpgroup does the same on its rows at
    its own pace: nothing but the stages' barriers ties them."""
    num_warps: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = x_smem.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    off_w = off_n + wg * ROWS
    q_ptrs, s_ptrs, z_ptrs, mask = _row_pointers(q_ptr, s_ptr, z_ptr, off_w, first, N, stride_qn, stride_sn,
                                                 stride_zn, ROWS, BITS, ZERO, num_warps)
    acc = gl.zeros([ROWS, BLOCK_M], gl.float32, mma)
    q, s, z = _step_loads(q_ptrs, s_ptrs, z_ptrs, 0, mask, ZERO, BITS)
    q1, s1, z1 = _step_loads(q_ptrs, s_ptrs, z_ptrs, gl.minimum(1, n_steps - 1), mask, ZERO, BITS)
    for k in range(n_steps):
        stage = k % STAGES
        q2, s2, z2 = _step_loads(q_ptrs, s_ptrs, z_ptrs, gl.minimum(k + 2, n_steps - 1), mask, ZERO, BITS)
        a = _step_tile(q, s, z, ZERO, ASM, MAGIC, dtype, a_layout, ROWS, BITS)
        mbarrier.wait(ready.index(stage), (k // STAGES) & 1)
        acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
        # waited for before the next tile takes the registers (see _wgmma_kernel)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        _thread_barrier()  # (the arrive is one thread's: every warp's MMA is done by then)
        mbarrier.arrive(empty.index(stage))
        q, s, z = q1, s1, z1
        q1, s1, z1 = q2, s2, z2
    _store_sums(acc, mma, y_ptr, b_ptr, r_ptr, c_ptr, off_w, off_m, pid_k, M, N, stride_ym, stride_ys, HAS_BIAS,
                HAS_ROW, HAS_COL, BLOCK_M, ROWS)


@gluon.jit
def _decoupled_loader(x_desc, x_smem, ready, empty, off_m, first, n_steps, STAGES: gl.constexpr):
    """The DECOUPLED form's loading warp: x's tile of each step by TMA into its stage, once both warpgroups have
    handed the stage back (a fresh barrier passes the first round)."""
    for k in range(n_steps):
        stage = k % STAGES
        mbarrier.wait(empty.index(stage), ((k // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(stage), x_desc.block_type.nbytes)
        _tma_load(x_desc, [off_m, (first + k) * STEP], ready.index(stage), x_smem.index(stage))


@gluon.jit
def _decoupled_kernel(x_desc, q_ptr, s_ptr, z_ptr, b_ptr, r_ptr, c_ptr, y_ptr, M, N, K, steps_per_split, stride_qn,
                      stride_sn, stride_zn, stride_ym, stride_ys, BITS: gl.constexpr, ZERO: gl.constexpr,
                      HAS_BIAS: gl.constexpr, HAS_ROW: gl.constexpr, HAS_COL: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ASM: gl.constexpr, MAGIC: gl.constexpr,
                      WG_REGS: gl.constexpr, num_warps: gl.constexpr, PDL: gl.constexpr = False):
    """_wgmma_kernel's work with its two warpgroups decoupled (DECOUPLED): each takes half the program's rows of w
    in a partition of its own (the kernel's warps and a worker's, WG_REGS registers a thread), sharing x's stages,
    which one more warp fills by TMA. In _wgmma_kernel with 8 warps, refilling a stage both warpgroups read takes a
    barrier of all 8 warps every step, so the two dequantize at the same time and multiply at the same time."""
    follow_previous(PDL)
    off_n, off_m, pid_k, first, n_steps = _program_tile(K, steps_per_split, BLOCK_M, BLOCK_N)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, STEP], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    # (the partitions' arguments are written out: a tuple held in a variable would not keep its constexprs)
    gl.warp_specialize([
        (_decoupled_rows, (0, x_smem, ready, empty, q_ptr, s_ptr, z_ptr, b_ptr, r_ptr, c_ptr, y_ptr, M, N, off_n, off_m,
                           first, n_steps, pid_k, stride_qn, stride_sn, stride_zn, stride_ym, stride_ys, BITS, ZERO,
                           HAS_BIAS, HAS_ROW, HAS_COL, BLOCK_M, BLOCK_N // 2, STAGES, ASM, MAGIC)),
        (_decoupled_rows, (1, x_smem, ready, empty, q_ptr, s_ptr, z_ptr, b_ptr, r_ptr, c_ptr, y_ptr, M, N, off_n, off_m,
                           first, n_steps, pid_k, stride_qn, stride_sn, stride_zn, stride_ym, stride_ys, BITS, ZERO,
                           HAS_BIAS, HAS_ROW, HAS_COL, BLOCK_M, BLOCK_N // 2, STAGES, ASM, MAGIC)),
        (_decoupled_loader, (x_desc, x_smem, ready, empty, off_m, first, n_steps, STAGES)),
    ], [num_warps, 1], [WG_REGS, 24])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


@gluon.jit
def _wgmma_kernel(x_desc, q_ptr, s_ptr, z_ptr, b_ptr, r_ptr, c_ptr, y_ptr, M, N, K, steps_per_split, stride_qn,
                  stride_sn, stride_zn, stride_ym, stride_ys, BITS: gl.constexpr, ZERO: gl.constexpr,
                  HAS_BIAS: gl.constexpr, HAS_ROW: gl.constexpr, HAS_COL: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ASM: gl.constexpr,
                  MAGIC: gl.constexpr, A_SHARED: gl.constexpr, IN_FLIGHT: gl.constexpr, num_warps: gl.constexpr,
                  PDL: gl.constexpr = False):
    follow_previous(PDL)
    dtype: gl.constexpr = x_desc.dtype
    off_n, off_m, pid_k, first, n_steps = _program_tile(K, steps_per_split, BLOCK_M, BLOCK_N)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    q_ptrs, s_ptrs, z_ptrs, mask = _row_pointers(q_ptr, s_ptr, z_ptr, off_n, first, N, stride_qn, stride_sn,
                                                 stride_zn, BLOCK_N, BITS, ZERO, num_warps)

    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, STEP], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    for i in gl.static_range(STAGES - 1):
        _load_x(x_desc, ready, x_smem, off_m, first, i, n_steps, STAGES)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    # the codes, scales and zeros of the next two steps are loaded ahead, in registers
    q, s, z = _step_loads(q_ptrs, s_ptrs, z_ptrs, 0, mask, ZERO, BITS)
    q1, s1, z1 = _step_loads(q_ptrs, s_ptrs, z_ptrs, gl.minimum(1, n_steps - 1), mask, ZERO, BITS)
    if A_SHARED:
        a_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, STEP], dtype)
        a_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, STEP], a_shared)
    # IN_FLIGHT: two steps an iteration, so that consecutive steps' tiles are different registers. One step's MMA
    # reads its tile while the next step's tile is built, and a tile's registers are written again only after the
    # wait that retires the MMA which read them.
    for j in range(n_steps // 2 if IN_FLIGHT else 0):
        k = 2 * j
        q2, s2, z2 = _step_loads(q_ptrs, s_ptrs, z_ptrs, gl.minimum(k + 2, n_steps - 1), mask, ZERO, BITS)
        a0 = _step_tile(q, s, z, ZERO, ASM, MAGIC, dtype, a_layout, BLOCK_N, BITS)
        acc = _mma_in_flight(acc, a0, k, x_desc, ready, x_smem, off_m, first, n_steps, STAGES)
        q3, s3, z3 = _step_loads(q_ptrs, s_ptrs, z_ptrs, gl.minimum(k + 3, n_steps - 1), mask, ZERO, BITS)
        a1 = _step_tile(q1, s1, z1, ZERO, ASM, MAGIC, dtype, a_layout, BLOCK_N, BITS)
        acc = _mma_in_flight(acc, a1, k + 1, x_desc, ready, x_smem, off_m, first, n_steps, STAGES)
        q, s, z = q2, s2, z2
        q1, s1, z1 = q3, s3, z3
    if IN_FLIGHT and n_steps % 2 == 1:
        a = _step_tile(q, s, z, ZERO, ASM, MAGIC, dtype, a_layout, BLOCK_N, BITS)
        acc = _mma_in_flight(acc, a, n_steps - 1, x_desc, ready, x_smem, off_m, first, n_steps, STAGES)
    for k in range(0 if IN_FLIGHT else n_steps):
        stage = k % STAGES
        q2, s2, z2 = _step_loads(q_ptrs, s_ptrs, z_ptrs, gl.minimum(k + 2, n_steps - 1), mask, ZERO, BITS)
        a = _step_tile(q, s, z, ZERO, ASM, MAGIC, dtype, a_layout, BLOCK_N, BITS)
        if A_SHARED:
            # the tile through shared memory (two buffers): the MMA of step k - 2, which read this buffer, is done
            a_smem.index(k % 2).store(a)
            fence_async_shared()
            mbarrier.wait(ready.index(stage), (k // STAGES) & 1)
            acc = warpgroup_mma(a_smem.index(k % 2), x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # the MMA of step k - 1 is done: its stage takes step k + STAGES - 1
            _load_x(x_desc, ready, x_smem, off_m, first, k + STAGES - 1, n_steps, STAGES)
        else:
            mbarrier.wait(ready.index(stage), (k // STAGES) & 1)
            acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            # the MMA of step k - 1 was done before this step began: its stage takes step k + STAGES - 1
            _load_x(x_desc, ready, x_smem, off_m, first, k + STAGES - 1, n_steps, STAGES)
            # the next step's tile may take the registers of this one's (an assembler before CUDA 13.3 can reuse
            # the registers of an MMA still reading them): it must be done before they are written
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        q, s, z = q1, s1, z1
        q1, s1, z1 = q2, s2, z2
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    _store_sums(acc, mma, y_ptr, b_ptr, r_ptr, c_ptr, off_n, off_m, pid_k, M, N, stride_ym, stride_ys, HAS_BIAS,
                HAS_ROW, HAS_COL, BLOCK_M, BLOCK_N)

def w4a16_linear(x, qdata, scale, zero, bias, params: dict, row_scale=None, col_scale=None, out_dtype=None,
                 x_fragment_ordered: bool = False) -> torch.Tensor:
    """y = ((x @ w.T) * row_scale[:, None] * col_scale[None, :] + bias).to(out_dtype or x.dtype) for W4A16 g128
    codes [N, K/2] with scales and zeros [N, K/128]; row_scale [M] and col_scale [N] fp32, optional. The inputs are
    those w4a16.wgmma_refusal accepts; ``params`` as in the module's docstring. ``x_fragment_ordered``: x is
    already tiles.fragment_ordered_x of itself, K/2 * 2 columns."""
    kp = qdata.shape[1] * 2
    if x_fragment_ordered and x.shape[1] != kp:
        raise ValueError(f"x in fragment order must be {kp} columns wide, got {x.shape[1]}")
    scale, zero = unit_stride(scale, zero)
    z = scale if zero is None else zero  # no zero stored: the scales stand in as a pointer the kernel never reads
    return _launch(x, (lambda: x) if x_fragment_ordered else (lambda: fragment_ordered_x(x, kp)), qdata, scale, z,
                   kp, bias, params, bits=4, zero_kind=w4a16.zero_kind(zero), asm=_PAIRS_ASM[x.dtype],
                   row_scale=row_scale, col_scale=col_scale, out_dtype=out_dtype)


def w8a16_linear(x, qdata, scale, bias, params: dict) -> torch.Tensor:
    """y = (x @ q.T) * scale + bias for int8 codes [N, K] (K a multiple of 128) with a scale a row [N]. The inputs
    are those w8a16.wgmma_refusal accepts; ``params`` as in the module's docstring."""
    (scale,) = unit_stride(scale)
    return _launch(x, lambda: bytes_ordered_x(x), qdata, scale, scale, x.shape[1], bias, params, bits=8, zero_kind=2,
                   asm=_BYTES_ASM[x.dtype], col_scale=scale)


def nf4_linear(x, qdata, scales, bias, params: dict) -> torch.Tensor:
    """y = x @ w.T + bias for the NF4 codes of an [N, K] weight (K a multiple of 128, blocks of 64 codes): qdata
    uint8 [N, K/2], two codes a byte, the first in the high nibble, and scales [N, K/64] in x's dtype
    (nf4.block_scales_triton). The inputs are those nf4.wgmma_refusal accepts; ``params`` as in the module's
    docstring."""
    kp = qdata.shape[1] * 2
    (scales,) = unit_stride(scales)
    return _launch(x, lambda: fragment_ordered_x(x, kp), qdata, scales, scales, kp, bias, params, bits=4,
                   zero_kind=NF4_LEVELS.value, asm=_LEVELS_ASM[x.dtype])


def bytes_ordered_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 128) with its columns in the W8A16 tile's order, a copy: within every 128 columns,
    column 16s + 8 j1 + 2t + j0 of the copy is column 32t + 4s + 2 j1 + j0 of x (t < 4, s < 8, j0 and j1 < 2)."""
    m, k = x.shape
    return x.reshape(m, k // 128, 4, 8, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(m, k)


def _launch(x, ordered_x, qdata, scale, z, kp: int, bias, params: dict, *, bits: int, zero_kind: int, asm: str,
            row_scale=None, col_scale=None, out_dtype=None):
    """The kernel on x (its tile-ordered copy made by ``ordered_x``) and a weight of ``bits``-bit codes over kp
    columns, each partial sum times row_scale and col_scale where given: the output's buffers (out_dtype, default
    x's), the split of K, the partial sums added up."""
    m, n = x.shape[0], qdata.shape[0]
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return torch.zeros(0, n, dtype=out_dtype, device=x.device)
    block_m, block_n, split = params["BLOCK_M"], params["BLOCK_N"], params["SPLIT_K"]
    half = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(ordered_x(), [block_m, BLOCK_K], gl.NVMMASharedLayout.get_default_for(
        [block_m, BLOCK_K], half))
    y, split, per_split = split_output(m, n, kp // BLOCK_K, split, out_dtype, x.device)
    bias, row_scale, col_scale = unit_stride(bias, row_scale, col_scale)
    words = int32_words(qdata)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    args = (x_desc, words, scale, z, y if bias is None else bias, y if row_scale is None else row_scale,
            y if col_scale is None else col_scale, y, m, n, kp, per_split, words.stride(0), scale.stride(0),
            z.stride(0), n, m * n)
    common = dict(BITS=bits, ZERO=zero_kind, HAS_BIAS=bias is not None and split == 1, HAS_ROW=row_scale is not None,
                  HAS_COL=col_scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=params["STAGES"], ASM=asm,
                  MAGIC=_MAGIC[x.dtype], num_warps=params["num_warps"],
                  **pdl_options(x.device, dict(params)))  # (a copy: the caller's params stay whole)
    if params.get("DECOUPLED"):
        _decoupled_kernel[grid](*args, WG_REGS=DECOUPLED_REGS, **common)
    else:
        _wgmma_kernel[grid](*args, A_SHARED=params["A_SHARED"],
                            IN_FLIGHT=params.get("IN_FLIGHT", False) and mma_in_flight(), **common)
    return split_total(y, split, bias, out_dtype)

