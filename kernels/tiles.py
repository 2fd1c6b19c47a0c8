"""The pieces every quantized-weight kernel shares: split-K reduction, tiles of y, dot helpers, launch sizing.

A split-K launch runs ``SPLIT_K`` programs along K for each tile of y; each writes an fp32 partial to a workspace
and the last to arrive sums them (``splitk_finish``). GEMV programs own ``BLOCK_N`` outputs of one row of x
(``gemv_rows``, ``gemv_finish``); GEMM programs own a ``BLOCK_M x BLOCK_N`` tile (``gemm_tile``, ``gemm_finish``),
computed as ``x @ w.T`` or, with ``SWAP``, as ``(w @ x.T)`` so the dequantized weight tile is the MMA's left
operand, kept in registers.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import threading

import torch


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
from aofunc.kernels.triton_compat import tl, triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple:
    """A CUDA device's compute capability, (9, 0) for an H100 or H200; (0, 0) for any other device."""
    if device.type != "cuda":
        return (0, 0)
    return _capability(torch.cuda.current_device() if device.index is None else device.index)


def hopper_or_newer(device: torch.device) -> bool:
    """Whether a CUDA device has compute capability 9.0 or more (Hopper's TMA copies, warpgroup MMAs and
    programmatic dependent launches); False for any other device."""
    return capability(device) >= (9, 0)


def unit_stride(*tensors):
    """The tensors as the kernels index them, each with its last dimension at unit stride: a contiguous copy of one
    held otherwise (a column-major scale, a bias that is every other element of a larger tensor), the others (and
    None) as they are. The kernels take the row strides of a weight's tensors, not their element strides."""
    return tuple(t if t is None or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()
                 for t in tensors)


def dequantized_linear(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """F.linear on a dequantized weight, x made row-major and the bias unit-stride first: cuBLAS adds a contiguous
    bias in its epilogue, before the one rounding, and any other bias after the rounded product, and torch's CPU
    GEMM sums a column-major bf16 x in another order, so inputs held in other strides would give other bits."""
    return torch.nn.functional.linear(x.contiguous(), w, *unit_stride(bias))


def pairs_transposed(x: torch.Tensor, kp: int, rows: int, cols: int) -> torch.Tensor:
    """x [M, K] zero-padded to kp columns and, within every block of 2 * rows * cols columns, its pairs of
    consecutive columns read as a [rows, cols] grid and written as its transpose, in a new contiguous tensor. The
    fragment orders of the GEMM tiles are such transposes (W4A16: 4 x 4 pairs, W8A16: 4 x 2), so a tile that reads
    x copied this way takes its columns in its own order, in 16-byte loads, with no gather (config PERMUTE_X)."""
    m, k = x.shape
    out = torch.empty(m, kp, dtype=x.dtype, device=x.device)
    if m == 0:
        return out  # (an empty x may keep strides that no view of pairs accepts)
    padded = torch.nn.functional.pad(x, (0, kp - k)) if kp != k else x.contiguous()
    unit = torch.int32 if x.element_size() == 2 else torch.int64  # a pair of columns, one element
    blocks = kp // (2 * rows * cols)
    out.view(unit).view(m, blocks, cols, rows).copy_(padded.view(unit).view(m, blocks, rows, cols).transpose(2, 3))
    return out


def fragment_ordered_x(x: torch.Tensor, kp: int) -> torch.Tensor:
    """x [M, K] zero-padded to kp columns (a multiple of 32) and permuted within every 32 columns into the order of
    nibble_fragments, a copy: the column order in which a GATHER_X tile of 4-bit codes in column order multiplies x
    (pairs of columns as a 4 x 4 transpose)."""
    return pairs_transposed(x, kp, 4, 4)


def fragment_tile_fits(config: dict) -> bool:
    """False for a fragment-ordered GEMM tile (GATHER_X) with less than one 16 x 8 tensor-core tile a warp
    (BLOCK_N * BLOCK_M < 128 * num_warps): Triton then lays copies of the tile over the warps, and on an H200 the
    fragment-ordered forms sum the wrong codes there (16 x 16 on 4 warps: relative error 0.9)."""
    return not config.get("GATHER_X") or config["BLOCK_N"] * config["BLOCK_M"] >= 128 * config.get("num_warps", 4)


def check_fragment_tile(config: dict) -> None:
    """Raise ValueError for a configuration that fragment_tile_fits refuses, when compiled for a GPU."""
    if not interpreting() and not fragment_tile_fits(config):
        raise ValueError(f"a GATHER_X tile needs BLOCK_N * BLOCK_M >= 128 * num_warps (a 16 x 8 tensor-core tile "
                         f"a warp), got {config['BLOCK_N']} x {config['BLOCK_M']} on {config.get('num_warps', 4)} "
                         f"warps")


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 for CPU tensors under the interpreter)."""
    return _sm_count(device) if device.type == "cuda" else 4


def pdl_options(device: torch.device, params: dict | None = None) -> dict:
    """The launch options that make a kernel calling follow_previous first a programmatic dependent launch: it
    launches once the programs of the kernel before it on the stream have all ended, and waits at follow_previous
    for that kernel's writes (compute capability 9.0 and up; nothing elsewhere, nor in the interpreter). A
    configuration's ``PDL`` (taken out of ``params``; default True) set False launches plainly, for comparison.

    On an H200 in a CUDA graph, W8A8's int8 GEMM after the quantization kernel saved 0.4 to 1.2 µs of 11 to 44;
    letting it launch earlier still (the quantization kernel calling griddepcontrol.launch_dependents as it starts)
    lost up to 7 µs, its programs then waiting on the multiprocessors while the quantization ran."""
    wanted = params.pop("PDL", True) if params is not None else True
    if not wanted or interpreting() or not hopper_or_newer(device):
        return {}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def follow_previous(PDL: tl.constexpr):
    """With PDL (the kernel launched with pdl_options): wait until the kernel before it on the stream is done and its
    writes are visible. A kernel calls it first, before it reads or writes any tensor."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def splitk_total(acc, offs, mask, ws_ptr, cnt_ptr, tile, pid_k, ws_stride, split_k):
    """(last, total) for one of a tile's split_k programs: this split's partial ``acc`` is written at
    ``ws_ptr + pid_k * ws_stride + offs`` and counted in ``cnt_ptr[tile]`` (zero before the launch); the program
    that arrives last gets last = True and the sum of all partials, in acc's dtype (int32 partials sum exactly), and
    sets the counter back to zero for the next launch (ArrivalCounters). Every one of a tile's split_k programs
    calls it once. ``acc`` may be of any shape, with offsets and mask of the same shape."""
    tl.store(ws_ptr + pid_k * ws_stride + offs, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == split_k - 1
    if last:
        tl.store(cnt_ptr + tile, 0)  # no other program of the launch counts in it again
        acc = tl.load(ws_ptr + offs, mask=mask, other=0, cache_modifier=".cg")
        for s in range(1, split_k):
            acc += tl.load(ws_ptr + s * ws_stride + offs, mask=mask, other=0, cache_modifier=".cg")
    return last, acc


@triton.jit
def splitk_finish(acc, offs, mask, offs_bias, b_ptr, y_ptr, ws_ptr, cnt_ptr, tile, pid_k, ws_stride, split_k,
                  SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store acc (+ bias) at y_ptr + offs; with SPLIT the last of a tile's split_k programs sums the fp32 partials
    (splitk_total) and stores."""
    last = True
    if SPLIT:
        last, acc = splitk_total(acc, offs, mask, ws_ptr, cnt_ptr, tile, pid_k, ws_stride, split_k)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_bias, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemv_rows(N, BLOCK_N: tl.constexpr):
    """This GEMV program's rows of w: offs_n, and ``rows`` (offs_n clamped to N - 1: rows past N repeat row
    N - 1 and are never stored, so loops need no masks)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, tl.minimum(offs_n, N - 1)


@triton.jit
def load_x(x_row, k, stride_xk, K, EVEN_K: tl.constexpr):
    """x_row[k] in fp32 for a tensor of column indices k; columns past K read 0 unless EVEN_K says none are."""
    if EVEN_K:
        return tl.load(x_row + k * stride_xk).to(tl.float32)
    else:
        return tl.load(x_row + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def gemv_accumulator(BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr, REDUCE_W: tl.constexpr):
    """A GEMV program's zeroed fp32 accumulator: one value per row and group of a step with REDUCE_W, else one per
    row, group and word."""
    if REDUCE_W:
        return tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    else:
        return tl.zeros([BLOCK_N, GROUPS, WORDS], dtype=tl.float32)


@triton.jit
def gemv_finish(y, offs_n, row, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k, SPLIT: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """Store this GEMV program's [BLOCK_N] outputs y (+ bias) in row ``row`` of x's output, through the split-K
    workspace with SPLIT (a tile per row of x and block of outputs)."""
    tile = row * tl.num_programs(0) + tl.program_id(0)
    splitk_finish(y, offs_n, offs_n < N, offs_n, b_ptr, y_ptr + row * stride_ym, ws_ptr + row * N, cnt_ptr,
                  tile, tl.program_id(2), M * N, split_k, SPLIT, HAS_BIAS)


def gemv_launch(x: torch.Tensor, n: int, params: dict, x_rows: int = 1, partials: torch.dtype = torch.float32):
    """(y [M, N] in x's dtype, grid, split, workspace, counters) of a GEMV launch: a program per ``x_rows`` rows of
    x and BLOCK_N outputs, split K ways (SPLIT_K, taken out of ``params``), split partial sums in ``partials``."""
    split = params.pop("SPLIT_K")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, params["BLOCK_N"]), triton.cdiv(m, x_rows), split)
    return (y, grid, split) + splitk_buffers(y, split, grid[0] * m, partials)


def int32_words(t: torch.Tensor) -> torch.Tensor:
    """int8/uint8 ``t`` [..., K] as int32 words of 4 bytes of a row, rows zero-padded to a multiple of 4 bytes (a
    copy only then, or when ``t`` is not contiguous or does not start on a word)."""
    k = t.shape[-1]
    if k % 4:
        t = torch.nn.functional.pad(t, (0, 4 - k % 4))
    if t.storage_offset() % 4:
        t = t.clone()
    return t.contiguous().view(torch.int32)


def splitk_buffers(y: torch.Tensor, split: int, tiles: int, dtype: torch.dtype = torch.float32):
    """(workspace [split, M, N] of partial sums in ``dtype``, zeroed arrival counters for ``tiles`` tiles) of a
    split-K launch writing y, or (y, y) as unused placeholders when split == 1. The workspace is this call's; the
    counters are ARRIVALS's (see there), which the launch leaves zeroed."""
    if split == 1:
        return y, y
    m, n = y.shape
    return torch.empty(split, m, n, dtype=dtype, device=y.device), ARRIVALS.take(y.device, tiles)


class ArrivalCounters:
    """Split-K arrival counters that stay zeroed between launches, so that a launch needs no zeroing of its own.

    splitk_total's last program of a tile sets the tile's counter back to 0, so every counter a launch took is zero
    again when it ends; on an H200 a zeroing of its own cost a split-K launch 1.1 to 1.8 µs in a CUDA graph (a node
    of its own), 8 to 12 % of the small shapes' times. Two launches must never count in the same counters at the
    same time, so:
    - an eager launch (and the interpreter's) takes the counters of its stream, kept for that stream: launches on
      one stream run one after another, launches on different streams never share;
    - a launch recorded into a CUDA graph takes counters no other launch ever takes, from a block set aside the
      first time a split-K launch ran eagerly on the device (the graph may be replayed on any stream, at any time,
      for as long as it lives); where there is no such block yet or it is used up, the graph gets counters zeroed
      by a node of its own, as every launch did before.
    """

    BLOCK = 1 << 16  # counters set aside for graphs, a device
    REGION = 1 << 10  # the fewest counters a stream is given

    def __init__(self):
        self._lock = threading.Lock()
        self._regions: dict = {}  # (device, stream handle or None) -> int32 counters, zero between launches
        self._blocks: dict = {}  # device -> [int32 counters, first never taken]

    def take(self, device: torch.device, tiles: int) -> torch.Tensor:
        """``tiles`` int32 counters, zero, for one launch on the current stream of ``device``."""
        cuda = device.type == "cuda"
        if cuda and torch.cuda.is_current_stream_capturing():
            with self._lock:
                block = self._blocks.get(device)
                if block is None or block[1] + tiles > block[0].numel():
                    return torch.zeros(tiles, dtype=torch.int32, device=device)
                first = block[1]
                block[1] += tiles
                return block[0][first:first + tiles]
        stream = torch.cuda.current_stream(device).cuda_stream if cuda else None
        with self._lock:
            if cuda and device not in self._blocks:
                self._blocks[device] = [torch.zeros(self.BLOCK, dtype=torch.int32, device=device), 0]
            region = self._regions.get((device, stream))
            if region is None or region.numel() < tiles:
                # the old region (if any) goes back to the allocator in stream order, after the launches using it
                region = torch.zeros(max(tiles, self.REGION), dtype=torch.int32, device=device)
                self._regions[(device, stream)] = region
        return region[:tiles]


ARRIVALS = ArrivalCounters()


SPLIT_SUM_ELEMENTS = 2 ** 31  # the largest workspace split_sum's kernel indexes, plus one


@triton.jit
def _split_sum_kernel(ws_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = False):
    """y = (ws[0] + ws[1] + ... + ws[SPLIT - 1] + bias) in y's dtype, over BLOCK of y's M * N elements."""
    follow_previous(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        total += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=mask)


def split_sum(ws: torch.Tensor, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """The fp32 partial sums ws [split, M, N] of a split-K launch added in the order of their splits, then the bias
    [N] (any float dtype, unit stride) in fp32, rounded once to out_dtype: one kernel, where adding and rounding
    in torch takes two to four."""
    split, m, n = ws.shape
    if ws.numel() >= SPLIT_SUM_ELEMENTS:  # past the kernel's 32-bit offsets: the same sums and order, in torch
        total = ws[0].clone()
        for s in range(1, split):
            total += ws[s]
        return (total if bias is None else total + bias.float()).to(out_dtype)
    y = torch.empty(m, n, dtype=out_dtype, device=ws.device)
    if m * n == 0:
        return y
    block = 1024
    _split_sum_kernel[(triton.cdiv(m * n, block),)](ws, y if bias is None else bias, y, m * n, n, SPLIT=split,
                                                  HAS_BIAS=bias is not None, BLOCK=block, **pdl_options(ws.device))
    return y


def split_output(m: int, n: int, steps: int, split: int, out_dtype, device):
    """(y, split, steps a split) for ``steps`` steps of K over ``split`` programs a tile (fewer where the steps run
    out): y [M, N] in out_dtype without a split, else the fp32 partial sums [split, M, N]."""
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    if split == 1:
        return torch.empty(m, n, dtype=out_dtype, device=device), split, per_split
    return torch.empty(split, m, n, dtype=torch.float32, device=device), split, per_split


def split_total(y, split: int, bias, out_dtype):
    """split_output's y as the output: the partial sums added in a fixed order, then the bias, in out_dtype (the
    kernels add the bias themselves without a split)."""
    return y if split == 1 else split_sum(y, bias, out_dtype)


@triton.jit
def interleave8(c0, c1, c2, c3, c4, c5, c6, c7, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """[ROWS, 8 * WORDS] tile whose column 8w + j is cj[:, w], from eight [ROWS, WORDS] tiles (one per code j)."""
    # tl.join appends its choice as the last axis, so pair codes j and j + 4 first: t[..., a, b, c] = code 4a+2b+c.
    c04 = tl.join(c0, c4)
    c15 = tl.join(c1, c5)
    c26 = tl.join(c2, c6)
    c37 = tl.join(c3, c7)
    return tl.reshape(tl.join(tl.join(c04, c26), tl.join(c15, c37)), (ROWS, 8 * WORDS))




@triton.jit
def fragment_columns(COLUMNS: tl.constexpr):
    """The column of x that each column c of a nibble_fragments tile multiplies: 8w + j for code j = (c4 c3 c0) of
    word w = (c >> 5, c2 c1) in binary. Written with // and % so the compiler sees pairs of consecutive columns,
    which it copies to shared memory 4 bytes at a time in the software pipeline."""
    return fragment_column_of(tl.arange(0, COLUMNS))


@triton.jit
def fragment_column_of(c):
    """fragment_columns for any tensor of column indices: a permutation within every 32 columns that is its own
    inverse (it swaps bits 1 and 3 and bits 2 and 4 of the index), so it also maps a stored position of codes in
    fragment order (w4a16.prepack_fragments) back to its column."""
    return 32 * (c // 32) + 8 * ((c // 2) % 4) + 4 * ((c // 16) % 2) + 2 * ((c // 8) % 2) + c % 2


@triton.jit
def nibble_fragments(t, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """The [ROWS, 8 * WORDS] tile of t[r, w, j0, j1, j2] (code j = 4 j2 + 2 j1 + j0 of word w, 4-bit codes packed
    eight to an int32 word), its columns in fragment order (fragment_columns) rather than in x's order.

    In that order the eight codes of a word land in the registers of the one thread whose share of Hopper's MMA
    left operand they are (column bits 0, 3 and 4 are register bits of that operand, bits 1 and 2 lane bits), so
    the tile goes from the loaded words to the tensor cores without a round trip through shared memory, which the
    x-ordered tile takes (SASS of the sm_90 build: 8 STS and 8 LDSM a step, none in this order). WORDS >= 4.
    """
    t = tl.reshape(t, (ROWS, WORDS // 4, 4, 2, 2, 2))  # r, w >> 2, w & 3, j0, j1, j2
    return tl.reshape(tl.permute(t, (0, 1, 5, 4, 2, 3)), (ROWS, 8 * WORDS))


@triton.jit
def word_pairs_fragments(q, dtype: tl.constexpr, ASM_FP16: tl.constexpr, ASM_BF16: tl.constexpr, ROWS: tl.constexpr,
                         WORDS: tl.constexpr):
    """The [ROWS, 8 * WORDS] tile in ``dtype`` (fp16 or bf16) and in fragment order (nibble_fragments) from inline
    PTX that writes, for an int32 word ($4), four registers $0..$3 of two 16-bit values each: $b the values of code
    2b in its low half and code 2b + 1 in its high half (ASM_FP16 or ASM_BF16 by dtype; CUDA only)."""
    q2 = tl.join(q, q)
    if dtype == tl.float16:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(ASM_FP16, "=r,=r,=r,=r,r,r", [q2],
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=2)
    else:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(ASM_BF16, "=r,=r,=r,=r,r,r", [q2],
                                                   dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                                   is_pure=True, pack=2)
    # bj[r, w, j0] = code 2j + j0 of word w; tl.join appends its choice as the last axis: t[r, w, j0, j1, j2]
    return nibble_fragments(tl.join(tl.join(b0, b1), tl.join(b2, b3)), ROWS, WORDS)


@triton.jit
def split_by_code(xt, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """The eight [ROWS, WORDS] tiles xt[:, 8w + j], j = 0..7, of a [ROWS, 8 * WORDS] tile (interleave8 undone)."""
    t = tl.reshape(xt, (ROWS, WORDS, 2, 2, 2))  # t[r, w, a, b, c] = xt[r, 8w + 4a + 2b + c]
    c0, c1 = tl.split(t)
    b00, b01 = tl.split(c0)
    b10, b11 = tl.split(c1)
    x0, x4 = tl.split(b00)
    x2, x6 = tl.split(b01)
    x1, x5 = tl.split(b10)
    x3, x7 = tl.split(b11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def dot_acc(acc, w, xt, SWAP: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + w @ xt.T with SWAP (the weight tile is the left operand, kept in registers), else acc + xt @ w.T.

    DOT_FP32: fp32 operands with IEEE products (fp32 x, and the interpreter); else in xt's dtype.
    """
    if DOT_FP32:
        if SWAP:
            return tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")
        else:
            return tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        if SWAP:
            return tl.dot(w.to(xt.dtype), tl.trans(xt), acc)
        else:
            return tl.dot(xt, tl.trans(w.to(xt.dtype)), acc)


@triton.jit
def dot_tile_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """A zeroed fp32 accumulator of a dot_acc chain: [BLOCK_N, BLOCK_M] with SWAP, else [BLOCK_M, BLOCK_N]."""
    if SWAP:
        return tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        return tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share each column tile while it sits in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_FAST: tl.constexpr):
    """This program's tile of y [M, N]: rows of x (offs_m) and their mask, and rows of w (offs_n, and ``rows``:
    offs_n clamped to N - 1, so rows past N repeat row N - 1 and are never stored).

    Program axis 0 runs over tiles of N, axis 1 over tiles of M; M_FAST swaps them, so the programs that share
    one tile of the weight run together and read it from L2 (large M).
    """
    if M_FAST:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_m < M, offs_n, tl.minimum(offs_n, N - 1)


@triton.jit
def scaled_rows(acc, s_ptr, rows, SWAP: tl.constexpr):
    """acc times the per-row scales of w, in acc's orientation."""
    s = tl.load(s_ptr + rows).to(tl.float32)
    if SWAP:
        return acc * s[:, None]
    else:
        return acc * s[None, :]


@triton.jit
def gemm_finish(acc, offs_m, m_mask, offs_n, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, split_k,
                SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr):
    """Store the tile ``acc`` (+ bias) of gemm_tile's tile of a dense y [M, N] (stride_ym == N), through the
    split-K workspace with SPLIT (it shares y's offsets). ``acc`` is [BLOCK_N, BLOCK_M] (y transposed) with SWAP,
    else [BLOCK_M, BLOCK_N]: the store follows the accumulator's orientation, so no tile is ever transposed."""
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if SWAP:
        offs_y = offs_m[None, :] * stride_ym + offs_n[:, None]
        mask_y = m_mask[None, :] & (offs_n < N)[:, None]
        offs_b = offs_n[:, None] + 0 * offs_m[None, :]
    else:
        offs_y = offs_m[:, None] * stride_ym + offs_n[None, :]
        mask_y = m_mask[:, None] & (offs_n < N)[None, :]
        offs_b = offs_n[None, :] + 0 * offs_m[:, None]
    splitk_finish(acc, offs_y, mask_y, offs_b, b_ptr, y_ptr, ws_ptr, cnt_ptr, tile, tl.program_id(2), M * N, split_k,
                  SPLIT, HAS_BIAS)




@triton.jit
def expert_rows(offs_ptr, E, S, BLOCK_M: tl.constexpr):
    """This program's rows of a grouped product whose rows of x are sorted by expert: offs_ptr[e] is the end of
    expert e's rows (torch._grouped_mm's convention, rows past the last end belong to no expert), and program axis 1
    numbers the BLOCK_M-row tiles of every expert in turn (an expert with no rows has none).

    Returns (expert, offs_m, m_mask, valid). A program past the last tile gets valid False, no rows, and expert
    E - 1, so that pointers computed from it stay inside the stack. Ends are clamped to [0, S] and to the previous
    end, so malformed offsets cannot make a program read or write outside x and y.
    """
    tile = tl.program_id(1)
    seen = tile * 0  # tiles of the experts before e
    start = tile * 0
    expert = tile * 0 + E
    row0 = tile * 0
    row1 = tile * 0
    for e in range(E):
        end = tl.maximum(tl.minimum(tl.load(offs_ptr + e), S), start)
        tiles = tl.cdiv(end - start, BLOCK_M)
        mine = (tile >= seen) & (tile < seen + tiles)
        expert = tl.where(mine, e, expert)
        row0 = tl.where(mine, start + (tile - seen) * BLOCK_M, row0)
        row1 = tl.where(mine, end, row1)
        seen += tiles
        start = end
    offs_m = row0 + tl.arange(0, BLOCK_M)
    return tl.minimum(expert, E - 1), offs_m, offs_m < row1, expert < E  # no tile: row0 = row1 = 0


@triton.jit
def row_expert(offs_ptr, E, S, row):
    """The expert whose rows of a grouped product hold ``row`` (ends offs_ptr[e], clamped as expert_rows clamps
    them), as an index that stays inside the stack, and whether any expert holds it (rows past the last end: no)."""
    expert = row * 0 + E
    start = row * 0
    for e in range(E):
        end = tl.maximum(tl.minimum(tl.load(offs_ptr + e), S), start)
        expert = tl.where((row >= start) & (row < end), e, expert)
        start = end
    return tl.minimum(expert, E - 1), expert < E


def check_offsets(offs: torch.Tensor, experts: int, x: torch.Tensor) -> None:
    """Raise ValueError unless offs is a 1-D integer tensor of one end offset per expert on x's device. Its values
    are not read here (that would wait for the device); the kernels clamp them to the rows of x."""
    if offs.dim() != 1 or offs.numel() != experts or offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offs must be an int32 tensor of {experts} end offsets (one per expert), got "
                         f"{offs.dtype} of shape {tuple(offs.shape)}")
    if offs.device != x.device:
        raise ValueError(f"offs is on {offs.device} but x is on {x.device}")


def grouped_grid(s: int, experts: int, n: int, config: dict, split: int) -> tuple[int, int, int]:
    """The launch grid of a grouped product of s sorted rows over `experts` experts: tiles of N, an upper bound on
    the BLOCK_M-row tiles of all experts (each expert's last tile may be partial: at most one more each), and
    splits of K."""
    return triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(s, config["BLOCK_M"]) + experts, split


def grouped_by_rows(s: int, experts: int) -> bool:
    """Whether a grouped product of s rows over ``experts`` experts runs the GEMV kernel, a program per row through
    its expert: up to a row an expert on average (decode), where tiles of 16 rows would be mostly padding."""
    return s <= experts


def grouped_split_k(s: int, experts: int, n_tiles: int, block_m: int, n_steps: int, device: torch.device) -> int:
    """Splits of K for a grouped product, sized as split_k sizes them for its busy tiles: the host does not read
    the offsets, so few rows (decode) count as one tile for each of up to s experts, many as s / BLOCK_M tiles."""
    busy = n_tiles * max(min(s, experts), triton.cdiv(s, block_m))
    return split_k(busy, n_steps, device)


def gemm_grid(m: int, n: int, config: dict, split: int) -> tuple[int, int, int]:
    """The launch grid of a GEMM configuration: tiles of N, tiles of M (swapped with M_FAST) and splits of K."""
    n_tiles, m_tiles = triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"])
    return (m_tiles, n_tiles, split) if config.get("M_FAST") else (n_tiles, m_tiles, split)


def pow2_at_most(n: int) -> int:
    """The largest power of two <= n (n >= 1): block shapes in Triton are powers of two."""
    return 1 << (n.bit_length() - 1)


def split_k(programs: int, n_steps: int, device: torch.device) -> int:
    """Splits of K so that about two programs run per multiprocessor, each with at least two steps of K."""
    want = max(1, (2 * sm_count(device)) // max(programs, 1))
    return max(1, min(want, n_steps // 2, 16))


def gemv_split_k(programs: int, n_steps: int, device: torch.device) -> int:
    """Splits of K for a GEMV of small programs: about six per multiprocessor, each with at least two steps."""
    return max(1, min((6 * sm_count(device)) // max(programs, 1), n_steps // 2, 8))




def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed against the fp32 twin: the output rounding, plus x rounded to its dtype in tl.dot."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


# the wgmma path's depth of K a step (kernels/wgmma.py): 128 codes, one group of W4A16's g128
BLOCK_K_WGMMA = 128


def wgmma_runs(device: torch.device) -> bool:
    """Whether the ``wgmma`` path (kernels/wgmma.py) can run on ``device``: a Hopper GPU (compute capability 9.x)
    and a Triton with Gluon (3.6 and later)."""
    return not interpreting() and capability(device)[0] == 9 and _gluon_ready()


def wgmma_device_refusal(device: torch.device) -> str | None:
    """Why the ``wgmma`` path cannot run on ``device``, or None where wgmma_runs."""
    if not wgmma_runs(device):
        return f"the wgmma path needs a Hopper GPU (compute capability 9.x) and Triton's Gluon; x is on {device}"
    return None


def wgmma_x_refusal(x: torch.Tensor) -> str | None:
    """Why the ``wgmma`` path cannot take this x whatever the weight's format, or None: it takes fp16 or bf16 x on
    a device where wgmma_runs."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the wgmma path takes fp16 or bf16 x, got {x.dtype}"
    return wgmma_device_refusal(x.device)


def mma_runs(device: torch.device) -> bool:
    """Whether the ``mma`` path (kernels/mma.py: Gluon, the warp-level m16n8k16 MMA) can run on ``device``: a GPU of
    compute capability 8.0 or later (A100, H100, ...) and a Triton with Gluon (3.6 and later)."""
    return not interpreting() and capability(device) >= (8, 0) and _gluon_ready()


def mma_x_refusal(x: torch.Tensor) -> str | None:
    """Why the ``mma`` path cannot take this x whatever the weight's format, or None: at most MMA_ROWS rows of fp16
    or bf16 x on a device where mma_runs."""
    if x.shape[0] > MMA_ROWS:
        return f"the mma path takes at most {MMA_ROWS} rows of x, got {x.shape[0]}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the mma path takes fp16 or bf16 x, got {x.dtype}"
    if not mma_runs(x.device):
        return (f"the mma path needs a GPU of compute capability 8.0 or later and Triton's Gluon; x is on "
                f"{x.device}")
    return None


# the most rows of x the mma path takes: 8 with x's rows in registers (one m16n8k16 MMA's 8 columns), 16 or 32 with
# the program's steps of x in shared memory
MMA_ROWS = 32
# the most shared memory a program of the mma path gives x: three programs a multiprocessor of compute capability 9.0
# (228 KB), two of 8.0 (164 KB)
MMA_SHARED_X_BYTES = 64 * 1024


def _mma_x_bytes(block_m: int, steps: int) -> int:
    """The shared memory that x takes in a program of the ``mma`` path with 16 or 32 rows of x and ``steps`` steps
    of K (held as _mma_held_steps)."""
    return _mma_held_steps(steps) * block_m * BLOCK_K_WGMMA * 2


def _mma_held_steps(steps: int) -> int:
    """The steps of x a program of the ``mma`` path holds in shared memory for ``steps`` steps of K: a power of
    two, at least 2."""
    return max(2, triton.next_power_of_2(steps))


def mma_x_steps(block_m: int, steps: int) -> int:
    """The steps of x that a program of the ``mma`` path with ``block_m`` rows of x and ``steps`` steps of K holds in
    shared memory: 0 for 8 rows (x's words loaded with the codes, into registers), else _mma_held_steps."""
    if block_m not in (8, 16, 32):
        raise ValueError(f"the mma path takes tiles of 8, 16 or 32 rows of x, got BLOCK_M={block_m}")
    if block_m == 8:
        return 0
    if _mma_x_bytes(block_m, steps) > MMA_SHARED_X_BYTES:
        raise ValueError(f"the mma path holds a program's {steps} steps of {block_m} rows of x in shared memory, "
                         f"{_mma_x_bytes(block_m, steps)} bytes, over its {MMA_SHARED_X_BYTES}: split K further "
                         f"(SPLIT_K)")
    return _mma_held_steps(steps)


def mma_configs(m: int, n: int, k: int) -> list[dict]:
    """The ``mma`` path's search space for m <= MMA_ROWS rows of x, n rows of w and k columns: 16 or 32 rows of w a
    warp on 1 to 8 warps, splits of K (one-warp programs won some H200 keys: 4096 x 14336 at 8 rows of W4A16, 18.4
    us against 19.6 for the best of 2-8 warps); from 9 rows, tiles of 16 or 32 rows of x whose steps of x fit in
    shared memory (mma_x_steps)."""
    block_m = 8 if m <= 8 else triton.next_power_of_2(m)
    steps = triton.cdiv(k, BLOCK_K_WGMMA)
    most_ways = 8 if block_m == 8 else 16  # the largest split of K the search tries
    # besides the powers of two, the splits that leave every program a multiple of four steps, so that W4A16's
    # scales come four steps a load (K x N = 14336 x 4096 at 16 rows of x on an H200: 23.0 us with K split 14 ways,
    # 23.9 split 16 ways)
    fours = {steps // per for per in (4, 8, 16) if steps % per == 0 and steps // per <= most_ways}
    splits = sorted({1, 2, 4, 8, most_ways} | fours)
    out = []
    for block_n, warps in ((16, 1), (32, 1), (32, 2), (64, 2), (64, 4), (128, 4), (256, 8)):
        for split in splits:
            if block_m > 8 and _mma_x_bytes(block_m, triton.cdiv(steps, split)) > MMA_SHARED_X_BYTES:
                continue
            if split == 1 or triton.cdiv(n, block_n) * split <= 4096:
                out.append(dict(path="mma", BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, num_warps=warps))
    return out


@functools.cache
def _gluon_ready() -> bool:
    """Whether Triton has the Gluon the wgmma kernel is written against (3.6 and later: its API before differs);
    asked once, as every launch on the path asks."""
    try:
        if importlib.util.find_spec("triton.experimental.gluon") is None:
            return False
    except ImportError:  # no Triton at all
        return False
    import triton as real  # the kernels are about to run: Triton is imported by then anyway

    return tuple(int(part) for part in real.__version__.split(".")[:2]) >= (3, 6)


def mma_in_flight() -> bool:
    """Whether the wgmma kernel may keep one MMA in flight while it builds the next step's tile in registers: only
    when the assembler Triton runs for sm_90 is CUDA 13.3's or later. Earlier ones (Triton 3.6 bundles CUDA 12.8's)
    can hand the registers of an MMA still reading them to later instructions, so the kernel then waits for each
    MMA first. ``TRITON_PTXAS_PATH`` names the assembler Triton runs (a CUDA 13.3+ ``ptxas``, such as the one in
    the ``nvidia-cuda-nvcc`` wheel for CUDA 13); asked at each call, as Triton asks at each compile."""
    import triton as real

    knobs = getattr(real, "knobs", None)  # Triton 3.4 and later
    tool = None if knobs is None else knobs.nvidia.ptxas
    return tool is not None and tuple(int(part) for part in tool.version.split(".")[:2]) >= (13, 3)


def wgmma_configs(m: int, n: int) -> list[dict]:
    """The ``wgmma`` path's search space for m rows of x and n of w: tiles of 64 to 256 rows of x on one or two
    warpgroups, two or three stages of x, the weight tile in registers or through shared memory, splits of K; with
    an assembler that allows it (mma_in_flight), also the tile in registers with one MMA kept in flight; and two
    warpgroups DECOUPLED (kernels/wgmma.py), 128 or 256 rows of w, two to four stages."""
    forms = [(False, False), (True, False)] + ([(False, True)] if mma_in_flight() else [])
    out = []
    rows = max(64, triton.next_power_of_2(m))
    for block_m in [b for b in (64, 128, 256) if b <= rows]:
        for block_n, warps in ((64, 4), (128, 4), (128, 8)):
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            for split in (1, 2, 4, 8):
                if split > 1 and tiles * split > 1024:
                    continue
                for stages in (2, 3):
                    for shared, in_flight in forms:
                        if block_m * BLOCK_K_WGMMA * 2 * stages + shared * 2 * block_n * BLOCK_K_WGMMA * 2 > 200_000:
                            continue
                        out.append(dict(path="wgmma", BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                                        SPLIT_K=split, A_SHARED=shared, num_warps=warps,
                                        **({"IN_FLIGHT": True} if in_flight else {})))
        # two warpgroups of 4 warps on half the rows of w each, decoupled (each in a partition of its own)
        for block_n in (128, 256):
            if block_m == 256 and block_n == 256:  # 128 fp32 sums a thread and more: spills
                continue
            tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
            for split in (1, 2, 4, 8):
                for stages in (2, 3, 4):
                    if (split > 1 and tiles * split > 1024) or block_m * BLOCK_K_WGMMA * 2 * stages > 200_000:
                        continue
                    out.append(dict(path="wgmma", BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, SPLIT_K=split,
                                    A_SHARED=False, DECOUPLED=True, num_warps=4))
    return out
