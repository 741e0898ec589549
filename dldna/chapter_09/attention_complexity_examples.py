"""Printed-book names for the three early efficient attentions, mapped onto the checked implementations.

The printed chapter's ``attention_complexity_examples.py`` had numpy sketches with these names. They keep their
printed signatures here (numpy or torch ``(batch, seq, dim)`` in, same type out) but run
``dldna.attention``'s versions, which fix the printed mistakes:

- ``sliding_window_attention`` had no ``1/sqrt(d)`` scale, a per-token loop and a dense ``(B, n, n)`` weight
  matrix; here it is banded (``O(n * window)`` memory). The printed window was centred, so this keeps the
  non-causal convention ``|i - j| <= window_size // 2``.
- ``sparse_block_attention`` computed every block pair and softmaxed each block separately (rows summed to
  ``n / block_size``) and dropped tail tokens; here only the diagonal blocks are computed ("attention within
  blocks", as its docstring said), with one softmax per row, and a ``block_size`` that does not divide ``n``
  raises ``ValueError``.
- ``low_rank_attention`` projected the *feature* axis with unseeded random matrices and still built ``n x n``
  scores; here it is Linformer, projecting the *sequence* axis of K and V to ``rank`` rows (seeded).
- ``calculate_memory("sparse")`` returned ``n^2``; here every method reports the score entries its code allocates.

Used in chapter 2. New code should import from ``dldna.attention``.
"""
from __future__ import annotations

import numpy as np
import torch

from dldna.attention import block_sparse_attention as _block_sparse_attention
from dldna.attention import linformer_attention, linformer_projection
from dldna.attention import sliding_window_attention as _sliding_window_attention
from dldna.attention.local import sliding_window_plan


def _to_torch(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)[:, None], True
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return x[:, None], False
    raise ValueError(f"expected a (batch, seq, dim) numpy array or tensor, got {type(x).__name__}")


def _wrap(fn, q, k, v, *args, **kwargs):
    (tq, is_np), (tk, _), (tv, _) = _to_torch(q), _to_torch(k), _to_torch(v)
    out = fn(tq, tk, tv, *args, **kwargs)[:, 0]
    return out.numpy() if is_np else out


def sliding_window_attention(q, k, v, window_size: int):
    """Centred sliding window: token ``i`` sees ``|i - j| <= window_size // 2``; ``(batch, seq, dim)`` in and out."""
    return _wrap(_sliding_window_attention, q, k, v, window_size, causal=False)


def sparse_block_attention(q, k, v, block_size: int):
    """Attention within blocks of ``block_size`` tokens (block-diagonal layout), one softmax per row."""
    n = q.shape[1]
    if not isinstance(block_size, int) or block_size < 1 or n % block_size:
        raise ValueError(f"block_size must be a positive int dividing seq_len ({n}), got {block_size!r}")
    layout = torch.eye(n // block_size, dtype=torch.bool)
    return _wrap(_block_sparse_attention, q, k, v, layout, block_size)


def low_rank_attention(q, k, v, rank: int, seed: int = 0):
    """Linformer attention with seeded ``(rank, seq)`` projections of the keys' and values' sequence axis."""
    n = q.shape[1]
    dtype = torch.as_tensor(q[:0]).dtype
    gen = torch.Generator().manual_seed(seed)
    E = linformer_projection(rank, n, gen, dtype=dtype)
    F = linformer_projection(rank, n, gen, dtype=dtype)
    return _wrap(linformer_attention, q, k, v, E, F)


def calculate_memory(seq_len: int, method: str, window_size: int, block_size: int, rank: int) -> int:
    """Attention-score entries per (batch, head) that each implementation above allocates.

    ``full``: ``n^2``. ``sliding``: whole query chunks times the keys their window touches
    (``sliding_window_plan``), about ``1.5 n w`` for ``n >> w`` and at most ``n^2`` for short sequences. ``sparse``: ``(n / b) b^2 = n b`` for the block-diagonal layout (the printed version said
    ``(n/b)^2 b^2 = n^2``). ``low_rank``: ``n * rank``.
    """
    n = seq_len
    if method == "full":
        return n * n
    if method == "sliding":
        chunk, n_chunks, back, ahead = sliding_window_plan(n, window_size, causal=False)
        return n_chunks * chunk * (back + 1 + ahead) * chunk
    if method == "sparse":
        return (n // block_size) * block_size * block_size
    if method == "low_rank":
        return n * rank
    raise ValueError(f"method must be 'full', 'sliding', 'sparse' or 'low_rank', got {method!r}")


def calcualte_efficieny() -> None:  # (sic) the printed spelling
    """Run the three early efficient attentions on a ``(2, 8, 4)`` input and compare their score memory."""
    batch_size, seq_len, dim = 2, 8, 4
    rng = np.random.default_rng(42)
    q, k, v = (rng.standard_normal((batch_size, seq_len, dim)) for _ in range(3))
    print("Original input shape:", q.shape)
    window_size, block_size, rank = 4, 2, 2
    for title, out in (
        ("1. Sliding Window Attention", sliding_window_attention(q, k, v, window_size)),
        ("2. Block Sparse Attention", sparse_block_attention(q, k, v, block_size)),
        ("3. Low-Rank (Linformer) Attention", low_rank_attention(q, k, v, rank)),
    ):
        print(f"\n{title}\nOutput shape: {out.shape}\nOutput of the first batch, first token: {np.round(out[0, 0], 4)}")
    print("\nAttention-score entries each implementation allocates per (batch, head):")
    print(f"{'method':>15} {'n=8 (w=4, b=2, r=2)':>24} {'n=16384 (w=256, b=64, r=256)':>32}")
    for label, method in (("Full Attention", "full"), ("Sliding Window", "sliding"), ("Block Sparse", "sparse"),
                          ("Low Rank", "low_rank")):
        small = calculate_memory(seq_len, method, window_size, block_size, rank)
        large = calculate_memory(16384, method, 256, 64, 256)
        print(f"{label:>15} {small:>10d} ({small / seq_len**2:7.1%} of full) {large:>14d} ({large / 16384**2:6.2%} of full)")
    print("At n=8 the banded code's one chunk covers the whole sequence, so it holds as much as full attention;"
          " the savings appear once n is much larger than the window (chapter 2 measures time and peak memory).")


calculate_efficiency = calcualte_efficieny  # correctly spelled alias

__all__ = [
    "sliding_window_attention", "sparse_block_attention", "low_rank_attention", "calculate_memory",
    "calcualte_efficieny", "calculate_efficiency",
]
