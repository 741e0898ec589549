"""Printed name for the v2 encoder (rotary positions): ``TransformerConfig``, ``TransformerEncoder``.

The real implementation is ``dldna.models.encoder.Encoder`` with ``position="rope"`` (one shared
implementation, where the printed book had a near-verbatim copy of v1).
"""
from __future__ import annotations

from dldna.chapter_09.encoder.efficient_encoder import TransformerConfig
from dldna.chapter_09.encoder.efficient_encoder import TransformerEncoder as _LearnedEncoder

__all__ = ["TransformerConfig", "TransformerEncoder"]


class TransformerEncoder(_LearnedEncoder):
    """``Encoder`` with RoPE (v2): ``forward(input_ids, attention_mask=None) -> (B, T, hidden)``."""

    POSITION = "rope"
