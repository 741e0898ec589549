"""Linformer: low-rank attention by projecting keys and values along the *sequence* axis (Wang et al. 2020).

``E`` and ``F`` are ``(k_proj, N)`` matrices: ``K' = E K`` and ``V' = F V`` have ``k_proj`` rows, so the score
matrix is ``N x k_proj`` instead of ``N x N``: time and memory ``O(N * k_proj)``. (The printed chapter projected the
*feature* axis of Q and K with fresh random matrices, which keeps the ``N x N`` score matrix and saves nothing.)

Used in chapter 2.
"""
from __future__ import annotations

import math

import torch

from dldna.attention.masks import _int
from dldna.attention.reference import attention, check_qkv


def linformer_projection(
    k_proj: int, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """A ``(k_proj, n)`` Gaussian projection with entries ``N(0, 1/k_proj)`` (Johnson-Lindenstrauss scaling).

    Linformer learns ``E`` and ``F``; a random JL projection is the untrained starting point the paper's
    low-rank argument rests on. Seed it with ``generator`` for reproducible results.
    """
    k_proj, n = _int("k_proj", k_proj), _int("n", n)
    w = torch.randn(k_proj, n, generator=generator, dtype=dtype)
    return (w / math.sqrt(k_proj)).to(device)


def pooling_projection(k_proj: int, n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A ``(k_proj, n)`` mean-pooling projection: row ``r`` averages the ``r``-th of ``k_proj`` near-equal segments.

    Linformer (sec. 4) lists pooling as a parameter-free alternative to learned ``E``, ``F``; with ``k_proj = n``
    it is the identity, so the error against full attention falls to zero.
    """
    k_proj, n = _int("k_proj", k_proj), _int("n", n)
    if k_proj > n:
        raise ValueError(f"k_proj ({k_proj}) must be <= n ({n})")
    proj = torch.zeros(k_proj, n, dtype=dtype)
    for row, segment in enumerate(torch.arange(n).tensor_split(k_proj)):
        proj[row, segment] = 1.0 / len(segment)
    return proj.to(device)


def _check_projection(name: str, p, n: int, rows: int | None) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() != 2 or p.shape[1] != n or (rows is not None and p.shape[0] != rows):
        want = f"({rows if rows is not None else 'k_proj'}, {n})"
        raise ValueError(f"{name} must have shape {want} (k_proj, seq_len of k), got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {p.dtype}")


def linformer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, E: torch.Tensor, F: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``softmax(q (E k)^T * scale) (F v)``: Linformer attention, equal to ``attention(q, E @ k, F @ v)``.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)``.
        E, F: ``(k_proj, N)`` projections of the sequence axis (the same ``k_proj`` for both).
        scale: defaults to ``1/sqrt(D)``.
    Returns ``(B, H, N, D)``. Time and memory ``O(N * k_proj)``; with ``E = F = I_N`` it is exact attention.
    Not causal: every projected row mixes all positions (Linformer is an encoder method).
    """
    check_qkv(q, k, v)
    n = k.shape[-2]
    _check_projection("E", E, n, None)
    _check_projection("F", F, n, E.shape[0])
    k_proj = E.to(k.dtype) @ k  # (B, Hkv, k_proj, D)
    v_proj = F.to(v.dtype) @ v
    return attention(q, k_proj, v_proj, scale=scale)


__all__ = ["linformer_projection", "pooling_projection", "linformer_attention"]
