"""Dilated attention (LongNet: Ding et al. 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens").

One *branch* ``(w, r)`` cuts the sequence into segments of ``w`` tokens and, inside each segment, keeps every
``r``-th position: the kept positions attend to each other (causally if asked). Head ``h`` uses the offset
``h mod r``, so the heads of a branch together cover every position. Several branches with geometrically growing
``w`` and ``r`` (e.g. ``w = 4, 8, 16`` with ``r = 1, 2, 4``) are mixed: each costs ``(N / w) (w / r)^2`` pairs
per head, so with ``w / r`` fixed the whole layer is O(N).

Convention (the same as ``dldna.attention.masks.make_segment_dilated``): position ``p`` is on the grid of branch
``(w, r)`` with offset ``o`` when ``(p mod w) mod r == o``; pair ``(i, j)`` is allowed when ``i // w == j // w``
and both are on the grid (and ``j <= i`` if causal). Positions past the end of the sequence are padding.

Branch outputs are merged with their log-sum-exp (:func:`dldna.attention.ring.merge_partials`). With
``deduplicate=True`` a pair already allowed by an earlier branch is masked in later ones, so the result equals
dense attention with the *union* mask :func:`longnet_mask`. With ``deduplicate=False`` it is LongNet's
weighted sum, in which a key covered by two branches counts twice (dense attention over the branches'
key sets concatenated). Used in chapter 14.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from dldna.attention.masks import materialize, make_segment_dilated, or_masks, receptive_field
from dldna.attention.reference import attention, check_qkv, repeat_kv
from dldna.attention.ring import merge_partials


def _check_branches(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> list[tuple[int, int]]:
    segment_lengths, dilation_rates = list(segment_lengths), list(dilation_rates)
    if not segment_lengths or len(segment_lengths) != len(dilation_rates):
        raise ValueError(f"segment_lengths and dilation_rates must be non-empty and of equal length, got "
                         f"{segment_lengths} and {dilation_rates}")
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in values):
            raise ValueError(f"{name} must hold positive ints, got {values}")
    for w, r in zip(segment_lengths, dilation_rates):
        if r > w:
            raise ValueError(f"each dilation rate must be <= its segment length, got segment {w} with dilation {r}")
    return list(zip(segment_lengths, dilation_rates))


def longnet_mask(n: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], num_heads: int,
                 causal: bool = False) -> torch.Tensor:
    """``(num_heads, n, n)`` bool union mask of all branches; head ``h`` uses offset ``h mod r`` in branch ``(w, r)``.

    Built from ``dldna.attention.masks.make_segment_dilated`` and ``or_masks``. Used in chapter 14.
    """
    branches = _check_branches(segment_lengths, dilation_rates)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    masks = []
    for h in range(num_heads):
        mods = [make_segment_dilated(w, r, offset=h % r, causal=causal) for w, r in branches]
        masks.append(materialize(or_masks(*mods), n))
    return torch.stack(masks)


def _grid(w: int, r: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head in-segment indices of the grid ``(H, ceil(w / r))`` and their validity (``< w``)."""
    m = -(-w // r)
    idx = torch.tensor([h % r for h in range(num_heads)])[:, None] + r * torch.arange(m)[None, :]
    return idx.clamp(max=w - 1), idx < w


def _on_branch(i: torch.Tensor, j: torch.Tensor, heads: torch.Tensor, w: int, r: int) -> torch.Tensor:
    """Whether global pair ``(i, j)`` (broadcast with per-head offsets ``heads % r``) is allowed by branch ``(w, r)``
    before causality: same segment and both on the grid."""
    off = heads % r
    return (i // w == j // w) & ((i % w) % r == off) & ((j % w) % r == off)


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = False,
    scale: float | None = None,
    deduplicate: bool = True,
    return_lse: bool = False,
):
    """LongNet dilated attention, computed sparsely: for each branch, gather the grid of every segment, run dense
    attention inside the ``(w / r) x (w / r)`` blocks, scatter back, and merge branches by log-sum-exp.

    Args:
        q: ``(B, H, N, D)``; k, v: ``(B, Hkv, N, D)`` (GQA allowed); any ``N`` (the last segment is padded).
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``, ``r_i <= w_i``.
        deduplicate: ``True`` gives exactly ``attention(q, k, v, mask=longnet_mask(...))``; ``False`` gives
            LongNet's sum in which keys shared by two branches are counted once per branch.
    Memory: O(B H N max_i(w_i / r_i)) for the scores instead of O(B H N^2). Used in chapter 14.
    """
    check_qkv(q, k, v)
    branches = _check_branches(segment_lengths, dilation_rates)
    bsz, heads, n, dim = q.shape
    k, v = repeat_kv(k, heads // k.shape[1]), repeat_kv(v, heads // v.shape[1])
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    head_ids = torch.arange(heads, device=q.device)
    out = torch.zeros_like(q)
    lse = torch.full((bsz, heads, n), float("-inf"), dtype=q.dtype, device=q.device)
    for b_idx, (w, r) in enumerate(branches):
        n_seg = -(-n // w)
        pad = n_seg * w - n
        idx, valid = (t.to(q.device) for t in _grid(w, r, heads))  # (H, m)
        m = idx.shape[1]
        # global positions of the grid: (S, H, m)
        pos = torch.arange(n_seg, device=q.device)[:, None, None] * w + idx[None]
        real = valid[None] & (pos < n)
        allowed = real[..., :, None] & real[..., None, :]  # (S, H, m, m)
        if causal:
            allowed &= pos[..., None, :] <= pos[..., :, None]
        if deduplicate:  # drop pairs an earlier branch already covers
            i, j, hh = pos[..., :, None], pos[..., None, :], head_ids[None, :, None, None]
            for w0, r0 in branches[:b_idx]:
                allowed &= ~_on_branch(i, j, hh, w0, r0)

        def gather(x):  # (B, H, N, D) -> (B * S, H, m, D)
            x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(bsz, heads, n_seg, w, dim)
            x = x.gather(3, idx[None, :, None, :, None].expand(bsz, heads, n_seg, m, dim))
            return x.permute(0, 2, 1, 3, 4).reshape(bsz * n_seg, heads, m, dim)

        mask = allowed[None].expand(bsz, -1, -1, -1, -1).reshape(bsz * n_seg, heads, m, m)
        o_b, l_b = attention(gather(q), gather(k), gather(v), mask=mask, scale=scale, return_lse=True)
        # scatter back to (B, H, N): positions off the grid (or padding) get zeros and lse = -inf
        o_b = o_b.view(bsz, n_seg, heads, m, dim).permute(0, 2, 1, 3, 4)
        l_b = l_b.view(bsz, n_seg, heads, m).permute(0, 2, 1, 3)
        flat = pos.permute(1, 0, 2).reshape(heads, n_seg * m)  # (H, S * m) global positions
        keep = real.permute(1, 0, 2).reshape(heads, n_seg * m)
        target = torch.where(keep, flat, torch.full_like(flat, n))  # invalid -> a dummy slot at index n
        full_o = q.new_zeros(bsz, heads, n + 1, dim)
        full_l = q.new_full((bsz, heads, n + 1), float("-inf"))
        full_o.scatter_(2, target[None, :, :, None].expand(bsz, heads, n_seg * m, dim), o_b.reshape(bsz, heads, -1, dim))
        full_l.scatter_(2, target[None].expand(bsz, heads, n_seg * m), l_b.reshape(bsz, heads, -1))
        out, lse = merge_partials(out, lse, full_o[:, :, :n], full_l[:, :, :n])
    return (out, lse) if return_lse else out


def dilated_pairs(n: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> int:
    """Query-key pairs one head computes (non-causal, before deduplication): ``sum_i ceil(N / w_i) * ceil(w_i / r_i)^2``."""
    branches = _check_branches(segment_lengths, dilation_rates)
    return sum(-(-n // w) * (-(-w // r)) ** 2 for w, r in branches)


def plot_dilated_pattern(n: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], num_heads: int,
                         causal: bool = False, layers: int = 2):
    """Figure: each branch of head 0, the union mask of heads 0 and 1, the union over all heads, and the
    receptive field of head 0's union mask after ``layers`` layers. Returns the figure. Used in chapter 14."""
    import matplotlib.pyplot as plt

    branches = _check_branches(segment_lengths, dilation_rates)
    union = longnet_mask(n, segment_lengths, dilation_rates, num_heads, causal)
    panels = [(materialize(make_segment_dilated(w, r, 0, causal), n), f"head 0: w={w}, r={r}") for w, r in branches]
    panels += [(union[0], "head 0: union"), (union[min(1, num_heads - 1)], f"head {min(1, num_heads - 1)}: union"),
               (union.any(0), "all heads"), (receptive_field(union[0], layers), f"head 0 after {layers} layers")]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (mask, title) in zip(axes, panels):
        ax.imshow(mask.numpy(), cmap="Blues", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("query i")
    fig.supxlabel("key j", fontsize=9)
    fig.tight_layout()
    return fig
