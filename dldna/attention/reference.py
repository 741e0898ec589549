"""Dense softmax attention: the oracle every other attention in the book is checked against.

Used in every chapter. Cost: O(N^2 d) time and O(N^2) memory for the score matrix.
"""
from __future__ import annotations

import math

import torch


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate ``(batch, heads, seq, head_dim)`` tensors; ``k``/``v`` may have fewer heads (GQA).

    Raises ``TypeError`` for non-tensors and ``ValueError`` naming the argument for bad shapes/dtypes.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape[:3] + k.shape[3:] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (batch, heads, seq), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each K/V head ``n_rep`` times: ``(B, Hkv, N, D) -> (B, Hkv * n_rep, N, D)`` (as in HF Llama)."""
    if not isinstance(n_rep, int) or n_rep < 1:
        raise ValueError(f"n_rep must be a positive int, got {n_rep!r}")
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook attention in three lines, ``softmax(q k^T / sqrt(d)) v``; no masks, no checks.

    It materialises the ``(B, H, N, N)`` score and probability matrices: the O(N^2) memory that chapter 1
    measures. Same result as ``attention(q, k, v)``.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores, dim=-1)
    return probs @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Dense scaled dot-product attention ``softmax(q k^T * scale) v``.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (GQA/MQA when ``Hkv < H``).
        mask: bool, ``True`` = may attend, broadcastable to ``(B, H, Nq, Nk)``.
        causal: query ``i`` sees keys ``j <= i + (Nk - Nq)`` (bottom-right aligned, as in a KV cache).
        scale: defaults to ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of the scaled scores per row, ``(B, H, Nq)``.

    A query row with no allowed key returns zeros (and ``lse = -inf``), never NaN.
    """
    check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    n_q, n_k = q.shape[-2], k.shape[-2]
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale
    allowed = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (True = may attend)")
        try:
            allowed = torch.broadcast_to(mask.to(q.device), scores.shape)
        except RuntimeError as err:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(scores.shape)}") from err
    if causal:
        tri = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with no allowed key have lse = -inf; exp(-inf - 0) = 0 keeps them at zero instead of NaN.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    out = probs @ v
    return (out, lse) if return_lse else out
