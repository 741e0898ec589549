"""FlashAttention in plain PyTorch: the online softmax, a tiled forward and the recomputing backward.

This is the algorithm of Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness" (NeurIPS 2022) and "FlashAttention-2" (2023), written with PyTorch tensor ops over blocks so that
every step can be read and checked on a CPU. The Triton kernels in ``dldna.kernels.flash_attention`` follow the
same loops block for block; on machines without a GPU ``flash_attention`` falls back to ``tiled_flash_attention``.

Shapes follow the book: ``q`` is ``(B, H, Nq, D)``, ``k``/``v`` are ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0``
(GQA/MQA without repeating K/V: queries are viewed as ``(B, Hkv, H // Hkv, Nq, D)``). Masks follow
``band_limits``: causal is bottom-right aligned (query ``i`` sits at key position ``i + Nk - Nq``).

Used in chapter 5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dldna.attention.reference import check_qkv

__all__ = [
    "online_softmax",
    "band_limits",
    "block_range",
    "block_schedule",
    "tiled_attention_forward",
    "tiled_attention_backward",
    "tiled_flash_attention",
    "IOCounter",
    "hbm_bytes_standard",
    "hbm_bytes_flash",
]


def online_softmax(x: np.ndarray, block: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Softmax of one row read ``block`` entries at a time, keeping only a running max ``m`` and sum ``l``.

    After block ``t`` with entries ``x_t``: ``m' = max(m, max x_t)`` and ``l' = l * exp(m - m') + sum exp(x_t - m')``.
    By induction ``l = sum_{seen j} exp(x_j - m)``: the factor ``exp(m - m')`` moves every earlier term from the old
    reference point ``m`` to the new one, so after the last block ``exp(x - m) / l`` is the exact softmax.

    Returns the softmax and the ``(m, l)`` pair after every block (for plotting the rescaling).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D array, got shape {x.shape}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    m, l, history = -math.inf, 0.0, []
    for start in range(0, x.size, block):
        xb = x[start : start + block]
        m_new = max(m, float(xb.max()))
        l = l * math.exp(m - m_new) + float(np.exp(xb - m_new).sum())
        m = m_new
        history.append((m, l))
    return np.exp(x - m) / l, history


@dataclass(frozen=True)
class Band:
    """Allowed keys of query ``i``: ``lo <= j - i <= hi`` (``None`` = unbounded), with bottom-right alignment.

    ``lo``/``hi`` already include the offset ``Nk - Nq``. Built by ``band_limits``.
    """

    lo: int | None
    hi: int | None

    def allowed(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool ``(len(rows), len(cols))``: True where key ``cols[c]`` may be seen by query ``rows[r]``."""
        diff = cols[None, :] - rows[:, None]
        keep = torch.ones_like(diff, dtype=torch.bool)
        if self.lo is not None:
            keep &= diff >= self.lo
        if self.hi is not None:
            keep &= diff <= self.hi
        return keep


def band_limits(n_q: int, n_k: int, causal: bool, window: int | None) -> Band:
    """The mask of ``flash_attention`` as a band of diagonals ``lo <= j - i <= hi``.

    * ``causal=False, window=None``: every key (unbounded band).
    * ``causal=True``: ``j <= i + (n_k - n_q)`` (bottom-right aligned, as ``dldna.attention.attention``).
    * ``causal=True, window=w``: additionally ``i + (n_k - n_q) - j < w`` (``w`` keys including itself, HF/Mistral).
    * ``causal=False, window=w``: ``|i + (n_k - n_q) - j| <= w // 2`` (as ``sliding_window_mask(..., causal=False)``).
    """
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    offset = n_k - n_q
    if causal:
        return Band(lo=None if window is None else offset - (window - 1), hi=offset)
    if window is None:
        return Band(lo=None, hi=None)
    return Band(lo=offset - window // 2, hi=offset + window // 2)


def block_range(start: int, block_rows: int, n_cols: int, block_cols: int, band: Band) -> tuple[int, int, int, int]:
    """Which column blocks rows ``[start, start + block_rows)`` need, split by whether they need a mask.

    Returns ``(lo, full_lo, full_hi, hi)``: blocks in ``[lo, full_lo)`` and ``[full_hi, hi)`` are partly masked,
    blocks in ``[full_lo, full_hi)`` are entirely allowed (no mask, no bounds check); everything outside
    ``[lo, hi)`` is skipped, which is what makes a sliding window cost O(N * window). The same arithmetic runs
    inside the Triton kernels; ``lo``, ``full_lo`` and ``full_hi`` are multiples of ``block_cols``.
    """
    last = start + block_rows - 1
    lo, hi = 0, n_cols
    if band.lo is not None:
        lo = max(0, start + band.lo) // block_cols * block_cols
    if band.hi is not None:
        hi = max(min(n_cols, last + band.hi + 1), lo)
    full_lo = lo
    if band.lo is not None:
        full_lo = -(-max(last + band.lo, lo) // block_cols) * block_cols
    full_hi = n_cols // block_cols * block_cols
    if band.hi is not None:
        full_hi = min(full_hi, max(start + band.hi + 1, 0) // block_cols * block_cols)
    hi_up = -(-hi // block_cols) * block_cols
    full_lo = min(full_lo, hi_up)
    full_hi = max(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


def block_schedule(n_q: int, n_k: int, block_m: int, block_n: int, causal: bool = False,
                   window: int | None = None) -> torch.Tensor:
    """What the kernels do with each (query block, key block) tile: 0 skipped, 1 computed with a mask, 2 computed
    without one. ``(ceil(n_q / block_m), ceil(n_k / block_n))`` int tensor, from ``block_range``."""
    band = band_limits(n_q, n_k, causal, window)
    plan = torch.zeros(-(-n_q // block_m), -(-n_k // block_n), dtype=torch.int64)
    for r, start in enumerate(range(0, n_q, block_m)):
        lo, full_lo, full_hi, hi = block_range(start, block_m, n_k, block_n, band)
        for n0 in range(lo, hi, block_n):
            plan[r, n0 // block_n] = 2 if full_lo <= n0 < full_hi else 1
    return plan


class IOCounter:
    """Counts bytes a tiled algorithm moves between slow (HBM) and fast (SRAM) memory; see ``hbm_bytes_*``.

    ``bytes_per_element`` counts every element at that size (e.g. 2 for fp16 while computing in fp32 on a CPU);
    by default each tensor's own element size.
    """

    def __init__(self, bytes_per_element: int | None = None) -> None:
        self.read = 0
        self.written = 0
        self.bytes_per_element = bytes_per_element

    def _bytes(self, t: torch.Tensor) -> int:
        return t.numel() * (self.bytes_per_element or t.element_size())

    def load(self, t: torch.Tensor) -> torch.Tensor:
        self.read += self._bytes(t)
        return t

    def store(self, t: torch.Tensor) -> torch.Tensor:
        self.written += self._bytes(t)
        return t

    @property
    def total(self) -> int:
        return self.read + self.written


def _split_heads(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """View ``(B, H, N, D)`` queries as ``(B, Hkv, G, N, D)`` so that head ``h`` uses K/V head ``h // G``."""
    b, h, n, d = q.shape
    return q.reshape(b, n_kv, h // n_kv, n, d)


def _check(q, k, v, scale, block_m, block_n):
    check_qkv(q, k, v)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v must have the head_dim of q ({q.shape[-1]}), got {v.shape[-1]}")
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def tiled_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    io: IOCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention forward over ``block_m x block_n`` tiles; returns ``(out, lse)``.

    For each block of queries (kept "in SRAM"), loop over the key blocks that ``block_range`` keeps, and update
    the running row max ``m``, the running sum ``l`` and the unnormalised output ``acc``; divide by ``l`` at the
    end. ``lse = m + log l`` is saved for the backward pass. Memory is O(block_m * block_n) per step instead of
    the O(Nq * Nk) score matrix. Fully masked rows give zeros and ``lse = -inf``. Accumulates in float32
    (float64 for float64 inputs). ``io`` (optional) counts the HBM traffic: each block of Q, K, V read and of O
    written.
    """
    scale = _check(q, k, v, scale, block_m, block_n)
    n_q, n_k, n_kv = q.shape[2], k.shape[2], k.shape[1]
    band = band_limits(n_q, n_k, causal, window)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = _split_heads(q, n_kv)  # (B, Hkv, G, Nq, D)
    kg, vg = k[:, :, None], v[:, :, None]  # (B, Hkv, 1, Nk, D): broadcast over the group, never copied
    out = torch.empty_like(qg)
    lse = torch.empty(qg.shape[:-1], dtype=acc_dtype, device=q.device)
    cols_all = torch.arange(n_k, device=q.device)
    for start in range(0, n_q, block_m):
        rows = torch.arange(start, min(start + block_m, n_q), device=q.device)
        q_blk = qg[..., start : start + block_m, :]
        if io is not None:
            io.load(q_blk)
        q_blk = q_blk.to(acc_dtype)
        m = torch.full(q_blk.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(q_blk.shape, dtype=acc_dtype, device=q.device)
        lo, full_lo, full_hi, hi = block_range(start, block_m, n_k, block_n, band)
        for n0 in range(lo, hi, block_n):
            k_blk, v_blk = kg[..., n0 : n0 + block_n, :], vg[..., n0 : n0 + block_n, :]
            if io is not None:
                io.load(k_blk)
                io.load(v_blk)
            s = (q_blk @ k_blk.to(acc_dtype).transpose(-2, -1)) * scale
            if not full_lo <= n0 < full_hi:  # partly masked block: apply the band
                s = s.masked_fill(~band.allowed(rows, cols_all[n0 : n0 + block_n]), -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)  # rescales what was accumulated against the old max
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + p @ v_blk.to(acc_dtype)
            m = m_new
        empty = l == 0
        out_blk = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
        out[..., start : start + block_m, :] = out_blk.to(q.dtype)
        if io is not None:
            io.store(out_blk.to(q.dtype))
        lse[..., start : start + block_m] = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(l))
    b, h = q.shape[:2]
    return out.reshape(b, h, n_q, -1), lse.reshape(b, h, n_q)


def tiled_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention backward: recompute ``P = exp(S - lse)`` block by block instead of storing it.

    With ``delta_i = sum_d dO_id O_id`` (equal to ``sum_j P_ij dP_ij``), the softmax gradient of each block is
    ``dS = P * (dP - delta)``, ``dP = dO V^T``; then ``dV += P^T dO``, ``dK += scale * dS^T Q``,
    ``dQ += scale * dS K``. Outer loop over key blocks (dK, dV stay "in SRAM"), inner loop over the query blocks
    that can see them. For GQA, the group's query heads are summed into their shared K/V head.
    Returns ``(dq, dk, dv)`` in the input dtypes.
    """
    scale = _check(q, k, v, scale, block_m, block_n)
    n_q, n_k, n_kv = q.shape[2], k.shape[2], k.shape[1]
    band = band_limits(n_q, n_k, causal, window)
    # The band seen from the keys' side: query i may see key j  <=>  -hi <= i - j <= -lo.
    band_t = Band(lo=None if band.hi is None else -band.hi, hi=None if band.lo is None else -band.lo)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg, og, dog = (_split_heads(t.to(acc_dtype), n_kv) for t in (q, out, grad_out))
    lseg = lse.reshape(qg.shape[:-1]).to(acc_dtype)
    lse_safe = torch.where(torch.isinf(lseg), torch.full_like(lseg, math.inf), lseg)  # empty rows: P = 0
    delta = (dog * og).sum(dim=-1)  # (B, Hkv, G, Nq)
    kf, vf = k.to(acc_dtype), v.to(acc_dtype)
    dq = torch.zeros_like(qg)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    rows_all = torch.arange(n_q, device=q.device)
    for n0 in range(0, n_k, block_n):
        cols = torch.arange(n0, min(n0 + block_n, n_k), device=q.device)
        k_blk, v_blk = kf[:, :, None, n0 : n0 + block_n], vf[:, :, None, n0 : n0 + block_n]
        dk_blk = torch.zeros_like(kf[:, :, n0 : n0 + block_n])
        dv_blk = torch.zeros_like(dk_blk)
        lo, full_lo, full_hi, hi = block_range(n0, block_n, n_q, block_m, band_t)
        for m0 in range(lo, hi, block_m):
            sl = slice(m0, m0 + block_m)
            s = (qg[..., sl, :] @ k_blk.transpose(-2, -1)) * scale
            p = torch.exp(s - lse_safe[..., sl, None])
            if not full_lo <= m0 < full_hi:
                p = p.masked_fill(~band.allowed(rows_all[sl], cols), 0.0)
            dp = dog[..., sl, :] @ v_blk.transpose(-2, -1)
            ds = p * (dp - delta[..., sl, None])
            dv_blk += (p.transpose(-2, -1) @ dog[..., sl, :]).sum(dim=2)
            dk_blk += (ds.transpose(-2, -1) @ qg[..., sl, :]).sum(dim=2) * scale
            dq[..., sl, :] += (ds @ k_blk) * scale
        dk[:, :, n0 : n0 + block_n] = dk_blk
        dv[:, :, n0 : n0 + block_n] = dv_blk
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _TiledFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, block_m, block_n):
        out, lse = tiled_attention_forward(q, k, v, causal, window, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, window, scale, block_m, block_n)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = tiled_attention_backward(q, k, v, out, lse, grad_out.contiguous(), *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def tiled_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_m: int = 64,
    block_n: int = 64,
):
    """FlashAttention in PyTorch with its own (recomputing) backward: the CPU stand-in for the Triton kernel.

    Same arguments and results as ``dldna.kernels.flash_attention``: ``(B, H, Nq, D)`` output, plus the natural
    log-sum-exp ``(B, H, Nq)`` (float32) when ``return_lse``. Memory O(N * D) per head, never O(N^2).
    Used in chapter 5.
    """
    out, lse = _TiledFlashAttention.apply(q, k, v, bool(causal), window, scale, block_m, block_n)
    return (out, lse) if return_lse else out


def hbm_bytes_standard(n: int, d: int, bytes_per_el: int = 2) -> int:
    """HBM traffic of standard attention for one head (Dao et al. 2022, Thm. 2: Theta(N d + N^2)).

    Read Q, K (2Nd), write S (N^2), read S and write P (2N^2), read P and V (N^2 + Nd), write O (Nd):
    ``(4 N d + 4 N^2)`` elements.
    """
    return (4 * n * d + 4 * n * n) * bytes_per_el


def hbm_bytes_flash(n: int, d: int, block_m: int, bytes_per_el: int = 2) -> int:
    """HBM traffic of the tiled forward for one head: Q read and O written once, K and V once per query block.

    ``(2 N d + 2 N d * ceil(N / block_m))`` elements, i.e. Theta(N^2 d / M) with SRAM size ``M ~ block_m * d``.
    """
    return (2 * n * d + 2 * n * d * (-(-n // block_m))) * bytes_per_el
