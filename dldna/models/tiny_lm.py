"""A small decoder-only language model whose every design choice is a switch, for ablations.

``TinyLM`` is a GPT-style causal Transformer where positions (none / learned / sinusoidal / RoPE / ALiBi), the
norm (LayerNorm / RMSNorm), its placement (pre / post) and the feed-forward (GELU / ReLU / SwiGLU / GeGLU) are
config fields, so chapter experiments change one thing at a time. It reuses ``dldna.models.layers`` (the same
RMSNorm, RoPE, gated MLPs and ALiBi as the Mistral and Phi-3 models). Attention runs through PyTorch SDPA.

Example::

    cfg = TinyLMConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, position="alibi")
    logits = TinyLM(cfg)(input_ids)          # (B, N, vocab_size)

Used in chapters 7 and 15.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dldna.models.layers import (GatedMLP, LearnedPositionalEmbedding, RMSNorm, RotaryEmbedding, alibi_bias,
                                 apply_rotary_pos_emb, sinusoidal_position_encoding)

POSITIONS = ("none", "learned", "sinusoidal", "rope", "alibi")
NORMS = ("layer", "rms")
FFNS = ("gelu", "relu", "swiglu", "geglu")


@dataclass
class TinyLMConfig:
    """Configuration of ``TinyLM`` (field names follow HF where one exists).

    ``intermediate_size`` defaults to ``4 * hidden_size`` for the plain FFNs and to ``round(8 * hidden_size / 3)``
    for the gated ones, so all FFNs have (almost exactly) the same ``8 * hidden_size^2`` weights.
    ``max_position_embeddings`` bounds only the learned table. ``rope_scaling > 1`` divides the RoPE positions
    (position interpolation: a model trained on ``n`` positions reads ``rope_scaling * n`` within its angles).
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    ffn: str = "gelu"
    norm: str = "layer"
    norm_position: str = "pre"
    position: str = "rope"
    max_position_embeddings: int = 64
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation (Chen et al. 2023): RoPE sees position / rope_scaling
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bias: bool = False

    def __post_init__(self):
        for name, value, allowed in (("ffn", self.ffn, FFNS), ("norm", self.norm, NORMS),
                                     ("norm_position", self.norm_position, ("pre", "post")),
                                     ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling <= 0:
            raise ValueError(f"rope_scaling must be positive, got {self.rope_scaling}")
        if self.intermediate_size is None:
            gated = self.ffn in ("swiglu", "geglu")
            self.intermediate_size = round(8 * self.hidden_size / 3) if gated else 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _norm(cfg: TinyLMConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)


class TinyMLP(nn.Module):
    """Plain two-layer FFN ``fc2(act(fc1(x)))`` with GELU or ReLU."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.bias)
        self.act = nn.GELU() if cfg.ffn == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TinyAttention(nn.Module):
    """Causal multi-head self-attention with optional RoPE (``cos, sin``) or an additive ``bias`` (ALiBi)."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary_pos_emb(q, k, *rope)
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class TinyBlock(nn.Module):
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))`` (the original Transformer) block."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.attn = TinyAttention(cfg)
        if cfg.ffn in ("swiglu", "geglu"):
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act="silu" if cfg.ffn == "swiglu" else "gelu",
                                bias=cfg.bias)
        else:
            self.mlp = TinyMLP(cfg)
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)

    def forward(self, x, rope=None, bias=None):
        if self.pre:
            x = x + self.attn(self.norm1(x), rope, bias)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, bias))
        return self.norm2(x + self.mlp(x))


class TinyLM(nn.Module):
    """Causal LM: ``forward(input_ids (B, N)) -> logits (B, N, vocab)``; position ``t`` predicts token ``t + 1``.

    Token embeddings start at N(0, 1) (so they are not drowned by the sinusoidal table, whose entries have
    RMS 1/sqrt(2)); linear layers at N(0, ``initializer_range``). Pre-norm models end with a final norm.
    """

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = (LearnedPositionalEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
                                if cfg.position == "learned" else None)
        self.rotary = RotaryEmbedding(cfg.head_dim, base=cfg.rope_theta) if cfg.position == "rope" else None
        self.layers = nn.ModuleList(TinyBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = _norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and not isinstance(module, LearnedPositionalEmbedding):
            nn.init.normal_(module.weight, std=1.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
        cfg, n = self.config, input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        positions = torch.arange(n, device=input_ids.device)
        rope = bias = None
        if cfg.position == "learned":
            x = x + self.embed_positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_position_encoding(positions, cfg.hidden_size).to(x.dtype)
        elif cfg.position == "rope":
            rope = self.rotary(x, positions / cfg.rope_scaling if cfg.rope_scaling != 1 else positions)
        elif cfg.position == "alibi":
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            bias = alibi_bias(cfg.num_attention_heads, n, device=x.device).masked_fill(~causal, float("-inf"))
        for layer in self.layers:
            x = layer(x, rope, bias)
        return self.lm_head(self.norm(x))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (optionally without the token/position embeddings and the LM head)."""
        skip = {id(p) for m in (self.embed_tokens, self.embed_positions, self.lm_head) if m is not None
                for p in m.parameters()} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)
