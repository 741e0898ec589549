"""Printed name ``dldna.chapter_09.phi3.simple_phi3``: ``PhiMiniConfig`` and ``PhiMiniForCausalLM``.

The printed module built a Phi-2-style model; these names now give the real Phi-3 architecture of
``dldna.models.phi3`` (HF-compatible, state dict keys under ``model.``), with two printed conveniences:
``PhiMiniConfig`` accepts ``use_return_dict`` and leaves the special token ids unset (the printed cell assigns
``config.pad_token_id`` after construction), and ``PhiMiniForCausalLM.transformer`` is the decoder stack, so
``model.lm_head.weight = model.transformer.embed_tokens.weight`` ties the weights as printed. Used in chapter 11.
"""
from __future__ import annotations

from dataclasses import dataclass

from dldna.models.phi3 import Phi3Config, Phi3ForCausalLM, Phi3Model

__all__ = ["PhiMiniConfig", "PhiMiniForCausalLM"]


@dataclass
class PhiMiniConfig(Phi3Config):
    """``Phi3Config`` with the printed call's extra field ``use_return_dict`` and no default special tokens."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_return_dict: bool = True  # outputs are always dataclasses that also support out["logits"]

    def to_hf_kwargs(self):
        kwargs = super().to_hf_kwargs()
        kwargs.pop("use_return_dict")
        return kwargs


class PhiMiniForCausalLM(Phi3ForCausalLM):
    """``Phi3ForCausalLM`` whose decoder stack is also reachable as ``.transformer`` (the printed name)."""

    @property
    def transformer(self) -> Phi3Model:
        return self.model
