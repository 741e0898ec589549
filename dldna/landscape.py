"""The efficient-Transformer landscape 2019-2025 as data: dated milestones and open-model configurations.

Every entry carries the arXiv identifier of the paper that introduced it (the date is the arXiv v1 month), and
every configuration number comes from the model's paper or its published Hugging Face ``config.json`` (named in
``source``). Used in chapter 17 and on the landing page.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import matplotlib.pyplot as plt

CATEGORIES = ("sparse / local", "low rank / kernel", "memory & recurrence", "IO-aware kernels",
              "KV cache", "positions & blocks", "models", "decoding")


@dataclass(frozen=True)
class Milestone:
    """One idea: what it is, when it appeared on arXiv (year, month), its category and paper."""

    name: str
    year: int
    month: int
    category: str
    arxiv: str
    summary: str
    chapter: int | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if not re.fullmatch(r"\d{4}\.\d{4,5}", self.arxiv):
            raise ValueError(f"arxiv must look like 2205.14135, got {self.arxiv!r}")
        if not 1 <= self.month <= 12:
            raise ValueError(f"month must be 1..12, got {self.month}")

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


MILESTONES: tuple[Milestone, ...] = (
    Milestone("Transformer-XL", 2019, 1, "memory & recurrence", "1901.02860", "segment recurrence with cached states, relative positions", 14),
    Milestone("Sparse Transformer", 2019, 4, "sparse / local", "1904.10509", "strided and fixed factorised patterns, O(N sqrt N)", 4),
    Milestone("Multi-query attention", 2019, 11, "KV cache", "1911.02150", "one K/V head shared by all query heads", 6),
    Milestone("Reformer", 2020, 1, "sparse / local", "2001.04451", "LSH buckets of similar queries/keys, reversible layers", 4),
    Milestone("GLU variants (SwiGLU)", 2020, 2, "positions & blocks", "2002.05202", "gated feed-forward layers", 7),
    Milestone("Longformer", 2020, 4, "sparse / local", "2004.05150", "sliding window plus global tokens", 4),
    Milestone("Linformer", 2020, 6, "low rank / kernel", "2006.04768", "project keys and values along the sequence axis", 2),
    Milestone("Linear Transformers", 2020, 6, "low rank / kernel", "2006.16236", "kernel feature maps, attention as an RNN", 3),
    Milestone("BigBird", 2020, 7, "sparse / local", "2007.14062", "window + global + random blocks", 4),
    Milestone("Performer (FAVOR+)", 2020, 9, "low rank / kernel", "2009.14794", "positive orthogonal random features for softmax", 3),
    Milestone("RoFormer (RoPE)", 2021, 4, "positions & blocks", "2104.09864", "rotary position embedding", 7),
    Milestone("ALiBi", 2021, 8, "positions & blocks", "2108.12409", "linear distance biases, length extrapolation", 7),
    Milestone("FlashAttention", 2022, 5, "IO-aware kernels", "2205.14135", "tiled exact attention with online softmax", 5),
    Milestone("Recurrent Memory Transformer", 2022, 7, "memory & recurrence", "2207.06881", "memory tokens carried across segments", 14),
    Milestone("Speculative decoding", 2022, 11, "decoding", "2211.17192", "draft then verify, exact sampling", 13),
    Milestone("GQA", 2023, 5, "KV cache", "2305.13245", "groups of query heads share K/V heads", 6),
    Milestone("LongNet", 2023, 7, "sparse / local", "2307.02486", "dilated attention across segments", 14),
    Milestone("FlashAttention-2", 2023, 7, "IO-aware kernels", "2307.08691", "better work partitioning across warps", 5),
    Milestone("PagedAttention (vLLM)", 2023, 9, "KV cache", "2309.06180", "KV cache in fixed-size blocks", 6),
    Milestone("Ring Attention", 2023, 10, "memory & recurrence", "2310.01889", "sequence sharded over devices, K/V blocks rotate", 14),
    Milestone("Mistral 7B", 2023, 10, "models", "2310.06825", "GQA + sliding-window attention", 9),
    Milestone("Mixtral 8x7B", 2024, 1, "models", "2401.04088", "sparse mixture of experts, 2 of 8 per token", 12),
    Milestone("Phi-3", 2024, 4, "models", "2404.14219", "small models trained on heavily filtered data", 11),
    Milestone("Multi-token prediction", 2024, 4, "decoding", "2404.19737", "extra heads predict tokens t+2..t+n", 13),
    Milestone("DeepSeek-V2 (MLA)", 2024, 5, "KV cache", "2405.04434", "multi-head latent attention compresses K/V", 6),
    Milestone("Cross-Layer Attention", 2024, 5, "KV cache", "2405.12981", "adjacent layers share K/V", 6),
    Milestone("FlashAttention-3", 2024, 7, "IO-aware kernels", "2407.08608", "Hopper asynchrony (TMA, wgmma) and FP8", 5),
    Milestone("Native Sparse Attention", 2025, 2, "sparse / local", "2502.11089", "trainable hardware-aligned sparse attention", 4),
)


@dataclass(frozen=True)
class ModelCard:
    """Architecture of a released model, as published (``source`` says where each number comes from)."""

    name: str
    params: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: str
    vocab: int
    context: str
    attention: str
    source: str


MODEL_CARDS: tuple[ModelCard, ...] = (
    ModelCard("Mistral 7B", "7.3B", 32, 4096, 32, 8, 128, "SwiGLU, 14336", 32000, "8k (window 4096)",
              "GQA + sliding window", "Jiang et al. 2023, Table 1 (arXiv 2310.06825)"),
    ModelCard("Gemma 7B", "8.5B", 28, 3072, 16, 16, 256, "GeGLU, 49152", 256128, "8k",
              "multi-head", "Gemma Team 2024, Table 1 (arXiv 2403.08295)"),
    ModelCard("Gemma 2B", "2.5B", 18, 2048, 8, 1, 256, "GeGLU, 32768", 256128, "8k",
              "multi-query", "Gemma Team 2024, Table 1 (arXiv 2403.08295)"),
    ModelCard("Phi-3-mini", "3.8B", 32, 3072, 32, 32, 96, "SwiGLU, 8192", 32064, "4k (128k LongRoPE variant)",
              "multi-head", "Abdin et al. 2024 (arXiv 2404.14219); microsoft/Phi-3-mini-4k-instruct config.json"),
)


def kv_cache_kib_per_token(card: ModelCard, dtype_bytes: int = 2) -> float:
    """KV-cache KiB per token: 2 (K and V) x layers x kv_heads x head_dim x bytes."""
    return 2 * card.layers * card.kv_heads * card.head_dim * dtype_bytes / 1024


def plot_timeline(milestones=MILESTONES):
    """Milestones on a time axis, one row per category; returns the figure."""
    fig, ax = plt.subplots(figsize=(12, 5.6))
    colors = plt.cm.tab10.colors
    for row, category in enumerate(CATEGORIES):
        items = sorted((m for m in milestones if m.category == category), key=lambda m: (m.year, m.month))
        for i, m in enumerate(items):
            x = m.year + (m.month - 0.5) / 12
            ax.scatter(x, row, color=colors[row % 10], s=40, zorder=3)
            ax.annotate(m.name, (x, row), xytext=(0, (7, -13, 17)[i % 3]), textcoords="offset points",
                        fontsize=7.5, ha="center")
    ax.set_yticks(range(len(CATEGORIES)), CATEGORIES)
    ax.set_ylim(-0.7, len(CATEGORIES) - 0.2)
    ax.set_xlim(2018.75, 2025.6)
    ax.set_xticks(range(2019, 2026))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Efficient Transformers on arXiv, 2019-2025 (one dot per paper)")
    fig.tight_layout()
    return fig
