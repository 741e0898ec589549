"""The FA3-style dK/dV kernel in Gluon (Hopper only), behind a dQ kernel that writes the base-2 LSE and
``delta = rowsum(dO * O)`` it reads (``flash_gluon.dq`` or ``flash_triton.backward_dq``).

- one loader warpgroup copies the program's keys' K and V once, then Q and dO tiles of 64 query rows into a ring
  of ``STAGES`` buffers (TMA, mbarriers), and gives its registers to the consumers (``setmaxnreg``);
- ``CONSUMERS`` consumer warpgroups, 64 keys each, keep their dK and dV (64 x D fp32) in registers. Per query tile
  each issues ``S^T = K Q^T`` and ``dP^T = V dO^T`` at once (asynchronous ``wgmma``), computes ``P^T`` while
  ``dP^T`` is still in flight, then ``dS^T = P^T (dP^T - delta)``, issues ``dV += P^T dO`` and ``dK += dS^T Q``
  together (P^T and dS^T from registers) and waits once for both;
- each consumer walks its tiles in two loops: the edge tiles (its diagonal tile, the far edge of a window; masked,
  and those where all of its keys are masked are passed over without computing), then the full tiles (no mask
  code). With the mask behind a runtime branch in one loop instead, ``ptxas`` spilled 812 to 968 bytes at D = 128
  (loop-invariant shared-memory descriptors); with these two loops, 4 to 28 bytes under the causal mask and 20 to
  80 under the window.

On CPU tensors it runs in ``dldna.kernels.gluon_emulator``. Limits: bf16, causal (optionally windowed),
``N % 128 == 0``, D in {64, 128}, no GQA. Experiments: ``benchmarks/experiments/gluon_fa3_dkdv.py``.
"""
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from dldna.kernels.gluon_emulator import run
from dldna.kernels.flash_gluon.forward import LOG2E, MAXNREG, REGS_CONSUMER, REGS_LOADER, ROWS, _descriptor

QROWS = gl.constexpr(64)  # query rows per tile of the loop


@gluon.jit
def _query_tiles(pid_n, n_ctx, CONSUMERS: gl.constexpr, WINDOW: gl.constexpr):
    """The query tiles ``[lo, hi)`` of key block ``pid_n`` (``CONSUMERS * ROWS`` keys) and ``far``, the first of the
    tiles at the window's far edge (``hi`` without a window). From the diagonal on, and with ``WINDOW`` > 0 (query i
    sees keys i - WINDOW < j <= i) up to the tile of the last key's last query.

    The loader and the consumers walk them in one order: the edge tiles first (the ``CONSUMERS`` tiles of the
    diagonal, then ``[far, hi)``), in one masked loop, then the full tiles ``[lo + CONSUMERS, far)``. One masked
    loop instead of two (diagonal, far edge) left ``ptxas`` less code to keep registers for: at D = 128 under the
    window, 20 instead of 416 bytes of spills (two consumers, 2 stages)."""
    k0 = pid_n * CONSUMERS * ROWS
    lo = k0 // QROWS
    hi = n_ctx // QROWS
    far = hi
    if WINDOW > 0:
        hi = gl.minimum(hi, (k0 + CONSUMERS * ROWS - 2 + WINDOW) // QROWS + 1)
        far = gl.minimum(gl.maximum((k0 + WINDOW) // QROWS, lo + CONSUMERS), hi)
    return lo, hi, far


@gluon.jit
def _edge_tile(e, lo, far, CONSUMERS: gl.constexpr):
    """The ``e``-th edge tile: the diagonal's, then the far edge's."""
    return gl.where(e < CONSUMERS, lo + e, far + e - CONSUMERS)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, do_desc, bufs, n_ctx, WINDOW: gl.constexpr):
    """The producer warpgroup: every consumer's K and V rows once, then Q and dO tile by tile into the ring."""
    k_bufs, v_bufs, q_bufs, do_bufs, kv_ready, ready, empty = bufs
    STAGES: gl.constexpr = q_bufs.shape[0]
    CONSUMERS: gl.constexpr = k_bufs.shape[0]
    KEYS: gl.constexpr = CONSUMERS * ROWS
    pid_n = gl.program_id(0)
    row0 = gl.program_id(1) * n_ctx
    k_row = row0 + pid_n * KEYS
    mbarrier.expect(kv_ready, CONSUMERS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for half in gl.static_range(CONSUMERS):
        tma.async_copy_global_to_shared(k_desc, [k_row + half * ROWS, 0], kv_ready, k_bufs.index(half))
        tma.async_copy_global_to_shared(v_desc, [k_row + half * ROWS, 0], kv_ready, v_bufs.index(half))
    lo, hi, far = _query_tiles(pid_n, n_ctx, CONSUMERS, WINDOW)
    n_edge = CONSUMERS + hi - far
    for i in range(0, n_edge + far - lo - CONSUMERS):
        t = gl.where(i < n_edge, _edge_tile(i, lo, far, CONSUMERS), lo + CONSUMERS + i - n_edge)
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row0 + t * QROWS, 0], ready.index(s), q_bufs.index(s))
        tma.async_copy_global_to_shared(do_desc, [row0 + t * QROWS, 0], ready.index(s), do_bufs.index(s))


@gluon.jit
def _step(i, t, dk, dv, k_smem, v_smem, bufs, lse2_ptr, delta_ptr, k_start, qk_scale, s_layout: gl.constexpr,
          a_layout: gl.constexpr, MASKED: gl.constexpr, WINDOW: gl.constexpr):
    """Fold query tile ``t``, the ``i``-th of the ring, into this warpgroup's dK, dV; ``MASKED``: the tile may hold
    masked pairs, or none of its pairs may be allowed (then it is only passed over)."""
    k_bufs, v_bufs, q_bufs, do_bufs, kv_ready, ready, empty = bufs
    STAGES: gl.constexpr = q_bufs.shape[0]
    s = i % STAGES
    q0 = t * QROWS
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    skip = False
    if MASKED:
        skip = q0 + QROWS - 1 < k_start  # every query of the tile before every key
        if WINDOW > 0:
            skip = skip | (q0 > k_start + ROWS - 2 + WINDOW)  # every query past every key's window
    if not skip:
        q_smem = q_bufs.index(s)
        do_smem = do_bufs.index(s)
        zeros_s = gl.zeros([ROWS, QROWS], gl.float32, s_layout)
        cols = q0 + gl.arange(0, QROWS, gl.SliceLayout(0, s_layout))
        st_tok = warpgroup_mma(k_smem, q_smem.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v_smem, do_smem.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        lse2 = gl.load(lse2_ptr + cols)
        delta = gl.load(delta_ptr + cols)
        st = warpgroup_mma_wait(1, deps=[st_tok])
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
        if MASKED:
            keys = gl.expand_dims(k_start + gl.arange(0, ROWS, gl.SliceLayout(1, s_layout)), 1)
            allowed = gl.expand_dims(cols, 0) >= keys
            if WINDOW > 0:
                allowed = allowed & (gl.expand_dims(cols, 0) < keys + WINDOW)
            pt = gl.where(allowed, pt, 0.0)
        dpt = warpgroup_mma_wait(0, deps=[dpt_tok])
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        # both products issued only now: P^T in fp32 and the bf16 operands of an in-flight dV product together
        # would not fit in 240 registers beside dK and dV at D = 128
        dv_tok = warpgroup_mma(gl.convert_layout(pt.to(gl.bfloat16), a_layout), do_smem, dv, is_async=True)
        dk_tok = warpgroup_mma(gl.convert_layout(dst.to(gl.bfloat16), a_layout), q_smem, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok])
    mbarrier.arrive(empty.index(s))
    return dk, dv


@gluon.jit
def _consumer(dk_desc, dv_desc, lse2_ptr, delta_ptr, bufs, n_ctx, qk_scale, sm_scale, HEAD_DIM: gl.constexpr,
              WINDOW: gl.constexpr, HALF: gl.constexpr):
    """One consumer warpgroup: keys ``HALF * ROWS .. + ROWS`` of the block; dK and dV in registers. The edge tiles
    (``_query_tiles``) in a masked loop, where the tiles that hold none of this warpgroup's pairs are passed over,
    then the full tiles without mask code."""
    k_bufs, v_bufs, q_bufs, do_bufs, kv_ready, ready, empty = bufs
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, QROWS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    CONSUMERS: gl.constexpr = k_bufs.shape[0]
    k_start = pid_n * CONSUMERS * ROWS + HALF * ROWS  # first key of this warpgroup, within the head
    lo, hi, far = _query_tiles(pid_n, n_ctx, CONSUMERS, WINDOW)
    k_smem = k_bufs.index(HALF)
    v_smem = v_bufs.index(HALF)
    lse2_ptr += bh * n_ctx
    delta_ptr += bh * n_ctx
    mbarrier.wait(kv_ready, 0)

    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    n_edge = CONSUMERS + hi - far
    for i in range(0, n_edge):
        dk, dv = _step(i, _edge_tile(i, lo, far, CONSUMERS), dk, dv, k_smem, v_smem, bufs, lse2_ptr, delta_ptr,
                       k_start, qk_scale, s_layout, a_layout, True, WINDOW)
    for t in range(lo + CONSUMERS, far):
        dk, dv = _step(n_edge + t - lo - CONSUMERS, t, dk, dv, k_smem, v_smem, bufs, lse2_ptr, delta_ptr, k_start,
                       qk_scale, s_layout, a_layout, False, WINDOW)

    # K and V are no longer read: their buffers stage dK and dV for the TMA stores
    k_smem.store((dk * sm_scale).to(gl.bfloat16))
    v_smem.store(dv.to(gl.bfloat16))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [bh * n_ctx + k_start, 0], k_smem)
    tma.async_copy_shared_to_global(dv_desc, [bh * n_ctx + k_start, 0], v_smem)
    tma.store_wait(0)


@gluon.jit
def _fa3_dkdv(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse2_ptr, delta_ptr, n_ctx, qk_scale, sm_scale,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, WINDOW: gl.constexpr, CONSUMERS: gl.constexpr):
    """Grid ``(N / (64 * CONSUMERS), B * H)``; every tensor a 2-D ``(B * H * N, D)`` descriptor; ``WINDOW`` 0:
    causal. ``CONSUMERS``: 2 (128 keys per program, one program per SM at D = 128) or 1 (64 keys, a smaller
    program, so that two share an SM)."""
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, ROWS, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS, ROWS, HEAD_DIM], v_desc.layout)
    q_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, QROWS, HEAD_DIM], q_desc.layout)
    do_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, QROWS, HEAD_DIM], do_desc.layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    mbarrier.init(kv_ready, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=CONSUMERS)  # released by every consumer
    fence_async_shared()

    bufs = (k_bufs, v_bufs, q_bufs, do_bufs, kv_ready, ready, empty)
    if CONSUMERS == 2:
        gl.warp_specialize([(_consumer, (dk_desc, dv_desc, lse2_ptr, delta_ptr, bufs, n_ctx, qk_scale, sm_scale,
                                         HEAD_DIM, WINDOW, 0)),
                            (_consumer, (dk_desc, dv_desc, lse2_ptr, delta_ptr, bufs, n_ctx, qk_scale, sm_scale,
                                         HEAD_DIM, WINDOW, 1)),
                            (_loader, (q_desc, k_desc, v_desc, do_desc, bufs, n_ctx, WINDOW))], [4, 4],
                           [REGS_CONSUMER, REGS_LOADER])
    else:
        gl.warp_specialize([(_consumer, (dk_desc, dv_desc, lse2_ptr, delta_ptr, bufs, n_ctx, qk_scale, sm_scale,
                                         HEAD_DIM, WINDOW, 0)),
                            (_loader, (q_desc, k_desc, v_desc, do_desc, bufs, n_ctx, WINDOW))], [4],
                           [REGS_LOADER])


def fa3_dkdv(q, k, v, do, lse2, delta, window=None, stages=2, consumers=2, scale=None):
    """dK, dV of causal (windowed) attention of bf16 ``(B, H, N, D)`` tensors, from the base-2 LSE and
    ``delta`` (``(B, H, N)`` float32) that ``dldna.kernels.flash_triton.backward_dq`` writes; ``consumers``
    warpgroups of 64 keys per program; ``scale``: of the scores, ``1 / sqrt(D)`` by default."""
    b, h, n, d = q.shape
    if q.dtype != torch.bfloat16 or n % 128 or d not in (64, 128) or any(t.shape != q.shape for t in (k, v, do)):
        raise ValueError(f"q, k, v, do must be bf16 (B, H, N, D) of one shape with N % 128 == 0, D in (64, 128); "
                         f"got {tuple(q.shape)} {q.dtype}")
    if consumers not in (1, 2):
        raise ValueError(f"consumers must be 1 or 2, got {consumers!r}")
    q2, k2, v2, do2 = (t.contiguous().view(b * h * n, d) for t in (q, k, v, do))
    dk, dv = torch.empty_like(k2), torch.empty_like(v2)
    descs = [_descriptor(q2, QROWS.value), _descriptor(k2, ROWS.value), _descriptor(v2, ROWS.value),
             _descriptor(do2, QROWS.value), _descriptor(dk, ROWS.value), _descriptor(dv, ROWS.value)]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    run(_fa3_dkdv, (n // (ROWS.value * consumers), b * h), *descs, lse2, delta, n, scale * LOG2E.value, scale,
        HEAD_DIM=d, STAGES=stages, WINDOW=window or 0, CONSUMERS=consumers, num_warps=4,
        maxnreg=_launch_regs(consumers))
    return dk.view(b, h, n, d), dv.view(b, h, n, d)


def _launch_regs(consumers):
    """Registers per thread at launch: two consumers and the loader share an SM's 65536 (``MAXNREG``); with one
    consumer, two programs of two warpgroups do (65536 / 512 = 128)."""
    return MAXNREG if consumers == 2 else 128
