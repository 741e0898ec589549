"""The FA3-style dQ kernel in Gluon (Hopper only), in the layout of the Gluon forward.

- per program 128 query rows; one loader warpgroup copies their Q and dO once, then K and V tiles of ``KEYS`` keys
  into a ring of ``STAGES`` buffers (TMA, mbarriers), and gives its registers to the consumers (``setmaxnreg``);
- two consumer warpgroups, 64 query rows each, first compute ``delta = rowsum(dO * O)`` and the base-2 LSE and
  store both for the dK/dV kernel (the contract of ``dldna.kernels.flash_triton.backward_dq``), then keep their dQ
  (64 x D fp32) in registers. Per key tile each issues ``S = Q K^T`` and ``dP = dO V^T`` at once (asynchronous
  ``wgmma``), computes ``P`` while ``dP`` is in flight, then ``dS = P (dP - delta)`` and issues ``dQ += dS K`` (dS
  from registers);
- the edge tiles (the diagonal, then the window's far edge) in one masked loop, then the full tiles without mask
  code, as in the Gluon dK/dV kernel (one masked copy of the step: ``ptxas`` keeps fewer registers for it).

On CPU tensors it runs in ``dldna.kernels.gluon_emulator``. Limits: bf16, causal (optionally windowed),
``N % 128 == 0``, D in {64, 128}, no GQA. Experiments: ``benchmarks/experiments/gluon_fa3_dq.py``.
"""
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from dldna.kernels.gluon_emulator import run
from dldna.kernels.flash_gluon.forward import BLOCK_M, LOG2E, MAXNREG, REGS_CONSUMER, REGS_LOADER, ROWS, \
    _descriptor, _query_block

@gluon.jit
def _key_tiles(pid_m, KEYS: gl.constexpr, WINDOW: gl.constexpr):
    """The key tiles ``[lo, hi)`` of query block ``pid_m`` (``BLOCK_M`` rows, tiles of ``KEYS``), and the two
    bounds of the full tiles ``[full_lo, full_hi)``: those where every pair of the block is allowed. The others are
    the diagonal tiles ``[full_hi, hi)`` and, with ``WINDOW`` > 0 (query i sees keys i - WINDOW < j <= i), the far
    edge's ``[lo, full_lo)``."""
    q0 = pid_m * BLOCK_M
    hi = (q0 + BLOCK_M) // KEYS
    full_hi = (q0 + 1) // KEYS  # tiles that end at or before the block's first row
    lo = 0
    full_lo = 0
    if WINDOW > 0:
        lo = gl.maximum(q0 + 1 - WINDOW, 0) // KEYS  # max first: // truncates towards zero
        # the first tile whose first key the block's last row sees
        full_lo = gl.minimum(gl.maximum(gl.cdiv(gl.maximum(q0 + BLOCK_M - WINDOW, 0), KEYS), lo), full_hi)
    return lo, hi, full_lo, full_hi


@gluon.jit
def _edge_tile(e, hi, full_hi, lo):
    """The ``e``-th edge tile: the diagonal's ``[full_hi, hi)``, then the far edge's from ``lo``."""
    return gl.where(e < hi - full_hi, full_hi + e, lo + e - (hi - full_hi))


@gluon.jit
def _tile_order(i, lo, hi, full_lo, full_hi):
    """The ``i``-th tile that the loader copies and the consumers take: the edge tiles, then the full ones."""
    n_edge = hi - full_hi + full_lo - lo
    return gl.where(i < n_edge, _edge_tile(i, hi, full_hi, lo), full_lo + i - n_edge)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, do_desc, bufs, n_ctx, WINDOW: gl.constexpr):
    """The producer warpgroup: both halves of the block's Q and dO once, then K and V tile by tile into the ring."""
    q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty = bufs
    STAGES: gl.constexpr = k_bufs.shape[0]
    KEYS: gl.constexpr = k_bufs.shape[1]
    pid_m = _query_block()
    row0 = gl.program_id(1) * n_ctx
    q_row = row0 + pid_m * BLOCK_M
    mbarrier.expect(qdo_ready, 2 * (q_desc.block_type.nbytes + do_desc.block_type.nbytes))
    for half in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [q_row + half * ROWS, 0], qdo_ready, q_bufs.index(half))
        tma.async_copy_global_to_shared(do_desc, [q_row + half * ROWS, 0], qdo_ready, do_bufs.index(half))
    lo, hi, full_lo, full_hi = _key_tiles(pid_m, KEYS, WINDOW)
    for i in range(0, hi - lo):
        j = _tile_order(i, lo, hi, full_lo, full_hi)
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + j * KEYS, 0], ready.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [row0 + j * KEYS, 0], ready.index(s), v_bufs.index(s))


@gluon.jit
def _step(i, j, dq, q_smem, do_smem, bufs, lse2, delta, q_start, rows, qk_scale, s_layout: gl.constexpr,
          a_layout: gl.constexpr, MASKED: gl.constexpr, WINDOW: gl.constexpr):
    """Fold key tile ``j``, the ``i``-th of the ring, into this warpgroup's dQ; ``MASKED``: the tile may hold
    masked pairs, or none of this warpgroup's pairs may be allowed (then it is only passed over)."""
    q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty = bufs
    STAGES: gl.constexpr = k_bufs.shape[0]
    KEYS: gl.constexpr = k_bufs.shape[1]
    s = i % STAGES
    k0 = j * KEYS
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    skip = False
    if MASKED:
        skip = k0 > q_start + ROWS - 1  # every key after every row of this warpgroup
        if WINDOW > 0:
            skip = skip | (k0 + KEYS - 1 <= q_start - WINDOW)  # every key before every row's window
    if not skip:
        k_smem = k_bufs.index(s)
        zeros_s = gl.zeros([ROWS, KEYS], gl.float32, s_layout)
        s_tok = warpgroup_mma(q_smem, k_smem.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do_smem, v_bufs.index(s).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        scores = warpgroup_mma_wait(1, deps=[s_tok])
        p = gl.exp2(scores * qk_scale - gl.expand_dims(lse2, 1))
        if MASKED:
            keys = gl.expand_dims(k0 + gl.arange(0, KEYS, gl.SliceLayout(0, s_layout)), 0)
            allowed = gl.expand_dims(rows, 1) >= keys
            if WINDOW > 0:
                allowed = allowed & (gl.expand_dims(rows - WINDOW, 1) < keys)
            p = gl.where(allowed, p, 0.0)
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds = p * (dp - gl.expand_dims(delta, 1))
        dq_tok = warpgroup_mma(gl.convert_layout(ds.to(gl.bfloat16), a_layout), k_smem, dq, is_async=True)
        dq = warpgroup_mma_wait(0, deps=[dq_tok])
    mbarrier.arrive(empty.index(s))
    return dq


@gluon.jit
def _consumer(o_ptr, dq_desc, lse_ptr, lse2_ptr, delta_ptr, bufs, n_ctx, qk_scale, sm_scale,
              HEAD_DIM: gl.constexpr, WINDOW: gl.constexpr, HALF: gl.constexpr):
    """One consumer warpgroup: query rows ``HALF * ROWS .. + ROWS`` of the block. ``delta`` and the base-2 LSE of
    its rows first (stored for the dK/dV kernel), then dQ in registers: the edge tiles in a masked loop, the full
    tiles without mask code."""
    q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty = bufs
    KEYS: gl.constexpr = k_bufs.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, KEYS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    tile_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

    pid_m = _query_block()
    bh = gl.program_id(1)
    q_start = pid_m * BLOCK_M + HALF * ROWS  # first query row of this warpgroup, within the head
    q_smem = q_bufs.index(HALF)
    do_smem = do_bufs.index(HALF)
    rows = q_start + gl.arange(0, ROWS, rows_layout)
    lse = gl.load(lse_ptr + bh * n_ctx + rows)
    lse2 = gl.where(lse == -float("inf"), float("inf"), lse * LOG2E)  # a row without keys: P = 0, not NaN
    gl.store(lse2_ptr + bh * n_ctx + rows, lse2)

    tile_rows = gl.arange(0, ROWS, gl.SliceLayout(1, tile_layout))
    tile_cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, tile_layout))
    offsets = (bh * n_ctx + q_start + gl.expand_dims(tile_rows, 1)) * HEAD_DIM + gl.expand_dims(tile_cols, 0)
    o = gl.load(o_ptr + offsets).to(gl.float32)
    mbarrier.wait(qdo_ready, 0)
    delta = gl.sum(o * do_smem.load(tile_layout).to(gl.float32), axis=1)
    delta = gl.convert_layout(delta, rows_layout)
    gl.store(delta_ptr + bh * n_ctx + rows, delta)

    lo, hi, full_lo, full_hi = _key_tiles(pid_m, KEYS, WINDOW)
    dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    n_edge = hi - full_hi + full_lo - lo
    for i in range(0, n_edge):
        dq = _step(i, _edge_tile(i, hi, full_hi, lo), dq, q_smem, do_smem, bufs, lse2, delta, q_start, rows,
                   qk_scale, s_layout, a_layout, True, WINDOW)
    for j in range(full_lo, full_hi):
        dq = _step(n_edge + j - full_lo, j, dq, q_smem, do_smem, bufs, lse2, delta, q_start, rows, qk_scale,
                   s_layout, a_layout, False, WINDOW)

    q_smem.store((dq * sm_scale).to(gl.bfloat16))  # Q is no longer read: its buffer stages dQ for the TMA store
    fence_async_shared()
    tma.async_copy_shared_to_global(dq_desc, [bh * n_ctx + q_start, 0], q_smem)
    tma.store_wait(0)


@gluon.jit
def _fa3_dq(q_desc, k_desc, v_desc, do_desc, dq_desc, o_ptr, lse_ptr, lse2_ptr, delta_ptr, n_ctx, qk_scale,
            sm_scale, HEAD_DIM: gl.constexpr, KEYS: gl.constexpr, STAGES: gl.constexpr, WINDOW: gl.constexpr):
    """Grid ``(N / 128, B * H)``; q, k, v, do, dq are 2-D ``(B * H * N, D)`` descriptors, o a contiguous pointer;
    ``WINDOW`` 0: causal."""
    q_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, ROWS, HEAD_DIM], q_desc.layout)
    do_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, ROWS, HEAD_DIM], do_desc.layout)
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, KEYS, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, KEYS, HEAD_DIM], v_desc.layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    qdo_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    mbarrier.init(qdo_ready, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # released by both consumers
    fence_async_shared()

    bufs = (q_bufs, do_bufs, k_bufs, v_bufs, qdo_ready, ready, empty)
    gl.warp_specialize([(_consumer, (o_ptr, dq_desc, lse_ptr, lse2_ptr, delta_ptr, bufs, n_ctx, qk_scale, sm_scale,
                                     HEAD_DIM, WINDOW, 0)),
                        (_consumer, (o_ptr, dq_desc, lse_ptr, lse2_ptr, delta_ptr, bufs, n_ctx, qk_scale, sm_scale,
                                     HEAD_DIM, WINDOW, 1)),
                        (_loader, (q_desc, k_desc, v_desc, do_desc, bufs, n_ctx, WINDOW))], [4, 4],
                       [REGS_CONSUMER, REGS_LOADER])


def fa3_dq(q, k, v, out, lse, do, window=None, keys=64, stages=2, scale=None):
    """dQ of causal (windowed) attention of bf16 ``(B, H, N, D)`` tensors from the forward's ``out`` and natural
    ``lse`` (``(B, H, N)`` float32): ``(dq, lse2, delta)`` as ``dldna.kernels.flash_triton.backward_dq`` returns
    them, so that either dK/dV kernel can follow. ``keys``: keys per tile (64 or 128); ``scale``: of the
    scores, ``1 / sqrt(D)`` by default."""
    b, h, n, d = q.shape
    if (q.dtype != torch.bfloat16 or n % BLOCK_M.value or d not in (64, 128)
            or any(t.shape != q.shape for t in (k, v, out, do))):
        raise ValueError(f"q, k, v, out, do must be bf16 (B, H, N, D) of one shape with N % 128 == 0, "
                         f"D in (64, 128); got {tuple(q.shape)} {q.dtype}")
    if keys not in (64, 128):
        raise ValueError(f"keys must be 64 or 128, got {keys!r}")
    if lse.shape != (b, h, n) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 {(b, h, n)}, got {tuple(lse.shape)} {lse.dtype}")
    q2, k2, v2, do2, o2 = (t.contiguous().view(b * h * n, d) for t in (q, k, v, do, out))
    dq = torch.empty_like(q2)
    lse2, delta = torch.empty_like(lse), torch.empty_like(lse)
    descs = [_descriptor(q2, ROWS.value), _descriptor(k2, keys), _descriptor(v2, keys), _descriptor(do2, ROWS.value),
             _descriptor(dq, ROWS.value)]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    run(_fa3_dq, (n // BLOCK_M.value, b * h), *descs, o2, lse.contiguous(), lse2, delta, n, scale * LOG2E.value,
        scale, HEAD_DIM=d, KEYS=keys, STAGES=stages, WINDOW=window or 0, num_warps=4, maxnreg=MAXNREG)
    return dq.view(b, h, n, d), lse2, delta
