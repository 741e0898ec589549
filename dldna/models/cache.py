"""Key/value cache for decoder-only models, with an optional rolling window (Mistral) and left padding.

Used in chapters 9-11 (simple Mistral, Phi-3, MoE, speculative decoding).

A decoder sees a *stream* of token slots: the prompt (possibly left-padded), then every generated token.
Slot ``t`` of the stream has the **stream index** ``t`` (padding included, the same for every row of the batch)
and, per row, a **position id** (the RoPE position: the number of real tokens before it) and a **valid** flag
(False for padding). Masks are built from stream indices, exactly as Hugging Face does:

    query slot i may attend to key slot j   iff   valid[j]  and  j <= i  and  i - j < sliding_window

(the HF window convention: ``sliding_window`` keys *including the query itself*). With left padding the
difference ``i - j`` between two real tokens equals the difference of their position ids, so indices and
positions give the same window.

With ``sliding_window = W`` the cache keeps only the **last W slots** of each layer (a rolling buffer): every
key older than that is outside every future query's window, so memory stays ``O(W)`` however long the
generation runs. Without a window the cache grows with the stream.

Interface (what a model's ``forward`` does; ``MistralModel`` and ``Phi3Model`` follow it)::

    step = cache.begin(new_valid)            # once per forward, before the layers; new_valid (B, n) bool
    # step.position_ids (B, n) RoPE positions, step.query_index (n,), step.key_index (L+n,),
    # step.key_valid (B, L+n): the keys the layers will see = kept cache slots + the n new ones
    mask = attention_mask_from_step(step, sliding_window)    # (B, 1, n, L+n) bool, True = may attend
    for i, layer in enumerate(layers):
        k, v = cache.update(k_new, v_new, i)  # (B, Hkv, L+n, D): old + new; stores the last W slots
    # without a cache: step = uncached_step(new_valid), same fields with L = 0

``KVCache.memory_bytes()`` reports the bytes held (chapter 9 plots it against the stream length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheStep:
    """What one forward call needs to build its mask and RoPE angles (shapes for ``B`` rows, ``n`` new slots).

    ``position_ids`` ``(B, n)`` long; ``query_index`` ``(n,)`` long stream indices of the new slots;
    ``key_index`` ``(K,)`` and ``key_valid`` ``(B, K)`` for the keys attention sees (cached then new).
    """

    position_ids: torch.Tensor
    query_index: torch.Tensor
    key_index: torch.Tensor
    key_valid: torch.Tensor


def positions_from_valid(valid: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """RoPE positions ``(B, n)`` from a validity mask ``(B, n)``: real tokens count ``start, start+1, ...``.

    Padding slots get the position of the next real token (any value works: they are never attended),
    matching HF ``generate`` (which gives padding position 1) on every real token.
    """
    if valid.dim() != 2:
        raise ValueError(f"valid must have shape (batch, seq), got {tuple(valid.shape)}")
    counts = valid.long().cumsum(-1) - valid.long()  # real tokens strictly before each slot
    if isinstance(start, torch.Tensor):
        start = start.to(valid.device).view(-1, 1)
    return counts + start


def uncached_step(new_valid: torch.Tensor) -> CacheStep:
    """The ``CacheStep`` of a forward without a cache: keys are exactly the ``n`` new slots."""
    n = new_valid.shape[1]
    index = torch.arange(n, device=new_valid.device)
    return CacheStep(positions_from_valid(new_valid), index, index, new_valid.bool())


def attention_mask_from_step(step: CacheStep, sliding_window: int | None = None) -> torch.Tensor:
    """Bool mask ``(B, 1, n, K)``, True = may attend: valid key, causal, and inside the window (HF convention).

    Rows with no allowed key (a padding query at the left edge) stay all False; the attention function must
    return zeros for them (``dldna.models.mistral.sdpa_attention`` does).
    """
    q = step.query_index[:, None]
    k = step.key_index[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    return allowed[None, None] & step.key_valid[:, None, None, :]


class KVCache:
    """Per-layer K/V tensors ``(B, Hkv, L, D)`` plus per-slot stream index, validity and position bookkeeping.

    Args:
        num_layers: decoder layers that will call ``update``.
        sliding_window: if set, keep only the last ``sliding_window`` slots (rolling buffer, memory O(W)).

    ``get_seq_length()`` is the stream length seen so far (padding included), as in HF caches.
    """

    def __init__(self, num_layers: int, sliding_window: int | None = None):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
        self.num_layers = num_layers
        self.sliding_window = sliding_window
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.seen_tokens = 0  # stream length, padding included
        self.key_index: torch.Tensor | None = None  # (L,) stream index of each kept slot
        self.key_valid: torch.Tensor | None = None  # (B, L) False for padding
        self.real_tokens: torch.Tensor | None = None  # (B,) real tokens seen per row (next RoPE position)

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        """Slots currently held (at most ``sliding_window`` when a window is set)."""
        return 0 if self.key_index is None else int(self.key_index.numel())

    def begin(self, new_valid: torch.Tensor) -> CacheStep:
        """Register ``n`` new slots for every row; ``new_valid`` ``(B, n)`` bool (False = padding).

        Returns the ``CacheStep`` for this forward and updates the bookkeeping (trimmed to the window).
        Every layer must then call ``update`` exactly once with the new slots' keys and values.
        """
        if new_valid.dim() != 2:
            raise ValueError(f"new_valid must have shape (batch, new_tokens), got {tuple(new_valid.shape)}")
        new_valid = new_valid.bool()
        b, n = new_valid.shape
        dev = new_valid.device
        if self.key_index is None:
            self.key_index = torch.empty(0, dtype=torch.long, device=dev)
            self.key_valid = torch.empty(b, 0, dtype=torch.bool, device=dev)
            self.real_tokens = torch.zeros(b, dtype=torch.long, device=dev)
        elif self.key_valid.shape[0] != b:
            raise ValueError(f"new_valid has batch {b} but the cache holds batch {self.key_valid.shape[0]}")
        position_ids = positions_from_valid(new_valid, self.real_tokens)
        query_index = torch.arange(self.seen_tokens, self.seen_tokens + n, device=dev)
        key_index = torch.cat([self.key_index, query_index])
        key_valid = torch.cat([self.key_valid, new_valid], dim=1)
        self.seen_tokens += n
        self.real_tokens = self.real_tokens + new_valid.long().sum(-1)
        self.key_index, self.key_valid = self._trim(key_index, -1), self._trim(key_valid, -1)
        return CacheStep(position_ids, query_index, key_index, key_valid)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key``/``value`` ``(B, Hkv, n, D)`` for layer ``layer_idx``; return old + new ``(B, Hkv, L+n, D)``.

        The stored tensors are then trimmed to the last ``sliding_window`` slots.
        """
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        if key.shape != value.shape:
            raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = self._trim(key, -2), self._trim(value, -2)
        return key, value

    def _trim(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        w = self.sliding_window
        if w is None or x.shape[dim] <= w:
            return x
        return x.narrow(dim, x.shape[dim] - w, w).contiguous()

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values of all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows (``beam_idx`` ``(B',)`` long), e.g. to drop finished rows or for beam search."""
        self.keys = [None if t is None else t.index_select(0, beam_idx) for t in self.keys]
        self.values = [None if t is None else t.index_select(0, beam_idx) for t in self.values]
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, beam_idx)
            self.real_tokens = self.real_tokens.index_select(0, beam_idx)

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, sliding_window={self.sliding_window}, "
                f"held={len(self)}, seen={self.seen_tokens}, bytes={self.memory_bytes()})")
