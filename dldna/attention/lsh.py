"""Reformer LSH attention (Kitaev, Kaiser and Levskaya 2020): attend only to keys hashed into your bucket.

Angular LSH by random rotations: ``h(x) = argmax([x R ; -x R])`` with ``R`` a ``(d, n_buckets/2)`` Gaussian
matrix, so nearby directions (large ``q . k``) tend to share a bucket. Positions are sorted by ``(bucket,
position)``, cut into chunks of ``chunk_size``, and every query attends to the keys of its own chunk and of the
previous chunk (restricted to its bucket by default): scores are ``(N/C) x C x 2C``, memory ``O(N C)``.
``n_hashes`` independent rounds widen the candidate set; their outputs are merged with their log-sum-exps, and a
pair found by several rounds is counted once (its score minus ``log(count)``), so the result is *exactly* dense
attention restricted to the union of the rounds' pairs -- ``lsh_mask`` builds that mask for the tests.

Shared-QK (the Reformer default): keys are the unit-normalised queries, and a token may attend to itself only
when it has no other candidate (otherwise ``q . q`` would always win).

Used in chapter 4.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dldna.attention.masks import _int
from dldna.attention.reference import check_qkv, repeat_kv


def random_rotations(
    d: int, n_buckets: int, n_hashes: int = 1, generator: torch.Generator | None = None, dtype=torch.float64, device=None
) -> torch.Tensor:
    """``(n_hashes, d, n_buckets // 2)`` Gaussian rotations for angular LSH (``n_buckets`` even)."""
    d, n_buckets, n_hashes = _int("d", d), _int("n_buckets", n_buckets, 2), _int("n_hashes", n_hashes)
    if n_buckets % 2:
        raise ValueError(f"n_buckets must be even (buckets come in +/- pairs), got {n_buckets}")
    return torch.randn(n_hashes, d, n_buckets // 2, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def lsh_hash(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Buckets ``argmax([x R; -x R])`` per hash round: ``x`` ``(..., N, d)`` -> ``(..., n_hashes, N)`` long."""
    if not isinstance(rotations, torch.Tensor) or rotations.dim() != 3 or rotations.shape[1] != x.shape[-1]:
        raise ValueError(f"rotations must be (n_hashes, {x.shape[-1]}, n_buckets // 2)")
    rotated = torch.einsum("...nd,rdk->...rnk", x, rotations.to(x.dtype))
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


class _Rounds:
    """Per-round sort orders and chunk indices of queries and keys, and the rule deciding allowed pairs."""

    def __init__(self, q_buckets, k_buckets, chunk_size, causal, shared_qk, same_bucket_only):
        n = q_buckets.shape[-1]
        pos = torch.arange(n, device=q_buckets.device)
        self.q_buckets, self.k_buckets = q_buckets, k_buckets  # (B, H, R, N)
        self.q_order = torch.argsort(q_buckets * n + pos, dim=-1)  # sorted slot -> position
        self.k_order = self.q_order if shared_qk else torch.argsort(k_buckets * n + pos, dim=-1)
        self.q_chunk = torch.argsort(self.q_order, dim=-1) // chunk_size  # position -> chunk of its slot
        self.k_chunk = self.q_chunk if shared_qk else torch.argsort(self.k_order, dim=-1) // chunk_size
        self.causal, self.shared_qk, self.same_bucket_only = causal, shared_qk, same_bucket_only

    def allowed(self, r: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Does round ``r`` let query ``q_pos`` see key ``k_pos``? ``q_pos (B,H,...,c,1)``, ``k_pos (B,H,...,1,s)``."""
        def at(table, idx):  # table (B, H, N) gathered at idx (B, H, ...)
            flat = idx.clamp_min(0).reshape(idx.shape[0], idx.shape[1], -1)
            return torch.gather(table, 2, flat).reshape(idx.shape)

        q_chunk, k_chunk = at(self.q_chunk[:, :, r], q_pos), at(self.k_chunk[:, :, r], k_pos)
        ok = (k_pos >= 0) & (q_pos >= 0) & ((k_chunk == q_chunk) | (k_chunk == q_chunk - 1))
        if self.same_bucket_only:
            ok = ok & (at(self.q_buckets[:, :, r], q_pos) == at(self.k_buckets[:, :, r], k_pos))
        if self.causal:
            ok = ok & (k_pos <= q_pos)
        if self.shared_qk:
            ok = ok & (k_pos != q_pos)
        return ok


def _prepare(q, k, v, n_buckets, n_hashes, causal, generator, chunk_size, shared_qk, rotations, same_bucket_only):
    if shared_qk:
        if k is not None:
            raise ValueError("k must be None when shared_qk=True (keys are the normalised queries)")
        k = F.normalize(q, dim=-1)
    check_qkv(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q and k must have the same seq length, got {q.shape[-2]} and {k.shape[-2]}")
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    n, d = q.shape[-2], q.shape[-1]
    if rotations is None:
        rotations = random_rotations(d, n_buckets, n_hashes, generator, dtype=q.dtype, device=q.device)
    elif rotations.dim() != 3 or rotations.shape[1] != d or rotations.shape[2] * 2 != n_buckets:
        raise ValueError(f"rotations must be (n_hashes, {d}, n_buckets // 2 = {n_buckets // 2}), got {tuple(rotations.shape)}")
    chunk_size = max(1, -(-n // n_buckets)) if chunk_size is None else _int("chunk_size", chunk_size)
    q_buckets = lsh_hash(q, rotations)
    k_buckets = q_buckets if shared_qk else lsh_hash(k, rotations)
    rounds = _Rounds(q_buckets, k_buckets, chunk_size, causal, shared_qk, same_bucket_only)
    return k, v, rounds, chunk_size


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    n_buckets: int,
    n_hashes: int = 1,
    causal: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    shared_qk: bool = False,
    rotations: torch.Tensor | None = None,
    same_bucket_only: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Reformer LSH attention; equals ``attention(q, k, v, mask=lsh_mask(...))`` with the same rotations.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)``; ``k=None`` with ``shared_qk=True`` (keys = ``q / |q|``).
        n_buckets: even number of hash buckets. n_hashes: independent hash rounds (more = closer to full attention).
        causal: key position ``<=`` query position. generator: seeds the rotations (or pass ``rotations``).
        chunk_size: sorted chunk length ``C`` (default ``ceil(N / n_buckets)``, about one bucket).
        same_bucket_only: inside the two chunks, keep only keys of the query's bucket (the paper's ``P_i``).
    Returns ``(B, H, N, D)``. Memory ``O(n_hashes * N * C)``.
    """
    n_buckets, n_hashes = _int("n_buckets", n_buckets, 2), _int("n_hashes", n_hashes)
    k, v, rounds, chunk = _prepare(q, k, v, n_buckets, n_hashes, causal, generator, chunk_size, shared_qk, rotations,
                                   same_bucket_only)
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    outs, lses = [], []
    for r in range(n_hashes):
        q_pos = F.pad(rounds.q_order[:, :, r], (0, pad), value=-1).view(b, h, n_chunks, chunk)
        k_pos = F.pad(rounds.k_order[:, :, r], (chunk, pad), value=-1).view(b, h, n_chunks + 1, chunk)
        k_pos = torch.cat([k_pos[:, :, :-1], k_pos[:, :, 1:]], dim=-1)  # previous chunk + own chunk: (.., 2C)

        def take(x, idx):  # x (B, H, N, D) gathered at idx (B, H, nc, s) -> (B, H, nc, s, D)
            flat = idx.clamp_min(0).reshape(b, h, -1, 1).expand(-1, -1, -1, x.shape[-1])
            return torch.gather(x, 2, flat).reshape(*idx.shape, x.shape[-1])

        scores = take(q, q_pos) @ take(k, k_pos).transpose(-1, -2) * scale  # (B, H, nc, C, 2C)
        qp, kp = q_pos[..., :, None], k_pos[..., None, :]
        allowed = rounds.allowed(r, qp, kp)
        count = sum(rounds.allowed(s, qp, kp).to(q.dtype) for s in range(n_hashes))
        scores = torch.where(allowed, scores - torch.log(count.clamp_min(1)), torch.full_like(scores, float("-inf")))
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, nc, C)
        weights = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        out_sorted = (weights @ take(v, k_pos)).reshape(b, h, -1, v.shape[-1])[:, :, :n]
        back = rounds.q_order[:, :, r]  # scatter the sorted rows back to their positions
        outs.append(torch.zeros_like(out_sorted).scatter(2, back[..., None].expand_as(out_sorted), out_sorted))
        lses.append(torch.zeros(b, h, n, dtype=q.dtype, device=q.device).scatter(2, back, lse.reshape(b, h, -1)[:, :, :n]))
    lse_all = torch.stack(lses)  # (R, B, H, N)
    total = torch.logsumexp(lse_all, dim=0)
    safe_total = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    out = (torch.exp(lse_all - safe_total)[..., None] * torch.stack(outs)).sum(0)
    if shared_qk:  # a token with no other candidate attends to itself
        out = torch.where(torch.isinf(total)[..., None], v, out)
    return out


def lsh_mask(
    q: torch.Tensor,
    k: torch.Tensor | None,
    n_buckets: int,
    n_hashes: int = 1,
    causal: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    shared_qk: bool = False,
    rotations: torch.Tensor | None = None,
    same_bucket_only: bool = True,
) -> torch.Tensor:
    """``(B, H, N, N)`` bool: the pairs ``lsh_attention`` with the same arguments attends to (union over rounds).

    ``O(N^2)``: for tests and pictures. With ``shared_qk`` the diagonal is kept exactly in rows with no other pair.
    """
    n_buckets, n_hashes = _int("n_buckets", n_buckets, 2), _int("n_hashes", n_hashes)
    v = q if k is None else k
    _, _, rounds, _ = _prepare(q, k, v, n_buckets, n_hashes, causal, generator, chunk_size, shared_qk, rotations,
                               same_bucket_only)
    b, h, n, _ = q.shape
    pos = torch.arange(n, device=q.device).expand(b, h, n)
    mask = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device)
    for r in range(n_hashes):
        mask |= rounds.allowed(r, pos[..., :, None], pos[..., None, :])
    if shared_qk:
        empty = ~mask.any(-1)
        mask |= torch.diag_embed(empty)
    return mask


def collision_probability(
    angles: torch.Tensor, d: int, n_buckets: int, n_trials: int = 2000, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Measured probability that two unit vectors at each angle (radians) land in the same bucket, ``(len(angles),)``.

    For ``n_buckets = 2`` (one random hyperplane) theory gives ``1 - angle / pi``; more buckets make the
    probability fall faster with the angle (chapter 4 plots both).
    """
    d, n_trials = _int("d", d, 2), _int("n_trials", n_trials)
    angles = torch.as_tensor(angles, dtype=torch.float64).flatten()
    x = torch.zeros(d, dtype=torch.float64)
    x[0] = 1.0
    y = torch.zeros(len(angles), d, dtype=torch.float64)
    y[:, 0], y[:, 1] = torch.cos(angles), torch.sin(angles)
    rotations = random_rotations(d, n_buckets, n_trials, generator)  # one rotation per trial
    hx = lsh_hash(x[None], rotations)[:, 0]  # (trials,)
    hy = lsh_hash(y, rotations)  # (trials, angles)
    return (hy == hx[:, None]).double().mean(0)


__all__ = ["random_rotations", "lsh_hash", "lsh_attention", "lsh_mask", "collision_probability"]
