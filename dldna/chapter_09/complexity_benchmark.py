"""Printed names of chapter 9's complexity benchmark, backed by ``dldna.bench`` (see chapter 1).

Unlike the printed version, times are medians after a warmup (not one cold ``time.time()`` run) and memory is
the measured *peak* allocated during the call (PyTorch's CPU allocator events / CUDA ``max_memory_allocated``),
not an RSS or ``memory_allocated`` difference taken after the tensors were already freed.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from dldna.bench import measure_attention_scaling
from dldna.plots import plot_loglog_scaling

Result = List[Tuple[int, float, float]]


def _as_tuples(rows) -> Result:
    return [(r["seq_len"], r["peak_mb"], r["seconds"]) for r in rows]


def measure_attention_complexity(seq_lengths: List[int], hidden_dim: int = 512, batch_size: int = 32) -> Result:
    """Single-head naive attention on CPU: ``[(seq_len, peak_memory_mb, seconds), ...]``."""
    return _as_tuples(measure_attention_scaling(seq_lengths, "naive", batch=batch_size, heads=1, head_dim=hidden_dim))


def _gpu_or_cpu() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_attention_complexity_gpu(seq_lengths: List[int], hidden_dim: int = 512, batch_size: int = 1) -> Result:
    """Single-head naive attention on the GPU (CPU if none): ``[(seq_len, peak_memory_mb, seconds), ...]``."""
    rows = measure_attention_scaling(seq_lengths, "naive", batch=batch_size, heads=1, head_dim=hidden_dim, device=_gpu_or_cpu())
    return _as_tuples(rows)


def measure_mh_attention_complexity_gpu(
    seq_lengths: List[int], hidden_dim: int = 512, num_heads: int = 8, batch_size: int = 1
) -> Result:
    """Multi-head naive attention (``hidden_dim / num_heads`` per head) on the GPU (CPU if none)."""
    if hidden_dim % num_heads:
        raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
    rows = measure_attention_scaling(
        seq_lengths, "naive", batch=batch_size, heads=num_heads, head_dim=hidden_dim // num_heads, device=_gpu_or_cpu()
    )
    return _as_tuples(rows)


def plot_complexity_analysis(results: Result):
    """Log-log plot of memory and time against sequence length, with fitted slopes; returns the figure."""
    rows = [{"seq_len": n, "peak_mb": mb, "seconds": s} for n, mb, s in results]
    return plot_loglog_scaling({"naive attention": rows})
