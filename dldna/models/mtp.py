"""Multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token
Prediction") and its self-speculative greedy decoding (blockwise parallel decoding, Stern et al. 2018).

A shared trunk (a ``MistralModel``) reads the prefix; ``n_future`` independent heads turn its last hidden state
``h_t`` into predictions of tokens ``t+1, ..., t+n``; all heads share one unembedding::

    z_i = h_t + SwiGLU_i(RMSNorm_i(h_t))          logits_i = lm_head(RMSNorm(z_i))       i = 1..n
    loss = mean_i CE(logits_i[t], x_{t+i})

(The paper's heads are full transformer layers; ours are residual SwiGLU blocks, so they need no KV cache.
Head 1 is an ordinary next-token head: ``forward`` returns its logits, so the model works with ``generate``.)

Self-speculative decoding: one forward gives the exact next token (head 1) and guesses for the n - 1 after it
(heads 2..n). The next forward feeds all n; head 1 at each fed position checks the following guess, and the
longest verified prefix is kept. The output equals head 1's greedy decoding token for token, at up to n tokens
per forward. Used in chapter 13.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dldna.models.generation import CausalLMOutput
from dldna.models.layers import GatedMLP, RMSNorm
from dldna.models.mistral import MistralConfig, MistralModel, MistralPreTrainedModel
from dldna.models.speculative import SpeculativeOutput, _full_cache, crop_cache

__all__ = ["MultiTokenPredictionLM", "MTPOutput", "mtp_generate"]


@dataclass
class MTPOutput(CausalLMOutput):
    """``logits`` of head 1 ``(B, n, V)``; ``head_logits`` ``(n_future, B, n, V)`` when asked for or training;
    ``head_losses`` ``(n_future,)`` when labels were given (``loss`` is their mean)."""

    head_logits: torch.Tensor | None = None
    head_losses: torch.Tensor | None = None


class MTPHead(nn.Module):
    """Residual SwiGLU block ``h + mlp(norm(h))``: ``(..., hidden) -> (..., hidden)``."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps=eps)
        self.mlp = GatedMLP(hidden_size, intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class MultiTokenPredictionLM(MistralPreTrainedModel):
    """Mistral trunk + ``n_future`` heads + shared ``lm_head``. ``forward`` follows the causal-LM contract.

    ``forward(input_ids, ..., labels=None, all_heads=False)``: ``labels`` ``(B, n)`` (usually ``input_ids``;
    ``-100`` ignored) train head ``i`` on ``labels[t + i]``.
    """

    def __init__(self, config: MistralConfig, n_future: int = 4, head_intermediate_size: int | None = None):
        super().__init__()
        if not isinstance(n_future, int) or n_future < 1:
            raise ValueError(f"n_future must be a positive int, got {n_future!r}")
        self.config, self.n_future = config, n_future
        self.model = MistralModel(config)
        inter = head_intermediate_size or config.intermediate_size
        self.heads = nn.ModuleList(MTPHead(config.hidden_size, inter, config.rms_norm_eps) for _ in range(n_future))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.heads.apply(self._init_weights)
        self._init_weights(self.lm_head)

    def head_logits(self, hidden: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """``(heads, B, n, V)`` logits of the first ``heads`` heads from trunk states ``(B, n, hidden)``."""
        return torch.stack([self.lm_head(self.norm(head(hidden))) for head in self.heads[:heads or self.n_future]])

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, inputs_embeds=None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None, all_heads: bool = False,
                **kwargs) -> MTPOutput:
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if labels is None and not all_heads:
            return MTPOutput(logits=self.head_logits(hidden, 1)[0], past_key_values=out.past_key_values,
                             hidden_states=hidden)
        logits = self.head_logits(hidden)
        loss = losses = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
            n = labels.shape[1]
            losses = torch.stack([
                F.cross_entropy(logits[i, :, :n - 1 - i].float().reshape(-1, logits.shape[-1]),
                                labels[:, 1 + i:].reshape(-1), ignore_index=-100)
                if n - 1 - i > 0 else logits.new_zeros(()) for i in range(self.n_future)])
            loss = losses.mean()
        return MTPOutput(logits=logits[0], past_key_values=out.past_key_values, loss=loss, hidden_states=hidden,
                         head_logits=logits, head_losses=losses)


@torch.no_grad()
def mtp_generate(model: MultiTokenPredictionLM, input_ids: torch.Tensor, max_new_tokens: int,
                 draft_heads: int | None = None) -> SpeculativeOutput:
    """Greedy self-speculative decoding with the model's own heads; ``input_ids`` ``(1, N)``.

    ``draft_heads`` (default all ``n_future``) heads propose a block per forward; 1 is plain greedy decoding.
    Returns ``SpeculativeOutput``: ``sequences`` equal to ``generate(model, input_ids, max_new_tokens,
    temperature=0)``; per round (one forward after the prefill) ``drafted`` guesses and ``accepted`` of them.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("input_ids must be a (1, seq) torch.long tensor")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    heads = draft_heads or model.n_future
    if not 1 <= heads <= model.n_future:
        raise ValueError(f"draft_heads must be in [1, {model.n_future}], got {draft_heads}")
    was_training = model.training
    model.eval()
    tokens = input_ids[0].tolist()
    prompt_len = len(tokens)
    cache = _full_cache(model)
    result = SpeculativeOutput(sequences=input_ids)
    try:
        hidden = model(input_ids, past_key_values=cache, use_cache=True).hidden_states
        guesses = model.head_logits(hidden[:, -1:], heads)[:, 0, 0].argmax(-1).tolist()
        while len(tokens) - prompt_len < max_new_tokens:
            m = min(heads, max_new_tokens - (len(tokens) - prompt_len))
            block = guesses[:m]
            fed = torch.tensor([block], dtype=torch.long, device=input_ids.device)
            hidden = model(fed, past_key_values=cache, use_cache=True).hidden_states
            result.target_calls += 1
            best = model.head_logits(hidden, 1)[0, 0].argmax(-1).tolist()  # exact next token after each fed one
            a = 1
            while a < m and block[a] == best[a - 1]:
                a += 1
            tokens += block[:a]
            crop_cache(cache, len(tokens))
            result.accepted_per_round.append(a - 1)
            result.drafted_per_round.append(m - 1)
            guesses = model.head_logits(hidden[:, a - 1:a], heads)[:, 0, 0].argmax(-1).tolist()
    finally:
        model.train(was_training)
    result.sequences = torch.tensor([tokens], dtype=torch.long, device=input_ids.device)
    return result
