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


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average that ignores non-finite values (NaN where a window has none)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < 2:
        return v
    ok = np.isfinite(v)
    csum = np.cumsum(np.where(ok, v, 0.0))
    ccount = np.cumsum(ok)
    lo = np.maximum(np.arange(len(v)) - window, -1)
    total = csum - np.where(lo >= 0, csum[np.maximum(lo, 0)], 0.0)
    count = ccount - np.where(lo >= 0, ccount[np.maximum(lo, 0)], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot_histories(histories: Mapping[str, Mapping], keys: Sequence[str] = ("loss", "eval_loss"), smooth: int = 1,
                   logy: bool = False, ylim: tuple[float, float] | None = None, title: str | None = None,
                   axes=None):
    """Training curves from ``dldna.training.train`` histories: one panel per key, one line per run.

    ``histories`` maps a label to a history dict (``step``, ``loss``, ``lr``, ``grad_norm``, ``eval_step``,
    ``eval_*``). ``eval_*`` keys are plotted against ``eval_step``, others against ``step``; ``smooth`` is a
    trailing moving-average window. A run that stopped on a non-finite loss is marked with an x where it
    stopped. Returns the figure.
    """
    if axes is None:
        fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
        axes = axes[0]
    else:
        axes = np.atleast_1d(axes)
        fig = axes[0].figure
    for ax, key in zip(axes, keys):
        for i, (label, hist) in enumerate(histories.items()):
            if key not in hist or not len(hist[key]):
                continue
            xs = hist["eval_step"] if key.startswith("eval_") else hist["step"]
            ys = hist[key] if key.startswith("eval_") else _smooth(hist[key], smooth)
            ax.plot(xs[: len(ys)], ys, label=label, color=f"C{i}", marker="o" if key.startswith("eval_") else None,
                    ms=3)
            if hist.get("diverged") and not key.startswith("eval_"):
                finite = [(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
                if finite:
                    ax.plot(*finite[-1], "x", color=f"C{i}", ms=10, mew=2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key.replace("_", " "))
        if logy:
            ax.set_yscale("log")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
