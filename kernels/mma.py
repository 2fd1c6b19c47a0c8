"""W4A16, W8A16 and NF4 for a few rows of x on the tensor cores' warp-level MMA (mma.sync m16n8k16, compute
capability 8.0 and up), written in Gluon: y^T = w @ x^T with the dequantized weight tile as the MMA's left operand
and up to 32 rows of x as its right one (8 columns an MMA), both from registers.

Each warp owns 16 rows of w (or 32, 64: BLOCK_N / num_warps) and runs the whole loop over its steps of K on its own:
no barrier in the loop, no wait (and at 8 rows of x no shared memory; more rows below). A thread's share of the left
operand for a 128-deep step is the m16n8k16 fragment that kernels/wgmma.py also builds (the warpgroup MMA takes its
register operand in the same fragments), so the tiles come from the same functions, with the words of a step taken
in their contiguous order (wgmma.word_layout's ``contiguous``): the thread with lane 4g + t holds, for each of its
rows, the codes of the step's columns 32t .. 32t + 31 (four words of 4-bit codes, one 16-byte load; eight words of
bytes, two). The right operand is loaded the same way, straight from x: row g of x at columns 32t .. 32t + 31,
four 16-byte loads, the column that each position of the left operand multiplies at that position of the right one
(_x_operand). So no copy of x is made, which at a few rows would cost more than the loads it saves.

W4A16 multiplies its codes as magic + code, exact in 16 bits (a byte permute and a mask-or a pair of codes), into
sums of each step's own, and a second MMA of a tile of ones sums x's columns of the step; the group's scale and
zero fold both into the fp32 accumulator (_group_terms). W8A16 and NF4 take wgmma._step_tile's tiles (exact bytes
with the row's scale at the end; levels times their block's scale).

Four steps an iteration, each with registers of its own that are loaded again, four steps ahead, once its MMA has
read them: four steps' codes in flight per warp and no register copied from one step's set to another's. Rows of
w and x past the last read the last one, so no load is masked; nothing of theirs is stored. W4A16's scales and
zeros come four steps a load (8 bytes a row, scales_layout) wherever every program's steps come in fours and the
rows' scales start on 8 bytes: a load of two bytes a row touches a sector of each of a warp's 16 rows, and the
four-step loads took 8192 x 28672 at 2-8 rows from 52-58 to 46-51 us on an H200.

Past 8 rows, each warp loading x's tile for itself would hold four steps of 16 or 32 rows of x in registers
(spills, or fewer steps in flight). With BLOCK_M 16 or 32 the program instead copies its steps of x into shared
memory once, before its loop (cp.async, 16 bytes a copy, no registers held; X_STEPS steps, a power of two, at most
tiles.MMA_SHARED_X_BYTES, so K is split until they fit), waits for the copies and one barrier, and every warp reads
each step's words back in x_layout when it multiplies the step (16-byte loads, the rows' 16-byte pieces xored by
the row so that a load's eight rows fall on different banks). The codes stay four steps ahead in registers as
before; no barrier follows the first.

A configuration (``params``): BLOCK_M (rows of x a tile: 8 from registers, 16 or 32 through shared memory),
BLOCK_N (rows of w a program, 16 a warp or more), SPLIT_K (programs sharing a tile's steps of K, their fp32 partial
sums added in a fixed order), num_warps, and FOUR (default True; False keeps the scales' loads a step at a time, for
comparison). The measurements are in docs/benchmarks.md.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from aofunc.kernels import w4a16, wgmma
from aofunc.kernels.tiles import (BLOCK_K_WGMMA, int32_words, mma_x_steps, pdl_options, split_output, split_total,
                                  unit_stride)

STEP = wgmma.STEP
# Gluon's copy of global memory into shared memory without registers (cp.async) and its barrier of all the program's
# threads, under the names of the Triton that runs (3.6 names them so; later releases async_load and barrier)
_copy_to_shared = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# a shared-memory view of other bytes' shape: `reinterpret` in later releases, `_reinterpret` in 3.6
_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
_MAGIC_PAIRS_ASM = {torch.bfloat16: w4a16.magic_pairs_ptx("bf16"), torch.float16: w4a16.magic_pairs_ptx("fp16")}


@gluon.constexpr_function
def x_layout(rows, num_warps):
    """[STEP // 2, rows] words of x (pairs of columns; a step's words by rows of x) as each thread loads them: lane
    4g + t holds row g (and g + 8, 16, 24 for 16 or 32 rows) at columns 32t + j (j < 32, its registers' halves),
    every warp the same."""
    reg, lane = [[1, 0], [2, 0], [4, 0], [8, 0]], [[16, 0], [32, 0]]
    r = 8
    while r < rows:  # 16 or 32 rows: the MMA's further 8-column tiles
        reg.append([0, r])
        r *= 2
    warp = []
    w = 1
    while w < num_warps:
        warp.append([0, 0])
        w *= 2
    return gl.DistributedLinearLayout(reg, lane + [[0, 1], [0, 2], [0, 4]], warp, [], [STEP // 2, rows])


@gluon.constexpr_function
def scales_layout(rows, num_warps):
    """[rows, 4]: four consecutive steps' scales (or zeros) of each row of w in registers, the rows where the MMA's
    sums lie (an m16n8 tile's rows g and g + 8 in lanes 4g .. 4g + 3, a warp's 16-row tiles one after another)."""
    tiles, warp = wgmma.row_tile_bases(rows, num_warps)
    lane = [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout([[0, 1], [0, 2], [8, 0]] + tiles, lane, warp, [], [rows, 4])


@gluon.constexpr_function
def x_shared_layout():
    """[steps, STEP // 2, rows] words of x in shared memory: a row's words of a step contiguous, in 16-byte pieces
    whose place among a row's eight pieces of 128 bytes is xored with the row's index (mod 8), so that the eight
    rows a load of x_layout reads at once fall on different banks."""
    return gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[0, 1])


@gluon.jit
def _x_to_shared(x_ptr, off_m, first, last, M, stride_xm, X_STEPS: gl.constexpr, ROWS: gl.constexpr,
                 num_warps: gl.constexpr):
    """The program's X_STEPS steps of x's rows off_m .. (words; steps past ``last`` read the last) copied into shared
    memory (x_shared_layout) by 16-byte asynchronous copies, which hold no registers, all in one operation; returns
    the buffer, which the caller reads after _x_ready."""
    fill: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, num_warps], [0, 1])
    words = gl.arange(0, STEP // 2, layout=gl.SliceLayout(1, fill))
    column = gl.arange(0, X_STEPS * ROWS, layout=gl.SliceLayout(0, fill))  # step column // ROWS, row column % ROWS
    rows = gl.minimum(off_m + column % ROWS, M - 1)
    steps = gl.minimum(column // ROWS, last)
    at = x_ptr + first * (STEP // 2) + gl.expand_dims(words, 1) + \
        gl.expand_dims(rows * stride_xm + steps * (STEP // 2), 0)
    x_smem = gl.allocate_shared_memory(gl.int32, [X_STEPS, STEP // 2, ROWS], x_shared_layout())
    # one copy of all the steps, into the same bytes seen as [STEP // 2, X_STEPS * ROWS] (a step's rows one after
    # another, each row's 16-byte pieces xored as before, since ROWS is a multiple of 8): copies into each step's
    # view one after another would each be fenced off from the one before by a barrier of the program (Triton 3.6)
    if _REINTERPRET:
        flat = x_smem.reinterpret(gl.int32, [STEP // 2, X_STEPS * ROWS], x_shared_layout())
    else:
        flat = x_smem._reinterpret(gl.int32, [STEP // 2, X_STEPS * ROWS], x_shared_layout())
    _copy_to_shared(flat, at)
    async_copy.commit_group()
    return x_smem


@gluon.jit
def _x_ready():
    """Wait for this thread's copies of _x_to_shared, then for every thread's."""
    async_copy.wait_group(0)
    _barrier()


@gluon.jit
def _x_words(xw, x_smem, step, X_STEPS: gl.constexpr, ROWS: gl.constexpr, num_warps: gl.constexpr):
    """A step's words of x in x_layout: as loaded with its codes (xw), or with X_STEPS read from shared memory."""
    if X_STEPS > 0:
        xw = x_smem.index(step).load(x_layout(ROWS, num_warps))
    return xw


@gluon.jit
def _x_pointers(x_ptr, off_m, first, M, stride_xm, ROWS: gl.constexpr, num_warps: gl.constexpr):
    """The pointers of x's [STEP // 2, ROWS] words (x_ptr: x as int32 pairs of columns, stride_xm in words) at
    step ``first`` in x_layout, rows off_m .. of x; rows past x's last read the last one."""
    xl: gl.constexpr = x_layout(ROWS, num_warps)
    words = gl.arange(0, STEP // 2, layout=gl.SliceLayout(1, xl))
    rows = gl.minimum(off_m + gl.arange(0, ROWS, layout=gl.SliceLayout(0, xl)), M - 1)
    return x_ptr + gl.expand_dims(rows, 0) * stride_xm + first * (STEP // 2) + gl.expand_dims(words, 1)


@gluon.jit
def _x_operand(xw, dtype: gl.constexpr, B_LAYOUT: gl.constexpr, ROWS: gl.constexpr):
    """The MMA's right operand [STEP, ROWS] from x's words as loaded (x_layout; carried through the loop as words,
    so that each 32-bit register stays whole): column 32t + 4s + 2j1 + j0 of the step at position 16s + 8j1 + 2t +
    j0, where the left operand holds the codes of that column (the conversion is asserted to move no data)."""
    if dtype == gl.float16:
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xw],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
    else:
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xw],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
    xv = gl.reshape(gl.permute(gl.join(lo, hi), [0, 2, 1]), [STEP, ROWS])  # column 2w + e: half e of word w
    t = gl.permute(gl.reshape(xv, [4, 8, 2, 2, ROWS]), [1, 2, 0, 3, 4])
    return gl.convert_layout(gl.reshape(t, [STEP, ROWS]), B_LAYOUT, assert_trivial=True)


@gluon.jit
def _magic_tile(q, ASM: gl.constexpr, dtype: gl.constexpr, A_LAYOUT: gl.constexpr, ROWS: gl.constexpr):
    """The [ROWS, STEP] tile of magic + code (exact 16-bit floats, w4a16.magic_pairs_ptx) in the MMA's left-operand
    layout from [ROWS, 16] words: a byte permute and a mask-or a pair of codes, nothing else (tiles.
    word_pairs_fragments' packing in Gluon, which cannot call a Triton function)."""
    q2 = gl.join(q, q)
    if dtype == gl.float16:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r", [q2],
                                                   dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                                   is_pure=True, pack=2)
    else:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r", [q2],
                                                   dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                                   is_pure=True, pack=2)
    return wgmma._fragment_tile(b0, b1, b2, b3, A_LAYOUT, ROWS, True)


@gluon.jit
def _group_terms(s, z, ZERO: gl.constexpr, MAGIC: gl.constexpr):
    """(s, c) in fp32 with w = (code - 8) s + z = (magic + code) s + c: c = z - (magic + 8) s for float zeros,
    -(magic + zero point) s for integer zero points, -(magic + 8) s for none."""
    sf = s.to(gl.float32)
    if ZERO == 0:
        c = z.to(gl.float32) - (MAGIC + 8.0) * sf
    elif ZERO == 1:
        c = -(MAGIC + z.to(gl.float32)) * sf
    else:
        c = -(MAGIC + 8.0) * sf
    return sf, c


@gluon.jit
def _mma_step(acc, q, s, z, xw, ones, ZERO: gl.constexpr, ASM: gl.constexpr, MAGIC: gl.constexpr,
              dtype: gl.constexpr, A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr, MMA: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BITS: gl.constexpr, MAGIC_SUMS: gl.constexpr):
    """acc plus one step's products: of its codes' words q (scales s, zeros z) and x's words xw."""
    b = _x_operand(xw, dtype, B_LAYOUT, BLOCK_M)
    if MAGIC_SUMS:
        sums = mma_v2(_magic_tile(q, ASM, dtype, A_LAYOUT, BLOCK_N), b, gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA))
        x_sums = mma_v2(ones, b, gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA))
        sf, c = _group_terms(s, z, ZERO, MAGIC)
        acc += sums * gl.expand_dims(sf, 1) + x_sums * gl.expand_dims(c, 1)
    else:
        acc = mma_v2(wgmma._step_tile(q, s, z, ZERO, ASM, MAGIC, dtype, A_LAYOUT, BLOCK_N, BITS, True), b, acc)
    return acc


@gluon.jit
def _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, step, last, ZERO: gl.constexpr, BITS: gl.constexpr,
                   FOUR: gl.constexpr, X_STEPS: gl.constexpr):
    """(q, s, z, x's words) of step min(step, last); with FOUR (scales four steps a load, _scales_four), s and z
    are 0; with X_STEPS (x in shared memory, read when the step is multiplied), x's words are 0."""
    step = gl.minimum(step, last)
    if FOUR:
        q = gl.load(q_ptrs + step * (4 * BITS))
        s = 0.0
        z = 0.0
    else:
        q, s, z = wgmma._step_loads(q_ptrs, s_ptrs, z_ptrs, step, None, ZERO, BITS)
    if X_STEPS > 0:
        xw = 0
    else:
        xw = gl.load(x_ptrs + step * (STEP // 2))
    return q, s, z, xw


@gluon.jit
def _scales_four(s_ptrs, z_ptrs, step, ZERO: gl.constexpr, FOUR: gl.constexpr):
    """The scales and zeros [BLOCK_N, 4] of steps step .. step + 3 (step a multiple of 4) in scales_layout (an
    8-byte load a row), or (0, 0) without FOUR."""
    if FOUR:
        sv = gl.load(s_ptrs + step)
        zv = sv if ZERO == 2 else gl.load(z_ptrs + step)
    else:
        sv = 0.0
        zv = 0.0
    return sv, zv


@gluon.jit
def _four_steps(v, FOUR: gl.constexpr, MMA: gl.constexpr):
    """A [BLOCK_N, 4] tile's four columns as the MMA's rows (no data moved), or four 0s without FOUR."""
    if FOUR:
        even, odd = gl.split(gl.reshape(v, [v.shape[0], 2, 2]))
        v0, v2 = gl.split(even)
        v1, v3 = gl.split(odd)
        rows: gl.constexpr = gl.SliceLayout(1, MMA)
        v0 = gl.convert_layout(v0, rows, assert_trivial=True)
        v1 = gl.convert_layout(v1, rows, assert_trivial=True)
        v2 = gl.convert_layout(v2, rows, assert_trivial=True)
        v3 = gl.convert_layout(v3, rows, assert_trivial=True)
    else:
        v0 = 0.0
        v1 = 0.0
        v2 = 0.0
        v3 = 0.0
    return v0, v1, v2, v3


@gluon.jit
def _pick(loaded, four, FOUR: gl.constexpr):
    """A step's scales (zeros): from the four-step load with FOUR, else as loaded with the step."""
    if FOUR:
        out = four
    else:
        out = loaded
    return out


@gluon.jit
def _mma_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, steps_per_split, stride_xm, stride_qn, stride_sn,
                stride_zn, stride_ym, stride_ys, BITS: gl.constexpr, ZERO: gl.constexpr, HAS_BIAS: gl.constexpr,
                HAS_COL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, ASM: gl.constexpr,
                MAGIC: gl.constexpr, FOUR: gl.constexpr, num_warps: gl.constexpr, PDL: gl.constexpr = False,
                X_STEPS: gl.constexpr = 0):
    """y^T's [BLOCK_N, BLOCK_M] tile over the program's steps of K. W4A16 (BITS 4, ZERO 0-2): each step's MMA
    multiplies the codes as magic + code, exact, into sums of their own, and a second MMA of a tile of ones sums
    x's columns of the step; the group's scale and zero then fold both into the fp32 accumulator, (magic + code)
    s and (z - (magic + 8) s) times x's sum. NF4 and bytes: the tile of wgmma._step_tile, accumulated by the MMA."""
    wgmma.follow_previous(PDL)
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    MAGIC_SUMS: gl.constexpr = BITS == 4 and ZERO != wgmma.NF4_LEVELS
    off_n, off_m, pid_k, first, n_steps = wgmma._program_tile(K, steps_per_split, BLOCK_M, BLOCK_N)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # rows past the weight's (and x's) last read the last one: no masks, and nothing of theirs is stored
    q_ptrs, s_ptrs, z_ptrs, mask = wgmma._row_pointers(q_ptr, s_ptr, z_ptr, off_n, first, N, stride_qn, stride_sn,
                                                       stride_zn, BLOCK_N, BITS, ZERO, num_warps, CLAMP=True,
                                                       CONTIGUOUS=True)
    # x's words: pairs of columns (stride_xm counts them)
    x_words = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    if X_STEPS > 0:  # the program's steps of x in shared memory, read by every warp
        x_smem = _x_to_shared(x_words, off_m, first, n_steps - 1, M, stride_xm, X_STEPS, BLOCK_M, num_warps)
        x_ptrs = 0  # (not read)
    else:
        x_smem = 0  # (not read)
        x_ptrs = _x_pointers(x_words, off_m, first, M, stride_xm, BLOCK_M, num_warps)
    if FOUR:  # four steps' scales and zeros of each row where the MMA's sums lie, in one load
        sl: gl.constexpr = scales_layout(BLOCK_N, num_warps)
        rows = gl.minimum(off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, sl)), N - 1)
        steps = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, sl)), 0)
        s_ptrs = s_ptr + gl.expand_dims(gl.multiple_of(rows * stride_sn + first, 4), 1) + steps
        z_ptrs = z_ptr + gl.expand_dims(gl.multiple_of(rows * stride_zn + first, 4), 1) + steps
    elif MAGIC_SUMS:  # the group's scale and zero of each row where the MMA's sums lie
        rows = gl.minimum(off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma)), N - 1)
        s_ptrs = s_ptr + rows * stride_sn + first
        z_ptrs = z_ptr + rows * stride_zn + first
    if MAGIC_SUMS:
        ones = gl.full([BLOCK_N, STEP], 1.0, dtype, a_layout)
    else:
        ones = 0.0  # (not read)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    # four steps an iteration, each with registers of its own that are loaded again (four steps ahead) once its
    # MMA has read them: four steps' codes in flight, and no register copied from one step's to another's
    last = n_steps - 1
    qa, sa, za, xa = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, 0, last, ZERO, BITS, FOUR, X_STEPS)
    qb, sb, zb, xb = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, 1, last, ZERO, BITS, FOUR, X_STEPS)
    qc, sc, zc, xc = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, 2, last, ZERO, BITS, FOUR, X_STEPS)
    qd, sd, zd, xd = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, 3, last, ZERO, BITS, FOUR, X_STEPS)
    sv, zv = _scales_four(s_ptrs, z_ptrs, 0, ZERO, FOUR)
    if X_STEPS > 0:
        _x_ready()
    for j in range(n_steps // 4):
        k = 4 * j
        s0, s1, s2, s3 = _four_steps(sv, FOUR, mma)
        z0, z1, z2, z3 = _four_steps(zv, FOUR, mma)
        sv, zv = _scales_four(s_ptrs, z_ptrs, gl.multiple_of(gl.minimum(k + 4, n_steps - 4), 4), ZERO, FOUR)
        acc = _mma_step(acc, qa, _pick(sa, s0, FOUR), _pick(za, z0, FOUR),
                        _x_words(xa, x_smem, k, X_STEPS, BLOCK_M, num_warps), ones, ZERO, ASM, MAGIC, dtype,
                        a_layout, b_layout, mma, BLOCK_M, BLOCK_N, BITS, MAGIC_SUMS)
        qa, sa, za, xa = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, k + 4, last, ZERO, BITS, FOUR, X_STEPS)
        acc = _mma_step(acc, qb, _pick(sb, s1, FOUR), _pick(zb, z1, FOUR),
                        _x_words(xb, x_smem, k + 1, X_STEPS, BLOCK_M, num_warps), ones, ZERO, ASM, MAGIC, dtype,
                        a_layout, b_layout, mma, BLOCK_M, BLOCK_N, BITS, MAGIC_SUMS)
        qb, sb, zb, xb = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, k + 5, last, ZERO, BITS, FOUR, X_STEPS)
        acc = _mma_step(acc, qc, _pick(sc, s2, FOUR), _pick(zc, z2, FOUR),
                        _x_words(xc, x_smem, k + 2, X_STEPS, BLOCK_M, num_warps), ones, ZERO, ASM, MAGIC, dtype,
                        a_layout, b_layout, mma, BLOCK_M, BLOCK_N, BITS, MAGIC_SUMS)
        qc, sc, zc, xc = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, k + 6, last, ZERO, BITS, FOUR, X_STEPS)
        acc = _mma_step(acc, qd, _pick(sd, s3, FOUR), _pick(zd, z3, FOUR),
                        _x_words(xd, x_smem, k + 3, X_STEPS, BLOCK_M, num_warps), ones, ZERO, ASM, MAGIC, dtype,
                        a_layout, b_layout, mma, BLOCK_M, BLOCK_N, BITS, MAGIC_SUMS)
        qd, sd, zd, xd = _step_operands(q_ptrs, s_ptrs, z_ptrs, x_ptrs, k + 7, last, ZERO, BITS, FOUR, X_STEPS)
    rest = n_steps % 4  # (0 with FOUR: every program's steps come in fours)
    k = n_steps - rest
    if not FOUR:
        if rest > 0:
            acc = _mma_step(acc, qa, sa, za, _x_words(xa, x_smem, k, X_STEPS, BLOCK_M, num_warps), ones, ZERO, ASM,
                            MAGIC, dtype, a_layout, b_layout, mma, BLOCK_M, BLOCK_N, BITS, MAGIC_SUMS)
        if rest > 1:
            acc = _mma_step(acc, qb, sb, zb, _x_words(xb, x_smem, k + 1, X_STEPS, BLOCK_M, num_warps), ones, ZERO,
                            ASM, MAGIC, dtype, a_layout, b_layout, mma, BLOCK_M, BLOCK_N, BITS, MAGIC_SUMS)
        if rest > 2:
            acc = _mma_step(acc, qc, sc, zc, _x_words(xc, x_smem, k + 2, X_STEPS, BLOCK_M, num_warps), ones, ZERO,
                            ASM, MAGIC, dtype, a_layout, b_layout, mma, BLOCK_M, BLOCK_N, BITS, MAGIC_SUMS)
    wgmma._store_sums(acc, mma, y_ptr, b_ptr, y_ptr, s_ptr, off_n, off_m, pid_k, M, N, stride_ym, stride_ys, HAS_BIAS,
                      False, HAS_COL, BLOCK_M, BLOCK_N)


def w4a16_linear(x, qdata, scale, zero, bias, params: dict) -> torch.Tensor:
    """y = x @ w.T + bias for W4A16 g128 codes [N, K/2] (K a multiple of 128) with scales and float zeros [N, K/128]
    of any float dtype (zero None: the integer grid's 8; uint8: integer zero points), applied in fp32; ``params``
    as in the module's docstring."""
    scale, zero = unit_stride(scale, zero)
    z = scale if zero is None else zero
    return _launch(x, qdata, scale, z, qdata.shape[1] * 2, bias, params, bits=4, zero_kind=w4a16.zero_kind(zero),
                   asm=_MAGIC_PAIRS_ASM[x.dtype])


def w8a16_linear(x, qdata, scale, bias, params: dict) -> torch.Tensor:
    """y = (x @ q.T) * scale + bias for int8 codes [N, K] (K a multiple of 128) with a scale a row [N]."""
    (scale,) = unit_stride(scale)
    return _launch(x, qdata, scale, scale, x.shape[1], bias, params, bits=8, zero_kind=2,
                   asm=wgmma._BYTES_ASM[x.dtype], col_scale=True)


def nf4_linear(x, qdata, scales, bias, params: dict) -> torch.Tensor:
    """y = x @ w.T + bias for NF4 codes [N, K/2] (K a multiple of 128) with the scales [N, K/64] of their blocks of
    64 codes in x's dtype (nf4.block_scales_triton)."""
    (scales,) = unit_stride(scales)
    return _launch(x, qdata, scales, scales, qdata.shape[1] * 2, bias, params, bits=4,
                   zero_kind=wgmma.NF4_LEVELS.value, asm=wgmma._LEVELS_ASM[x.dtype])


def _launch(x, qdata, scale, z, kp: int, bias, params: dict, *, bits: int, zero_kind: int, asm: str,
            col_scale: bool = False):
    """The kernel on x (padded to kp columns, its rows read as 32-bit words) and a weight of ``bits``-bit codes:
    the output's buffers, the split of K, the partial sums added up (then the bias) in a fixed order."""
    m, n = x.shape[0], qdata.shape[0]
    block_m, block_n, split = params["BLOCK_M"], params["BLOCK_N"], params["SPLIT_K"]
    steps = kp // BLOCK_K_WGMMA  # (a Python int: STEP is the kernels' constexpr)
    x_steps = mma_x_steps(block_m, -(-steps // split))  # (a tile whose x does not fit is refused before any work)
    if m == 0:
        return torch.zeros(0, n, dtype=x.dtype, device=x.device)
    if x.shape[1] != kp:
        x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
    if x.stride(1) != 1 or x.stride(0) % 2 or x.data_ptr() % 4:  # read as 32-bit words
        x = x.clone(memory_format=torch.contiguous_format)
    y, split, per_split = split_output(m, n, steps, split, x.dtype, x.device)
    # W4A16's scales and zeros four steps a load where every program's steps come in fours and the loads align
    four = params.get("FOUR", True) and bits == 4 and zero_kind != wgmma.NF4_LEVELS.value and per_split % 4 == 0 and \
        steps % 4 == 0 and all(t.stride(0) % 4 == 0 and t.data_ptr() % (4 * t.element_size()) == 0 for t in (scale, z))
    (bias,) = unit_stride(bias)
    words = int32_words(qdata)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    _mma_kernel[grid](x, words, scale, z, y if bias is None else bias, y, m, n, kp, per_split, x.stride(0) // 2,
                      words.stride(0), scale.stride(0), z.stride(0), n, m * n, BITS=bits, ZERO=zero_kind,
                      HAS_BIAS=bias is not None and split == 1, HAS_COL=col_scale, BLOCK_M=block_m, BLOCK_N=block_n,
                      ASM=asm, MAGIC=wgmma._MAGIC[x.dtype], FOUR=four, X_STEPS=x_steps,
                      num_warps=params["num_warps"],
                      **pdl_options(x.device, dict(params)))  # (a copy: the caller's params stay whole)
    return split_total(y, split, bias, x.dtype)
