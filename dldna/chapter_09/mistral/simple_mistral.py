"""Printed module ``dldna.chapter_09.mistral.simple_mistral``: the Mistral classes and helpers by their printed names.

Everything is the package's exact, HF-compatible implementation (``dldna.models.mistral``); the printed module's
defects (unused KV cache, query positions restarting at 0, centred window, ``attn_mask`` with ``is_causal``) are
gone. ``MistralRotaryEmbedding``, ``MistralRMSNorm`` and ``MistralMLP`` keep the printed constructor arguments.
Used in chapter 9.
"""
from __future__ import annotations

from dldna.attention.reference import repeat_kv
from dldna.models.cache import KVCache
from dldna.models.generation import CausalLMOutput, generate
from dldna.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary_pos_emb, rotate_half
from dldna.models.mistral import (MistralAttention, MistralConfig, MistralDecoderLayer, MistralForCausalLM,
                                  MistralModel, sdpa_attention)

__all__ = ["MistralConfig", "MistralModel", "MistralForCausalLM", "MistralAttention", "MistralDecoderLayer",
           "MistralRMSNorm", "MistralRotaryEmbedding", "MistralMLP", "apply_rotary_pos_emb", "rotate_half", "repeat_kv",
           "KVCache", "CausalLMOutput", "generate", "sdpa_attention"]

MistralRMSNorm = RMSNorm


class MistralRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` with the printed argument order ``(dim, max_position_embeddings, base)``."""

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000.0, device=None):
        super().__init__(dim, base=base, max_position_embeddings=max_position_embeddings)
        if device is not None:
            self.to(device)


class MistralMLP(GatedMLP):
    """SwiGLU feed-forward built from a ``MistralConfig`` (HF ``MistralMLP(config)``)."""

    def __init__(self, config: MistralConfig):
        super().__init__(config.hidden_size, config.intermediate_size, act=config.hidden_act)
