"""Printed name for the v1 encoder (learned absolute positions): ``TransformerConfig``, ``TransformerEncoder``.

The real implementation is ``dldna.models.encoder.Encoder`` with ``position="learned"``; unlike the printed
code it has an attention output projection, a bool key-padding mask and LayerNorm with eps inside the root.
"""
from __future__ import annotations

from dataclasses import replace

from dldna.models.encoder import Encoder, EncoderConfig

TransformerConfig = EncoderConfig  # printed defaults: vocab 30522, hidden 256, 4 layers, 8 heads, FFN 512


class TransformerEncoder(Encoder):
    """``Encoder`` with learned positions (v1): ``forward(input_ids, attention_mask=None) -> (B, T, hidden)``."""

    POSITION = "learned"

    def __init__(self, config: EncoderConfig):
        super().__init__(replace(config, position=self.POSITION))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is not None and attention_mask.dim() == 4:  # printed (B, 1, 1, T) masks
            attention_mask = attention_mask[:, 0, 0, :]
        return super().forward(input_ids, attention_mask, position_ids)
