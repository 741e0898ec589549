"""Triton kernels of FlashAttention-2: forward, backward (dQ and dK/dV) and their block-sparse twins.

The loops are those of ``dldna.kernels.tiled`` (read that first): one program owns a block of query rows (forward,
dQ) or of key rows (dK/dV), walks the blocks of the other side that the mask keeps, and splits them into partly
masked blocks (``MASKED=True``: the bounds and band checks that can fail there, see ``_attn_fwd``) and fully
allowed blocks (no checks at all). One step has no counterpart there: at head_dim 64 the forward folds a sliding
window's two partly masked blocks into one full tile (``_fwd_edge_pair``). Scores are kept in base 2
(``qk_scale = scale * log2(e)`` so ``exp2`` replaces ``exp``); the log-sum-exp handed to the backward and to the
caller is natural-log. GQA: query head ``h`` reads K/V head ``h // GROUP``; the dK/dV program of a K/V head loops
over its ``GROUP`` query heads, so nothing is repeated in memory and no atomics are needed.

Importing this module needs ``triton``; on a CPU it runs only under ``TRITON_INTERPRET=1`` (set before the
first ``import triton``). Used in chapter 5.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dldna.kernels.availability import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Integer arguments whose value changes from call to call (lengths, band limits, head counts) are not
# specialised, so one compiled kernel serves every sequence length.
_DYNAMIC = ["H", "GROUP", "n_q", "n_k", "band_lo", "band_hi", "n_bh", "heads_per_chunk"]


@triton.jit
def _band_mask(rows, cols, n_cols, band_lo, band_hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
               CHECK_N: tl.constexpr = True):
    """True where ``band_lo <= col - row`` (if HAS_LO), ``col - row <= band_hi`` (if HAS_HI) and ``col < n_cols``
    (if CHECK_N); shape (rows, cols). Each check left out saves a compare per score."""
    keep = (cols[None, :] < n_cols) | (not CHECK_N)  # the compiler folds this to True when CHECK_N is off
    if HAS_LO:  # against per-row limits: one compare per score, no subtraction
        keep = keep & (cols[None, :] >= (rows + band_lo)[:, None])
    if HAS_HI:
        keep = keep & (cols[None, :] <= (rows + band_hi)[:, None])
    return keep


@triton.jit
def _block_range(start, BLOCK_ROWS: tl.constexpr, n_cols, BLOCK_COLS: tl.constexpr, band_lo, band_hi,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Column blocks needed by rows [start, start + BLOCK_ROWS): masked [lo, full_lo), full, masked [full_hi, hi).

    Same arithmetic as ``dldna.kernels.tiled.block_range``; blocks outside [lo, hi) are never visited.
    """
    last = start + BLOCK_ROWS - 1
    lo = start * 0
    hi = n_cols + lo
    if HAS_LO:
        lo = tl.maximum(start + band_lo, 0) // BLOCK_COLS * BLOCK_COLS
    if HAS_HI:
        hi = tl.maximum(tl.minimum(n_cols, last + band_hi + 1), lo)
    full_lo = lo
    if HAS_LO:
        full_lo = tl.cdiv(tl.maximum(last + band_lo, lo), BLOCK_COLS) * BLOCK_COLS
    full_hi = n_cols // BLOCK_COLS * BLOCK_COLS + lo * 0
    if HAS_HI:
        full_hi = tl.minimum(full_hi, tl.maximum(start + band_hi + 1, 0) // BLOCK_COLS * BLOCK_COLS)
    full_lo = tl.minimum(full_lo, tl.cdiv(hi, BLOCK_COLS) * BLOCK_COLS)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tile(n_blocks, n_bh, heads_per_chunk):
    """This program's ``(rank, bh)`` on a 1-D grid of ``n_blocks * n_bh`` tiles; rank 0 is a head's heaviest block.

    Heads are taken ``heads_per_chunk`` at a time; inside a chunk, rank-major: every head's heaviest block, then
    every head's next one, and so on. Under a causal mask that is longest-job-first over the whole chunk, so the
    last programs to start are short ones (no long tail on a few SMs), while the chunk's K/V stays in L2 (the host
    sizes the chunk). ``heads_per_chunk = 1`` is head by head, the order that suits sliding windows best.
    """
    pid = tl.program_id(0)
    per_chunk = heads_per_chunk * n_blocks
    chunk = pid // per_chunk
    heads_here = tl.minimum(heads_per_chunk, n_bh - chunk * heads_per_chunk)
    r = pid - chunk * per_chunk
    return r // heads_here, chunk * heads_per_chunk + r % heads_here


@triton.jit
def _kept_span(SPAN, r):
    """Where layout row ``r``'s kept blocks sit in the index array: ``[SPAN[2r], SPAN[2r + 1])`` (``layout_spans``)."""
    return tl.load(SPAN + 2 * r), tl.load(SPAN + 2 * r + 1)


@triton.jit
def _kept_start(IDX, it, steps: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """First token of loop step ``it`` (``steps`` tiles per kept block): tile ``it % steps`` of the kept block
    ``IDX[it // steps]``."""
    return tl.load(IDX + it // steps) * LAYOUT_BLOCK + (it % steps) * BLOCK


@triton.jit
def _load_rows(T, b, h, start, n_rows, stride_n, offs_d, ROWS: tl.constexpr, MASKED: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Rows [start, start + ROWS) of one head's ``(N, D)`` matrix, as a ``(ROWS, D)`` tile.

    USE_TMA: ``T`` is a 4-D tensor descriptor and ``(b, h)`` picks the head (the copy engine zero-fills rows past
    the end). Otherwise ``T`` points at the head's first row; MASKED zero-fills rows ``>= n_rows``.
    """
    if USE_TMA:
        tile = T.load([b, h, start, 0]).reshape([ROWS, offs_d.shape[0]])
    else:
        offs = start + tl.arange(0, ROWS)
        ptrs = T + offs[:, None] * stride_n + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=offs[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


# ----------------------------------------------------------------------------------------------- forward
@triton.jit
def _softmax_step(qk, acc, l_i, m_i, offs_m, offs_n, n_k, band_lo, band_hi, qk_scale, MASKED: tl.constexpr,
                  HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, CHECK_N: tl.constexpr = True):
    """Fold one key block's raw scores ``qk = q k^T`` (rows ``offs_m``, keys ``offs_n``) into the running max
    ``m_i`` and sum ``l_i``, and rescale ``acc`` to the new max. Returns ``(p, acc, l_i, m_new)``, with ``p`` the
    block's unnormalised probabilities (base 2) that multiply V next. MASKED: scores that ``_band_mask`` rejects
    are -inf."""
    if MASKED:  # -inf * qk_scale - m = -inf: masked scores take the unmasked path's one FFMA and give p = 0
        qk = tl.where(_band_mask(offs_m, offs_n, n_k, band_lo, band_hi, HAS_LO, HAS_HI, CHECK_N), qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0, so the max commutes with the scaling
    qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)  # rescale what was accumulated against the old running max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, acc, l_i, m_ij


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k, band_lo, band_hi,
               qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
               USE_TMA: tl.constexpr = False, b=0, hk=0, CHECK_N: tl.constexpr = True):
    """One step of the online softmax: fold key block [start_n, start_n + BLOCK_N) into (acc, l_i, m_i).

    MASKED: apply the checks HAS_LO / HAS_HI / CHECK_N name (``_band_mask``); CHECK_N also zero-fills K/V rows past
    n_k. USE_TMA: ``K``/``V`` are 4-D tensor descriptors (the copy engine fetches the tile; rows past the end are
    zeros).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, b, hk, start_n, n_k, stride_kn, offs_d, BLOCK_N, MASKED and CHECK_N, USE_TMA)
    qk = tl.dot(q, tl.trans(k))
    p, acc, l_i, m_ij = _softmax_step(qk, acc, l_i, m_i, offs_m, offs_n, n_k, band_lo, band_hi, qk_scale, MASKED,
                                      HAS_LO, HAS_HI, CHECK_N)
    v = _load_rows(V, b, hk, start_n, n_k, stride_vn, offs_d, BLOCK_N, MASKED and CHECK_N, USE_TMA)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _fwd_edge_pair(acc, l_i, m_i, q, K, V, KP, VP, stride_kn, stride_vn, start_left, start_diag, offs_d, qk_scale,
                   BLOCK: tl.constexpr, USE_TMA: tl.constexpr = False, b=0, hk=0):
    """Fold the two partly masked key blocks of a sliding window into (acc, l_i, m_i) with ONE online-softmax step.

    With square tiles and a causal window and ``band_hi`` that are multiples of the tile (``PAIRED_EDGES`` in
    ``_attn_fwd``), a query block has one partly masked key block at each edge of its window, and the two keep
    complementary halves: query row ``r`` keeps column ``c`` of the diagonal block (keys from ``start_diag``) if
    ``c <= r`` and column ``c`` of the left-edge block (keys from ``start_left``) if ``c > r``. So they fit together
    into one full ``(BLOCK, BLOCK)`` score tile: the exponentials, row max, row sum and rescaling run once instead
    of twice, and no score is -inf. Neither block reaches past the ends of K (the caller checks), so nothing is
    bounds-checked.

    USE_TMA: ``KP``/``VP`` are 5-D descriptors (``_pair_descriptor``) whose one copy brings both blocks, so the
    program waits for two copies here instead of four, and computes one ``(BLOCK, 2 BLOCK)`` Q K^T and one P V over
    ``2 BLOCK`` keys. The reshapes, split and join between them move no data: a thread of the warpgroup MMA layout
    holds columns ``c`` and ``c + BLOCK`` of the same rows. Otherwise (``KP``/``VP`` unused) each block is its own
    load and its own pair of products."""
    from_diag = tl.arange(0, BLOCK)[None, :] <= tl.arange(0, BLOCK)[:, None]
    if USE_TMA:  # KP, VP: 5-D descriptors, one copy brings both blocks (``_pair_descriptor``)
        D: tl.constexpr = offs_d.shape[0]
        k_pair = KP.load([b, hk, 0, start_left, 0]).reshape([2 * BLOCK, D])  # left-edge rows, then diagonal rows
        qk_pair = tl.dot(q, tl.trans(k_pair))  # (BLOCK, 2 BLOCK): left-edge scores | diagonal scores
        qk_left, qk_diag = tl.split(tl.permute(tl.reshape(qk_pair, [BLOCK, 2, BLOCK]), (0, 2, 1)))
        qk = tl.where(from_diag, qk_diag, qk_left)
        p, acc, l_i, m_ij = _softmax_step(qk, acc, l_i, m_i, offs_d, offs_d, 0, 0, 0, qk_scale, False, False, False)
        v_pair = VP.load([b, hk, 0, start_left, 0]).reshape([2 * BLOCK, D])
        p = p.to(v_pair.dtype)
        p_left, p_diag = tl.where(from_diag, 0.0, p), tl.where(from_diag, p, 0.0)
        p_pair = tl.reshape(tl.permute(tl.join(p_left, p_diag), (0, 2, 1)), [BLOCK, 2 * BLOCK])
        acc = tl.dot(p_pair, v_pair, acc)
    else:
        k_left = _load_rows(K, b, hk, start_left, 0, stride_kn, offs_d, BLOCK, False, USE_TMA)
        k_diag = _load_rows(K, b, hk, start_diag, 0, stride_kn, offs_d, BLOCK, False, USE_TMA)
        qk = tl.where(from_diag, tl.dot(q, tl.trans(k_diag)), tl.dot(q, tl.trans(k_left)))
        p, acc, l_i, m_ij = _softmax_step(qk, acc, l_i, m_i, offs_d, offs_d, 0, 0, 0, qk_scale, False, False, False)
        v_left = _load_rows(V, b, hk, start_left, 0, stride_vn, offs_d, BLOCK, False, USE_TMA)
        v_diag = _load_rows(V, b, hk, start_diag, 0, stride_vn, offs_d, BLOCK, False, USE_TMA)
        p = p.to(v_diag.dtype)
        acc = tl.dot(tl.where(from_diag, p, 0.0), v_diag, acc)
        acc = tl.dot(tl.where(from_diag, 0.0, p), v_left, acc)
    return acc, l_i, m_ij


@triton.jit(do_not_specialize=_DYNAMIC)
def _attn_fwd(Q, K, V, O, LSE, ROW_SPAN, COL_IDX, KP, VP,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              H, GROUP, n_q, n_k, band_lo, band_hi, qk_scale, n_bh, heads_per_chunk,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SPARSE: tl.constexpr, USE_TMA: tl.constexpr = False,
              LAYOUT_BLOCK: tl.constexpr = 1, RAGGED: tl.constexpr = True, WIDE_BAND: tl.constexpr = False,
              EDGES_IN_ONE_LOOP: tl.constexpr = False, PAIRED_EDGES: tl.constexpr = False):
    """1-D grid of query blocks x B * H (order: ``_tile``). Dense: the band's key blocks. SPARSE: the kept key
    blocks of this block's layout row r, COL_IDX[ROW_SPAN[2r]:ROW_SPAN[2r + 1]] (``layout_spans`` of a layout of
    LAYOUT_BLOCK-token blocks, which BLOCK_M and BLOCK_N divide: a kept layout block is LAYOUT_BLOCK // BLOCK_N steps
    of the loop). USE_TMA (Hopper, dense): Q, K, V, O are 4-D tensor descriptors with blocks (1, 1, rows, HEAD_DIM).

    The partly masked tiles check only what can fail there. Unless RAGGED (n_k not a multiple of the key tile:
    LAYOUT_BLOCK if SPARSE, else BLOCK_N) no tile reaches past n_k: no bounds checks (on an H200's BigBird row the
    sparse forward ran 1.5 % faster without them; the same in the two sparse backward kernels was 6 % slower). Dense:
    the tiles right of the full ones start at or after the last row's band_lo, so they never check band_lo; with
    WIDE_BAND (band_hi - band_lo >= BLOCK_M + BLOCK_N) the left-edge tiles end before the first row's band_hi, so
    they never check band_hi. EDGES_IN_ONE_LOOP: the partly masked tiles of both edges run in one loop (each checks
    both band limits) before the full ones; the host picks it where it measured faster (``attention_forward``).
    PAIRED_EDGES (``_paired_edges``: BLOCK_M == BLOCK_N, a causal window and band_hi that are multiples of it, the
    host sets it where it measured faster): a query block whose window has both edge blocks inside K folds the two
    in one step (``_fwd_edge_pair``); the edge loops then run no step. KP, VP: with PAIRED_EDGES and USE_TMA, K and V
    as the 5-D descriptors of ``_pair_descriptor`` (one copy per pair of edge blocks); otherwise unused."""
    # Query blocks in reverse order: under a causal mask the last blocks have the most work, start them first.
    n_blocks = tl.cdiv(n_q, BLOCK_M)
    rank, bh = _tile(n_blocks, n_bh, heads_per_chunk)
    pid_m = n_blocks - 1 - rank
    b32 = bh // H  # int32 indices for the tensor descriptors
    h32 = bh % H
    hk32 = h32 // GROUP
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    hk = h // GROUP
    LSE += bh.to(tl.int64) * n_q
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if not USE_TMA:
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + hk * stride_kh
        V += b * stride_vb + hk * stride_vh
        O += b * stride_ob + h * stride_oh
    q = _load_rows(Q, b32, h32, start_m, n_q, stride_qn, offs_d, BLOCK_M, True, USE_TMA)
    # A finite floor instead of -inf keeps exp2(m_old - m_new) defined for rows that have seen no key yet.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if SPARSE:
        steps: tl.constexpr = LAYOUT_BLOCK // BLOCK_N  # loop steps per kept layout block
        first, last = _kept_span(ROW_SPAN, start_m // LAYOUT_BLOCK)
        for it in range(first * steps, last * steps):
            start_n = _kept_start(COL_IDX, it, steps, LAYOUT_BLOCK, BLOCK_N)
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k,
                                       band_lo, band_hi, qk_scale, BLOCK_N, RAGGED, False, False)
    else:
        lo, full_lo, full_hi, hi = _block_range(start_m, BLOCK_M, n_k, BLOCK_N, band_lo, band_hi, HAS_LO, HAS_HI)
        if PAIRED_EDGES:
            if (full_lo - lo == BLOCK_N) & (hi - full_hi == BLOCK_N):  # both edge blocks exist, inside K
                acc, l_i, m_i = _fwd_edge_pair(acc, l_i, m_i, q, K, V, KP, VP, stride_kn, stride_vn, lo, full_hi,
                                               offs_d, qk_scale, BLOCK_N, USE_TMA, b32, hk32)
                lo = full_lo
                hi = full_hi
        if EDGES_IN_ONE_LOOP:
            n_left = (full_lo - lo) // BLOCK_N
            for j in range(0, n_left + tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK_N)):
                start_n = tl.where(j < n_left, lo + j * BLOCK_N, full_hi + (j - n_left) * BLOCK_N)
                acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d,
                                           n_k, band_lo, band_hi, qk_scale, BLOCK_N, True, HAS_LO, HAS_HI, USE_TMA,
                                           b32, hk32, RAGGED)
        else:
            for start_n in range(lo, full_lo, BLOCK_N):  # left edge of a window: partly masked
                acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d,
                                           n_k, band_lo, band_hi, qk_scale, BLOCK_N, True, HAS_LO,
                                           HAS_HI and not WIDE_BAND, USE_TMA, b32, hk32, RAGGED)
        for start_n in range(full_lo, full_hi, BLOCK_N):  # the bulk: no mask, no bounds checks
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k,
                                       band_lo, band_hi, qk_scale, BLOCK_N, False, HAS_LO, HAS_HI, USE_TMA, b32, hk32)
        if not EDGES_IN_ONE_LOOP:
            for start_n in range(full_hi, hi, BLOCK_N):  # diagonal (causal) and the ragged tail: partly masked
                acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d,
                                           n_k, band_lo, band_hi, qk_scale, BLOCK_N, True, False, HAS_HI, USE_TMA,
                                           b32, hk32, RAGGED)
    # Divide by the softmax sum; write O and the natural-log LSE (rows without keys: zeros and -inf).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    out = acc / l_safe[:, None]
    if USE_TMA:
        O.store([b32, h32, start_m, 0], out.to(O.dtype).reshape([1, 1, BLOCK_M, HEAD_DIM]))  # rows past n_q: clipped
    else:
        tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < n_q)
    tl.store(LSE + offs_m, lse, mask=offs_m < n_q)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _load_lse2(LSE, offs, n):
    """LSE in base 2 for rows < n; rows without keys (-inf) become +inf so that P = exp2(s - lse) = 0."""
    lse = tl.load(LSE + offs, mask=offs < n, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k, band_lo, band_hi,
              qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
              USE_TMA: tl.constexpr = False, b=0, hk=0, CHECK_N: tl.constexpr = True):
    """Fold key block [start_n, start_n + BLOCK_N) into dQ (MASKED, CHECK_N as in ``_fwd_block``). USE_TMA: ``K``/``V``
    are 4-D tensor descriptors."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, b, hk, start_n, n_k, stride_kn, offs_d, BLOCK_N, MASKED and CHECK_N, USE_TMA)
    v = _load_rows(V, b, hk, start_n, n_k, stride_vn, offs_d, BLOCK_N, MASKED and CHECK_N, USE_TMA)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])  # recomputed, never stored
    if MASKED:
        p = tl.where(_band_mask(offs_m, offs_n, n_k, band_lo, band_hi, HAS_LO, HAS_HI, CHECK_N), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit(do_not_specialize=_DYNAMIC)
def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, LSE2, DELTA, ROW_SPAN, COL_IDX,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                 stride_dqb, stride_dqh, stride_dqn,
                 H, GROUP, n_q, n_k, band_lo, band_hi, qk_scale, sm_scale, n_bh, heads_per_chunk,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SPARSE: tl.constexpr, USE_TMA: tl.constexpr = False,
                 LAYOUT_BLOCK: tl.constexpr = 1, RAGGED: tl.constexpr = True, WIDE_BAND: tl.constexpr = False):
    """dQ of one query block: the forward's loop again, with dS = P * (dP - delta) in place of the softmax.
    It first computes the block's ``delta_i = sum_d dO_id O_id`` (= sum_j P_ij dP_ij, the row term of the softmax
    gradient) and its LSE in base 2, and stores both for the dK/dV kernel, which runs next and so reads a ready
    base-2 LSE in every step instead of converting LSE there (54 fewer instructions per step of its loop at D = 64).
    Same grid, order and masking (RAGGED, WIDE_BAND) as the dense forward.
    USE_TMA (dense): K and V are 4-D tensor descriptors with blocks (1, 1, BLOCK_N, HEAD_DIM)."""
    n_blocks = tl.cdiv(n_q, BLOCK_M)
    rank, bh = _tile(n_blocks, n_bh, heads_per_chunk)
    pid_m = n_blocks - 1 - rank
    b32 = bh // H  # int32 indices for the tensor descriptors
    hk32 = (bh % H) // GROUP
    b = b32.to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    Q += b * stride_qb + h * stride_qh
    O += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    if not USE_TMA:
        K += b * stride_kb + hk * stride_kh
        V += b * stride_vb + hk * stride_vh
    LSE += bh.to(tl.int64) * n_q
    LSE2 += bh.to(tl.int64) * n_q
    DELTA += bh.to(tl.int64) * n_q
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < n_q
    q = _load_rows(Q, 0, 0, start_m, n_q, stride_qn, offs_d, BLOCK_M, True, False)
    do = _load_rows(DO, 0, 0, start_m, n_q, stride_don, offs_d, BLOCK_M, True, False)
    lse2 = _load_lse2(LSE, offs_m, n_q)
    o = _load_rows(O, 0, 0, start_m, n_q, stride_on, offs_d, BLOCK_M, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=offs_m < n_q)
    tl.store(LSE2 + offs_m, lse2, mask=offs_m < n_q)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if SPARSE:  # as in the forward
        steps: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
        first, last = _kept_span(ROW_SPAN, start_m // LAYOUT_BLOCK)
        for it in range(first * steps, last * steps):
            start_n = _kept_start(COL_IDX, it, steps, LAYOUT_BLOCK, BLOCK_N)
            dq = _dq_block(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k,
                           band_lo, band_hi, qk_scale, BLOCK_N, True, False, False)
    else:
        lo, full_lo, full_hi, hi = _block_range(start_m, BLOCK_M, n_k, BLOCK_N, band_lo, band_hi, HAS_LO, HAS_HI)
        for start_n in range(lo, full_lo, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k,
                           band_lo, band_hi, qk_scale, BLOCK_N, True, HAS_LO, HAS_HI and not WIDE_BAND, USE_TMA, b32,
                           hk32, RAGGED)
        for start_n in range(full_lo, full_hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            dq = _dq_block(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k,
                           band_lo, band_hi, qk_scale, BLOCK_N, False, HAS_LO, HAS_HI, USE_TMA, b32, hk32)
        for start_n in range(full_hi, hi, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, start_n, offs_m, offs_d, n_k,
                           band_lo, band_hi, qk_scale, BLOCK_N, True, False, HAS_HI, USE_TMA, b32, hk32, RAGGED)
    tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows)


@triton.jit
def _head_source(T, b, h, stride_b, stride_h, USE_TMA: tl.constexpr):
    """What ``_load_rows`` reads head (b, h) from: the descriptor itself, or the pointer to the head's first row."""
    if USE_TMA:
        src = T
    else:
        src = T + b * stride_b + h * stride_h
    return src


@triton.jit
def _dkdv_block(dk, dv, k, v, Q, DO, LSE2, DELTA, stride_qn, stride_don, start_m, offs_n, offs_d, n_q,
                band_lo, band_hi, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, USE_TMA: tl.constexpr = False, b=0, h=0,
                CHECK_N: tl.constexpr = True, EARLY_DP: tl.constexpr = False):
    """Fold query block [start_m, start_m + BLOCK_M) into dK, dV of one key block (transposed: keys are rows).
    LSE2: the base-2 LSE the dQ kernel stored. MASKED, CHECK_N (rows past n_q): as in ``_fwd_block``.
    USE_TMA: ``Q``/``DO`` are 4-D tensor descriptors (rows past n_q arrive as zeros). EARLY_DP: start dP^T = V dO^T
    before the exponentials (``_early_dp``), at the cost of one more live score tile."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, b, h, start_m, n_q, stride_qn, offs_d, BLOCK_M, MASKED and CHECK_N, USE_TMA)
    do = _load_rows(DO, b, h, start_m, n_q, stride_don, offs_d, BLOCK_M, MASKED and CHECK_N, USE_TMA)
    if MASKED and CHECK_N:  # rows past n_q: P = 0 comes from the mask below, so zero-fill (what cp.async does
        # natively; other=inf cost the block-sparse dK/dV kernel 9 % on an H200, with a select after every load)
        lse2 = tl.load(LSE2 + offs_m, mask=offs_m < n_q, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=offs_m < n_q, other=0.0)
    else:
        lse2 = tl.load(LSE2 + offs_m)
        delta = tl.load(DELTA + offs_m)
    qk_t = tl.dot(k, tl.trans(q))
    if EARLY_DP:  # issued before the exponentials, so the tensor cores compute dP^T while they run
        dp_t = tl.dot(v, tl.trans(do))
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])  # P^T, (BLOCK_N, BLOCK_M)
    if MASKED:
        p_t = tl.where(_band_mask(offs_n, offs_m, n_q, band_lo, band_hi, HAS_LO, HAS_HI, CHECK_N), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    if not EARLY_DP:
        dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=_DYNAMIC)
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE2, DELTA, COL_SPAN, ROW_IDX,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn,
                   H, GROUP, n_q, n_k, band_lo, band_hi, qk_scale, sm_scale, n_bh, heads_per_chunk,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SPARSE: tl.constexpr, USE_TMA: tl.constexpr = False,
                   LAYOUT_BLOCK: tl.constexpr = 1, RAGGED: tl.constexpr = True, EARLY_DP: tl.constexpr = False):
    """1-D grid of key blocks x B * Hkv (order: ``_tile``; under a causal mask the first key blocks are heaviest).
    band_lo/band_hi bound ``i - j`` (query minus key): the forward's band seen from the keys' side. SPARSE: the
    query blocks that keep this key block's layout column c, ROW_IDX[COL_SPAN[2c]:COL_SPAN[2c + 1]] (the spans of
    the transposed layout), each LAYOUT_BLOCK // BLOCK_M steps of the loop. USE_TMA (dense): Q and DO are 4-D tensor
    descriptors with blocks (1, 1, BLOCK_M, HEAD_DIM). Dense and not RAGGED (n_q a multiple of BLOCK_M): no query
    bounds checks.

    GQA: every query head of the group adds to this K/V head. The (head, block) pairs are walked as ONE flat loop
    per kind of block: a loop over heads around the block loops made the compiler spill registers.
    """
    pid_n, bhk = _tile(tl.cdiv(n_k, BLOCK_N), n_bh, heads_per_chunk)
    n_kv_heads = H // GROUP
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = (bhk % n_kv_heads).to(tl.int64)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < n_k
    k = _load_rows(K, 0, 0, start_n, n_k, stride_kn, offs_d, BLOCK_N, True, False)
    v = _load_rows(V, 0, 0, start_n, n_k, stride_vn, offs_d, BLOCK_N, True, False)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    steps: tl.constexpr = LAYOUT_BLOCK // BLOCK_M  # SPARSE: loop steps per kept layout block
    if SPARSE:
        first, last = _kept_span(COL_SPAN, start_n // LAYOUT_BLOCK)
        n_masked = (last - first) * steps
    else:
        lo, full_lo, full_hi, hi = _block_range(start_n, BLOCK_N, n_q, BLOCK_M, band_lo, band_hi, HAS_LO, HAS_HI)
        n_left = (full_lo - lo) // BLOCK_M
        n_masked = n_left + tl.cdiv(tl.maximum(hi - full_hi, 0), BLOCK_M)
        n_full = (full_hi - full_lo) // BLOCK_M
        for it in range(0, GROUP * n_full):  # fully allowed query blocks: no mask
            g = it // tl.maximum(n_full, 1)
            start_m = tl.multiple_of(full_lo + (it - g * n_full) * BLOCK_M, BLOCK_M)
            h = hk * GROUP + g
            q_src = _head_source(Q, b, h, stride_qb, stride_qh, USE_TMA)
            do_src = _head_source(DO, b, h, stride_dob, stride_doh, USE_TMA)
            dk, dv = _dkdv_block(dk, dv, k, v, q_src, do_src, LSE2 + (b * H + h) * n_q, DELTA + (b * H + h) * n_q,
                                 stride_qn, stride_don, start_m, offs_n, offs_d, n_q, band_lo, band_hi, qk_scale,
                                 BLOCK_M, False, HAS_LO, HAS_HI, USE_TMA, b.to(tl.int32), h.to(tl.int32),
                                 EARLY_DP=EARLY_DP)
    for it in range(0, GROUP * n_masked):  # partly masked query blocks (dense: left of the full ones, then right)
        g = it // tl.maximum(n_masked, 1)
        j = it - g * n_masked
        if SPARSE:
            start_m = _kept_start(ROW_IDX + first, j, steps, LAYOUT_BLOCK, BLOCK_M)
        else:
            start_m = tl.where(j < n_left, lo + j * BLOCK_M, full_hi + (j - n_left) * BLOCK_M)
        h = hk * GROUP + g
        q_src = _head_source(Q, b, h, stride_qb, stride_qh, USE_TMA)
        do_src = _head_source(DO, b, h, stride_dob, stride_doh, USE_TMA)
        dk, dv = _dkdv_block(dk, dv, k, v, q_src, do_src, LSE2 + (b * H + h) * n_q, DELTA + (b * H + h) * n_q,
                             stride_qn, stride_don, start_m, offs_n, offs_d, n_q, band_lo, band_hi, qk_scale, BLOCK_M,
                             True, HAS_LO and not SPARSE, HAS_HI and not SPARSE, USE_TMA, b.to(tl.int32),
                             h.to(tl.int32), RAGGED or SPARSE, EARLY_DP)
    DK += b * stride_dkb + hk * stride_dkh
    DV += b * stride_dvb + hk * stride_dvh
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=cols)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=cols)


# ------------------------------------------------------------------------------------- configs and tuning
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel: rows per program, columns per step, warps, stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # dense only: fetch the looped-over tiles through tensor descriptors (Hopper's copy engine)


# Hopper candidates (block_m, block_n, warps, stages); the tuner times them once per shape class.
# Forward: 128-row query blocks feed two warpgroups' wgmma; block_n trades registers (the score tile) for fewer
# online-softmax rescalings. On an H200 (every candidate's time: the tuning log in results/flash_attention_bench.json)
# 64 x 64 tiles on one warpgroup, several programs per SM, loaded by the copy engine (TMA), won the sliding windows
# and the 1k causal rows. 64 x 128 TMA tiles on one warpgroup (half as many softmax rescalings) won the causal
# rows at D = 64 at 16k and 64k, by 4 to 5 %, and came within 1 % of the 64 x 64 ones at 4k. At causal D = 128
# from 4k on the winners, 128 x 128 TMA tiles (each K/V tile read once for 128 query rows) and 128 x 64 ones
# without TMA, are within 3 % of each other; with 3 stages the 128 x 128 tiles take 230,400 of the 232,448 bytes
# of shared memory a block may use. Backward: dK/dV keep two (block_n x D) fp32 accumulators in registers, so a
# wide key block needs 8 warps at D = 128. There, 64 x 64 TMA tiles on 4 warps with 2 stages (two programs per SM,
# dP^T not early) took 3 to 13 % off the forward+backward of the 32 x 64 ones, whose S^T and dP^T steps are
# 64 x 32 products with both operands in shared memory (benchmarks/experiments/logs/ab_dkdv64_*.json).
_GPU_CONFIGS = {
    "fwd": {
        64: [KernelConfig(128, 64, 4, 3), KernelConfig(128, 64, 4, 4), KernelConfig(128, 128, 8, 3),
             KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 4),
             KernelConfig(128, 64, 4, 3, tma=True), KernelConfig(128, 128, 8, 3, tma=True),
             KernelConfig(64, 64, 4, 2, tma=True), KernelConfig(64, 64, 4, 3, tma=True),
             KernelConfig(128, 64, 8, 3, tma=True), KernelConfig(128, 128, 8, 4, tma=True),
             KernelConfig(64, 128, 4, 2, tma=True), KernelConfig(64, 128, 4, 3, tma=True)],
        128: [KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 4), KernelConfig(128, 128, 8, 2),
              KernelConfig(128, 128, 8, 3), KernelConfig(64, 64, 4, 3),
              KernelConfig(128, 64, 8, 3, tma=True), KernelConfig(128, 128, 8, 2, tma=True),
              KernelConfig(64, 64, 4, 2, tma=True), KernelConfig(64, 64, 4, 3, tma=True),
              KernelConfig(128, 64, 8, 4, tma=True), KernelConfig(128, 128, 8, 3, tma=True)],
    },
    "dq": {
        64: [KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 3), KernelConfig(128, 32, 4, 3),
             KernelConfig(64, 32, 4, 4), KernelConfig(128, 64, 8, 3, tma=True), KernelConfig(64, 64, 4, 3, tma=True)],
        128: [KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 3), KernelConfig(128, 32, 8, 3),
              KernelConfig(64, 32, 4, 4), KernelConfig(128, 64, 8, 3, tma=True), KernelConfig(64, 64, 4, 3, tma=True)],
    },
    "dkdv": {
        64: [KernelConfig(64, 128, 8, 3), KernelConfig(32, 128, 8, 3), KernelConfig(64, 64, 4, 3),
             KernelConfig(32, 64, 4, 4), KernelConfig(64, 64, 4, 3, tma=True), KernelConfig(64, 128, 8, 3, tma=True)],
        128: [KernelConfig(32, 128, 8, 3), KernelConfig(64, 128, 8, 3), KernelConfig(32, 64, 4, 4),
              KernelConfig(64, 128, 8, 2), KernelConfig(64, 128, 8, 2, tma=True), KernelConfig(32, 64, 4, 4, tma=True),
              KernelConfig(64, 64, 8, 3, tma=True), KernelConfig(32, 128, 8, 2, tma=True),
              KernelConfig(64, 64, 4, 2, tma=True)],
    },
}
# (Registers, spills and shared memory of each: benchmarks/flash_compile_report.py, results/flash_compile_report.json.)
# Under the interpreter the time grows with programs x loop steps: one config, tiles small enough that the
# tests' short sequences still span several blocks (exercising masked, full and tail blocks).
_INTERPRET_CONFIG = KernelConfig(32, 32, 4, 1)

_forced: dict[str, KernelConfig] = {}
_tuned: dict[tuple, KernelConfig] = {}
TUNING_LOG: list[dict] = []  # one entry per tuning: kernel, key, every config's median ms, the winner


def force_config(kernel: str, config: KernelConfig | None) -> None:
    """Use ``config`` for ``kernel`` ("fwd", "dq", "dkdv") instead of tuning (``None`` restores tuning)."""
    if kernel not in _GPU_CONFIGS:
        raise ValueError(f"kernel must be one of {sorted(_GPU_CONFIGS)}, got {kernel!r}")
    if config is None:
        _forced.pop(kernel, None)
    else:
        _forced[kernel] = config


def each_config(configs_of):
    """Yield ``(kernel, config)`` for every config ``configs_of(kernel)`` lists, for each of the three kernels, with
    that config forced and the other two kernels forced to their first config (so nothing is tuned meanwhile).
    Tuning is restored when the loop ends. For sweeps: ``each_config(lambda k: candidate_configs(k, 64))``."""
    try:
        for kernel in _GPU_CONFIGS:
            for config in configs_of(kernel):
                for other in _GPU_CONFIGS:
                    force_config(other, configs_of(other)[0])
                force_config(kernel, config)
                yield kernel, config
    finally:
        restore_tuning()


def restore_tuning() -> None:
    """Undo every ``force_config``: each kernel is tuned again."""
    for kernel in _GPU_CONFIGS:
        force_config(kernel, None)


def candidate_configs(kernel: str, head_dim: int) -> list[KernelConfig]:
    """The configs the tuner tries for ``kernel`` at ``head_dim`` (one fixed config under the interpreter)."""
    if interpreting():
        return [_INTERPRET_CONFIG]
    return _GPU_CONFIGS[kernel][64 if head_dim <= 64 else 128]


# The tuner times each config as benchmarks/attention.py times a row: ``do_bench`` with its default 25 ms warm-up
# and 100 ms of calls, after TUNE_HEAT_MS of the first config. A GPU kept busy lowers its clock to stay within its
# power limit (an H200 at 700 W ran these kernels at 1.6-1.9 GHz instead of 1.98 GHz), so a config timed in the
# first milliseconds after idle looks up to 6 % faster than it runs in steady state, and the ranking can change.
TUNE_HEAT_MS = 150


def _pick_config(kernel: str, key: tuple, head_dim: int, launch, tma_ok: bool = False,
                 configs: list[KernelConfig] | None = None) -> KernelConfig:
    """The forced config, or the fastest of ``configs`` (default: the candidates) for this key, tuned once."""
    if kernel in _forced and (configs is None or _forced[kernel] in configs):
        return _forced[kernel]
    if configs is None:
        configs = [c for c in candidate_configs(kernel, head_dim) if tma_ok or not c.tma]
    if len(configs) == 1:
        return configs[0]
    full_key = (kernel,) + key
    if full_key not in _tuned:
        times = []
        for cfg in configs:
            warmup = 25 if any(math.isfinite(t) for t in times) else TUNE_HEAT_MS
            try:
                times.append(triton.testing.do_bench(lambda: launch(cfg), warmup=warmup, rep=100,
                                                     return_mode="median"))
            except Exception as err:  # e.g. out of shared memory / resources for this tile shape
                times.append(math.inf)
                TUNING_LOG.append({"kernel": kernel, "key": repr(key), "config": repr(cfg), "error": repr(err)})
        best = min(range(len(configs)), key=times.__getitem__)
        _tuned[full_key] = configs[best]
        TUNING_LOG.append({"kernel": kernel, "key": repr(key), "times_ms": {repr(c): t for c, t in zip(configs, times)},
                           "best": repr(configs[best])})
    return _tuned[full_key]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride()[:3]  # one call, not three: 4 of these per forward, 12 per backward, on the launch path


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv unwraps constexprs on every call: 2.3 us on an H200 host (host_pieces.py)


# ----------------------------------------------------------------------------------------- launchers
_NO_LAYOUT: dict[torch.device, torch.Tensor] = {}


def _no_layout(device):
    """A one-element placeholder for the unused layout arguments of dense launches (made once per device: a fresh
    tensor per call cost an allocation and a fill kernel on the host's launch path)."""
    device = torch.device(device)
    if device not in _NO_LAYOUT:
        _NO_LAYOUT[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _NO_LAYOUT[device]


# Bytes of the streamed side (K and V, or Q and dO) that one chunk of heads in ``_tile``'s order may span: well
# inside the L2 of an H100 (50 MB) or H200 (60 MB). On an H200 at causal N=4k, D=64, a chunk of all 128 heads ran
# 13 to 16 % slower than chunks of 19 (scratch run, 2026-12-01): the heads' K/V no longer stayed in L2.
L2_CHUNK_BYTES = 20_000_000


def _heads_per_chunk(n_bh: int, streamed_rows: int, head_bytes_per_row: int, ragged: bool) -> int:
    """Heads per chunk of the tile order: as many as keep their streamed rows within ``L2_CHUNK_BYTES`` when the
    blocks' work differs (``ragged``: causal, no lower band limit); 1 otherwise (windows, layouts: head by head)."""
    if not ragged:
        return 1
    return max(1, min(n_bh, L2_CHUNK_BYTES // max(1, 2 * streamed_rows * head_bytes_per_row)))


def attention_forward(q, k, v, band_lo, band_hi, scale, layout=None, block=None):
    """Run the forward kernel; returns ``(o, lse)``.

    Dense: ``band_lo``/``band_hi`` bound ``j - i`` (None = unbounded). Block-sparse: ``layout = (row_span, col_idx)``,
    the ``layout_spans`` of a block layout with tiles of ``block`` x ``block`` tokens.
    """
    b, h, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    o = torch.empty((b, h, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    row_span, col_idx = layout if layout is not None else (_no_layout(q.device),) * 2

    chunk = _heads_per_chunk(b * h, n_k, d * k.element_size(), layout is None and band_lo is None)
    edges_in_one_loop = _edges_in_one_loop(d, band_lo)

    def launch(cfg):
        grid = (_cdiv(n_q, cfg.block_m) * b * h,)
        tensors = (q, k, v, o)
        span = band_hi - band_lo + 1 if layout is None and _paired_edges(d, band_lo, band_hi, cfg) else None
        paired = span is not None and n_k >= span + cfg.block_n  # else no query block has both edge blocks
        if cfg.tma:
            tensors = tuple(_descriptor(t, rows) for t, rows in zip(tensors, (cfg.block_m, cfg.block_n, cfg.block_n,
                                                                                   cfg.block_m)))
        kv_pairs = tensors[1:3]  # unused unless paired through descriptors
        if cfg.tma and paired:
            kv_pairs = (_pair_descriptor(k, span, cfg.block_n), _pair_descriptor(v, span, cfg.block_n))
        _attn_fwd[grid](*tensors, lse, row_span, col_idx, *kv_pairs, *_strides(q), *_strides(k), *_strides(v),
                        *_strides(o), h, h // n_kv, n_q, n_k, band_lo or 0, band_hi or 0, scale * LOG2E, b * h, chunk,
                        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                        HAS_LO=band_lo is not None, HAS_HI=band_hi is not None, SPARSE=layout is not None,
                        USE_TMA=cfg.tma, LAYOUT_BLOCK=block or 1, RAGGED=n_k % (block or cfg.block_n) != 0,
                        WIDE_BAND=_wide_band(band_lo, band_hi, cfg), EDGES_IN_ONE_LOOP=edges_in_one_loop,
                        PAIRED_EDGES=paired,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if layout is not None:
        key = (d, str(q.dtype), "layout", block, _pow2(n_q), _pow2(n_k), h // n_kv > 1)
        launch(_pick_config("fwd", key, d, launch, configs=layout_candidate_configs("fwd", block, d)))
        return o, lse
    key = (d, str(q.dtype), band_lo is not None, band_hi is not None, _pow2(n_q), _pow2(n_k), h // n_kv > 1)
    tma_ok = _tma_ok(q, k, v, o)
    launch(_pick_config("fwd", key + (tma_ok,), d, launch, tma_ok=tma_ok))
    return o, lse


def _edges_in_one_loop(head_dim: int, band_lo) -> bool:
    """The forward's EDGES_IN_ONE_LOOP. Sliding windows on an H200 (benchmarks/experiments/logs/ab_edges.json): both
    edges in one loop ran 2 to 5 % faster at D = 128 and 6 to 9 % slower at D = 64 than a loop per edge."""
    return head_dim > 64 and band_lo is not None


def _paired_edges(head_dim: int, band_lo, band_hi, cfg: KernelConfig) -> bool:
    """The forward's PAIRED_EDGES: head_dim <= 64, square tiles, and a band whose width and upper limit are multiples
    of the tile, so that the left-edge and diagonal blocks of a query block keep complementary halves
    (``_fwd_edge_pair``). On an H200 (benchmarks/experiments/logs/ab_paired_edges.json, 64 x 64 TMA tiles) pairing
    made the D = 64 window forward 2 to 5 % faster and the D = 128 one 1 to 3 % slower; with the pair descriptors
    (``logs/ab_pair_desc_d128.json``) the D = 128 one moved by +0.3 to -2.1 %, within the noise. (Tiles of 2:1
    sides can pair too, two blocks per edge; compiled with Triton 3.6 for sm_90a, that doubled the shared memory of
    the 128 x 64 forward and at D = 128 serialized its warpgroup MMAs, ``ptxas`` C7515.)"""
    if head_dim > 64 or band_lo is None or band_hi is None or cfg.block_m != cfg.block_n:
        return False
    return band_hi % cfg.block_n == 0 and (band_hi - band_lo + 1) % cfg.block_n == 0


def _early_dp(head_dim: int, cfg: KernelConfig) -> bool:
    """Whether the dK/dV kernel issues dP^T = V dO^T before the exponentials of P^T, so that the tensor cores run
    it meanwhile (Triton waits for each product right after issuing it, but ptxas moves independent instructions,
    here the exponentials, above that wait). That keeps one more score tile live. At D = 128, where the dK and dV
    accumulators alone take 128 registers per thread, only tiles of at most 16 scores per thread take it. Compiled
    for sm_90a (Triton 3.6), those spill at most 32 bytes more with it; with 32 scores per thread the spills grew
    from 56-88 to 136-308 bytes (64 x 128 tiles on 8 warps: the causal 16k backward ran 14 % slower on an H200)
    and from 88 to 276 (64 x 64 tiles on 4 warps, whose loop over full blocks went from 1 to 53 local-memory
    accesses). No D <= 64 config spills with it."""
    return head_dim <= 64 or cfg.block_m * cfg.block_n <= 16 * 32 * cfg.num_warps


def _wide_band(band_lo, band_hi, cfg: KernelConfig) -> bool:
    """The kernels' WIDE_BAND, ``band_hi - band_lo >= block_m + block_n``: left-edge tiles never check band_hi."""
    return band_lo is not None and band_hi is not None and band_hi - band_lo >= cfg.block_m + cfg.block_n


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A 4-D ``(B, H, N, D)`` tensor as a tensor descriptor whose blocks are ``rows`` rows of one head."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def _pair_descriptor(t: torch.Tensor, span: int, rows: int) -> TensorDescriptor:
    """``(B, H, N, D)`` as a 5-D descriptor ``(B, H, 2, N - span, D)`` (element ``[b, h, j, r]`` is row
    ``r + j * span``) with blocks ``(1, 1, 2, rows, D)``: one copy brings two row blocks ``span`` rows apart, a
    window's left-edge and diagonal blocks (``_fwd_edge_pair``). Needs N > span."""
    bs, hs, ns, ds = t.stride()
    return TensorDescriptor(t, [t.shape[0], t.shape[1], 2, t.shape[2] - span, t.shape[3]], [bs, hs, span * ns, ns, ds],
                            [1, 1, 2, rows, t.shape[3]])


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors need Hopper or newer, 16-byte aligned bases and 16-byte multiples as strides."""
    if interpreting():
        return True
    if not tensors[0].is_cuda or _capability(tensors[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               for t in tensors)


def layout_candidate_configs(kernel: str, block: int, head_dim: int) -> list[KernelConfig]:
    """Candidates for a layout of ``block``-token blocks: the dense candidates whose tiles divide the block (a kept
    128 x 128 block is then walked as, e.g., 64 x 64 tiles), without TMA; one block x block tile if none does."""
    if interpreting():  # tiles smaller than the block where the tests' blocks allow, to exercise the sub-steps
        return [KernelConfig(min(block, 16), min(block, 16), 4, 1)]
    fits = [c for c in candidate_configs(kernel, head_dim)
            if not c.tma and block % c.block_m == 0 and block % c.block_n == 0]
    return fits or [KernelConfig(block, block, 4, 3)]


def attention_backward(q, k, v, o, lse, do, band_lo, band_hi, scale, layout=None, layout_t=None, block=None):
    """Run the backward kernels (dQ with delta, then dK/dV); returns ``(dq, dk, dv)``.

    Block-sparse: ``layout`` is the ``layout_spans`` of the block layout (for dQ) and ``layout_t`` those of its
    transpose (for dK/dV: the query blocks of each key block).
    """
    tuning = _backward_key(q, k, v, do, band_lo, band_hi, layout is not None, block)  # once: it is on the launch path
    dq, lse2, delta = backward_dq(q, k, v, o, lse, do, band_lo, band_hi, scale, layout, block, tuning)
    dk, dv = backward_dkdv(q, k, v, do, lse2, delta, band_lo, band_hi, scale, layout_t, block, tuning)
    return dq, dk, dv


def _backward_key(q, k, v, do, band_lo, band_hi, sparse: bool, block) -> tuple[tuple, bool]:
    """The tuning key of both backward kernels, and whether their dense tiles may come through TMA."""
    b, h, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    if sparse:
        return (d, str(q.dtype), "layout", block, _pow2(n_q), _pow2(n_k), h // n_kv > 1), False
    tma_ok = _tma_ok(q, k, v, do)
    return (d, str(q.dtype), band_lo is not None, band_hi is not None, _pow2(n_q), _pow2(n_k), h // n_kv > 1,
            tma_ok), tma_ok


def backward_dq(q, k, v, o, lse, do, band_lo, band_hi, scale, layout=None, block=None, tuning=None):
    """The dQ kernel: ``(dq, lse2, delta)``, with the base-2 LSE (``+inf`` for rows without keys) and
    ``delta = rowsum(dO * O)`` it also writes, both ``(B, H, N)`` float32, for ``backward_dkdv``. ``tuning``: the
    ``_backward_key`` of these inputs, if the caller has it."""
    b, h, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    group = h // n_kv
    delta = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    lse2 = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    dq = torch.empty((b, h, n_q, d), device=q.device, dtype=q.dtype)
    has_lo, has_hi = band_lo is not None, band_hi is not None
    sparse = layout is not None
    row_span, col_idx = layout if sparse else (_no_layout(q.device),) * 2
    ragged = not sparse and band_lo is None  # causal (or full): the blocks' work differs
    dq_chunk = _heads_per_chunk(b * h, n_k, d * k.element_size(), ragged)

    def launch_dq(cfg):
        kt, vt = k, v
        if cfg.tma:
            kt, vt = _descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)
        _attn_bwd_dq[(_cdiv(n_q, cfg.block_m) * b * h,)](
            q, kt, vt, o, do, dq, lse, lse2, delta, row_span, col_idx, *_strides(q), *_strides(k), *_strides(v),
            *_strides(o), *_strides(do), *_strides(dq), h, group, n_q, n_k, band_lo or 0, band_hi or 0, scale * LOG2E,
            scale, b * h, dq_chunk,
            HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_LO=has_lo, HAS_HI=has_hi, SPARSE=sparse,
            USE_TMA=cfg.tma, LAYOUT_BLOCK=block or 1, RAGGED=n_k % cfg.block_n != 0,
            WIDE_BAND=_wide_band(band_lo, band_hi, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key, tma_ok = tuning or _backward_key(q, k, v, do, band_lo, band_hi, sparse, block)
    configs = layout_candidate_configs("dq", block, d) if sparse else None
    launch_dq(_pick_config("dq", key, d, launch_dq, tma_ok=tma_ok, configs=configs))
    return dq, lse2, delta


def backward_dkdv(q, k, v, do, lse2, delta, band_lo, band_hi, scale, layout_t=None, block=None, tuning=None):
    """The dK/dV kernel on the ``lse2`` and ``delta`` that ``backward_dq`` wrote: ``(dk, dv)``; ``tuning`` as there."""
    b, h, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    group = h // n_kv
    dk = torch.empty((b, n_kv, n_k, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, n_kv, n_k, d), device=q.device, dtype=v.dtype)
    sparse = layout_t is not None
    col_span, row_idx = layout_t if sparse else (_no_layout(q.device),) * 2
    ragged = not sparse and band_lo is None
    dkdv_chunk = _heads_per_chunk(b * n_kv, n_q * group, d * q.element_size(), ragged)
    # Seen from the keys: query i may see key j  <=>  -band_hi <= i - j <= -band_lo.
    t_lo = None if band_hi is None else -band_hi
    t_hi = None if band_lo is None else -band_lo

    def launch_dkdv(cfg):
        qt, dot = q, do
        if cfg.tma:
            qt, dot = _descriptor(q, cfg.block_m), _descriptor(do, cfg.block_m)
        _attn_bwd_dkdv[(_cdiv(n_k, cfg.block_n) * b * n_kv,)](
            qt, k, v, dot, dk, dv, lse2, delta, col_span, row_idx, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dk), *_strides(dv), h, group, n_q, n_k, t_lo or 0, t_hi or 0, scale * LOG2E,
            scale, b * n_kv, dkdv_chunk, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_LO=t_lo is not None,
            HAS_HI=t_hi is not None, SPARSE=sparse, USE_TMA=cfg.tma, LAYOUT_BLOCK=block or 1,
            RAGGED=n_q % cfg.block_m != 0, EARLY_DP=_early_dp(d, cfg), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)

    key, tma_ok = tuning or _backward_key(q, k, v, do, band_lo, band_hi, sparse, block)
    configs = layout_candidate_configs("dkdv", block, d) if sparse else None
    launch_dkdv(_pick_config("dkdv", key, d, launch_dkdv, tma_ok=tma_ok, configs=configs))
    return dk, dv
