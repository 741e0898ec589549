"""Scratch: an FA3-style dQ kernel in Gluon, so that with ``gluon_fa3_forward.py`` and ``gluon_fa3_dkdv.py`` the
whole causal (windowed) attention runs on warp-specialised Gluon kernels.

With the Gluon forward and dK/dV kernels, what is left of the window D = 128 forward+backward is mostly dldna's dQ
kernel (``gluon_fa3_dkdv.py``'s last runs). This kernel computes what that one does, in the layout of the Gluon
forward:
- per program 128 query rows; one loader warpgroup copies their Q and dO once, then K and V tiles of ``KEYS`` keys
  into a ring of ``STAGES`` buffers (TMA, mbarriers), and gives its registers to the consumers (``setmaxnreg``);
- two consumer warpgroups, 64 query rows each, first compute ``delta = rowsum(dO * O)`` and the base-2 LSE and
  store both for the dK/dV kernel (the contract of ``dldna.kernels.flash_triton.backward_dq``), then keep their dQ
  (64 x D fp32) in registers. Per key tile each issues ``S = Q K^T`` and ``dP = dO V^T`` at once (asynchronous
  ``wgmma``), computes ``P`` while ``dP`` is in flight, then ``dS = P (dP - delta)`` and issues ``dQ += dS K`` (dS
  from registers);
- the edge tiles (the diagonal, then the window's far edge) in one masked loop, then the full tiles without mask
  code, as in the Gluon dK/dV kernel (one masked copy of the step: ``ptxas`` keeps fewer registers for it).

Gluon kernels do not run under ``TRITON_INTERPRET=1``; on CPU tensors this one runs in
``dldna.kernels.gluon_emulator`` (``tests/test_gluon_emulator.py`` checks it against float64 there).
Limits: bf16, causal (optionally windowed), ``N % 128 == 0``, D in {64, 128}, no GQA.

    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dq.py --out benchmarks/experiments/logs
        [--rounds 3] [--variants 64:2 128:2] [--cases window:128:16384 ...] [--dq-only | --no-check] [--log-name NAME]
    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dq.py --host-time   # launch cost of each entry point
    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dq.py --compile-only   # sm_90a registers, no GPU
"""
import json
import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from dldna.kernels.gluon_emulator import run

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.gluon_fa3_dkdv import (  # noqa: E402
    CHECK_SHAPES, Hybrid, max_grad_errors, time_rows)
from benchmarks.experiments.gluon_fa3_forward import (  # noqa: E402
    BLOCK_M, LOG2E, MAXNREG, REGS_CONSUMER, REGS_LOADER, ROWS, _descriptor, _query_block, causal_band,
    experiment_parser, line_logger, parse_cases, rel_diff, run_header, timed_rounds, write_json)


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


def fa3_dq(q, k, v, out, lse, do, window=None, keys=64, stages=2):
    """dQ of causal (windowed) attention of bf16 ``(B, H, N, D)`` tensors from the forward's ``out`` and natural
    ``lse`` (``(B, H, N)`` float32): ``(dq, lse2, delta)`` as ``dldna.kernels.flash_triton.backward_dq`` returns
    them, so that either dK/dV kernel can follow. ``keys``: keys per tile (64 or 128)."""
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
    scale = 1.0 / math.sqrt(d)
    run(_fa3_dq, (n // BLOCK_M.value, b * h), *descs, o2, lse.contiguous(), lse2, delta, n, scale * LOG2E.value,
        scale, HEAD_DIM=d, KEYS=keys, STAGES=stages, WINDOW=window or 0, num_warps=4, maxnreg=MAXNREG)
    return dq.view(b, h, n, d), lse2, delta


def compile_only(d, keys=64, stages=2, window=0):
    """Registers, spills and shared memory of the sm_90a build (no GPU needed)."""
    from benchmarks.flash_compile_report import ptxas_info
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(rows):
        return f"tensordesc<bf16[{rows}, {d}],{gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)!r}>"

    sig = {"q_desc": desc(ROWS.value), "k_desc": desc(keys), "v_desc": desc(keys), "do_desc": desc(ROWS.value),
           "dq_desc": desc(ROWS.value), "o_ptr": "*bf16", "lse_ptr": "*fp32", "lse2_ptr": "*fp32",
           "delta_ptr": "*fp32", "n_ctx": "i32", "qk_scale": "fp32", "sm_scale": "fp32", "HEAD_DIM": "constexpr",
           "KEYS": "constexpr", "STAGES": "constexpr", "WINDOW": "constexpr"}
    src = GluonASTSource(_fa3_dq, sig, {"HEAD_DIM": d, "KEYS": keys, "STAGES": stages, "WINDOW": window})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": MAXNREG})
    ptx = kernel.asm["ptx"]
    return {"head_dim": d, "keys": keys, "stages": stages, "window": window, "shared_bytes": kernel.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "setmaxnreg": ptx.count("setmaxnreg"), **ptxas_info(ptx)}


def _label(variant):
    keys, stages = variant
    return f"{keys}keys_{stages}stages"


def _dq_kernel(variant):
    """``Hybrid``'s ``dq_kernel`` for this kernel with ``variant = (keys, stages)``."""
    return lambda q, k, v, out, lse, grad_out, window: fa3_dq(q, k, v, out, lse, grad_out, window, *variant)


def check(variants, dkdv_variant, log):
    """Largest errors of dQ (and of dK, dV behind it) against float64 on ``gluon_fa3_dkdv.CHECK_SHAPES``, for the
    Gluon forward, this dQ kernel and the Gluon dK/dV, next to those of dldna's shipped kernels on the same inputs;
    and how far this kernel's ``lse2`` and ``delta`` are from those of dldna's dQ kernel on the shipped forward
    (relative norm)."""
    from dldna.kernels import flash_attention, flash_triton

    torch.manual_seed(0)
    results = []
    for b, h, n, d, window in CHECK_SHAPES:
        q, k, v, grad = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        fns = {f"gluon_{_label(variant)}": (lambda q, k, v, variant=variant: Hybrid.apply(
            q, k, v, window, True, dkdv_variant, _dq_kernel(variant))) for variant in variants}
        fns["dldna"] = lambda q, k, v: flash_attention(q, k, v, causal=True, window=window)
        row = dict(shape=[b, h, n, d], window=window, **max_grad_errors(fns, q, k, v, grad, window))
        band, scale = causal_band(q, window), 1.0 / math.sqrt(d)
        out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale)
        _, lse2, delta = flash_triton.backward_dq(q, k, v, out, lse, grad, band.lo, band.hi, scale)
        for variant in variants:
            _, my_lse2, my_delta = fa3_dq(q, k, v, out, lse, grad, window, *variant)
            row[f"gluon_{_label(variant)}_lse2_delta_rel_diff"] = [rel_diff(my_lse2, lse2), rel_diff(my_delta, delta)]
        results.append(row)
        log(json.dumps(row))
    return results


def time_dq(row, window, variants, rounds, log, **tags):
    """The dQ kernels alone, in ms (medians of ``rounds``): this one in each ``(keys, stages)`` variant and dldna's
    on its stored tuned config, on the ``(out, lse)`` of one shipped forward; and each variant's dQ against dldna's
    (relative norm)."""
    from dldna.kernels import flash_triton

    q, k, v = (t.detach() for t in (row.q, row.k, row.v))
    band, scale = causal_band(q, window), 1.0 / math.sqrt(q.shape[-1])
    out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale)
    fns = {f"gluon_dq_{_label(variant)}": (lambda variant=variant: fa3_dq(q, k, v, out, lse, row.grad, window,
                                                                         *variant))
           for variant in variants}
    fns["dldna_dq"] = lambda: flash_triton.backward_dq(q, k, v, out, lse, row.grad, band.lo, band.hi, scale)
    shipped = fns["dldna_dq"]()
    diffs = {name: [rel_diff(a, b) for a, b in zip(fn(), shipped)] for name, fn in fns.items() if name != "dldna_dq"}
    log(json.dumps(dict(tags, dq_lse2_delta_rel_diff_vs_dldna=diffs)))
    rounds_ms, median = timed_rounds(lambda name: round(triton.testing.do_bench(fns[name], return_mode="median"), 4),
                                     list(fns), rounds, log, "dq_ms", **tags)
    return dict(dq_lse2_delta_rel_diff_vs_dldna=diffs, dq_rounds_ms=rounds_ms, dq_median_ms=median)


def gluon_backward_combos(row, window, variant, dkdv_variant):
    """The timed combinations with this dQ kernel (``variant``) and the Gluon dK/dV (``dkdv_variant``) behind either
    forward, and the Gluon forward and dK/dV behind dldna's dQ kernel, by name, as ``BenchRow.fns`` entries."""
    from benchmarks.experiments.gluon_fa3_dkdv import hybrids

    q, k, v = row.q, row.k, row.v
    return {"gluon_fwd_gluon_bwd": lambda: Hybrid.apply(q, k, v, window, True, dkdv_variant, _dq_kernel(variant)),
            "dldna_fwd_gluon_bwd": lambda: Hybrid.apply(q, k, v, window, False, dkdv_variant, _dq_kernel(variant)),
            "gluon_fwd_gluon_dkdv": hybrids(row, window, dkdv_variant)["gluon_fwd_gluon_dkdv"]}


def host_us(fn, calls=200):
    """Host time per call of ``fn`` in microseconds: ``calls`` calls back to back without a synchronisation (the
    GPU's queue fills, so this is the launch path's own time while it stays under the kernels')."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def time_host(cases, variant, dkdv_variant, log):
    """Host microseconds per call of each kernel's Python entry point, Gluon's and dldna's, and of building one
    Gluon ``TensorDescriptor``: whether a forward+backward's three launches can outrun its GPU time."""
    from benchmarks.attention import WINDOW, BenchRow
    from benchmarks.experiments.gluon_fa3_dkdv import fa3_dkdv
    from benchmarks.experiments.gluon_fa3_forward import fa3_forward
    from dldna.kernels import flash_triton, report

    record = json.load(open("results/flash_attention_bench.json"))
    rows = []
    for mask, d, n in cases:
        window = WINDOW if mask == "window" else None
        row = BenchRow(mask, d, n)
        flash_triton.restore_tuning()
        report.force_tuned_configs(record, mask, d, n)
        q, k, v, do = (t.detach() for t in (row.q, row.k, row.v, row.grad))
        band, scale = causal_band(q, window), 1.0 / math.sqrt(d)
        out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale)
        _, lse2, delta = flash_triton.backward_dq(q, k, v, out, lse, do, band.lo, band.hi, scale)
        q2 = q.view(-1, d)
        fns = {"gluon_fwd": lambda: fa3_forward(q, k, v, window=window),
               "gluon_dq": lambda: fa3_dq(q, k, v, out, lse, do, window, *variant),
               "gluon_dkdv": lambda: fa3_dkdv(q, k, v, do, lse2, delta, window, *dkdv_variant),
               "dldna_fwd": lambda: flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale),
               "dldna_dq": lambda: flash_triton.backward_dq(q, k, v, out, lse, do, band.lo, band.hi, scale),
               "dldna_dkdv": lambda: flash_triton.backward_dkdv(q, k, v, do, lse2, delta, band.lo, band.hi, scale),
               "one_gluon_descriptor": lambda: _descriptor(q2, ROWS.value)}
        entry = dict(mask=mask, d=d, n=n, host_us={name: round(host_us(fn), 1) for name, fn in fns.items()})
        log(json.dumps(entry))
        rows.append(entry)
    return rows


def main():
    parser = experiment_parser("gluon_fa3_dq", 3, ["window:128:16384", "window:128:4096", "window:128:65536",
                                                   "causal:128:16384", "window:64:16384"])
    parser.add_argument("--variants", nargs="+", default=["64:2", "128:2"],
                        help="KEYS:STAGES of this kernel (keys per tile, K/V tiles in flight): each is checked and "
                             "timed alone, the first also in forward+backward")
    parser.add_argument("--dkdv-variant", default="2:2", help="STAGES:CONSUMERS of the Gluon dK/dV kernel")
    parser.add_argument("--dq-only", action="store_true", help="time the dQ kernels alone, skipping the checks")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 checks")
    parser.add_argument("--host-time", action="store_true",
                        help="only the host time per call of every kernel's Python entry point")
    args = parser.parse_args()
    if args.compile_only:  # printed only: the log files hold GPU runs
        for d in (64, 128):
            for window in (0, 1024):
                for keys in (64, 128):
                    for stages in (2, 3):
                        print(json.dumps(compile_only(d, keys, stages, window)))
        return
    log = line_logger(args.out, args.log_name)
    variants = [tuple(int(x) for x in variant.split(":")) for variant in args.variants]
    dkdv_variant = tuple(int(x) for x in args.dkdv_variant.split(":"))
    if args.host_time:
        write_json(args.out, args.log_name, dict(run_header("gluon_fa3_dq.py"), rows=time_host(
            parse_cases(args.cases), variants[0], dkdv_variant, log)))
        return
    result = dict(run_header("gluon_fa3_dq.py"),
                  check=None if args.dq_only or args.no_check else check(variants, dkdv_variant, log))
    result["rows"] = time_rows(
        args.cases, args.rounds, log,
        lambda row, window: gluon_backward_combos(row, window, variants[0], dkdv_variant),
        lambda row, window, **tags: time_dq(row, window, variants, args.rounds, log, **tags),
        "dq_median_ms", fwd_bwd=not args.dq_only)
    write_json(args.out, args.log_name, result)


if __name__ == "__main__":
    main()
