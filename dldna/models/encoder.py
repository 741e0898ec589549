"""A small efficient Transformer encoder for text classification: learned positions (v1) or RoPE (v2).

Design (chapter 8):

* **pre-LN blocks** (Xiong et al. 2020): ``x = x + Drop(Attn(LN(x)))``, ``x = x + Drop(FFN(LN(x)))`` and one
  final LayerNorm, which trains stably without the post-LN warm-up dance;
* **attention through** ``torch.nn.functional.scaled_dot_product_attention`` with a boolean key-padding mask
  ``(B, 1, 1, T)`` (True = may attend) and an output projection ``o_proj``. Without padding in the batch the mask
  is dropped, so PyTorch may pick the FlashAttention kernel (Dao et al. 2022) on GPU; with padding it picks a
  kernel that accepts a mask (memory-efficient or cuDNN attention), still without an ``N x N`` matrix in HBM;
* **positions**: ``position="learned"`` adds a trained table ``(max_position_embeddings, hidden)`` to the token
  embeddings (BERT, Devlin et al. 2019); ``position="rope"`` rotates queries and keys (RoFormer, Su et al. 2021)
  so attention scores depend only on relative offsets;
* GELU feed-forward ``fc2(GELU(fc1(x)))``, Xavier-uniform linear weights (Glorot & Bengio 2010), N(0, 0.02)
  embeddings.

Position ids count real tokens (``cumsum(attention_mask) - 1``), so left or right padding gives the same
result for the real tokens. Shapes: ``input_ids`` and ``attention_mask`` ``(B, T)``, hidden states
``(B, T, hidden_size)``. The printed defaults (``EncoderConfig()``): vocab 30522, hidden 256, 4 layers,
8 heads, FFN 512, dropout 0.1, 512 positions, LayerNorm eps 1e-12. Used in chapter 8.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from dldna.models.layers import LearnedPositionalEmbedding, RotaryEmbedding, apply_rotary_pos_emb
from dldna.config import check_positive_ints

POSITIONS = ("learned", "rope")
POOLINGS = ("first", "mean")


@dataclass
class EncoderConfig:
    """Encoder hyper-parameters (HF BERT field names, plus ``position``, ``pooling`` and ``rope_theta``).

    ``pooling="first"`` reads the first token (the ``[CLS]`` of the BERT tokenizer); ``"mean"`` averages the
    real (non-pad) tokens, which is the right choice for the T5 tokenizer (it has no CLS token).
    """

    vocab_size: int = 30522
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position: str = "learned"
    rope_theta: float = 10000.0
    num_labels: int = 4
    pooling: str = "mean"
    classifier_dropout: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "num_labels"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim, got {self.head_dim}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size), got {self.pad_token_id}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides) -> "EncoderConfig":
        """A 2-layer, 32-wide config for tests and fast mode."""
        base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, T)`` 0/1 or bool mask of real tokens -> ``(B, 1, 1, T)`` bool SDPA mask (True = may attend),
    or None when nothing is padded (so SDPA may use the FlashAttention kernel)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    return mask[:, None, None, :]


class EncoderSelfAttention(nn.Module):
    """Multi-head self-attention with q/k/v/o projections; ``(B, T, C) -> (B, T, C)``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        c, self.num_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.o_proj = nn.Linear(c, c)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None):
        b, t, c = x.shape
        q, k, v = (proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = apply_rotary_pos_emb(q, k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class EncoderMLP(nn.Module):
    """``fc2(GELU(fc1(x)))``: ``(B, T, C) -> (B, T, C)`` through ``intermediate_size``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """One pre-LN block: ``x + Drop(Attn(LN(x)))`` then ``x + Drop(MLP(LN(x)))``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = EncoderSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EncoderMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, mask=None, cos=None, sin=None):
        rope = None if cos is None else (cos, sin)
        x = x + self.dropout(self.attention(self.attention_norm(x), mask, rope))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def _init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases; N(0, 0.02) embeddings (zero padding row); LN = identity."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """Token embeddings (+ learned positions) -> ``num_hidden_layers`` pre-LN blocks -> final LayerNorm.

    ``forward(input_ids (B, T), attention_mask (B, T) | None, position_ids (B, T) | None) -> (B, T, C)``.
    Outputs at padded positions are not meaningful (they are excluded from pooling); real tokens do not
    depend on padding. ``gradient_checkpointing_enable()`` recomputes each block in the backward pass.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.position == "learned":
            self.position_embeddings = LearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
            self.rotary_emb = None
        else:
            self.position_embeddings = None
            self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta,
                                              max_position_embeddings=config.max_position_embeddings)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.apply(_init_weights)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            if not bool(attention_mask.bool().any(-1).all()):
                raise ValueError("attention_mask: every sequence needs at least one real token")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.word_embeddings(input_ids)
        cos = sin = None
        if self.position_embeddings is not None:  # raises ValueError beyond max_position_embeddings
            x = x + self.position_embeddings(position_ids)
        else:
            cos, sin = self.rotary_emb(x, position_ids)
        x = self.embedding_dropout(x)
        mask = key_padding_mask(attention_mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, cos, sin, use_reentrant=False)
            else:
                x = layer(x, mask, cos, sin)
        return self.final_norm(x)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """``(B, T, C) -> (B, C)``: the first token (``"first"``) or the mean over real tokens (``"mean"``)."""
    if how == "first":
        return hidden[:, 0]
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
    raise ValueError(f"how must be one of {POOLINGS}, got {how!r}")


class ClassifierOutput(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor
    pooled: torch.Tensor


class EncoderClassifier(nn.Module):
    """``Encoder`` + pooling (``config.pooling``) + dropout + linear head over ``config.num_labels`` classes.

    ``forward(input_ids, attention_mask=None, labels=None)`` returns ``ClassifierOutput(loss, logits (B, L),
    pooled (B, C))``; ``loss`` is the (label-smoothed) cross-entropy when ``labels`` are given.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier)

    def gradient_checkpointing_enable(self) -> None:
        self.encoder.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing_disable()

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None) -> ClassifierOutput:
        hidden = self.encoder(input_ids, attention_mask, position_ids)
        pooled = pool(hidden, attention_mask, self.config.pooling)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        return ClassifierOutput(loss, logits, pooled)


class MaskedLMOutput(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor


class EncoderForMaskedLM(nn.Module):
    """``Encoder`` + BERT-style MLM head (dense, GELU, LayerNorm, decoder tied to the word embeddings).

    ``forward(input_ids, attention_mask=None, labels=None)``: ``labels`` ``(B, T)`` hold the original ids at
    masked positions and -100 elsewhere (see ``mask_tokens``). Logits are computed only at masked positions
    when labels are given (``(M, vocab)``), else everywhere (``(B, T, vocab)``).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        _init_weights(self.dense)

    def gradient_checkpointing_enable(self) -> None:
        self.encoder.gradient_checkpointing_enable()

    def forward(self, input_ids, attention_mask=None, labels=None) -> MaskedLMOutput:
        hidden = self.encoder(input_ids, attention_mask)
        if labels is not None:
            sel = labels != -100
            hidden, targets = hidden[sel], labels[sel]
        h = self.norm(F.gelu(self.dense(hidden)))
        logits = h @ self.encoder.word_embeddings.weight.t() + self.bias
        loss = None if labels is None else F.cross_entropy(logits.float(), targets)
        return MaskedLMOutput(loss, logits)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, vocab_size: int,
                special_ids: list[int] | tuple[int, ...] = (), probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019): pick ``probability`` of the real, non-special tokens; of those 80 %
    become ``mask_token_id``, 10 % a random token, 10 % stay. Returns ``(masked_ids, labels)`` with labels
    -100 where nothing is predicted. ``generator`` must live on ``input_ids``' device."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    dev = input_ids.device
    candidates = attention_mask.bool().clone()
    for sid in special_ids:
        candidates &= input_ids != sid
    u = torch.rand(input_ids.shape, device=dev, generator=generator)
    chosen = candidates & (u < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, device=dev, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=dev, generator=generator)
    out = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels
