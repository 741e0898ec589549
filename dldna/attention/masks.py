"""Boolean attention masks (``True`` = may attend), as ``mask_mod`` closures and as dense tensors.

Every pattern is written once, as a ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` closure returned by a
``make_*`` factory (the signature FlexAttention uses, so the same closure can drive
``torch.nn.attention.flex_attention.create_block_mask``). ``materialize(mask_mod, q_len, kv_len)`` turns a closure
into a dense ``(q_len, kv_len)`` mask for the dense reference, SDPA and plots; ``and_masks``/``or_masks`` compose
closures. The ``*_mask(n, ...)`` builders are ``materialize(make_*(...), n, n)``.

Block layouts (``*_block_layout``) are ``(n_blocks, n_blocks)`` bool tensors saying which
``block_size x block_size`` tiles are computed; ``block_sparse_mask(n, block_size, layout)`` expands one to
tokens. They drive ``block_sparse_attention`` and the Triton block-sparse kernel.

Window conventions (tested):
- ``sliding_window_mask(n, window, causal=True)``: ``0 <= i - j < window`` -- ``window`` keys *including
  the query itself* (the Hugging Face / Mistral convention); non-causal: ``|i - j| <= window // 2``.
- ``longformer_mask(n, window, global_tokens)``: ``|i - j| <= window`` (one-sided radius, as in the design),
  or ``i`` or ``j`` global.

Used in chapters 2, 4 and 14.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- validation
def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _layout(layout, n_blocks: int | None = None, name: str = "layout") -> torch.Tensor:
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool, got {layout.dtype}")
    if layout.dim() != 2 or layout.shape[0] != layout.shape[1]:
        raise ValueError(f"{name} must be a square (n_blocks, n_blocks) tensor, got {tuple(layout.shape)}")
    if n_blocks is not None and layout.shape[0] != n_blocks:
        raise ValueError(f"{name} must have shape ({n_blocks}, {n_blocks}), got {tuple(layout.shape)}")
    return layout


def _global_vector(n: int, global_tokens, name: str = "global_tokens") -> torch.Tensor:
    """``(n,)`` bool vector marking the global positions; indices must lie in ``[0, n)``."""
    if isinstance(global_tokens, torch.Tensor):
        idx = global_tokens.flatten().to(torch.long).tolist()
    elif isinstance(global_tokens, Iterable):
        idx = list(global_tokens)
    else:
        raise TypeError(f"{name} must be a sequence of ints, got {type(global_tokens).__name__}")
    is_global = torch.zeros(n, dtype=torch.bool)
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"{name} must hold ints in [0, {n}), got {i!r}")
        is_global[i] = True
    return is_global


# ---------------------------------------------------------------------------------------------- composition
def materialize(mask_mod: MaskMod, q_len: int, kv_len: int | None = None, device=None) -> torch.Tensor:
    """Evaluate ``mask_mod`` on every ``(q_idx, kv_idx)`` pair: a dense ``(q_len, kv_len)`` bool tensor."""
    q_len = _int("q_len", q_len)
    kv_len = q_len if kv_len is None else _int("kv_len", kv_len)
    zero = torch.zeros((), dtype=torch.long, device=device)
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    out = mask_mod(zero, zero, q_idx, kv_idx)
    return torch.broadcast_to(torch.as_tensor(out, device=device), (q_len, kv_len)).to(torch.bool).clone()


def _combine(mask_mods: tuple, op, name: str) -> MaskMod:
    if not mask_mods:
        raise ValueError(f"{name} needs at least one mask_mod")

    def mask_mod(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            out = op(out, mod(b, h, q_idx, kv_idx))
        return out

    return mask_mod


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A ``mask_mod`` allowing a pair only if every argument allows it (intersection)."""
    return _combine(mask_mods, torch.logical_and, "and_masks")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A ``mask_mod`` allowing a pair if any argument allows it (union)."""
    return _combine(mask_mods, torch.logical_or, "or_masks")


# ---------------------------------------------------------------------------------------------- mask_mods
def make_causal() -> MaskMod:
    """Query ``i`` sees keys ``j <= i``."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return causal


def make_sliding_window(window: int, causal: bool = True) -> MaskMod:
    """Causal: ``0 <= i - j < window`` (``window`` keys including self). Non-causal: ``|i - j| <= window // 2``."""
    window = _int("window", window)
    radius = window // 2

    def sliding_window(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        if causal:
            return (diff >= 0) & (diff < window)
        return diff.abs() <= radius

    return sliding_window


def make_dilated(window: int, dilation: int, causal: bool = True) -> MaskMod:
    """Dilated sliding window (Longformer, Beltagy et al. 2020, sec. 3.1): the window's keys spaced ``dilation`` apart.

    Causal: ``(i - j) % dilation == 0`` and ``0 <= i - j < window * dilation`` -- ``window`` keys including self.
    Non-causal: ``(i - j) % dilation == 0`` and ``|i - j| <= (window // 2) * dilation``.
    ``dilation=1`` gives ``make_sliding_window(window, causal)``; the receptive field is ``window * dilation``.
    """
    window, dilation = _int("window", window), _int("dilation", dilation)
    radius = (window // 2) * dilation

    def dilated(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        on_grid = diff.remainder(dilation) == 0
        if causal:
            return on_grid & (diff >= 0) & (diff < window * dilation)
        return on_grid & (diff.abs() <= radius)

    return dilated


def make_segment_dilated(segment: int, dilation: int, offset: int = 0, causal: bool = False) -> MaskMod:
    """One (segment, dilation) branch of LongNet dilated attention (Ding et al. 2023).

    The sequence is cut into segments of ``segment`` tokens; inside each, the positions ``p`` with
    ``p % dilation == offset % dilation`` attend to each other (and, if ``causal``, only backwards).
    Positions off the grid attend nowhere in this branch; LongNet unions several branches (``or_masks``).
    """
    segment, dilation = _int("segment", segment), _int("dilation", dilation)
    offset = _int("offset", offset, minimum=0) % dilation

    def segment_dilated(b, h, q_idx, kv_idx):
        same_segment = (q_idx // segment) == (kv_idx // segment)
        on_grid = ((q_idx % segment) % dilation == offset) & ((kv_idx % segment) % dilation == offset)
        out = same_segment & on_grid
        return out & (kv_idx <= q_idx) if causal else out

    return segment_dilated


def make_block_sparse(block_size: int, layout: torch.Tensor) -> MaskMod:
    """Token ``i`` sees token ``j`` when tile ``(i // block_size, j // block_size)`` is kept in ``layout``."""
    block_size = _int("block_size", block_size)
    layout = _layout(layout)

    def block_sparse(b, h, q_idx, kv_idx):
        lay = layout.to(q_idx.device)
        return lay[q_idx // block_size, kv_idx // block_size]

    return block_sparse


def make_strided(stride: int) -> MaskMod:
    """Sparse Transformer strided pattern (Child et al. 2019), causal, both heads' sets united.

    ``A1 = {j : 0 <= i - j < stride}`` (the previous ``stride`` tokens) and ``A2 = {j : (i - j) % stride == 0}``.
    """
    stride = _int("stride", stride)

    def strided(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & ((diff < stride) | (diff.remainder(stride) == 0))

    return strided


def make_fixed(stride: int, c: int) -> MaskMod:
    """Sparse Transformer fixed pattern (Child et al. 2019), causal, both sets united.

    ``A1 = {j : j // stride == i // stride}`` (same block) and ``A2 = {j : j % stride >= stride - c}`` (the last
    ``c`` "summary" positions of every block), with ``1 <= c <= stride``.
    """
    stride, c = _int("stride", stride), _int("c", c)
    if c > stride:
        raise ValueError(f"c must be <= stride ({stride}), got {c}")

    def fixed(b, h, q_idx, kv_idx):
        same_block = (q_idx // stride) == (kv_idx // stride)
        summary = kv_idx.remainder(stride) >= stride - c
        return (kv_idx <= q_idx) & (same_block | summary)

    return fixed


def make_longformer(n: int, window: int, global_tokens: Sequence[int]) -> MaskMod:
    """Longformer (Beltagy et al. 2020): ``|i - j| <= window``, plus *symmetric* global attention.

    A global token attends to every position and every position attends to it. ``n`` fixes the length of the
    global-token table; ``window`` is the one-sided radius (``window=0`` keeps only the diagonal).
    """
    n = _int("n", n)
    window = _int("window", window, minimum=0)
    is_global = _global_vector(n, global_tokens)

    def longformer(b, h, q_idx, kv_idx):
        glob = is_global.to(q_idx.device)
        return ((q_idx - kv_idx).abs() <= window) | glob[q_idx] | glob[kv_idx]

    return longformer


# ---------------------------------------------------------------------------------------------- dense masks
def causal_mask(n: int) -> torch.Tensor:
    """``(n, n)`` lower-triangular mask: ``j <= i``."""
    return materialize(make_causal(), _int("n", n))


def sliding_window_mask(n: int, window: int, causal: bool = True) -> torch.Tensor:
    """``(n, n)``; causal: ``0 <= i - j < window``; non-causal: ``|i - j| <= window // 2``."""
    return materialize(make_sliding_window(window, causal), _int("n", n))


def dilated_mask(n: int, window: int, dilation: int, causal: bool = True) -> torch.Tensor:
    """``(n, n)`` dilated sliding window, see ``make_dilated``; ``dilation=1`` equals ``sliding_window_mask``."""
    return materialize(make_dilated(window, dilation, causal), _int("n", n))


def segment_dilated_mask(n: int, segment: int, dilation: int, offset: int = 0, causal: bool = False) -> torch.Tensor:
    """``(n, n)`` LongNet branch, see ``make_segment_dilated``."""
    return materialize(make_segment_dilated(segment, dilation, offset, causal), _int("n", n))


def block_sparse_mask(n: int, block_size: int, layout: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` token mask of a ``(n // block_size, n // block_size)`` block ``layout``; ``block_size`` must divide ``n``."""
    n, block_size = _int("n", n), _int("block_size", block_size)
    if n % block_size:
        raise ValueError(f"block_size ({block_size}) must divide n ({n})")
    _layout(layout, n // block_size)
    return materialize(make_block_sparse(block_size, layout), n)


def strided_mask(n: int, stride: int) -> torch.Tensor:
    """``(n, n)`` Sparse Transformer strided pattern (causal), see ``make_strided``."""
    return materialize(make_strided(stride), _int("n", n))


def fixed_mask(n: int, stride: int, c: int) -> torch.Tensor:
    """``(n, n)`` Sparse Transformer fixed pattern (causal), see ``make_fixed``."""
    return materialize(make_fixed(stride, c), _int("n", n))


def longformer_mask(n: int, window: int, global_tokens: Sequence[int]) -> torch.Tensor:
    """``(n, n)``: ``|i - j| <= window`` or ``i`` or ``j`` in ``global_tokens``."""
    return materialize(make_longformer(n, window, global_tokens), n)


# ---------------------------------------------------------------------------------------------- block layouts
def block_layout_from_mask(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Smallest block layout covering a token ``mask``: tile kept if any of its entries is ``True``.

    ``mask`` is ``(n, n)`` bool; tail tiles are included when ``block_size`` does not divide ``n``, giving
    ``(ceil(n / block_size),) * 2``.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError("mask must be a 2-D bool tensor")
    block_size = _int("block_size", block_size)
    n_q, n_k = mask.shape
    pad_q, pad_k = (-n_q) % block_size, (-n_k) % block_size
    padded = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q), value=False)
    tiles = padded.reshape((n_q + pad_q) // block_size, block_size, (n_k + pad_k) // block_size, block_size)
    return tiles.any(dim=3).any(dim=1)


def sliding_window_block_layout(n_blocks: int, window_blocks: int, causal: bool = True) -> torch.Tensor:
    """Block-level sliding window: ``sliding_window_mask`` applied to block indices."""
    return sliding_window_mask(n_blocks, window_blocks, causal)


def strided_block_layout(n_blocks: int, stride: int) -> torch.Tensor:
    """Sparse Transformer strided pattern on blocks (as the original block-sparse kernels ran it); causal."""
    return strided_mask(n_blocks, stride)


def fixed_block_layout(n_blocks: int, stride: int, c: int) -> torch.Tensor:
    """Sparse Transformer fixed pattern on blocks: ``stride`` blocks per group, the last ``c`` of them summaries."""
    return fixed_mask(n_blocks, stride, c)


def longformer_block_layout(n_blocks: int, window_blocks: int, global_blocks: Sequence[int]) -> torch.Tensor:
    """Longformer on blocks: ``|I - J| <= window_blocks`` or ``I``/``J`` a global block."""
    return longformer_mask(n_blocks, window_blocks, global_blocks)


def bigbird_block_layout(
    n_blocks: int, window_blocks: int = 3, num_global_blocks: int = 1, num_random_blocks: int = 1, seed: int = 0
) -> torch.Tensor:
    """BigBird-ITC block layout (Zaheer et al. 2020): window + global + random blocks, non-causal.

    - window: block ``I`` sees ``J`` with ``|I - J| <= window_blocks // 2`` (``window_blocks`` odd, 3 in the paper);
    - global: the first ``num_global_blocks`` blocks see everything and are seen by everyone;
    - random: every other row gets ``num_random_blocks`` extra blocks drawn without replacement (seeded) among those
      it does not see yet (fewer if not enough remain).
    """
    n_blocks = _int("n_blocks", n_blocks)
    window_blocks = _int("window_blocks", window_blocks)
    if window_blocks % 2 == 0:
        raise ValueError(f"window_blocks must be odd (the block itself plus equal neighbours), got {window_blocks}")
    num_global_blocks = _int("num_global_blocks", num_global_blocks, minimum=0)
    num_random_blocks = _int("num_random_blocks", num_random_blocks, minimum=0)
    _int("seed", seed, minimum=0)
    if num_global_blocks > n_blocks:
        raise ValueError(f"num_global_blocks ({num_global_blocks}) must be <= n_blocks ({n_blocks})")
    layout = sliding_window_mask(n_blocks, window_blocks, causal=False)
    layout[:num_global_blocks, :] = True
    layout[:, :num_global_blocks] = True
    gen = torch.Generator().manual_seed(seed)
    for row in range(num_global_blocks, n_blocks):
        free = (~layout[row]).nonzero().flatten()
        if num_random_blocks and free.numel():
            pick = free[torch.randperm(free.numel(), generator=gen)[:num_random_blocks]]
            layout[row, pick] = True
    return layout


def bigbird_mask(
    n: int, block_size: int, window_blocks: int = 3, num_global_blocks: int = 1, num_random_blocks: int = 1, seed: int = 0
) -> torch.Tensor:
    """``(n, n)`` BigBird mask: ``bigbird_block_layout`` expanded to tokens (``block_size`` must divide ``n``)."""
    n, block_size = _int("n", n), _int("block_size", block_size)
    if n % block_size:
        raise ValueError(f"block_size ({block_size}) must divide n ({n})")
    layout = bigbird_block_layout(n // block_size, window_blocks, num_global_blocks, num_random_blocks, seed)
    return block_sparse_mask(n, block_size, layout)


def mask_density(mask: torch.Tensor) -> float:
    """Fraction of allowed entries; for a causal mask about one half."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor")
    return float(mask.float().mean())


def receptive_field(mask: torch.Tensor, layers: int) -> torch.Tensor:
    """Positions each query can draw information from after ``layers`` stacked layers with the same ``mask``.

    Returns ``(n, n)`` bool: reachability by paths of length ``<= layers`` (a layer always keeps the residual
    path ``i -> i``). Used in chapter 4 for the receptive-field growth plots.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError("mask must be a 2-D bool tensor")
    layers = _int("layers", layers, minimum=0)
    step = (mask | torch.eye(mask.shape[0], dtype=torch.bool)).float()
    reach = torch.eye(mask.shape[0])
    for _ in range(layers):
        reach = ((reach @ step) > 0).float()
    return reach.bool()


__all__ = [
    "MaskMod", "materialize", "and_masks", "or_masks",
    "make_causal", "make_sliding_window", "make_dilated", "make_segment_dilated", "make_block_sparse",
    "make_strided", "make_fixed", "make_longformer",
    "causal_mask", "sliding_window_mask", "dilated_mask", "segment_dilated_mask", "block_sparse_mask",
    "strided_mask", "fixed_mask", "longformer_mask", "bigbird_mask",
    "block_layout_from_mask", "sliding_window_block_layout", "strided_block_layout", "fixed_block_layout",
    "longformer_block_layout", "bigbird_block_layout", "mask_density", "receptive_field",
]
