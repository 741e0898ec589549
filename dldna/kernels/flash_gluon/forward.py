"""The FA3-style causal (sliding-window) forward in Gluon: warp-specialised, Hopper only (``sm_90a``).

Gluon (``triton.experimental.gluon``) is Triton's lower-level dialect, where the kernel itself lays out warps,
shared memory, barriers and asynchronous tensor-core calls. The Triton forward (``flash_triton._attn_fwd``) is one
program that waits on each tile's matmul before its softmax; Triton 3.6 has no pass that overlaps them on NVIDIA
GPUs. FlashAttention-3 (Shah et al. 2024) gets past FlashAttention-2 on Hopper with what this kernel writes by hand:
- warp specialisation: one loader warpgroup issues the TMA copies of K and V into a ring of shared memory (mbarriers
  for full and empty slots) while two consumer warpgroups, 64 query rows each, run the matmuls and the softmax; the
  loader gives its registers to the consumers (``setmaxnreg``), so each keeps its scores and output in registers;
- (``overlap``) the overlap inside a consumer: the score matmul of key tile j is issued, then the P @ V matmul of
  tile j-1, and the softmax of tile j runs while that second matmul is still in flight;
- (``consumers=3``, D = 64) 192-row blocks, as FA3 does at that head_dim; (``persistent``) one program per SM that
  takes its tiles in mirrored waves or from a queue (an atomic counter) and loads the next tile's Q and K/V while it
  finishes the last.

With ``window`` the same kernel runs the causal sliding window (query i sees keys i - window < j <= i): the key
tiles before the block's first key are skipped and only the edge tiles are masked. It returns ``(out, lse)`` as
``flash_triton.attention_forward`` does, so either backward can follow.

On CPU tensors the kernel runs in ``dldna.kernels.gluon_emulator`` (Triton's interpreter cannot run Gluon), which is
how the CPU CI tests it (``tests/test_gluon_emulator.py``). Limits: bf16, causal (optionally windowed),
``N % 128 == 0``, D in {64, 128}, as many K/V heads as query heads. The experiments that chose these variants:
``benchmarks/experiments/gluon_fa3_forward.py`` and its section of ``benchmarks/experiments/README.md``.
"""
import functools
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from dldna.kernels.gluon_emulator import run

LOG2E = gl.constexpr(1.4426950408889634)
ROWS = gl.constexpr(64)  # query rows per consumer warpgroup: one wgmma is 64 rows tall
BLOCK_M = gl.constexpr(128)  # query rows per program: two consumer warpgroups
BLOCK_N = gl.constexpr(128)  # keys per tile
REGS_CONSUMER = gl.constexpr(240)  # setmaxnreg per thread: 2 x 128 x 240 + 128 x 24 <= 64k registers
REGS_LOADER = gl.constexpr(24)
MAXNREG = 168  # at launch all 384 threads share the register file: 65536 / 384 = 170, rounded down to 8
# With three consumers (192 query rows per program, D = 64 only, as FlashAttention-3 does at that head_dim):
REGS_CONSUMER_3 = gl.constexpr(160)  # 3 x 128 x 160 + 128 x 24 <= 64k
MAXNREG_3 = 128  # 65536 / 512 threads


@gluon.jit
def _query_block():
    """This program's query block on a 2-D grid ``(blocks, B * H)``: the last (longest under a causal mask) first."""
    return gl.num_programs(0) - 1 - gl.program_id(0)


@gluon.jit
def _block_and_head(tile, n_ctx, order, BLOCK_Q: gl.constexpr):
    """``(pid_m, bh)`` of ``tile`` (``0 .. cdiv(N, BLOCK_Q) * B * H``) in the order of dldna's ``_tile``; ``order``
    is ``(B * H, heads_per_chunk)``. Heads a chunk at a time, inside a chunk every head's last (heaviest under a causal
    mask) block, then every head's next one; ``heads_per_chunk = 1`` is head by head, as ``_query_block``'s grid."""
    n_bh, heads_per_chunk = order
    n_blocks = gl.cdiv(n_ctx, BLOCK_Q)
    per_chunk = heads_per_chunk * n_blocks
    chunk = tile // per_chunk
    heads_here = gl.minimum(heads_per_chunk, n_bh - chunk * heads_per_chunk)
    r = tile - chunk * per_chunk
    return n_blocks - 1 - r // heads_here, chunk * heads_per_chunk + r % heads_here


@gluon.jit
def _walk_tile(wave):
    """This program's tile in ``wave`` (``0, 1, ...``): tile ``wave * grid + pid``, with ``pid`` mirrored in odd waves
    (``grid - 1 - pid``), so that under the longest-first order a program that took a long tile takes a short one
    next (a plain stride would give the first programs the longest tile of every wave). A program per tile: ``pid``."""
    grid = gl.num_programs(0)
    pid = gl.program_id(0)
    return wave * grid + pid + (wave % 2) * (grid - 1 - 2 * pid)


@gluon.jit
def _next_tile(done, sched, SCHEDULE: gl.constexpr):
    """The loader's next tile after ``done`` tiles: from the queue (``SCHEDULE`` 2: an atomic counter in global memory
    past the first ``grid`` tiles, so the tiles go out in order to whichever program asks first), else the next wave
    of ``_walk_tile`` (a program per tile: past the last)."""
    if SCHEDULE == 2:
        tile = gl.num_programs(0) + gl.atomic_add(sched[0], 1)
    else:
        tile = _walk_tile(done)
    return tile


@gluon.jit
def _post_tile(tile_smem, tile):
    """The loader's word to the consumers: the tile whose Q it loads next (read after ``q_ready``'s phase)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])  # the 128 threads of a warpgroup
    tile_smem.store(gl.zeros([1], gl.int32, layout) + tile)


@gluon.jit
def _read_tile(tile_smem):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    return gl.max(tile_smem.load(layout), axis=0)


@gluon.jit
def _key_tiles(pid_m, n_ctx, BLOCK_Q: gl.constexpr, WINDOW: gl.constexpr):
    """Key tiles ``[lo, hi)`` of query block ``pid_m`` (``BLOCK_Q`` rows): up to the diagonal, and with ``WINDOW``
    > 0 (query i sees keys i - WINDOW < j <= i) from the tile of the block's first row's first key; the tiles before
    are skipped. A block of 192 rows can end inside a key tile (the tile is kept) or past the sequence (it stops)."""
    if BLOCK_Q == BLOCK_N:
        hi = pid_m + 1
    else:
        hi = gl.minimum(gl.cdiv((pid_m + 1) * BLOCK_Q, BLOCK_N), n_ctx // BLOCK_N)
    lo = 0
    if WINDOW > 0:
        lo = gl.maximum(pid_m * BLOCK_Q + 1 - WINDOW, 0) // BLOCK_N  # max first: // truncates towards zero
    return lo, hi


@gluon.jit
def _needs_mask(j, pid_m, BLOCK_Q: gl.constexpr, WINDOW: gl.constexpr):
    """Whether key tile ``j`` of query block ``pid_m`` holds a masked pair: a tile whose last key comes after the
    block's first row (with 128-row blocks: the diagonal tile, the last), and with a window the tiles that start
    before the last row's first key."""
    masked = (j + 1) * BLOCK_N - 1 > pid_m * BLOCK_Q
    if WINDOW > 0:
        masked = masked | (j * BLOCK_N < pid_m * BLOCK_Q + BLOCK_Q - WINDOW)
    return masked


@gluon.jit
def _loader(q_desc, k_desc, v_desc, bufs, n_ctx, order, sched, WINDOW: gl.constexpr, SCHEDULE: gl.constexpr):
    """The producer warpgroup, for each of the program's tiles: each consumer's part of the Q block once it is free,
    then K and V tile by tile into the ring (whose slots and phases run on across tiles). ``sched``: ``(counter,
    tile_smem)``; with the queue (``SCHEDULE`` 2) the loader takes the tiles and posts each to the consumers."""
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty = bufs
    STAGES: gl.constexpr = k_bufs.shape[0]
    CONSUMERS: gl.constexpr = q_bufs.shape[0]
    n_tiles = gl.cdiv(n_ctx, CONSUMERS * ROWS) * order[0]
    taken = 0  # K/V tiles put in the ring by the program's earlier tiles
    done = 0  # the program's earlier tiles
    tile = gl.program_id(0)
    while tile < n_tiles:
        pid_m, bh = _block_and_head(tile, n_ctx, order, CONSUMERS * ROWS)
        row0 = bh * n_ctx
        q_row = row0 + pid_m * (CONSUMERS * ROWS)
        mbarrier.wait(q_empty, (done & 1) ^ 1)  # the previous tile's score products are done
        if SCHEDULE == 2:
            _post_tile(sched[1], tile)
        mbarrier.expect(q_ready, CONSUMERS * q_desc.block_type.nbytes)
        for part in gl.static_range(CONSUMERS):  # rows past the sequence (a 192-row block's last): read, never stored
            tma.async_copy_global_to_shared(q_desc, [q_row + part * ROWS, 0], q_ready, q_bufs.index(part))
        lo, hi = _key_tiles(pid_m, n_ctx, CONSUMERS * ROWS, WINDOW)
        for j in range(lo, hi):
            c = taken + j - lo
            s = c % STAGES
            phase = (c // STAGES) & 1
            mbarrier.wait(k_empty.index(s), phase ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], k_ready.index(s), k_bufs.index(s))
            mbarrier.wait(v_empty.index(s), phase ^ 1)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row0 + j * BLOCK_N, 0], v_ready.index(s), v_bufs.index(s))
        taken += hi - lo
        done += 1
        tile = _next_tile(done, sched, SCHEDULE)
    if SCHEDULE == 2:  # the consumers' word to stop: a tile past the last, with no Q
        mbarrier.wait(q_empty, (done & 1) ^ 1)
        _post_tile(sched[1], tile)
        mbarrier.arrive(q_ready)


@gluon.jit
def _online_softmax(scores, m_i, l_i, rows, keys, qk_scale, masked, WINDOW: gl.constexpr):
    """One key tile of the online softmax in base 2, the mask applied on ``masked`` tiles only:
    ``(p, alpha, m_new, l_new)`` with ``alpha`` the factor that rescales the output accumulated so far."""
    if masked:
        allowed = gl.expand_dims(rows, 1) >= gl.expand_dims(keys, 0)
        if WINDOW > 0:  # the subtraction per row, not per pair
            allowed = allowed & (gl.expand_dims(rows - WINDOW, 1) < gl.expand_dims(keys, 0))
        scores = gl.where(allowed, scores, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(scores, axis=1) * qk_scale)
    m_sub = m_new
    if WINDOW > 0:  # a row's first window tile can be all masked: exp2(-inf - -inf) would be NaN
        m_sub = gl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_sub)
    p = gl.exp2(scores * qk_scale - gl.expand_dims(m_sub, 1))
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _consumer(outs, bufs, n_ctx, order, sched, qk_scale, HEAD_DIM: gl.constexpr, OVERLAP: gl.constexpr,
              WINDOW: gl.constexpr, SCHEDULE: gl.constexpr, PART: gl.constexpr):
    """One consumer warpgroup, for each of the program's tiles: query rows ``PART * ROWS .. + ROWS`` of the block;
    scores and output in registers. ``outs``: ``(o_desc, lse_ptr, o_bufs)``; with ``o_bufs`` apart from the Q
    buffers (persistent programs) the output's TMA store runs on while the next tile starts."""
    o_desc, lse_ptr, o_bufs = outs
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty = bufs
    STAGES: gl.constexpr = k_bufs.shape[0]
    BLOCK_Q: gl.constexpr = q_bufs.shape[0] * ROWS
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_smem = q_bufs.index(PART)
    o_smem = o_bufs.index(PART)
    zeros_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    cols = gl.arange(0, BLOCK_N, s_cols)

    n_tiles = gl.cdiv(n_ctx, BLOCK_Q) * order[0]
    taken = 0  # K/V tiles taken from the ring by the program's earlier tiles
    done = 0
    tile = gl.program_id(0)
    if SCHEDULE == 2:
        mbarrier.wait(q_ready, 0)
        tile = _read_tile(sched[1])
    while tile < n_tiles:
        pid_m, bh = _block_and_head(tile, n_ctx, order, BLOCK_Q)
        q_start = pid_m * BLOCK_Q + PART * ROWS  # first query row of this warpgroup, within the head
        lo, block_hi = _key_tiles(pid_m, n_ctx, BLOCK_Q, WINDOW)
        hi = block_hi
        if BLOCK_Q > BLOCK_N:  # 192 rows: this warpgroup's rows may end a tile before the block's
            hi = gl.minimum(gl.cdiv(q_start + ROWS, BLOCK_N), block_hi)
        if SCHEDULE != 2:  # with the queue, waited for before the tile was read
            mbarrier.wait(q_ready, done & 1)

        m_i = gl.full([ROWS], -float("inf"), gl.float32, s_rows)
        l_i = gl.full([ROWS], 0.0, gl.float32, s_rows)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        rows = q_start + gl.arange(0, ROWS, s_rows)

        if OVERLAP:
            # tile lo alone: its scores, softmax and P kept for the next iteration's P @ V
            s = taken % STAGES
            mbarrier.wait(k_ready.index(s), (taken // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
            scores = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(s))
            p, _, m_i, l_i = _online_softmax(scores, m_i, l_i, rows, lo * BLOCK_N + cols, qk_scale,
                                             _needs_mask(lo, pid_m, BLOCK_Q, WINDOW), WINDOW)
            p_prev = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            for j in range(lo + 1, hi):
                c = taken + j - lo
                s = c % STAGES
                sp = (c - 1) % STAGES
                mbarrier.wait(k_ready.index(s), (c // STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zeros_s, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_ready.index(sp), ((c - 1) // STAGES) & 1)
                o_tok = warpgroup_mma(p_prev, v_bufs.index(sp), acc, is_async=True)
                scores = warpgroup_mma_wait(1, deps=[s_tok])
                mbarrier.arrive(k_empty.index(s))
                p, alpha, m_i, l_i = _online_softmax(scores, m_i, l_i, rows, j * BLOCK_N + cols, qk_scale,
                                                     _needs_mask(j, pid_m, BLOCK_Q, WINDOW), WINDOW)
                p_next = gl.convert_layout(p.to(gl.bfloat16), p_layout)
                acc = warpgroup_mma_wait(0, deps=[o_tok])
                mbarrier.arrive(v_empty.index(sp))
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
                p_prev = p_next
            mbarrier.arrive(q_empty)  # every score product of the tile is done: the loader may load the next Q
            c = taken + hi - lo - 1
            sl = c % STAGES
            mbarrier.wait(v_ready.index(sl), (c // STAGES) & 1)
            o_tok = warpgroup_mma(p_prev, v_bufs.index(sl), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(v_empty.index(sl))
        else:
            for j in range(lo, hi):
                c = taken + j - lo
                s = c % STAGES
                phase = (c // STAGES) & 1
                mbarrier.wait(k_ready.index(s), phase)
                s_tok = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zeros_s, use_acc=False,
                                      is_async=True)
                scores = warpgroup_mma_wait(0, deps=[s_tok])
                mbarrier.arrive(k_empty.index(s))
                p, alpha, m_i, l_i = _online_softmax(scores, m_i, l_i, rows, j * BLOCK_N + cols, qk_scale,
                                                     _needs_mask(j, pid_m, BLOCK_Q, WINDOW), WINDOW)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
                mbarrier.wait(v_ready.index(s), phase)
                o_tok = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_bufs.index(s), acc,
                                      is_async=True)
                acc = warpgroup_mma_wait(0, deps=[o_tok])
                mbarrier.arrive(v_empty.index(s))
            mbarrier.arrive(q_empty)
        for j in range(hi, block_hi):  # tiles the other warpgroups still use: released once loaded, never read
            c = taken + j - lo
            s = c % STAGES
            phase = (c // STAGES) & 1
            mbarrier.wait(k_ready.index(s), phase)  # an arrival before the load would count for the slot's last tile
            mbarrier.arrive(k_empty.index(s))
            mbarrier.wait(v_ready.index(s), phase)
            mbarrier.arrive(v_empty.index(s))
        taken += block_hi - lo
        done += 1

        if q_start < n_ctx:
            out = acc / gl.expand_dims(gl.convert_layout(l_i, o_rows), 1)
            tma.store_wait(0)  # the previous tile's output has left o_smem
            o_smem.store(out.to(gl.bfloat16))  # without persistence o_smem is q_smem, which is no longer read
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [bh * n_ctx + q_start, 0], o_smem)
            lse = (m_i + gl.log2(l_i)) / LOG2E  # natural log, as dldna's kernels return it
            gl.store(lse_ptr + bh * n_ctx + rows, lse)
        if SCHEDULE == 2:
            mbarrier.wait(q_ready, done & 1)
            tile = _read_tile(sched[1])
        else:
            tile = _walk_tile(done)
    tma.store_wait(0)


@gluon.jit
def _fa3_fwd(q_desc, k_desc, v_desc, o_desc, lse_ptr, counter, n_ctx, n_bh, heads_per_chunk, qk_scale,
             HEAD_DIM: gl.constexpr, OVERLAP: gl.constexpr, STAGES: gl.constexpr, WINDOW: gl.constexpr,
             CONSUMERS: gl.constexpr = 2, SCHEDULE: gl.constexpr = 0):
    """1-D grid over the ``cdiv(N, 64 * CONSUMERS) * B * H`` tiles (order: ``_block_and_head``): a program per tile,
    or fewer programs that each take several: ``SCHEDULE`` 1 in mirrored waves (``_walk_tile``), 2 from a queue
    (``_next_tile``; ``counter``: an int32 zero). q, k, v, o are 2-D ``(B * H * N, D)`` tensor descriptors;
    ``WINDOW`` 0: causal; ``CONSUMERS`` 2 or 3 warpgroups of 64 query rows."""
    q_bufs = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, ROWS, HEAD_DIM], q_desc.layout)
    if SCHEDULE > 0:  # the output's own staging buffers: the next tile's Q may load while the output is stored
        o_bufs = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, ROWS, HEAD_DIM], o_desc.layout)
    else:
        o_bufs = q_bufs
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    q_empty = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    tile_smem = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=CONSUMERS)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)  # released by every consumer
        mbarrier.init(v_empty.index(s), count=CONSUMERS)
    fence_async_shared()

    bufs = (q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty)
    order = (n_bh, heads_per_chunk)
    outs = (o_desc, lse_ptr, o_bufs)
    sched = (counter, tile_smem)
    if CONSUMERS == 2:
        gl.warp_specialize([(_consumer, (outs, bufs, n_ctx, order, sched, qk_scale, HEAD_DIM, OVERLAP, WINDOW,
                                         SCHEDULE, 0)),
                            (_consumer, (outs, bufs, n_ctx, order, sched, qk_scale, HEAD_DIM, OVERLAP, WINDOW,
                                         SCHEDULE, 1)),
                            (_loader, (q_desc, k_desc, v_desc, bufs, n_ctx, order, sched, WINDOW, SCHEDULE))],
                           [4, 4], [REGS_CONSUMER, REGS_LOADER])
    else:
        gl.warp_specialize([(_consumer, (outs, bufs, n_ctx, order, sched, qk_scale, HEAD_DIM, OVERLAP, WINDOW,
                                         SCHEDULE, 0)),
                            (_consumer, (outs, bufs, n_ctx, order, sched, qk_scale, HEAD_DIM, OVERLAP, WINDOW,
                                         SCHEDULE, 1)),
                            (_consumer, (outs, bufs, n_ctx, order, sched, qk_scale, HEAD_DIM, OVERLAP, WINDOW,
                                         SCHEDULE, 2)),
                            (_loader, (q_desc, k_desc, v_desc, bufs, n_ctx, order, sched, WINDOW, SCHEDULE))],
                           [4, 4, 4], [REGS_CONSUMER_3, REGS_CONSUMER_3, REGS_LOADER])


@functools.lru_cache(maxsize=None)
def _shared_layout(rows, cols):
    """The swizzled shared-memory layout of a bf16 ``rows x cols`` TMA block, built once per shape: building it took
    more host time than the descriptor itself (about 5 against 1.5 µs per call on a CPU core)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16)


def _descriptor(t, rows):
    """A TMA descriptor of the 2-D bf16 tensor ``t`` in blocks of ``rows`` full rows."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [rows, t.shape[-1]], _shared_layout(rows, t.shape[-1]))


SCHEDULES = {None: 0, "walk": 1, "queue": 2}  # fa3_forward's ``persistent``: _fa3_fwd's SCHEDULE


def _build_problem(d, consumers=2, stages=2, persistent=None):
    """Why ``_fa3_fwd`` cannot be built with these settings at head_dim ``d`` (None if it can)."""
    if consumers not in (2, 3) or (consumers == 3 and d != 64):
        return f"consumers must be 2, or 3 at head_dim 64 (registers), got {consumers} at {d}"
    if persistent not in SCHEDULES:
        return f"persistent must be one of {sorted(SCHEDULES, key=str)}, got {persistent!r}"
    if d == 128 and stages > 2 and persistent:
        return "at head_dim 128 a persistent program has shared memory for 2 stages only"
    return None


def _maxnreg(consumers):
    """Registers per thread at launch, before ``setmaxnreg`` shares them out."""
    return MAXNREG if consumers == 2 else MAXNREG_3


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    """SMs of ``device``; on the CPU (the Gluon emulator) 3, so that a persistent grid of small shapes takes
    several tiles per program."""
    if device.type == "cpu":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def fa3_forward(q, k, v, overlap=True, stages=2, window=None, consumers=2, chunk_heads=False, persistent=None,
                poison=False, scale=None):
    """Causal attention of bf16 ``(B, H, N, D)`` q, k, v: ``(out, lse)``, lse ``(B, H, N)`` float32 natural log.
    ``stages``: K/V tiles in flight in shared memory; ``window``: query i sees keys i - window < j <= i;
    ``consumers``: warpgroups of 64 query rows per program, 2, or 3 at D = 64 (192-row blocks); ``chunk_heads``:
    the shipped kernels' program order (``_heads_per_chunk``: longest first over a chunk of heads whose K/V fit in
    L2; head by head with a window), else head by head; ``persistent``: one program per SM, which takes the tiles
    in mirrored waves (``"walk"``) or from a queue (``"queue"``);
    ``poison``: out and lse start as NaN (for checks: a row the kernel misses shows); ``scale``: of the scores,
    ``1 / sqrt(D)`` by default."""
    b, h, n, d = q.shape
    if q.dtype != torch.bfloat16 or n % BLOCK_M.value or d not in (64, 128) or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be bf16 (B, H, N, D) of one shape with N % 128 == 0, D in (64, 128); "
                         f"got {tuple(q.shape)} {q.dtype}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    problem = _build_problem(d, consumers, stages, persistent)
    if problem:
        raise ValueError(problem)
    q2, k2, v2 = (t.contiguous().view(b * h * n, d) for t in (q, k, v))
    out = torch.full_like(q2, math.nan) if poison else torch.empty_like(q2)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    if poison:
        lse.fill_(math.nan)
    descs = [_descriptor(q2, ROWS.value), _descriptor(k2, BLOCK_N.value), _descriptor(v2, BLOCK_N.value),
             _descriptor(out, ROWS.value)]
    heads_per_chunk = 1
    if chunk_heads:
        from dldna.kernels.flash_triton import _heads_per_chunk
        heads_per_chunk = _heads_per_chunk(b * h, n, d * q.element_size(), window is None)
    tiles = triton.cdiv(n, consumers * ROWS.value) * b * h
    grid = min(tiles, _sm_count(q.device)) if persistent else tiles
    # the queue's counter, zeroed for every call (a fill kernel, timed with the call); unread without the queue
    counter = torch.zeros(1, device=q.device, dtype=torch.int32) if persistent == "queue" else lse
    qk_scale = LOG2E.value * (1.0 / math.sqrt(d) if scale is None else scale)
    run(_fa3_fwd, (grid,), *descs, lse, counter, n, b * h, heads_per_chunk, qk_scale, HEAD_DIM=d, OVERLAP=overlap,
        STAGES=stages, WINDOW=window or 0, CONSUMERS=consumers, SCHEDULE=SCHEDULES[persistent], num_warps=4,
        maxnreg=_maxnreg(consumers))
    return out.view(b, h, n, d), lse
