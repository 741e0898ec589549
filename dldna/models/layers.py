"""Building blocks shared by every model in the book: RMSNorm, rotary embeddings, gated feed-forwards.

These are the single implementations the encoder, Mistral and Phi-3 models import. Layouts and parameter
names follow Hugging Face (Llama/Mistral) so state dicts load both ways. Used in chapters 7-11.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * weight``.

    Computed in float32 and cast back, like HF ``MistralRMSNorm``; equals ``torch.nn.RMSNorm``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (the HF "rotate_half" pairing: i with i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """Rotate ``q`` ``(B, H, N, D)`` and ``k`` by the angles in ``cos``/``sin`` ``(B, N, D)`` (or ``(N, D)``).

    Only the first ``cos.shape[-1]`` features are rotated (partial rotary); the rest pass through.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        out = x_rot * cos + rotate_half(x_rot) * sin
        return torch.cat((out.to(x.dtype), x_pass), dim=-1) if x_pass.shape[-1] else out.to(x.dtype)

    return rotate(q), rotate(k)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) with HF layout: returns ``cos, sin`` of shape ``(B, N, dim)``.

    Frequencies are ``base^(-2i/dim)``; angles are computed in float32 for any ``position_ids`` (B, N), so
    positions need no precomputed table (and nothing to extend). ``dim`` may be smaller than head_dim
    (partial rotary, as in Phi models).
    """

    def __init__(self, dim: int, base: float = 10000.0, max_position_embeddings: int = 2048):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        if base <= 0:
            raise ValueError(f"base must be positive, got {base}")
        self.dim, self.base, self.max_position_embeddings = dim, float(base), max_position_embeddings
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """``x`` only supplies dtype and device; ``position_ids`` is ``(B, N)`` (or ``(N,)``) of ints."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        freqs = position_ids.to(x.device, torch.float32)[..., None] * self.inv_freq.to(x.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class GatedMLP(nn.Module):
    """Gated feed-forward ``down(act(gate(x)) * up(x))``: SwiGLU with ``act="silu"``, GeGLU with ``"gelu"``.

    Parameter names follow HF Llama/Mistral (``gate_proj``, ``up_proj``, ``down_proj``, no biases).
    Shapes: ``(..., hidden) -> (..., hidden)``.
    """

    _ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        if act not in self._ACTS:
            raise ValueError(f"act must be one of {sorted(self._ACTS)}, got {act!r}")
        self.act_name = act
        self.act_fn = self._ACTS[act]
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def SwiGLU(hidden_size: int, intermediate_size: int) -> GatedMLP:
    """SwiGLU feed-forward (Shazeer 2020): ``GatedMLP`` with SiLU gate."""
    return GatedMLP(hidden_size, intermediate_size, act="silu")


def GeGLU(hidden_size: int, intermediate_size: int) -> GatedMLP:
    """GeGLU feed-forward (Shazeer 2020): ``GatedMLP`` with GELU gate."""
    return GatedMLP(hidden_size, intermediate_size, act="gelu")
