"""Kernel (linear) attention and FAVOR+ random features (Performer, Choromanski et al. 2020).

Softmax attention weights are ``exp(q . k)`` normalised per row. If a feature map ``phi`` satisfies
``E[phi(q) . phi(k)] = exp(q . k)``, then ``phi(Q) (phi(K)^T V)`` costs ``O(N m d)`` instead of ``O(N^2 d)``
(associativity). FAVOR+ uses *positive* features ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with rows of ``W``
drawn Gaussian and made orthogonal: positive features keep every estimated weight positive (low variance
where the true kernel is small), orthogonality lowers the variance further. (The printed chapter used
``relu(W x)``, which does not estimate the softmax kernel at all.)

Causal linear attention uses prefix sums of ``phi(k_j) v_j^T``, computed chunk by chunk so memory stays
``O(C^2 + m d)`` per chunk instead of ``O(N m d)``. Kernel attention with ``elu(x) + 1`` (Katharopoulos et al.
2020) uses the same ``linear_attention``.

Used in chapter 3.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from dldna.attention.masks import _int
from dldna.attention.reference import attention, check_qkv, repeat_kv

FEATURE_KINDS = ("positive", "hyperbolic", "trig", "relu")


def orthogonal_random_matrix(
    m: int, d: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64, device=None,
    n_draws: int | None = None,
) -> torch.Tensor:
    """``(m, d)`` random projection whose rows are orthogonal within each block of ``d`` rows.

    Each block is the Q factor of a Gaussian ``d x d`` matrix (orthonormal rows); every row is then rescaled by
    the norm of an independent ``N(0, I_d)`` vector, so each row is marginally ``N(0, I_d)`` (unbiased
    estimator) while rows in a block are exactly orthogonal (Performer, sec. 2.4). ``m > d`` stacks blocks.
    ``n_draws`` returns ``(n_draws, m, d)`` independent draws at once (one batched QR).
    """
    m, d = _int("m", m), _int("d", d)
    draws = 1 if n_draws is None else _int("n_draws", n_draws)
    n_blocks = -(-m // d)
    gaussian = torch.randn(draws, n_blocks, d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]  # Haar-distributed Q factor
    rows = q.transpose(-1, -2).reshape(draws, n_blocks * d, d)[:, :m]
    norms = torch.randn(draws, m, d, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
    out = (rows * norms).to(dtype=dtype, device=device)
    return out[0] if n_draws is None else out


def random_projection(
    m: int, d: int, orthogonal: bool = True, generator: torch.Generator | None = None, dtype=torch.float64, device=None,
    n_draws: int | None = None,
) -> torch.Tensor:
    """``(m, d)`` FAVOR+ projection (``(n_draws, m, d)`` if given): ``orthogonal_random_matrix`` or i.i.d. ``N(0, 1)``."""
    if orthogonal:
        return orthogonal_random_matrix(m, d, generator, dtype, device, n_draws)
    m, d = _int("m", m), _int("d", d)
    shape = (m, d) if n_draws is None else (_int("n_draws", n_draws), m, d)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def favor_features(
    x: torch.Tensor, projection: torch.Tensor, kind: str = "positive", is_query: bool | None = None
) -> torch.Tensor:
    """Random features ``phi(x)`` with ``E[phi(x) . phi(y)] = exp(x . y)`` (for ``kind`` other than ``"relu"``).

    Args:
        x: ``(..., N, d)``, already scaled (attention passes ``q * scale**0.5``).
        projection: ``(m, d)``, rows ``w_i`` (or ``(..., m, d)`` broadcasting against ``x``'s batch axes).
        kind: ``"positive"``: ``exp(w.x - |x|^2/2) / sqrt(m)``, ``m`` features (FAVOR+);
            ``"hyperbolic"``: ``exp(-|x|^2/2) [exp(w.x), exp(-w.x)] / sqrt(2m)``, ``2m`` positive features;
            ``"trig"``: ``exp(|x|^2/2) [sin(w.x), cos(w.x)] / sqrt(m)``, ``2m`` features of either sign;
            ``"relu"``: ``relu(w.x) / sqrt(m)`` -- the printed chapter's map, *not* a softmax-kernel estimator.
        is_query: numerical stabilisation of the exponentials. ``True`` subtracts each row's maximum exponent
            (queries: a per-row constant cancels in the row's normalisation); ``False`` subtracts the maximum
            over the whole ``(N, m)`` slab (keys: one constant for all keys cancels too). ``None`` (default):
            no shift, so ``phi(x) . phi(y)`` is the raw unbiased estimate.
    Returns ``(..., N, m)`` or ``(..., N, 2m)``.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    if not isinstance(projection, torch.Tensor) or projection.dim() < 2 or projection.shape[-1] != x.shape[-1]:
        shape = tuple(projection.shape) if isinstance(projection, torch.Tensor) else type(projection).__name__
        raise ValueError(f"projection must be (m, {x.shape[-1]}) to match x's last axis, got {shape}")
    m = projection.shape[-2]
    wx = x @ projection.to(x.dtype).transpose(-1, -2)  # (..., N, m)
    half_sq_norm = (x * x).sum(-1, keepdim=True) / 2
    if kind == "relu":
        return F.relu(wx) / math.sqrt(m)
    if kind == "trig":
        return torch.exp(half_sq_norm) * torch.cat([torch.sin(wx), torch.cos(wx)], -1) / math.sqrt(m)
    exponent = torch.cat([wx, -wx], -1) if kind == "hyperbolic" else wx
    exponent = exponent - half_sq_norm
    if is_query is True:
        exponent = exponent - exponent.amax(dim=-1, keepdim=True).detach()
    elif is_query is False:
        exponent = exponent - exponent.amax(dim=(-2, -1), keepdim=True).detach()
    return torch.exp(exponent) / math.sqrt(exponent.shape[-1])


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``: the deterministic positive feature map of Katharopoulos et al. (2020), "Transformers are RNNs"."""
    return F.elu(x) + 1


def linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, causal: bool = False, chunk_size: int = 128
) -> torch.Tensor:
    """``(phi_q phi_k^T) v`` normalised per row, computed without the ``N x N`` matrix.

    Non-causal: ``phi_q (phi_k^T v) / phi_q (phi_k^T 1)``, time ``O(N m d)``.
    Causal: chunks of ``chunk_size`` queries; the past enters through the running state ``S = sum phi(k_j) v_j^T``
    (``m x d``) and ``z = sum phi(k_j)``; inside a chunk a small masked ``C x C`` product adds the present.
    Rows with a zero denominator give zeros.

    Args: phi_q ``(B, H, N, m)``, phi_k ``(B, H, N, m)``, v ``(B, H, N, d)``.
    """
    for name, t in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, features)")
    if phi_q.shape[-1] != phi_k.shape[-1] or phi_k.shape[:3] != v.shape[:3] or phi_q.shape[:2] != phi_k.shape[:2]:
        raise ValueError(f"phi_q, phi_k, v shapes disagree: {tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}")
    chunk_size = _int("chunk_size", chunk_size)
    if not causal:
        state = phi_k.transpose(-1, -2) @ v  # (B, H, m, d)
        z = phi_k.sum(-2)  # (B, H, m)
        return _divide(phi_q @ state, phi_q @ z[..., None])
    if phi_q.shape[-2] != phi_k.shape[-2]:
        raise ValueError("causal linear attention needs q and k of the same length")
    b, h, n, m = phi_q.shape
    state = phi_k.new_zeros(b, h, m, v.shape[-1])
    z = phi_k.new_zeros(b, h, m, 1)
    outs = []
    for start in range(0, n, chunk_size):
        pq, pk, vc = (t[:, :, start : start + chunk_size] for t in (phi_q, phi_k, v))
        present = (pq @ pk.transpose(-1, -2)).tril()  # (B, H, C, C): j <= i inside the chunk
        numer = pq @ state + present @ vc
        denom = pq @ z + present.sum(-1, keepdim=True)
        outs.append(_divide(numer, denom))
        state = state + pk.transpose(-1, -2) @ vc
        z = z + pk.sum(-2)[..., None]
    return torch.cat(outs, dim=2)


def _divide(numer: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    zero = denom == 0
    return torch.where(zero, torch.zeros_like(numer), numer / torch.where(zero, torch.ones_like(denom), denom))


def kernel_attention_dense(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The quadratic form of ``linear_attention``: ``A = phi_q phi_k^T`` (masked), rows normalised, times ``v``.

    ``O(N^2)``; used to check ``linear_attention`` exactly and to look at the estimated attention matrix.
    """
    weights = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        weights = weights.tril()
    return _divide(weights @ v, weights.sum(-1, keepdim=True))


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_features: int,
    causal: bool = False,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    scale: float | None = None,
    projection: torch.Tensor | None = None,
    kind: str = "positive",
    chunk_size: int = 128,
) -> torch.Tensor:
    """FAVOR+ attention: an unbiased random-feature estimate of softmax attention in ``O(N m d)`` time.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)``.
        num_features: ``m`` random features (ignored when ``projection`` is given).
        causal: prefix-sum form (``linear_attention(..., causal=True)``).
        orthogonal: orthogonal (True) or i.i.d. Gaussian projection rows.
        generator: seeds the draw. Feature redraw: with ``projection=None`` every call draws new features (as
            Performer redraws them during training); pass a fixed ``projection`` ``(m, D)`` to keep them.
        scale: softmax temperature, default ``1/sqrt(D)``; features see ``q * scale**0.5`` and ``k * scale**0.5``.
        kind: feature map, see ``favor_features``.
    Returns ``(B, H, N, D)``. Approximates ``attention(q, k, v, causal=causal)``; the error falls as ``m`` grows.
    """
    check_qkv(q, k, v)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if projection is None:
        projection = random_projection(_int("num_features", num_features), d, orthogonal, generator, dtype=q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    root = math.sqrt(scale)
    phi_q = favor_features(q * root, projection.to(q.device), kind, is_query=True)
    phi_k = favor_features(k * root, projection.to(q.device), kind, is_query=False)
    return linear_attention(phi_q, phi_k, v, causal=causal, chunk_size=chunk_size)


def softmax_kernel_estimates(
    x: torch.Tensor, y: torch.Tensor, num_features: int, n_draws: int, kind: str = "positive",
    orthogonal: bool = True, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n_draws`` independent estimates of ``exp(x . y)`` for vectors ``x, y`` of shape ``(d,)``.

    Returns ``(n_draws,)``: ``phi(x) . phi(y)`` with a fresh projection per draw (chapter 3's variance and
    unbiasedness plots).
    """
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"x and y must be vectors of the same length, got {tuple(x.shape)} and {tuple(y.shape)}")
    w = random_projection(num_features, x.shape[0], orthogonal, generator, dtype=x.dtype, n_draws=n_draws)
    phi_x, phi_y = favor_features(x.expand(w.shape[0], 1, -1), w, kind), favor_features(y.expand(w.shape[0], 1, -1), w, kind)
    return (phi_x * phi_y).sum(-1).flatten()


def favor_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_counts: Sequence[int], n_draws: int = 5,
    orthogonal: bool = True, causal: bool = False, generator: torch.Generator | None = None, kind: str = "positive",
) -> list[float]:
    """Mean relative error ``|out - exact| / |exact|`` (Frobenius) of FAVOR+ over ``n_draws`` draws, per feature count."""
    exact = attention(q, k, v, causal=causal)
    errors = []
    for m in feature_counts:
        errs = [
            float((performer_attention(q, k, v, m, causal, orthogonal, generator, kind=kind) - exact).norm() / exact.norm())
            for _ in range(_int("n_draws", n_draws))
        ]
        errors.append(sum(errs) / len(errs))
    return errors


__all__ = [
    "orthogonal_random_matrix", "random_projection", "favor_features", "elu_features", "linear_attention",
    "kernel_attention_dense", "performer_attention", "softmax_kernel_estimates", "favor_error", "FEATURE_KINDS",
]
