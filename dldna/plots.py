"""Plotting helpers shared by the chapters. Every function returns the matplotlib figure (no ``plt.show()``)."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from dldna.bench import fit_loglog_slope


def plot_loglog_scaling(
    series: Mapping[str, Sequence[dict]],
    x_key: str = "seq_len",
    y_keys: Sequence[tuple[str, str]] = (("seconds", "time (s)"), ("peak_mb", "peak memory (MiB)")),
    reference_slopes: Sequence[float] = (1.0, 2.0),
    title: str | None = None,
    fit_last: int | None = None,
):
    """Log-log plots of measurements vs ``x_key``, one panel per ``y_keys`` entry.

    ``series`` maps a label to rows (dicts). Each line's legend shows its fitted slope; dashed grey lines show
    ``reference_slopes`` (e.g. O(N) and O(N^2)) anchored at the first point of the first series.
    ``fit_last=k`` fits the slope on the ``k`` largest points only (small sizes are dominated by fixed overheads).
    """
    if fit_last is not None and fit_last < 2:
        raise ValueError(f"fit_last must be >= 2 or None, got {fit_last}")
    fig, axes = plt.subplots(1, len(y_keys), figsize=(5.2 * len(y_keys), 3.8), squeeze=False)
    for ax, (y_key, y_label) in zip(axes[0], y_keys):
        anchor = None
        for label, rows in series.items():
            pts = [(r[x_key], r[y_key]) for r in rows if np.isfinite(r.get(y_key, np.nan)) and r[y_key] > 0]
            if len(pts) < 2:
                continue
            xs, ys = zip(*pts)
            k = len(xs) if fit_last is None else min(fit_last, len(xs))
            slope = fit_loglog_slope(xs[-k:], ys[-k:])
            where = "" if k == len(xs) else f" over {k} largest N"
            ax.loglog(xs, ys, "o-", label=f"{label} (slope {slope:.2f}{where})")
            anchor = anchor or (xs[0], ys[0], xs[-1])
        if anchor is not None:
            x0, y0, x1 = anchor
            grid = np.geomspace(x0, x1, 20)
            for p in reference_slopes:
                ax.loglog(grid, y0 * (grid / x0) ** p, "--", color="grey", alpha=0.6, lw=1)
                ax.annotate(f"O(N^{p:g})", (grid[-1], y0 * (grid[-1] / x0) ** p), fontsize=8, color="grey")
        ax.xaxis.set_minor_formatter(NullFormatter())  # keep only the decade labels readable
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(y_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
