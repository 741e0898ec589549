"""Sparse Mixture of Experts (Shazeer et al. 2017; Switch, Fedus et al. 2022; Mixtral, Jiang et al. 2024).

A ``SparseMoeBlock`` replaces the feed-forward of a decoder layer by ``num_local_experts`` SwiGLU experts and a
linear router. Each token goes to the ``num_experts_per_tok`` (k) experts with the largest router logits; their
outputs are mixed with the softmax of the *selected* logits (Mixtral)::

    logits = x W_r^T                      (T, E)
    S      = top-k indices of logits      (T, k)
    w_tj   = softmax_j(logits[t, S_tj])   (the k weights of a token sum to 1)
    y_t    = sum_j w_tj * Expert_{S_tj}(x_t),   Expert_e(x) = W2_e (silu(W1_e x) * W3_e x)

Dispatch sorts the T*k (token, expert) assignments by expert, runs each expert once on its contiguous slice and
scatters the weighted results back with ``index_add_``: a loop over experts, never over tokens. An optional
``capacity_factor`` caps every expert at ``ceil(capacity_factor * T * k / E)`` assignments (Switch/GShard);
overflowing assignments are dropped (the token keeps the residual path and its other experts), first choices
(j = 0) taking precedence over second choices, then earlier tokens over later ones.

Parameter names and layout equal Hugging Face ``transformers`` 5.x ``MixtralSparseMoeBlock``: ``gate.weight``
``(E, hidden)``, ``experts.gate_up_proj`` ``(E, 2 * intermediate, hidden)`` (gate rows first, then up rows) and
``experts.down_proj`` ``(E, hidden, intermediate)``; so ``MoEForCausalLM`` state dicts load both ways with HF
``MixtralForCausalLM``.

Auxiliary losses: ``load_balancing_loss`` (Switch eq. 4-6, HF's definition for top-k) and ``router_z_loss``
(ST-MoE, Zoph et al. 2022). Used in chapter 12.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dldna.models.generation import CausalLMOutput
from dldna.models.layers import GatedMLP
from dldna.models.mistral import MistralConfig, MistralForCausalLM, MistralModel

__all__ = ["MoEConfig", "SparseMoeBlock", "MoEExperts", "MoEModel", "MoEForCausalLM", "MoECausalLMOutput",
           "RoutingInfo", "route_top_k", "load_balancing_loss", "router_z_loss", "expert_capacity",
           "moe_parameter_counts", "dense_moe_reference"]


@dataclass
class MoEConfig(MistralConfig):
    """Mistral hyper-parameters plus the MoE fields of HF ``MixtralConfig`` (defaults: Mixtral-8x7B-v0.1).

    ``num_local_experts`` E experts, ``num_experts_per_tok`` k of them per token; ``router_aux_loss_coef`` weighs
    the load-balancing loss and ``router_z_loss_coef`` (ours, ST-MoE) the router z-loss, both added to the LM
    loss when ``output_router_logits`` (as in HF). ``router_jitter_noise`` multiplies router/expert inputs by
    U(1 - eps, 1 + eps) in training (HF). ``capacity_factor`` (ours; None = no cap, as Mixtral) enables token
    dropping. ``moe_layers`` (ours) lists the layers that get an MoE block (None = all, as Mixtral); the others
    keep a dense SwiGLU of ``intermediate_size``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    router_z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    moe_layers: list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                             f"({self.num_local_experts})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None or positive, got {self.capacity_factor}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.moe_layers is not None:
            self.moe_layers = sorted(set(int(i) for i in self.moe_layers))
            if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
                raise ValueError(f"moe_layers must be layer indices in [0, {self.num_hidden_layers}), "
                                 f"got {self.moe_layers}")

    @classmethod
    def tiny(cls, **overrides) -> "MoEConfig":
        """CPU-sized: 2 layers, 64 wide, GQA 4:2, 4 experts of width 64, top-2, vocab 128, full attention."""
        base = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
                    num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def mixtral_8x7b(cls) -> "MoEConfig":
        """Mixtral-8x7B-v0.1 (HF ``config.json``; Jiang et al. 2024, arXiv 2401.04088, Table 1)."""
        return cls(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                   sliding_window=None, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layers is None or layer_idx in self.moe_layers

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.MixtralConfig`` (only for all-MoE configs without capacity)."""
        if self.moe_layers is not None or self.capacity_factor is not None:
            raise ValueError("HF Mixtral has neither moe_layers nor capacity_factor; unset them to compare")
        d = super().to_hf_kwargs()
        for key in ("router_z_loss_coef", "capacity_factor", "moe_layers"):
            d.pop(key)
        return d


@dataclass
class RoutingInfo:
    """What one ``SparseMoeBlock`` forward decided, for the losses and the chapter's plots.

    ``router_logits`` ``(T, E)`` (keeps its graph, for the auxiliary losses); ``selected_experts`` ``(T, k)`` long;
    ``routing_weights`` ``(T, k)`` float32, each row summing to 1; ``expert_counts`` ``(E,)`` assignments per expert
    before dropping; ``kept`` ``(T, k)`` bool, False where the capacity dropped the assignment; ``capacity`` or None.
    """

    router_logits: torch.Tensor
    selected_experts: torch.Tensor
    routing_weights: torch.Tensor
    expert_counts: torch.Tensor
    kept: torch.Tensor
    capacity: int | None = None

    @property
    def dropped_fraction(self) -> float:
        """Fraction of the T*k assignments dropped by the capacity limit."""
        return 1.0 - self.kept.float().mean().item()


def route_top_k(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: ``(weights (T, k) float32, experts (T, k) long)``; weights = softmax over the selected logits.

    Equal to HF's ``softmax`` over all experts, top-k, then renormalising (the partition function cancels).
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must have shape (tokens, experts), got {tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[-1]}], got {top_k}")
    top_logits, experts = torch.topk(router_logits.float(), top_k, dim=-1)
    return top_logits.softmax(-1), experts


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * top_k / num_experts)`` (None without a factor)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


class MoEExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors (HF 5.x ``MixtralExperts`` layout), run with sorted dispatch.

    ``gate_up_proj`` ``(E, 2I, H)``: rows ``[:I]`` are the gate projection W1, rows ``[I:]`` the up projection W3;
    ``down_proj`` ``(E, H, I)`` is W2. ``expert_forward(e, x)`` is one expert on ``(m, H)`` inputs.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        if act not in GatedMLP._ACTS:
            raise ValueError(f"act must be one of {sorted(GatedMLP._ACTS)}, got {act!r}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        self.act_fn = GatedMLP._ACTS[act]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[expert])

    def forward(self, x: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor,
                capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(T, H)``, ``selected_experts``/``routing_weights`` ``(T, k)`` -> ``(y (T, H), counts (E,), kept (T, k))``.

        Cost: every expert runs once on its ``count_e`` rows (sum = T*k), plus one argsort of T*k integers.
        """
        t, k = selected_experts.shape
        # Slot-major flattening (all first choices, then all second choices): with a capacity, first choices win.
        flat_expert = selected_experts.t().reshape(-1)  # (k*T,)
        order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert, token order kept
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        sorted_expert = flat_expert[order]
        kept_sorted = torch.ones_like(order, dtype=torch.bool)
        if capacity is not None:
            starts = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
            rank = torch.arange(order.numel(), device=x.device) - starts[sorted_expert]
            kept_sorted = rank < capacity
        kept_flat = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted)
        kept = kept_flat.view(k, t).t()
        order, sorted_expert = order[kept_sorted], sorted_expert[kept_sorted]
        token = order % t
        weight = routing_weights.t().reshape(-1)[order]
        xs = x[token]  # (m, H): the kept assignments, contiguous per expert
        sizes = torch.bincount(sorted_expert, minlength=self.num_experts).tolist()
        outs = [self.expert_forward(e, chunk) for e, chunk in enumerate(xs.split(sizes)) if sizes[e] > 0]
        y = torch.zeros_like(x)
        if outs:
            ys = torch.cat(outs) * weight[:, None].to(x.dtype)
            y.index_add_(0, token, ys)
        return y, counts, kept


class SparseMoeBlock(nn.Module):
    """Router ``gate`` + ``experts``: ``(B, n, H) -> (B, n, H)``; the routing of the last call is in ``self.routing``.

    HF ``MixtralSparseMoeBlock`` names and outputs (without capacity). ``capacity_factor`` overrides the config.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.capacity_factor = config.capacity_factor
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = MoEExperts(config.num_local_experts, config.hidden_size, config.intermediate_size,
                                  config.hidden_act)
        self.routing: RoutingInfo | None = None
        std = config.initializer_range
        for p in (self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj):
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must have shape (batch, seq, hidden), got {tuple(hidden_states.shape)}")
        b, n, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = self.gate(x)
        weights, experts = route_top_k(logits, self.top_k)
        capacity = expert_capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor)
        y, counts, kept = self.experts(x, experts, weights, capacity)
        self.routing = RoutingInfo(logits, experts, weights, counts, kept, capacity)
        return y.view(b, n, h)


def dense_moe_reference(block: SparseMoeBlock, hidden_states: torch.Tensor) -> torch.Tensor:
    """The slow oracle: a Python loop over tokens and their k experts (no capacity). ``(B, n, H) -> (B, n, H)``."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    weights, experts = route_top_k(block.gate(x), block.top_k)
    rows = []
    for t in range(x.shape[0]):
        rows.append(sum(weights[t, j].to(x.dtype) * block.experts.expert_forward(int(experts[t, j]), x[t:t + 1])[0]
                        for j in range(block.top_k)))
    return torch.stack(rows).view_as(hidden_states)


def _stack_logits(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(router_logits, torch.Tensor):
        return router_logits.reshape(-1, router_logits.shape[-1])
    if len(router_logits) == 0:
        raise ValueError("router_logits is empty")
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in router_logits])


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e`` over all tokens of all layers given.

    ``f_e`` = assignments to expert ``e`` per token (top-k counted, so ``sum_e f_e = k``), ``P_e`` = mean router
    probability of ``e``. Uniform routing gives ``k``; everything on one expert gives ``E * k``-ish. Gradients
    flow through ``P_e`` only. ``router_logits``: ``(T, E)`` or one per layer; ``attention_mask`` ``(B, n)`` with
    ``T = B * n`` per layer excludes padding. Equals HF ``load_balancing_loss_func``.
    """
    logits = _stack_logits(router_logits)
    num_experts = logits.shape[-1]
    probs = logits.float().softmax(-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    assigned = F.one_hot(selected, num_experts).sum(1).float()  # (T, E): 1 where e is among the token's k
    if attention_mask is None:
        weight = torch.ones(probs.shape[0], device=probs.device)
    else:
        per_layer = attention_mask.reshape(-1).float().to(probs.device)
        if probs.shape[0] % per_layer.numel():
            raise ValueError(f"attention_mask has {per_layer.numel()} tokens, router_logits {probs.shape[0]} rows")
        weight = per_layer.repeat(probs.shape[0] // per_layer.numel())
    total = weight.sum()
    f = (assigned * weight[:, None]).sum(0) / total
    p = (probs * weight[:, None]).sum(0) / total
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_e logits_te)^2``: keeps router logits small (Zoph et al. 2022)."""
    logits = _stack_logits(router_logits).float()
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoEModel(MistralModel):
    """``MistralModel`` whose feed-forwards are ``SparseMoeBlock``s (in ``config.moe_layers``; HF ``MixtralModel``)."""

    def __init__(self, config: MoEConfig):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            if config.is_moe_layer(i):
                layer.mlp = SparseMoeBlock(config)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]


@dataclass
class MoECausalLMOutput(CausalLMOutput):
    """``CausalLMOutput`` plus ``aux_loss`` (load balancing), ``z_loss`` and per-layer ``router_logits``."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] = field(default_factory=tuple)


class MoEForCausalLM(MistralForCausalLM):
    """``MoEModel`` + ``lm_head``; state dict equal to HF ``MixtralForCausalLM`` (5.x) for all-MoE configs.

    ``forward(..., labels=None, output_router_logits=None)`` returns ``MoECausalLMOutput``. With router logits on
    (argument or ``config.output_router_logits``), ``loss = lm_loss + router_aux_loss_coef * aux_loss +
    router_z_loss_coef * z_loss`` (HF adds the first two the same way). ``generate`` and ``num_parameters`` are
    Mistral's.
    """

    def __init__(self, config: MoEConfig):
        super().__init__(config, model=MoEModel(config))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_router_logits: bool | None = None, **kwargs) -> MoECausalLMOutput:
        out = super().forward(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                              use_cache=use_cache)
        logits, loss = out.logits, out.loss
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        router_logits = tuple(block.routing.router_logits for block in self.model.moe_blocks())
        aux = z = None
        if output_router_logits and router_logits:
            n = logits.shape[1]
            mask = attention_mask[:, -n:] if attention_mask is not None and attention_mask.dim() == 2 else None
            aux = load_balancing_loss(router_logits, self.config.num_experts_per_tok, mask)
            z = router_z_loss(router_logits)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z
        return MoECausalLMOutput(logits=logits, past_key_values=out.past_key_values, loss=loss,
                                 hidden_states=out.hidden_states, aux_loss=aux, z_loss=z,
                                 router_logits=router_logits if output_router_logits else ())

    def num_active_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters one token uses: the total minus the ``E - k`` experts it skips in every MoE layer."""
        unused = 0
        for block in self.model.moe_blocks():
            per_expert = (block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel())
            unused += (block.num_experts - block.top_k) * per_expert
        return self.num_parameters(exclude_embeddings) - unused


def moe_parameter_counts(config: MoEConfig) -> dict[str, int]:
    """Parameter counts of ``MoEForCausalLM(config)`` from the config alone (no tensors), by component.

    Keys: ``embedding``, ``attention``, ``router``, ``experts`` (all), ``dense_mlp`` (non-MoE layers), ``norms``,
    ``lm_head``, ``total``, ``active`` (per token: k of E experts), ``active_non_embedding`` and
    ``flops_per_token`` = 2 * (active weights touched by a matmul: no embedding lookup, no norms), the usual
    forward-pass estimate without the attention-score term.
    """
    c = config
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    moe = [c.is_moe_layer(layer) for layer in range(c.num_hidden_layers)]
    n_moe = sum(moe)
    n_dense = c.num_hidden_layers - n_moe
    attention = c.num_hidden_layers * (2 * h * c.num_attention_heads * d + 2 * h * c.num_key_value_heads * d)
    per_expert = 3 * h * i
    counts = {
        "embedding": c.vocab_size * h,
        "attention": attention,
        "router": n_moe * h * c.num_local_experts,
        "experts": n_moe * c.num_local_experts * per_expert,
        "dense_mlp": n_dense * per_expert,
        "norms": (2 * c.num_hidden_layers + 1) * h,
        "lm_head": 0 if c.tie_word_embeddings else c.vocab_size * h,
    }
    counts["total"] = sum(counts.values())
    counts["active"] = counts["total"] - n_moe * (c.num_local_experts - c.num_experts_per_tok) * per_expert
    counts["active_non_embedding"] = counts["active"] - counts["embedding"]
    lm_head = c.vocab_size * h
    counts["flops_per_token"] = 2 * (counts["active"] - counts["embedding"] - counts["norms"] - counts["lm_head"]
                                     + lm_head)
    return counts
