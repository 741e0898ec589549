"""Attention variants that shrink the KV cache: MHA / GQA / MQA, MLA and CLA, with a KV cache and its arithmetic.

Used in chapter 6. One class covers the head-sharing family (Shazeer 2019 MQA; Ainslie et al. 2023 GQA):

* ``MultiHeadAttention(hidden, n_heads, n_kv_heads)``: ``n_kv_heads == n_heads`` is MHA, ``1 < n_kv_heads <
  n_heads`` GQA, ``n_kv_heads == 1`` MQA. Query head ``h`` reads K/V head ``h // (n_heads // n_kv_heads)``.
* ``MultiHeadLatentAttention``: DeepSeek-V2's MLA (DeepSeek-AI 2024, arXiv:2405.04434). Keys and values are
  up-projected from one cached latent ``c_kv`` per token, plus one RoPE key shared by all heads; decoding can
  *absorb* the up-projections into the query and output so that attention runs in the latent space.
* Cross-Layer Attention (Brandon et al. 2024, arXiv:2405.12981): ``TinyDecoder`` with ``cla_share = s`` lets
  only the first layer of every group of ``s`` layers project K/V; the others attend to those K/V.

Caches are ``LayerCache`` objects (one per layer that owns K/V): tensors ``(B, heads, T, dim)`` grown along
``T``. Every decode step must give the same output as the full forward of the whole sequence (tested to 1e-10
in float64). ``kv_cache_bytes`` / ``mla_kv_cache_bytes`` give the cache size in bytes and ``kv_cache_table`` the
figures for real models. Positions are the plain token indices (no padding in this chapter; chapter 9's
``dldna.models.cache.KVCache`` handles padded batches and rolling windows).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from dldna.attention.reference import attention
from dldna.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary_pos_emb, rotate_half


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------
class LayerCache:
    """The cache of one layer: a tuple of tensors ``(B, heads, T, dim)`` grown along ``T`` by ``append``.

    MHA/GQA/MQA store ``(k, v)``; MLA stores ``(c_kv, k_rope)``. Growing by concatenation keeps the stored bytes
    equal to what the tokens need, so ``nbytes()`` can be checked against ``kv_cache_bytes``.
    """

    def __init__(self):
        self.tensors: tuple[torch.Tensor, ...] | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.tensors is None else self.tensors[0].shape[-2]

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append ``new`` tensors (same number and shapes as before, new tokens on axis -2); return the whole cache."""
        if self.tensors is not None:
            if len(new) != len(self.tensors):
                raise ValueError(f"expected {len(self.tensors)} tensors, got {len(new)}")
            new = tuple(torch.cat([old, x], dim=-2) for old, x in zip(self.tensors, new))
        self.tensors = tuple(new)
        return self.tensors

    def nbytes(self) -> int:
        """Bytes held by this layer's cached tensors."""
        return 0 if self.tensors is None else sum(t.numel() * t.element_size() for t in self.tensors)

    def __repr__(self) -> str:
        shapes = [] if self.tensors is None else [tuple(t.shape) for t in self.tensors]
        return f"LayerCache(seq_len={self.seq_len}, shapes={shapes}, bytes={self.nbytes()})"


def cache_nbytes(caches) -> int:
    """Bytes held by a list of ``LayerCache`` (``None`` entries, i.e. CLA layers without their own K/V, hold 0)."""
    return sum(c.nbytes() for c in caches if c is not None)


# ----------------------------------------------------------------------------------------------------------------
# MHA / GQA / MQA (+ the CLA consumer mode)
# ----------------------------------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """Causal self-attention with ``n_kv_heads`` K/V heads shared by groups of query heads, RoPE on q and k.

    Args:
        hidden_size: model width ``d``; n_heads: query heads; n_kv_heads: K/V heads (default ``n_heads``;
            must divide ``n_heads``); head_dim: default ``hidden_size // n_heads``.
        owns_kv: ``False`` makes a Cross-Layer-Attention consumer: it has no ``k_proj``/``v_proj`` and attends to
            the K/V passed in ``shared_kv`` by the first layer of its group.

    Parameters follow HF Llama names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, no biases).
    Per token and layer the cache holds ``2 * n_kv_heads * head_dim`` numbers. Used in chapter 6.
    """

    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 rope_theta: float = 10000.0, owns_kv: bool = True):
        super().__init__()
        _positive_int("hidden_size", hidden_size)
        _positive_int("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else _positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if hidden_size % n_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads}) "
                                 "when head_dim is not given")
            head_dim = hidden_size // n_heads
        _positive_int("head_dim", head_dim)
        self.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim = hidden_size, n_heads, n_kv_heads, head_dim
        self.owns_kv = owns_kv
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=False)
        if owns_kv:
            self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
            self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(head_dim, base=rope_theta)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: LayerCache | None = None,
                shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``x`` ``(B, T, d)``, ``position_ids`` ``(T,)`` or ``(B, T)`` -> ``(out (B, T, d), (k, v))``.

        ``k, v`` ``(B, n_kv_heads, S, head_dim)`` are all keys/values attended to (past + new, RoPE applied):
        a CLA group passes them to its consumer layers as ``shared_kv``. New K/V are appended to ``cache``.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(x, position_ids)
        if self.owns_kv:
            if shared_kv is not None:
                raise ValueError("shared_kv is only for layers built with owns_kv=False")
            k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            if shared_kv is None:
                raise ValueError("a layer with owns_kv=False needs shared_kv from the first layer of its group")
            q = q * cos[:, None] + rotate_half(q) * sin[:, None]  # RoPE on the queries only
            k, v = shared_kv
        out = attention(q, k, v, causal=True)  # bottom-right causal: new token i sees every key up to itself
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out), (k, v)

    def kv_numbers_per_token(self) -> int:
        """Numbers this layer adds to the cache per token (0 for a CLA consumer)."""
        return 2 * self.n_kv_heads * self.head_dim if self.owns_kv else 0


# ----------------------------------------------------------------------------------------------------------------
# Multi-head Latent Attention (DeepSeek-V2)
# ----------------------------------------------------------------------------------------------------------------
class MultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434, Sec. 2.1), HF ``DeepseekV2Attention`` names.

    Per token ``x`` (width ``d``) with ``n_heads`` heads:

    * latent ``c_kv = RMSNorm(W_DKV x)`` of size ``kv_lora_rank`` and one RoPE key ``k_R = RoPE(W_KR x)`` of size
      ``qk_rope_head_dim`` shared by all heads; these two are the whole cache
      (``kv_a_proj_with_mqa`` computes both);
    * per head ``k_h = [W_UK_h c_kv, k_R]`` and ``v_h = W_UV_h c_kv`` (``kv_b_proj``); queries
      ``q_h = [q_nope_h, RoPE(q_rope_h)]`` (``q_proj``, or ``q_a_proj -> q_a_layernorm -> q_b_proj`` with
      ``q_lora_rank``); scale ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``.

    ``forward(..., absorb=True)`` computes the same output without building per-head keys/values: since
    ``q_nope_h . W_UK_h c = (W_UK_h^T q_nope_h) . c``, each query is mapped into the latent space and attends to
    ``[c_kv, k_R]`` as a single shared key head with value ``c_kv`` (MQA with head_dim ``kv_lora_rank +
    qk_rope_head_dim``); ``W_UV_h`` is applied after the weighted sum. RoPE uses the rotate-half pairing of
    ``dldna.models.layers`` (HF DeepSeek-V2 pairs adjacent features: a fixed permutation of the RoPE features of
    the weights maps one onto the other). Used in chapter 6.
    """

    def __init__(self, hidden_size: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None = None, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-6):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("n_heads", n_heads), ("kv_lora_rank", kv_lora_rank),
                            ("qk_nope_head_dim", qk_nope_head_dim), ("qk_rope_head_dim", qk_rope_head_dim),
                            ("v_head_dim", v_head_dim)):
            _positive_int(name, value)
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        if q_lora_rank is not None:
            _positive_int("q_lora_rank", q_lora_rank)
        self.hidden_size, self.n_heads = hidden_size, n_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_head_dim ** -0.5
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=rms_norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=rms_norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, base=rope_theta)

    def _queries(self, x: torch.Tensor):
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.qk_head_dim).transpose(1, 2)
        return q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def _up_weights(self):
        """``W_UK`` ``(H, nope, kv_lora_rank)`` and ``W_UV`` ``(H, v_head_dim, kv_lora_rank)`` from ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: LayerCache | None = None,
                absorb: bool = False):
        """``x`` ``(B, T, d)`` -> ``(out (B, T, d), (c_kv, k_rope))`` with the full latent cache ``(B, 1, S, .)``.

        ``absorb=False``: expand per-head keys ``(B, H, S, nope + rope)`` and values (training, prefill).
        ``absorb=True``: attend in the latent space, reading only ``S * (kv_lora_rank + rope)`` cached numbers
        (decoding). Both give the same output.
        """
        b, t, _ = x.shape
        q_nope, q_rope = self._queries(x)
        # What MLA caches per token: the latent c_kv and one RoPE key shared by all heads.
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).view(b, 1, t, self.kv_lora_rank)
        cos, sin = self.rotary(x, position_ids)
        q_rope, k_rope = apply_rotary_pos_emb(q_rope, k_rope.view(b, 1, t, self.qk_rope_head_dim), cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)
        w_uk, w_uv = self._up_weights()
        if absorb:
            q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # W_UK^T q_nope: query in latent space
            query = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, c + r)
            key = torch.cat([c_kv, k_rope], dim=-1)  # (B, 1, S, c + r): one key head for all query heads
            out_latent = attention(query, key, c_kv, causal=True, scale=self.scale)  # (B, H, T, c)
            out = torch.einsum("bhtc,hvc->bhtv", out_latent, w_uv)
        else:
            k_nope = torch.einsum("bxsc,hnc->bhsn", c_kv, w_uk)
            value = torch.einsum("bxsc,hvc->bhsv", c_kv, w_uv)
            key = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
            out = attention(torch.cat([q_nope, q_rope], dim=-1), key, value, causal=True, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_head_dim)
        return self.o_proj(out), (c_kv, k_rope)

    def kv_numbers_per_token(self) -> int:
        """Numbers this layer adds to the cache per token: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim


# ----------------------------------------------------------------------------------------------------------------
# A tiny decoder with any of the variants (and CLA)
# ----------------------------------------------------------------------------------------------------------------
ATTENTION_KINDS = ("mha", "mla")


@dataclass
class KVDecoderConfig:
    """Config of ``TinyDecoder``: pre-norm decoder with SwiGLU, RoPE and one attention variant.

    ``attention="mha"`` uses ``MultiHeadAttention`` with ``n_kv_heads`` (MHA/GQA/MQA) and optional
    ``cla_share`` (CLA: layers ``[g*s, g*s+s)`` use the K/V of layer ``g*s``); ``attention="mla"`` uses
    ``MultiHeadLatentAttention`` with the ``kv_lora_rank`` / ``qk_*`` / ``v_head_dim`` fields.
    """

    vocab_size: int = 256
    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 344
    attention: str = "mha"
    cla_share: int = 1
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    q_lora_rank: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    name: str = field(default="", compare=False)

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "intermediate_size", "cla_share"):
            _positive_int(key, getattr(self, key))
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.n_layers % self.cla_share:
            raise ValueError(f"cla_share ({self.cla_share}) must divide n_layers ({self.n_layers})")
        if self.attention == "mla" and self.cla_share != 1:
            raise ValueError("cla_share > 1 is implemented for attention='mha' only")

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Cache bytes per token of the whole model (all layers)."""
        if self.attention == "mla":
            return mla_kv_cache_bytes(self.n_layers, self.kv_lora_rank, self.qk_rope_head_dim, 1, 1, dtype_bytes)
        return kv_cache_bytes(self.n_layers, self.n_kv_heads, self.head_dim, 1, 1, dtype_bytes, self.cla_share)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (HF Llama names)."""

    def __init__(self, config: KVDecoderConfig, layer_idx: int):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        if c.attention == "mla":
            self.self_attn = MultiHeadLatentAttention(c.hidden_size, c.n_heads, c.kv_lora_rank, c.qk_nope_head_dim,
                                                      c.qk_rope_head_dim, c.v_head_dim, c.q_lora_rank, c.rope_theta,
                                                      c.rms_norm_eps)
        else:
            self.self_attn = MultiHeadAttention(c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta,
                                                owns_kv=layer_idx % c.cla_share == 0)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act="silu")

    def forward(self, x, position_ids, cache=None, shared_kv=None, absorb=False):
        h = self.input_layernorm(x)
        if isinstance(self.self_attn, MultiHeadLatentAttention):
            attn_out, kv = self.self_attn(h, position_ids, cache, absorb=absorb)
        else:
            attn_out, kv = self.self_attn(h, position_ids, cache, shared_kv)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class TinyDecoder(nn.Module):
    """A small causal LM to compare the cache-shrinking variants at matched parameter count. Used in chapter 6.

    ``forward(input_ids (B, T), caches=None) -> logits (B, T, vocab)``. With ``caches = model.new_cache()`` each
    call appends its tokens to the caches and continues at position ``caches``' length, so feeding a sequence one
    token at a time gives the same logits as one full forward.
    """

    def __init__(self, config: KVDecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self) -> list[LayerCache | None]:
        """One ``LayerCache`` per layer that owns K/V; ``None`` for CLA consumer layers."""
        return [LayerCache() if getattr(layer.self_attn, "owns_kv", True) else None for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, caches: list[LayerCache | None] | None = None,
                absorb: bool = False) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches must have one entry per layer ({len(self.layers)}), got {len(caches)}")
        past = 0 if caches is None else next(c.seq_len for c in caches if c is not None)
        position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        shared = None
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            owns = getattr(layer.self_attn, "owns_kv", True)
            x, kv = layer(x, position_ids, cache, None if owns else shared, absorb)
            if owns:
                shared = kv
        return self.lm_head(self.norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def matched_intermediate_size(config: KVDecoderConfig, target_params: int, multiple: int = 8) -> int:
    """The SwiGLU width (a multiple of ``multiple``) that brings ``config``'s parameter count closest to target.

    Variants with fewer K/V parameters (GQA, MQA, CLA) get a wider MLP, so all compared models have (almost)
    the same number of parameters, as in the GQA and CLA papers' comparisons.
    """
    _positive_int("target_params", target_params)
    base = TinyDecoder(KVDecoderConfig(**{**asdict(config), "intermediate_size": multiple})).num_parameters()
    per_unit = 3 * config.hidden_size * config.n_layers  # gate, up, down columns per unit of width
    width = multiple + (target_params - base) / per_unit
    return max(multiple, int(round(width / multiple)) * multiple)


# ----------------------------------------------------------------------------------------------------------------
# KV-cache arithmetic
# ----------------------------------------------------------------------------------------------------------------
def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch: int, dtype_bytes: int = 2,
                   cla_share: int = 1) -> int:
    """Bytes of a K/V cache: ``2 (K and V) * n_layers / cla_share * n_kv_heads * head_dim * seq_len * batch * dtype_bytes``.

    MHA: ``n_kv_heads = n_heads``; GQA/MQA: fewer; CLA with sharing factor ``cla_share`` stores K/V for one
    layer in ``cla_share`` (which must divide ``n_layers``). ``seq_len`` may be 0 (an empty cache).
    Used in chapter 6.
    """
    for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                        ("batch", batch), ("dtype_bytes", dtype_bytes), ("cla_share", cla_share)):
        _positive_int(name, value)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    if n_layers % cla_share:
        raise ValueError(f"cla_share ({cla_share}) must divide n_layers ({n_layers})")
    return 2 * (n_layers // cla_share) * n_kv_heads * head_dim * seq_len * batch * dtype_bytes


def mla_kv_cache_bytes(n_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, seq_len: int, batch: int,
                       dtype_bytes: int = 2) -> int:
    """Bytes of an MLA cache: ``n_layers * (kv_lora_rank + qk_rope_head_dim) * seq_len * batch * dtype_bytes``.

    DeepSeek-V2 writes this as ``(d_c + d_h^R) * l`` elements per token (arXiv:2405.04434, Table 1).
    """
    for name, value in (("n_layers", n_layers), ("kv_lora_rank", kv_lora_rank),
                        ("qk_rope_head_dim", qk_rope_head_dim), ("batch", batch), ("dtype_bytes", dtype_bytes)):
        _positive_int(name, value)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    return n_layers * (kv_lora_rank + qk_rope_head_dim) * seq_len * batch * dtype_bytes


#: Attention shapes of real models (from their published configs) for ``kv_cache_table``.
REAL_MODELS = [
    dict(model="Llama-2-7B", kind="MHA", n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
         source="Touvron et al. 2023 (arXiv:2307.09288); HF meta-llama/Llama-2-7b-hf config.json"),
    dict(model="Llama-2-70B", kind="GQA", n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
         source="Touvron et al. 2023 (arXiv:2307.09288); HF meta-llama/Llama-2-70b-hf config.json"),
    dict(model="Mistral-7B", kind="GQA", n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
         source="Jiang et al. 2023 (arXiv:2310.06825), Table 1"),
    dict(model="DeepSeek-67B", kind="GQA", n_layers=95, n_heads=64, n_kv_heads=8, head_dim=128,
         source="DeepSeek-AI 2024 (arXiv:2401.02954), Table 2"),
    dict(model="DeepSeek-V2", kind="MLA", n_layers=60, n_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
         head_dim=128, source="DeepSeek-AI 2024 (arXiv:2405.04434); HF deepseek-ai/DeepSeek-V2 config.json"),
    dict(model="Mistral-7B + CLA2", kind="GQA+CLA2", n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
         cla_share=2, source="hypothetical: Mistral-7B shapes with CLA2 (Brandon et al. 2024, arXiv:2405.12981)"),
    dict(model="Llama-2-7B as MQA + CLA2", kind="MQA+CLA2", n_layers=32, n_heads=32, n_kv_heads=1, head_dim=128,
         cla_share=2, source="hypothetical: Llama-2-7B shapes with MQA-CLA2 (Brandon et al. 2024)"),
]


def model_kv_bytes(spec: dict, seq_len: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Cache bytes for one entry of ``REAL_MODELS`` (or a dict with the same keys)."""
    if spec.get("kind") == "MLA":
        return mla_kv_cache_bytes(spec["n_layers"], spec["kv_lora_rank"], spec["qk_rope_head_dim"], seq_len, batch,
                                  dtype_bytes)
    return kv_cache_bytes(spec["n_layers"], spec["n_kv_heads"], spec["head_dim"], seq_len, batch, dtype_bytes,
                          spec.get("cla_share", 1))


def kv_cache_table(seq_len: int = 4096, batch: int = 1, dtype_bytes: int = 2, models: list[dict] | None = None):
    """Rows ``{model, kind, bytes_per_token, numbers_per_token_per_layer, total_gib, vs_mha_same_shape, source}``.

    ``vs_mha_same_shape`` is the cache relative to MHA with the model's own ``n_heads`` and ``head_dim``
    (``2 * n_heads * head_dim`` numbers per token per layer). Mistral-7B v0.1 also caps its cache at a
    4096-token rolling window; the table shows the full-attention cache. Used in chapter 6.
    """
    rows = []
    for spec in REAL_MODELS if models is None else models:
        per_token = model_kv_bytes(spec, 1, 1, dtype_bytes)
        mha = kv_cache_bytes(spec["n_layers"], spec["n_heads"], spec["head_dim"], 1, 1, dtype_bytes)
        rows.append(dict(model=spec["model"], kind=spec["kind"], bytes_per_token=per_token,
                         numbers_per_token_per_layer=per_token // dtype_bytes / spec["n_layers"],
                         total_gib=model_kv_bytes(spec, seq_len, batch, dtype_bytes) / 2**30,
                         vs_mha_same_shape=per_token / mha, source=spec["source"]))
    return rows


def plot_kv_table(rows: list[dict]):
    """Horizontal bars of KV-cache bytes per token (log scale) for ``kv_cache_table`` rows; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1))
    names = [f"{r['model']} ({r['kind']})" for r in rows]
    values = [r["bytes_per_token"] / 1024 for r in rows]
    ax.barh(names, values, color=[f"C{i}" for i in range(len(rows))])
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:,.0f} KiB", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set(xlabel="KV cache per token, all layers (KiB, bf16)", title="What one token costs to remember")
    ax.margins(x=0.25)
    fig.tight_layout()
    return fig


def allocated_cache_bytes(config: KVDecoderConfig, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float16,
                          seed: int = 0) -> int:
    """Build ``TinyDecoder(config)`` in ``dtype``, prefill ``seq_len`` random tokens and return the cache's bytes.

    The check of the arithmetic: equals ``config.kv_bytes_per_token(dtype_bytes) * seq_len * batch``.
    """
    _positive_int("seq_len", seq_len)
    gen = torch.Generator().manual_seed(seed)
    model = TinyDecoder(config).to(dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
    caches = model.new_cache()
    with torch.no_grad():
        model(ids, caches)
    return cache_nbytes(caches)


def greedy_decode(model: TinyDecoder, prompt: torch.Tensor, new_tokens: int, absorb: bool = False) -> torch.Tensor:
    """Greedy generation with the cache: prefill ``prompt`` ``(B, T)``, then one token per step -> ``(B, T + new)``."""
    _positive_int("new_tokens", new_tokens)
    caches = model.new_cache()
    with torch.no_grad():
        logits = model(prompt, caches, absorb=absorb)
        out = [prompt]
        for _ in range(new_tokens):
            token = logits[:, -1:].argmax(-1)
            out.append(token)
            logits = model(token, caches, absorb=absorb)
    return torch.cat(out, dim=1)


def next_token_loss(model: TinyDecoder, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting ``batch[:, 1:]`` from ``batch[:, :-1]``."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


__all__ = [
    "LayerCache", "cache_nbytes", "MultiHeadAttention", "MultiHeadLatentAttention", "KVDecoderConfig", "TinyDecoder",
    "matched_intermediate_size", "kv_cache_bytes", "mla_kv_cache_bytes", "REAL_MODELS", "model_kv_bytes",
    "kv_cache_table", "plot_kv_table", "allocated_cache_bytes", "greedy_decode", "next_token_loss",
]
