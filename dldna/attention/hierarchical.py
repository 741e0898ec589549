"""Two-level hierarchical attention (a toy in the spirit of H-Transformer-1D, Zhu and Soricut 2021, and of
BP-Transformer / Combiner): each query attends *exactly* to the keys of its own block of ``b`` tokens and
*coarsely* to every other block through one pooled key/value (the block mean), under one softmax.

For query ``i`` in block ``c(i)`` the weights are ``softmax`` over

* local keys ``j`` with ``c(j) = c(i)`` (and ``j <= i`` if causal): score ``s_ij = q_i . k_j * scale``;
* pooled blocks ``c != c(i)`` (``c < c(i)`` if causal): score ``q_i . kbar_c * scale + log n_c``, value ``vbar_c``,

where ``n_c`` is the block's token count; ``+ log n_c`` makes one pooled key stand for ``n_c`` keys, so when the
keys and values inside every block are equal the result is exactly dense attention. ``block_size = 1`` is also
exact (every block is one token). Cost per head: ``N b`` local pairs + ``N ceil(N / b)`` pooled pairs,
minimised near ``b = sqrt(N)`` at O(N^1.5) instead of O(N^2). Used in chapter 14.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from dldna.attention.reference import attention, check_qkv, repeat_kv
from dldna.attention.ring import merge_partials


def hierarchical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, causal: bool = False,
                           scale: float | None = None, return_lse: bool = False):
    """Local (exact, inside blocks of ``block_size``) plus pooled global (block means) attention, one softmax.

    ``q``: ``(B, H, N, D)``; ``k``, ``v``: ``(B, Hkv, N, D)``; any ``N`` (the last block may be shorter).
    Returns ``(B, H, N, D)``. Scores use O(B H N (b + N / b)) memory. Used in chapter 14.
    """
    check_qkv(q, k, v)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    bsz, heads, n, dim = q.shape
    k, v = repeat_kv(k, heads // k.shape[1]), repeat_kv(v, heads // v.shape[1])
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    b = min(block_size, n)
    n_blocks = -(-n // b)
    pad = n_blocks * b - n
    pos = torch.arange(n_blocks * b, device=q.device).view(n_blocks, b)
    real = pos < n

    # level 1: exact attention inside each block, blocks folded into the batch axis
    def blocks(x):  # (B, H, N, D) -> (B * n_blocks, H, b, D)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(bsz, heads, n_blocks, b, dim)
        return x.permute(0, 2, 1, 3, 4).reshape(bsz * n_blocks, heads, b, dim)

    local_mask = real[:, None, :] & real[:, :, None]  # (n_blocks, b, b)
    if causal:
        local_mask &= torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
    local_mask = local_mask[None, :, None].expand(bsz, -1, 1, -1, -1).reshape(bsz * n_blocks, 1, b, b)
    o_loc, l_loc = attention(blocks(q), blocks(k), blocks(v), mask=local_mask, scale=scale, return_lse=True)
    o_loc = o_loc.view(bsz, n_blocks, heads, b, dim).permute(0, 2, 1, 3, 4).reshape(bsz, heads, -1, dim)[:, :, :n]
    l_loc = l_loc.view(bsz, n_blocks, heads, b).permute(0, 2, 1, 3).reshape(bsz, heads, -1)[:, :, :n]

    # level 2: every query against the pooled key/value of the other blocks
    counts = real.sum(1).to(q.dtype)  # (n_blocks,)
    k_bar = blocks(k).view(bsz, n_blocks, heads, b, dim).sum(3).transpose(1, 2) / counts[:, None]
    v_bar = blocks(v).view(bsz, n_blocks, heads, b, dim).sum(3).transpose(1, 2) / counts[:, None]
    # fold the "+ log n_c" bias into an extra feature: [q, 1] . [kbar * scale, log n_c] with scale 1
    ones = q.new_ones(bsz, heads, n, 1)
    q_aug = torch.cat([q * scale, ones], dim=-1)
    k_aug = torch.cat([k_bar, torch.log(counts)[None, None, :, None].expand(bsz, heads, -1, 1)], dim=-1)
    v_aug = torch.cat([v_bar, torch.zeros_like(k_bar[..., :1])], dim=-1)
    q_block = torch.arange(n, device=q.device) // b
    k_block = torch.arange(n_blocks, device=q.device)
    global_mask = (k_block[None, :] < q_block[:, None]) if causal else (k_block[None, :] != q_block[:, None])
    o_glob, l_glob = attention(q_aug, k_aug, v_aug, mask=global_mask, scale=1.0, return_lse=True)
    out, lse = merge_partials(o_loc, l_loc, o_glob[..., :dim], l_glob)
    return (out, lse) if return_lse else out


def hierarchical_pairs(n: int, block_size: int) -> int:
    """Scores one head evaluates (non-causal count): ``ceil(N / b) b^2`` local + ``N ceil(N / b)`` pooled.
    Used in chapter 14 for the cost curve."""
    if n < 1 or block_size < 1:
        raise ValueError(f"n and block_size must be positive, got {n} and {block_size}")
    b = min(block_size, n)
    n_blocks = -(-n // b)
    return n_blocks * b * b + n * n_blocks


def measure_hierarchical_scaling(seq_lengths: Sequence[int], heads: int = 4, head_dim: int = 32, repeats: int = 3,
                                 progress: bool = False, num_threads: int = 1) -> dict[str, list[dict]]:
    """Time, peak memory and evaluated scores of dense attention vs hierarchical attention with
    ``b = round(sqrt(N))`` on CPU (float32, batch 1, ``num_threads`` threads: one thread times more steadily on a
    shared machine). Returns ``{"dense": rows, "hierarchical": rows}`` with rows ``seq_len, seconds, peak_mb,
    pairs`` (the format of ``dldna.plots.plot_loglog_scaling``). Used in chapter 14."""
    series: dict[str, list[dict]] = {"dense": [], "hierarchical": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        _measure(series, seq_lengths, heads, head_dim, repeats, progress)
    finally:
        torch.set_num_threads(threads)
    return series


def _measure(series, seq_lengths, heads, head_dim, repeats, progress):
    from dldna.bench import peak_memory_mb, time_fn

    lengths = list(seq_lengths)
    if progress:
        from tqdm.auto import tqdm

        lengths = tqdm(lengths, desc="hierarchical vs dense")
    for n in lengths:
        n = int(n)
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen) for _ in range(3))
        b = max(1, round(math.sqrt(n)))
        runs = {"dense": (lambda: attention(q, k, v), n * n),
                "hierarchical": (lambda: hierarchical_attention(q, k, v, b), hierarchical_pairs(n, b))}
        for name, (fn, pairs) in runs.items():
            series[name].append({"seq_len": n, "block_size": b, "pairs": pairs,
                                 "seconds": time_fn(fn, warmup=1, repeats=repeats), "peak_mb": peak_memory_mb(fn)})
