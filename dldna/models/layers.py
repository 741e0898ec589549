"""Building blocks shared by every model in the book: RMSNorm, rotary embeddings, gated feed-forwards,
absolute (sinusoidal, learned) positions and ALiBi biases.

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

    Frequencies are ``base^(-2i/dim)``. Angles are computed in float32 (never in the activation dtype) into a
    cached cos/sin table of ``max_position_embeddings`` rows, extended on demand (doubling) when a larger position
    arrives; ``forward`` looks rows up for any ``position_ids`` and casts the result. ``dim`` may be smaller than
    head_dim (partial rotary, as in Phi models).
    """

    def __init__(self, dim: int, base: float = 10000.0, max_position_embeddings: int = 2048):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        if base <= 0:
            raise ValueError(f"base must be positive, got {base}")
        if max_position_embeddings <= 0:
            raise ValueError(f"max_position_embeddings must be positive, got {max_position_embeddings}")
        self.dim, self.base, self.max_position_embeddings = dim, float(base), max_position_embeddings
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", torch.empty(0, dim), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0, dim), persistent=False)

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device, torch.float32)
        return torch.cat((freqs, freqs), dim=-1)

    def _extend(self, needed: int, device: torch.device) -> None:
        """Make the float32 table cover positions ``[0, needed)`` on ``device``."""
        if self.cos_cached.shape[0] >= needed and self.cos_cached.device == device:
            return
        length = max(self.max_position_embeddings, self.cos_cached.shape[0], 1 << max(needed - 1, 0).bit_length())
        emb = self._angles(torch.arange(length, device=device))
        self.cos_cached, self.sin_cached = emb.cos(), emb.sin()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """``x`` only supplies dtype and device; ``position_ids`` is ``(B, N)`` (or ``(N,)``), ints or floats."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        position_ids = position_ids.to(x.device)
        # Negative (padding slots) or fractional (interpolated, e.g. positions / scale) ids have no table row.
        if position_ids.is_floating_point() or (position_ids.numel() and int(position_ids.min()) < 0):
            emb = self._angles(position_ids)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        self._extend(int(position_ids.max()) + 1 if position_ids.numel() else 1, x.device)
        return self.cos_cached[position_ids].to(x.dtype), self.sin_cached[position_ids].to(x.dtype)


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


# ----------------------------------------------------------------------------------------------------------------
# Absolute positions (added to the token embeddings) and ALiBi (added to the attention scores). Chapter 7.
# ----------------------------------------------------------------------------------------------------------------


def _check_positions(position_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
    if position_ids.is_floating_point() or position_ids.is_complex():
        raise ValueError(f"position_ids must be integers, got {position_ids.dtype}")
    if position_ids.numel() and int(position_ids.min()) < 0:
        raise ValueError("position_ids must be non-negative")
    return position_ids


def sinusoidal_position_encoding(position_ids: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sinusoidal absolute positions (Vaswani et al. 2017), float32, shape ``position_ids.shape + (dim,)``.

    ``PE[p, 2i] = sin(p / base^(2i/dim))`` and ``PE[p, 2i+1] = cos(p / base^(2i/dim))`` (interleaved, as in the
    paper). Defined for every position, including ones never seen in training. Used in chapter 7.
    """
    position_ids = _check_positions(position_ids)
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even number, got {dim}")
    if base <= 0:
        raise ValueError(f"base must be positive, got {base}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class SinusoidalPositionalEmbedding(nn.Module):
    """Module form of ``sinusoidal_position_encoding``: ``forward(position_ids) -> (..., dim)``; no parameters."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        self.dim, self.base = dim, float(base)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return sinusoidal_position_encoding(position_ids, self.dim, self.base)

    def extra_repr(self) -> str:
        return f"{self.dim}, base={self.base:g}"


class LearnedPositionalEmbedding(nn.Embedding):
    """Learned absolute positions (BERT, GPT-2): a ``(max_positions, dim)`` table indexed by ``position_ids``.

    Positions ``>= max_positions`` have no row: ``forward`` raises ``ValueError`` rather than failing with an
    index error deep inside ``embedding`` — the reason learned positions cannot extrapolate. Used in chapters 7-8.
    """

    def __init__(self, max_positions: int, dim: int, init_std: float = 0.02):
        if max_positions <= 0 or dim <= 0:
            raise ValueError(f"max_positions and dim must be positive, got {max_positions}, {dim}")
        super().__init__(max_positions, dim)
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        position_ids = _check_positions(position_ids)
        if position_ids.numel() and int(position_ids.max()) >= self.num_embeddings:
            raise ValueError(f"position_ids go up to {int(position_ids.max())} but the table has only "
                             f"{self.num_embeddings} positions (learned positions do not extrapolate)")
        return super().forward(position_ids)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022), float32 ``(num_heads,)``: ``2^(-8/n), 2^(-16/n), ...`` for
    ``n = num_heads`` a power of two; otherwise the slopes of the nearest lower power of two followed by every
    other slope of the next one (the paper's recipe, also used by HF BLOOM). Used in chapter 7."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** (num_heads.bit_length() - 1)
    slopes = power_of_two(closest)
    if closest < num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(num_heads: int, q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi additive attention bias ``-slope_h * |i - j|``, float32 ``(num_heads, q_len, k_len)``.

    Queries sit at the *last* ``q_len`` of the ``k_len`` key positions (``i = k_len - q_len + row``), which is
    what decoding with a KV cache needs. Add it to the scaled scores ``q k^T / sqrt(d)`` before the softmax; for a
    causal model apply the causal mask as well (on the allowed half ``j <= i`` this is the paper's
    ``-slope * (i - j)``; the symmetric form is the usual choice for bidirectional encoders). Used in chapter 7.
    """
    k_len = q_len if k_len is None else k_len
    if q_len < 1 or k_len < q_len:
        raise ValueError(f"need 1 <= q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    slopes = alibi_slopes(num_heads).to(device)
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return -slopes[:, None, None] * (i - j).abs().to(torch.float32)
