"""Rotary position embedding, looked at: angles, the rotation of one 2-D pair, long-range decay, an explorer.

The computations use the same frequencies as ``dldna.models.layers.RotaryEmbedding`` (``theta_i =
base^(-2i/d)``); the figures return matplotlib figures and ``rope_explorer`` returns an ipywidgets box (with a
kernel, e.g. in Colab; the book's static pages show ``plot_rope_pair`` figures instead). Used in chapter 7.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch


def rope_frequencies(dim: int, base: float = 10000.0) -> np.ndarray:
    """``theta_i = base^(-2i/dim)`` for ``i = 0 .. dim/2 - 1`` (float64), as in ``RotaryEmbedding.inv_freq``."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even number, got {dim}")
    if base <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def rope_relative_decay(max_distance: int, dim: int = 128, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Su et al. (2021, sec. 3.4.3) bound on how much a query-key score can vary with relative distance ``m``:
    ``(1/(d/2)) sum_j |S_j(m)|`` with ``S_j(m) = sum_{k<j} exp(i m theta_k)``, for ``m = 0 .. max_distance``.

    It decays (with oscillations) as ``m`` grows: distant pairs get a smaller possible score. Returns ``(m, bound)``.
    """
    if max_distance < 1:
        raise ValueError(f"max_distance must be positive, got {max_distance}")
    theta = rope_frequencies(dim, base)
    m = np.arange(max_distance + 1, dtype=np.float64)
    partial = np.cumsum(np.exp(1j * m[:, None] * theta[None, :]), axis=1)
    return m, np.abs(partial).mean(axis=1)


def rope_score_vs_distance(max_distance: int, dim: int = 128, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """``q_m . k_n / d`` for ``q = k =`` all-ones as a function of ``m - n``: ``mean_i cos((m-n) theta_i)``.

    Identical vectors score highest when they are close; the score decays on average as they move apart.
    """
    theta = rope_frequencies(dim, base)
    m = np.arange(max_distance + 1, dtype=np.float64)
    return m, np.cos(m[:, None] * theta[None, :]).mean(axis=1)


def rope_scores_from_layer(q: torch.Tensor, k: torch.Tensor, positions_q, positions_k, base: float = 10000.0) -> torch.Tensor:
    """Scores ``q_m . k_n`` after rotating ``q`` ``(D,)`` to each position in ``positions_q`` and ``k`` to each in
    ``positions_k`` with the package's ``RotaryEmbedding``; float64 ``(len(positions_q), len(positions_k))``."""
    from dldna.models.layers import RotaryEmbedding, apply_rotary_pos_emb

    if q.dim() != 1 or q.shape != k.shape:
        raise ValueError(f"q and k must be 1-D of the same size, got {tuple(q.shape)} and {tuple(k.shape)}")
    rope = RotaryEmbedding(q.shape[0], base=base)

    def rotate(vec, positions):
        pos = torch.as_tensor(positions)[None]
        cos, sin = rope(vec.double(), pos)
        x = vec.double().expand(1, 1, pos.shape[1], -1)
        return apply_rotary_pos_emb(x, x, cos.double(), sin.double())[0][0, 0]

    return rotate(q, positions_q) @ rotate(k, positions_k).T


def plot_rope_pair(position: int = 5, freq_index: int = 0, base: float = 10000.0, dim: int = 64,
                   max_position: int = 64, axes=None):
    """Left: the 2-D pair ``i`` of a query, rotated by ``position * theta_i`` (earlier positions faded). Right:
    ``cos(m theta_i)`` for every position ``m`` and pair ``i``, with the chosen (m, i) marked.

    Low pairs (small ``i``) turn fast and tell nearby positions apart; high pairs turn slowly and carry
    long-range position. Returns the figure.
    """
    theta = rope_frequencies(dim, base)
    if not 0 <= freq_index < len(theta):
        raise ValueError(f"freq_index must be in [0, {len(theta) - 1}], got {freq_index}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    else:
        fig = axes[0].figure
    ax, hm = axes
    circle = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(circle), np.sin(circle), color="0.85", lw=1)
    base_vec = np.array([1.0, 0.3]) / np.hypot(1.0, 0.3)
    for m in range(position + 1):
        a = m * theta[freq_index]
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ base_vec
        last = m == position
        ax.annotate("", xy=rot, xytext=(0, 0), arrowprops=dict(arrowstyle="->", lw=2.2 if last else 0.8,
                                                                color="C3" if last else "C0",
                                                                alpha=1.0 if last else 0.15 + 0.5 * m / max(position, 1)))
    ax.set_title(f"pair {freq_index}: angle m*theta = {position}*{theta[freq_index]:.3g} rad", fontsize=9)
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.set_aspect("equal")
    ax.set_xlabel(f"feature {freq_index}")
    ax.set_ylabel(f"feature {freq_index + dim // 2}  (rotate_half pairing)")
    grid = np.cos(np.arange(max_position)[:, None] * theta[None, :])
    im = hm.imshow(grid.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
    hm.plot([position], [freq_index], "k*", ms=12)
    hm.set_xlabel("position m")
    hm.set_ylabel("pair index i")
    hm.set_title(f"cos(m * theta_i), d={dim}, base={base:g}", fontsize=9)
    fig.colorbar(im, ax=hm, fraction=0.04)
    fig.tight_layout()
    return fig


def rope_explorer(dim: int = 64, max_position: int = 64):
    """ipywidgets explorer: sliders for position, pair index and (log) base redraw ``plot_rope_pair``.

    Needs a running kernel (Jupyter, Colab); on the static site use the figures printed beside it.
    """
    import ipywidgets as widgets
    from IPython.display import display

    out = widgets.Output()
    position = widgets.IntSlider(value=5, min=0, max=max_position - 1, description="position m")
    pair = widgets.IntSlider(value=0, min=0, max=dim // 2 - 1, description="pair i")
    log_base = widgets.FloatSlider(value=4.0, min=1.0, max=6.0, step=0.1, description="log10 base")

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            fig = plot_rope_pair(position.value, pair.value, 10 ** log_base.value, dim, max_position)
            display(fig)
            plt.close(fig)

    for w in (position, pair, log_base):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([position, pair, log_base]), out])
