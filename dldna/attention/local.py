"""Local attention that never builds the ``N x N`` matrix: banded sliding-window and block-sparse attention.

``sliding_window_attention`` cuts the queries into chunks and lets each chunk see only the keys its window can
reach, so scores take ``O(N * window)`` memory instead of ``O(N^2)``. ``block_sparse_attention`` computes only the
kept ``block_size x block_size`` tiles of a block layout and normalises each query row *once* over all its kept
tiles (the printed chapter softmaxed every tile separately, so rows summed to the number of tiles).

Both equal ``dldna.attention.attention`` with the matching mask from ``dldna.attention.masks``.
Used in chapters 2 and 4.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dldna.attention.masks import _int, _layout
from dldna.attention.reference import check_qkv, repeat_kv


def _self_attention_inputs(q, k, v, scale):
    check_qkv(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"q and k must have the same seq length (self-attention), got {q.shape[-2]} and {k.shape[-2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    n_rep = q.shape[1] // k.shape[1]
    return repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale


def _normalise(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``softmax(scores) @ values`` over the last axis, with rows whose scores are all ``-inf`` giving zeros.

    Subtracting the row maximum makes the largest kept term ``exp(0) = 1``, so a row with any kept key has a
    denominator ``>= 1`` and an empty row has ``0``: clamping at 1 turns the empty rows into zeros, never NaN.
    """
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    return (weights @ values) / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)


def sliding_window_plan(n: int, window: int, causal: bool = True, chunk_size: int | None = None):
    """How ``sliding_window_attention`` tiles a length-``n`` sequence: ``(chunk, n_chunks, back, ahead)``.

    Query chunk ``I`` sees the key chunks ``I - back .. I + ahead``; it holds ``chunk * (back + 1 + ahead) * chunk``
    scores, ``n_chunks`` times. Default chunk: the window's reach (at least 16, at most ``n``).
    """
    n, window = _int("n", n), _int("window", window)
    before = window - 1 if causal else window // 2  # how far back / forward a query can see
    after = 0 if causal else window // 2
    chunk = _int("chunk_size", chunk_size) if chunk_size is not None else max(before, after, 16)
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    # never reach past the first / last chunk: those keys would all be padding
    return chunk, n_chunks, min(-(-before // chunk), n_chunks - 1), min(-(-after // chunk), n_chunks - 1)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool = True,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Banded attention, equal to ``attention(q, k, v, mask=sliding_window_mask(N, window, causal))``.

    Causal: query ``i`` sees keys ``i - window < j <= i`` (``window`` keys including itself, the Mistral/HF
    convention). Non-causal: ``|i - j| <= window // 2``.

    Queries are cut into chunks of ``C`` tokens (default: about one window); chunk ``I`` is scored only against
    the ``L`` keys from the chunks its window touches, gathered with ``unfold``. Scores are
    ``(B, H, N/C, C, L)`` with ``L <= C + window``: time and memory ``O(N * window)`` instead of ``O(N^2)``.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)`` with ``H % Hkv == 0``.
        window: positive int (see above). scale: defaults to ``1/sqrt(D)``. chunk_size: query chunk length.
    Returns: ``(B, H, N, D)``. Differentiable. Longformer (Beltagy et al. 2020), Mistral (Jiang et al. 2023).
    """
    window = _int("window", window)
    k, v, scale = _self_attention_inputs(q, k, v, scale)
    b, h, n, d = q.shape
    chunk, n_chunks, back, ahead = sliding_window_plan(n, window, causal, chunk_size)
    span = (back + 1 + ahead) * chunk  # keys gathered per query chunk
    tail = n_chunks * chunk - n

    q_chunks = F.pad(q, (0, 0, 0, tail)).view(b, h, n_chunks, chunk, d)
    pad = (0, 0, back * chunk, tail + ahead * chunk)
    k_windows = F.pad(k, pad).unfold(2, span, chunk)  # (B, H, n_chunks, D, span): already k^T per chunk
    v_windows = F.pad(v, pad).unfold(2, span, chunk).transpose(-1, -2)  # (B, H, n_chunks, span, D)

    # query i = I*C + a and key j = (I - back)*C + s:  i - j = back*C + a - s, the same for every chunk I
    diff = back * chunk + torch.arange(chunk, device=q.device)[:, None] - torch.arange(span, device=q.device)
    band = ((diff >= 0) & (diff < window)) if causal else (diff.abs() <= window // 2)
    key_pos = (torch.arange(n_chunks, device=q.device)[:, None] - back) * chunk + torch.arange(span, device=q.device)
    allowed = band & ((key_pos >= 0) & (key_pos < n))[:, None, :]  # (n_chunks, C, span)

    scores = (q_chunks @ k_windows) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = _normalise(scores, v_windows)
    return out.reshape(b, h, n_chunks * chunk, v.shape[-1])[:, :, :n]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention over the kept tiles of a block layout, with one softmax per query row across all its tiles.

    Equals ``attention(q, k, v, mask=block_sparse_mask(N, block_size, layout))`` (``& causal_mask(N)`` when
    ``causal``). Only the ``nnz`` kept tiles are computed: scores are ``(B, H, nnz, block_size, block_size)``,
    so time and memory are ``O(nnz * block_size^2)``. Row maxima and denominators are reduced across the tiles of
    a block row with ``scatter_reduce`` / ``index_add`` (a segment softmax). Rows with no kept tile give zeros.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)``; ``block_size`` must divide ``N``.
        layout: ``(N // block_size, N // block_size)`` bool, ``True`` = tile computed.
        causal: also mask ``j > i`` (tiles above the diagonal are skipped, diagonal tiles masked inside).
    Sparse Transformer (Child et al. 2019), BigBird (Zaheer et al. 2020).
    """
    block_size = _int("block_size", block_size)
    k, v, scale = _self_attention_inputs(q, k, v, scale)
    b, h, n, d = q.shape
    if n % block_size:
        raise ValueError(f"block_size ({block_size}) must divide the sequence length ({n})")
    n_blocks = n // block_size
    layout = _layout(layout, n_blocks).to(q.device)
    if causal:
        layout = layout & torch.ones_like(layout).tril()
    rows, cols = layout.nonzero(as_tuple=True)  # the kept tiles, (nnz,) each

    def tiles(x, index):  # (B, H, N, D) -> (B, H, nnz, block_size, D)
        return x.view(b, h, n_blocks, block_size, x.shape[-1])[:, :, index]

    scores = (tiles(q, rows) @ tiles(k, cols).transpose(-1, -2)) * scale  # (B, H, nnz, bs, bs)
    if causal:
        inside = torch.ones(block_size, block_size, dtype=torch.bool, device=q.device).tril()
        keep = inside | (rows != cols)[:, None, None]
        scores = scores.masked_fill(~keep, float("-inf"))
    # one softmax per query row: maximum over all kept tiles of its block row, then shared denominators
    row_index = rows.view(1, 1, -1, 1).expand(b, h, -1, block_size)
    tile_max = scores.amax(dim=-1).detach()
    row_max = torch.full((b, h, n_blocks, block_size), float("-inf"), dtype=q.dtype, device=q.device)
    row_max = row_max.scatter_reduce(2, row_index, tile_max, reduce="amax")
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max[:, :, rows, :, None])
    denom = torch.zeros(b, h, n_blocks, block_size, dtype=q.dtype, device=q.device).index_add(2, rows, weights.sum(-1))
    numer = torch.zeros(b, h, n_blocks, block_size, v.shape[-1], dtype=q.dtype, device=q.device)
    numer = numer.index_add(2, rows, weights @ tiles(v, cols))
    out = numer / denom.clamp_min(1.0)[..., None]
    return out.reshape(b, h, n, v.shape[-1])


__all__ = ["sliding_window_plan", "sliding_window_attention", "block_sparse_attention"]
