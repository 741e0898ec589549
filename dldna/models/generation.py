"""Autoregressive generation with a KV cache: greedy decoding and sampling (temperature, top-k, top-p,
repetition penalty), eos stopping and left-padded batches. One ``generate`` for every decoder in the book.

Used in chapters 9-11. The model contract (``MistralForCausalLM``, ``Phi3ForCausalLM`` follow it)::

    out = model(input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    out.logits            # (B, n, vocab) for the n new tokens
    out.past_key_values   # the cache to pass on the next call (the model creates it when given None)

``attention_mask`` is ``(B, past + n)`` with 1 for real tokens and 0 for padding, as in Hugging Face;
``position_ids`` ``(B, n)`` are the RoPE positions of the new tokens (real tokens counted from 0, so a
left-padded row starts at position 0 after its padding).

Sampling processors follow HF's order and definitions: repetition penalty (Keskar et al. 2019), temperature,
top-k, then nucleus / top-p (Holtzman et al. 2020), so seeded runs are comparable with HF ``generate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F


@dataclass
class CausalLMOutput:
    """Output of a causal LM forward: ``logits`` ``(B, n, V)``, the cache, and the loss when labels were given."""

    logits: torch.Tensor
    past_key_values: Any = None
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``; ``ignore_index`` labels are skipped.

    ``logits`` ``(B, N, V)``, ``labels`` ``(B, N)``; computed in float32 (as HF does).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


def apply_repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of every token already in ``input_ids`` by ``penalty``."""
    if penalty == 1.0:
        return logits
    score = logits.gather(-1, input_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, input_ids, score)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties at the k-th value kept), set the rest to ``-inf``."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to at least ``p``."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    remove_sorted = mass_before > p
    remove_sorted[..., 0] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_token_scores(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      repetition_penalty: float = 1.0) -> torch.Tensor:
    """Processed logits ``(B, V)`` of the next token (penalty, temperature, top-k, top-p), float32."""
    logits = apply_repetition_penalty(logits.float(), input_ids, repetition_penalty)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


def _check_args(input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a (batch, seq) torch.long tensor")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or a non-negative int, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None, do_sample: bool = True,
             pad_token_id: int | None = None) -> torch.Tensor:
    """Extend ``input_ids`` ``(B, N)`` by up to ``max_new_tokens`` tokens; returns ``(B, N + generated)``.

    Greedy (argmax) when ``temperature == 0`` or ``do_sample=False``; otherwise samples from the processed
    distribution with ``generator`` (a ``torch.Generator`` on the model's device, for reproducible samples).
    Left-pad batched prompts and pass their ``attention_mask`` (1 = token, 0 = padding). Rows that emit
    ``eos_token_id`` are finished: they receive ``pad_token_id`` (default: the eos id) afterwards, and generation
    stops when every row is finished. ``use_cache=False`` recomputes the whole prefix each step (slow, but a
    useful check: both give the same tokens).
    """
    _check_args(input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, attention_mask)
    greedy = temperature == 0 or not do_sample
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    tokens, cache, new = input_ids, None, input_ids
    try:
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            if use_cache:
                out = model(new, attention_mask=mask, position_ids=positions[:, -new.shape[1]:],
                            past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            else:
                out = model(tokens, attention_mask=mask, position_ids=positions, use_cache=False)
            scores = next_token_scores(out.logits[:, -1], tokens, 0.0 if greedy else temperature,
                                       None if greedy else top_k, None if greedy else top_p, repetition_penalty)
            if greedy:
                next_tok = scores.argmax(-1)
            else:
                probs = scores.softmax(-1)
                next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad_token_id), next_tok)
            tokens = torch.cat([tokens, next_tok[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new = next_tok[:, None]
            if eos:
                finished = finished | torch.isin(next_tok, eos_t)
                if bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    return tokens


class CausalLMMixin:
    """``generate`` and ``num_parameters`` for the causal LMs (Mistral, Mixtral-style MoE, Phi-3).

    The model needs a ``config`` with ``eos_token_id`` and ``pad_token_id``; ``generate`` takes :func:`generate`'s
    arguments with those ids as defaults.
    """

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 use_cache: bool = True, **kwargs) -> torch.Tensor:
        """:func:`dldna.models.generation.generate` with this model; eos / pad ids default to the config's."""
        kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, repetition_penalty=repetition_penalty, use_cache=use_cache, **kwargs)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters, shared (tied) tensors counted once; without ``embed_tokens`` if asked."""
        # named_parameters() yields a tied tensor once, under its first name (the embedding's)
        return sum(p.numel() for name, p in self.named_parameters()
                   if p.requires_grad and not (exclude_embeddings and "embed_tokens" in name))
