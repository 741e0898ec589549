"""Phi-3 decoder (Abdin et al. 2024, "Phi-3 Technical Report"), layer for layer as Hugging Face ``Phi3ForCausalLM``.

What makes it Phi-3 rather than Llama/Mistral is mostly *packaging*: the query, key and value projections are
one matrix ``qkv_proj`` (rows ``[q | k | v]``), the gate and up projections of the SwiGLU feed-forward are one
matrix ``gate_up_proj`` (rows ``[gate | up]``), RoPE may rotate only a fraction of each head
(``partial_rotary_factor``), and there is residual dropout (``resid_pdrop``). Otherwise: pre-norm RMSNorm,
SiLU-gated MLP, no biases, optional sliding-window attention, untied embeddings by default. Phi-2, which the
printed book's ``simple_phi3`` actually built, uses LayerNorm, a GELU MLP with biases, separate q/k/v with
biases, a parallel attention+MLP block and partial rotary.

Parameter names equal HF's, so ``Phi3ForCausalLM(cfg).load_state_dict(hf_model.state_dict())`` works both
ways (the tests check logits to 1e-5 in fp32 and greedy generation token for token). The KV cache, masks and
``generate`` are the shared ones of ``dldna.models.cache`` / ``dldna.models.generation``.

Shapes: ``input_ids`` ``(B, N)`` -> ``logits`` ``(B, N, vocab)``; inside attention ``(B, heads, N, head_dim)``.
Used in chapter 11.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dldna.attention.reference import repeat_kv
from dldna.models.cache import KVCache, attention_mask_from_step, uncached_step
from dldna.models.generation import CausalLMMixin, CausalLMOutput, causal_lm_loss
from dldna.models.layers import RMSNorm, RotaryEmbedding, apply_rotary_pos_emb
from dldna.models.mistral import sdpa_attention
from dldna.config import check_positive_ints

__all__ = ["Phi3Config", "Phi3Output", "Phi3Attention", "Phi3MLP", "Phi3DecoderLayer", "Phi3Model", "Phi3ForCausalLM"]

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class Phi3Config:
    """Phi-3 hyper-parameters with Hugging Face's field names and defaults (Phi-3-mini-4k shapes).

    ``head_dim = hidden_size // num_attention_heads``; RoPE rotates the first
    ``int(head_dim * partial_rotary_factor)`` features of each head. ``sliding_window`` uses the HF convention
    (a query sees the last ``sliding_window`` keys, itself included); ``None`` = full causal attention.
    ``rope_parameters`` (transformers >= 5 style ``{"rope_type": "default", "rope_theta": ..., "partial_rotary_factor": ...}``)
    overrides ``rope_theta``/``partial_rotary_factor`` when given. Only default RoPE is implemented:
    ``rope_scaling`` (LongRoPE of the 128k models) raises ``ValueError``. ``embd_pdrop`` and
    ``original_max_position_embeddings`` are kept for compatibility; like HF's default RoPE, nothing uses them.
    """

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 32000
    pad_token_id: int | None = 32000
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_parameters is not None:
            params = dict(self.rope_parameters)
            if params.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters: only rope_type='default' is implemented, got {params['rope_type']!r}")
            self.rope_theta = float(params.get("rope_theta", self.rope_theta))
            self.partial_rotary_factor = float(params.get("partial_rotary_factor", self.partial_rotary_factor))
            self.rope_parameters = None  # folded into the two fields above
        check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"head_dim * partial_rotary_factor must give an even rotary dim >= 2, got {self.rotary_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            raise ValueError("rope_scaling (LongRoPE / su / yarn) is not implemented; use rope_scaling=None")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            # A negative id would index from the end (the printed default pad_token_id=-1 froze the last row).
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be None or an id in [0, vocab_size={self.vocab_size}), got {value!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or a positive int, got {self.sliding_window!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def tiny(cls, **overrides) -> "Phi3Config":
        """The chapter-11 arithmetic model: 3 layers, width 64, 4 heads, tied embeddings, 18-token vocabulary.

        About 125k parameters (the printed book's size class); ``pad_token_id=14``, ``eos_token_id=15`` match
        ``dldna.data.ArithmeticTokenizer``. Any field can be overridden.
        """
        base = dict(vocab_size=18, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=64, original_max_position_embeddings=64,
                    tie_word_embeddings=True, bos_token_id=None, eos_token_id=15, pad_token_id=14)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.Phi3Config`` describing the same model."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rope_parameters",)}
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                     "partial_rotary_factor": self.partial_rotary_factor}
        return kwargs


@dataclass
class Phi3Output(CausalLMOutput):
    """``CausalLMOutput`` (logits, past_key_values, loss, hidden_states) plus per-layer ``attentions``.

    ``out["logits"]`` also works (HF ``ModelOutput`` style, as the printed training loop indexes it).
    """

    attentions: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key: str):
        if not isinstance(key, str) or key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0,
                     return_weights: bool = False):
    """Softmax attention with a bool ``mask`` ``(B, 1|H, Nq, Nk)`` (True = may attend) and GQA ``k``/``v``.

    ``q`` ``(B, H, Nq, D)``, ``k``/``v`` ``(B, Hkv, Nk, D)``; returns ``(out, weights)``. Without
    ``return_weights`` this is the shared SDPA path (``dldna.models.mistral.sdpa_attention``) and ``weights`` is
    None; with it the probabilities ``(B, H, Nq, Nk)`` are computed explicitly (for attention maps). A query row
    with no allowed key gives zeros either way, never NaN.
    """
    if not return_weights:
        return sdpa_attention(q, k, v, mask, dropout_p=dropout_p), None
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    has_key = mask.any(-1, keepdim=True)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~(mask | ~has_key), float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) * has_key
    weights_used = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return weights_used @ v, weights


class Phi3Attention(nn.Module):
    """Self-attention with one fused ``qkv_proj`` (``hidden -> (H + 2 Hkv) * head_dim``) and ``o_proj``."""

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_size = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, output_attentions: bool = False):
        b, n, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # rotates the first rotary_dim features only
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # new keys are rotated *before* they are cached
        dropout = self.config.attention_dropout if self.training else 0.0
        out, weights = masked_attention(q, k, v, mask, dropout, return_weights=output_attentions)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, q_size)), weights


class Phi3MLP(nn.Module):
    """Gated feed-forward with one fused ``gate_up_proj`` (``hidden -> 2 * intermediate``, rows ``[gate | up]``).

    ``down_proj(act(gate) * up)``; equals ``dldna.models.layers.GatedMLP`` with the two matrices stacked.
    """

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class Phi3DecoderLayer(nn.Module):
    """Pre-norm block: ``x + drop(attn(norm(x)))`` then ``x + drop(mlp(norm(x)))``."""

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask, cache=None, output_attentions=False):
        attn, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, output_attentions)
        x = x + self.resid_attn_dropout(attn)
        x = x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, weights


class Phi3Model(nn.Module):
    """Embeddings, decoder layers and the final norm: ``input_ids`` ``(B, N)`` -> hidden states ``(B, N, hidden)``."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool | None = None, output_attentions: bool = False):
        """Returns ``(hidden_states, cache or None, attentions or None)``; see ``Phi3ForCausalLM.forward``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a (batch, seq) torch.long tensor")
        b, n = input_ids.shape
        if use_cache is None:
            use_cache = past_key_values is not None
        if past_key_values is not None and not use_cache:
            raise ValueError("past_key_values was given with use_cache=False")
        if attention_mask is None:
            new_valid = torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < n:
                raise ValueError(f"attention_mask must have shape (batch, past + seq) = ({b}, >= {n}), "
                                 f"got {tuple(attention_mask.shape)}")
            new_valid = attention_mask[:, -n:].to(input_ids.device).bool()  # the past is in the cache already
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else KVCache(
                self.config.num_hidden_layers, sliding_window=self.config.sliding_window)
            step = cache.begin(new_valid)
        else:
            step = uncached_step(new_valid)
        if position_ids is None:
            position_ids = step.position_ids
        elif position_ids.shape != (b, n) and position_ids.shape != (n,):
            raise ValueError(f"position_ids must have shape ({b}, {n}) or ({n},), got {tuple(position_ids.shape)}")
        mask = attention_mask_from_step(step, self.config.sliding_window)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, position_ids.to(x.device).expand(b, n))
        attentions = [] if output_attentions else None
        for layer in self.layers:
            x, weights = layer(x, cos, sin, mask, cache, output_attentions)
            if output_attentions:
                attentions.append(weights)
        return self.norm(x), cache, (tuple(attentions) if output_attentions else None)


class Phi3ForCausalLM(CausalLMMixin, nn.Module):
    """``Phi3Model`` (kept under ``.model``, as in HF) plus ``lm_head``; ties it to the embeddings if configured.

    ``forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
    labels=None, output_attentions=False)`` returns a :class:`Phi3Output`:

    - ``logits`` ``(B, N, vocab)``; ``loss`` when ``labels`` ``(B, N)`` are given (next-token cross-entropy,
      ``-100`` ignored, the shift done inside, as in HF);
    - ``past_key_values``: a ``dldna.models.cache.KVCache`` when ``use_cache`` (default: only if a cache was
      passed in), to feed back with the next tokens; ``attention_mask`` is then ``(B, past + N)``, 1 = token;
    - ``attentions``: per-layer probabilities ``(B, H, N, keys)`` when ``output_attentions``.
    """

    def __init__(self, config: Phi3Config):
        super().__init__()
        if not isinstance(config, Phi3Config):
            raise TypeError(f"config must be a Phi3Config, got {type(config).__name__}")
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        # HF's initialisation: N(0, initializer_range) for matrices and embeddings, zero padding row, unit norms.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool = False, return_dict: bool = True) -> Phi3Output:
        hidden, cache, attentions = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                               output_attentions)
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return Phi3Output(logits=logits, past_key_values=cache, loss=loss, hidden_states=None, attentions=attentions)
