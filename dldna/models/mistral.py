"""Simple Mistral (Jiang et al. 2023, "Mistral 7B"): a decoder with grouped-query attention, a causal sliding
window, rotary positions, RMSNorm and SwiGLU, exactly equal to Hugging Face ``MistralForCausalLM``.

Used in chapters 9 and 10. Parameter names and ``state_dict()`` keys are HF's, so weights load both ways::

    cfg = MistralConfig.tiny()
    ours = MistralForCausalLM(cfg)
    ours.load_state_dict(hf_model.state_dict())      # identical logits (fp32: within 1e-5)

What differs from the printed ``simple_mistral`` (chapter 9 explains each):

* the KV cache is really used (``dldna.models.cache.KVCache``), a rolling buffer of ``sliding_window`` slots;
* query positions continue from the cache (RoPE angles of decoded tokens are right);
* the window is causal with the HF convention: query ``i`` sees keys ``i - W < j <= i`` (``W`` keys incl. itself);
* attention is ``torch.nn.functional.scaled_dot_product_attention`` with **either** a bool mask **or**
  ``is_causal=True``, never both; padding rows with nothing to attend to return zeros, not NaN.

Cost per layer for ``n`` tokens: ``O(n * min(n, W) * d)`` attention work (dense masks here, so ``O(n^2)``
memory for the mask; chapter 3's banded kernels remove that), KV cache ``2 * L * Hkv * min(n, W) * d_head``
numbers per sequence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dldna.attention.reference import repeat_kv
from dldna.models.cache import CacheStep, KVCache, attention_mask_from_step, uncached_step
from dldna.models.generation import CausalLMMixin, CausalLMOutput, causal_lm_loss
from dldna.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary_pos_emb
from dldna.config import check_positive_ints


@dataclass
class MistralConfig:
    """Mistral hyper-parameters with Hugging Face ``MistralConfig`` field names (defaults: Mistral-7B-v0.1).

    ``sliding_window=None`` gives full causal attention. ``head_dim=None`` means ``hidden_size //
    num_attention_heads``. ``num_attention_heads`` must be a multiple of ``num_key_value_heads``
    (MHA: equal; GQA: fewer K/V heads; MQA: one). Extra HF keys (``use_return_dict``, ``output_attentions`` ...)
    are accepted through ``**kwargs``-style fields and ignored.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    attention_dropout: float = 0.0
    use_return_dict: bool = True  # accepted for the printed examples; outputs are always dataclasses

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                 f"({self.num_attention_heads}) when head_dim is None")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 (RoPE rotates pairs), got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or a positive int, got {self.sliding_window!r}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be None or in [0, vocab_size={self.vocab_size}), got "
                             f"{self.pad_token_id} (a negative id would silently freeze an embedding row)")
        if self.hidden_act not in GatedMLP._ACTS:
            raise ValueError(f"hidden_act must be one of {sorted(GatedMLP._ACTS)}, got {self.hidden_act!r}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")

    @classmethod
    def tiny(cls, **overrides) -> "MistralConfig":
        """A CPU-sized config for tests and fast mode: 2 layers, 64 wide, GQA 4:2, window 8, vocab 128."""
        base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.MistralConfig`` describing the same model."""
        d = self.to_dict()
        d.pop("use_return_dict")
        return d


class MistralAttention(nn.Module):
    """Grouped-query self-attention with RoPE and a causal sliding window; HF parameter names.

    ``q_proj``: hidden -> H * d; ``k_proj``/``v_proj``: hidden -> Hkv * d; ``o_proj``: H * d -> hidden; no biases.
    """

    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values: KVCache | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``hidden_states`` ``(B, n, hidden)``; ``attention_mask`` bool ``(B, 1, n, K)`` or None with ``is_causal``."""
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = sdpa_attention(q, k, v, attention_mask, is_causal=is_causal, dropout_p=dropout)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with GQA (K/V heads repeated) and a bool ``mask`` (True = may attend) **or** ``is_causal``.

    ``q`` ``(B, H, n, d)``, ``k``/``v`` ``(B, Hkv, K, d)``. Query rows whose mask is all False get zeros (SDPA
    alone would return NaN there). Equals ``dldna.attention.attention(q, k, v, mask)``.
    """
    if mask is not None and is_causal:
        raise ValueError("pass either mask or is_causal=True, not both (SDPA rejects the combination)")
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)
    has_key = mask.any(-1, keepdim=True)
    safe_mask = mask | ~has_key  # let empty rows attend everywhere, then zero them
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask, dropout_p=dropout_p)
    return out * has_key.to(out.dtype)


class MistralDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (HF names ``input_layernorm`` ...)."""

    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MistralAttention(config, layer_idx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, act=config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, is_causal=False):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                                       attention_mask, past_key_values, is_causal)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


@dataclass
class BaseModelOutput:
    """``last_hidden_state`` ``(B, n, hidden)`` and the cache (when ``use_cache``)."""

    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None


class MistralPreTrainedModel(nn.Module):
    """Weight initialisation shared by the Mistral modules (HF: normal(0, initializer_range), zero pad row)."""

    config: MistralConfig

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def _new_token_mask(attention_mask: torch.Tensor | None, batch: int, n: int, past: int, device) -> torch.Tensor:
    """Validity ``(B, n)`` bool of the new tokens from a 2-D HF mask ``(B, n)`` or ``(B, past + n)``."""
    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (n, past + n):
        raise ValueError(f"attention_mask must be (batch, new) or (batch, past + new) = ({batch}, {n}) or "
                         f"({batch}, {past + n}), got {tuple(attention_mask.shape)}")
    return attention_mask[:, -n:].to(device).bool()


class MistralModel(MistralPreTrainedModel):
    """Embedding, ``num_hidden_layers`` decoder layers and the final RMSNorm (HF ``MistralModel``)."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        if not isinstance(config, MistralConfig):
            raise TypeError(f"config must be a MistralConfig, got {type(config).__name__}")
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MistralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta,
                                          max_position_embeddings=config.max_position_embeddings)
        self.apply(self._init_weights)

    def make_cache(self) -> KVCache:
        """An empty cache sized for this model (rolling window of ``config.sliding_window`` slots)."""
        return KVCache(self.config.num_hidden_layers, self.config.sliding_window)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs) -> BaseModelOutput:
        """``input_ids`` ``(B, n)`` (or ``inputs_embeds`` ``(B, n, hidden)``); ``attention_mask`` 1/0 ``(B, n)`` or
        ``(B, past + n)``; ``position_ids`` ``(B, n)`` default: real tokens counted from the cache's position,
        so left padding is handled (HF counts padding too unless ``generate`` passes positions).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        b, n, _ = inputs_embeds.shape
        if n == 0:
            raise ValueError("the input must hold at least one token")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.make_cache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        new_valid = _new_token_mask(attention_mask, b, n, past, inputs_embeds.device)
        step: CacheStep = past_key_values.begin(new_valid) if past_key_values is not None else uncached_step(new_valid)
        if position_ids is None:
            position_ids = step.position_ids
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, -1)
        window = self.config.sliding_window
        # Plain causal attention needs no mask (SDPA's is_causal, the fast kernels); otherwise a bool mask.
        plain_causal = past == 0 and bool(new_valid.all()) and (window is None or n <= window)
        mask = None if plain_causal else attention_mask_from_step(step, window)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, mask, past_key_values, is_causal=plain_causal)
        return BaseModelOutput(self.norm(hidden), past_key_values if use_cache else None)


class MistralForCausalLM(CausalLMMixin, MistralPreTrainedModel):
    """``MistralModel`` plus the ``lm_head`` (tied to the embedding when ``tie_word_embeddings``).

    ``forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
    use_cache=None)`` returns ``CausalLMOutput(logits (B, n, V), past_key_values, loss)``; the loss is the
    next-token cross-entropy on ``labels`` (``-100`` ignored), shifted inside as in HF.
    """

    def __init__(self, config: MistralConfig, model: MistralModel | None = None):
        """``model`` replaces the default ``MistralModel(config)`` (the MoE model passes its own)."""
        super().__init__()
        self.config = config
        self.model = MistralModel(config) if model is None else model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights(self.lm_head)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> CausalLMOutput:
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, past_key_values=out.past_key_values, loss=loss,
                              hidden_states=out.last_hidden_state)
