"""Measuring the attention zoo: every efficient method against the dense reference and SDPA, vs sequence length.

``zoo_methods(n, ...)`` builds, for one length, the callables ``fn(q, k, v)`` with their layouts / projections /
rotations prepared outside the timed region. ``measure_zoo`` times them (``dldna.bench.time_fn``) and measures
their peak memory (``dldna.bench.peak_memory_mb``) over a list of lengths, recording out-of-memory as missing,
and fits log-log slopes. ``zoo_errors`` gives each method's error against the dense attention it replaces.
``benchmarks/attention_zoo.py`` runs ``measure_zoo`` at full size and stores the result; chapters 2 and 3 run it
small on the CPU and plot both with ``plot_zoo_scaling``.

Used in chapters 2 and 3.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dldna.attention.linear import performer_attention, random_projection
from dldna.attention.local import block_sparse_attention, sliding_window_attention
from dldna.attention.lowrank import linformer_attention, linformer_projection, pooling_projection
from dldna.attention.lsh import lsh_attention, random_rotations
from dldna.attention.masks import _int, bigbird_block_layout, block_sparse_mask, sliding_window_mask
from dldna.attention.reference import attention

ALL_METHODS = ("dense", "sdpa", "sliding_window", "block_sparse", "linformer", "performer", "performer_causal", "lsh")

DESCRIPTIONS = {
    "dense": "dense reference, causal (materialises N x N)",
    "sdpa": "torch SDPA, causal (fused kernel where available)",
    "sliding_window": "banded causal sliding window",
    "block_sparse": "block-sparse, BigBird layout (window 3 + 1 global + 1 random block)",
    "linformer": "Linformer, k_proj fixed",
    "performer": "FAVOR+, non-causal",
    "performer_causal": "FAVOR+, causal (chunked prefix sums)",
    "lsh": "Reformer LSH, chunk fixed, buckets = N / chunk",
}


def zoo_methods(
    n: int,
    head_dim: int,
    methods: Sequence[str] = ALL_METHODS,
    window: int = 256,
    block_size: int = 64,
    k_proj: int = 256,
    num_features: int = 256,
    lsh_chunk: int = 64,
    n_hashes: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, Callable]:
    """``{name: fn(q, k, v)}`` for length ``n``; random parts (layouts, projections, rotations) drawn once, seeded."""
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"methods must be among {ALL_METHODS}, got {sorted(unknown)}")
    n = _int("n", n)
    gen = torch.Generator().manual_seed(seed)
    fns: dict[str, Callable] = {}
    for name in methods:
        if name == "dense":
            fns[name] = lambda q, k, v: attention(q, k, v, causal=True)
        elif name == "sdpa":
            fns[name] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif name == "sliding_window":
            fns[name] = lambda q, k, v: sliding_window_attention(q, k, v, window)
        elif name == "block_sparse":
            if n % block_size:
                raise ValueError(f"block_size ({block_size}) must divide n ({n}) for the block_sparse method")
            layout = bigbird_block_layout(n // block_size, 3, 1, 1, seed).to(device)
            fns[name] = lambda q, k, v, layout=layout: block_sparse_attention(q, k, v, layout, block_size)
        elif name == "linformer":
            e, f = (linformer_projection(min(k_proj, n), n, gen, dtype=dtype, device=device) for _ in range(2))
            fns[name] = lambda q, k, v, e=e, f=f: linformer_attention(q, k, v, e, f)
        elif name in ("performer", "performer_causal"):
            w = random_projection(num_features, head_dim, True, gen, dtype=dtype, device=device)
            causal = name == "performer_causal"
            fns[name] = lambda q, k, v, w=w, causal=causal: performer_attention(q, k, v, num_features, causal,
                                                                              projection=w)
        elif name == "lsh":
            n_buckets = max(2, 2 * round(n / lsh_chunk / 2))
            rot = random_rotations(head_dim, n_buckets, n_hashes, gen, dtype=dtype, device=device)
            fns[name] = lambda q, k, v, rot=rot, nb=n_buckets: lsh_attention(
                q, k, v, nb, n_hashes, rotations=rot, chunk_size=lsh_chunk)
    return fns


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def measure_zoo(
    seq_lengths: Sequence[int],
    methods: Sequence[str] = ALL_METHODS,
    batch: int = 1,
    heads: int = 1,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    memory: bool = True,
    max_dense_n: int | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    **method_kwargs,
) -> dict:
    """Time (median seconds) and peak memory (MiB) of each method at each length; slopes of both vs ``N``.

    Returns ``{"config": {...}, "records": [{"method", "n", "time_s", "peak_mb", "error"}], "slopes": {method:
    {"time": s, "memory": s}}}`` (slopes fitted on the four largest lengths). A run that runs out of memory is
    recorded with ``None`` and the error; ``max_dense_n`` skips the quadratic methods (dense, SDPA) above that length. ``num_threads`` sets
    ``torch.set_num_threads`` for the run (restored afterwards): on a shared, busy CPU one thread gives steadier
    timings than several threads waiting on each other.
    """
    from dldna.bench import fit_loglog_slope

    dev = torch.device(device)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(_int("num_threads", num_threads))
    try:
        records = _measure(seq_lengths, methods, batch, heads, head_dim, dtype, dev, warmup, repeats, memory,
                           max_dense_n, progress, method_kwargs)
    finally:
        torch.set_num_threads(previous_threads)
    slopes = {}
    for name in methods:
        slopes[name] = {}
        for key, label in (("time_s", "time"), ("peak_mb", "memory")):
            pts = [(r["n"], r[key]) for r in records if r["method"] == name and r[key] is not None and r[key] > 0][-4:]
            slopes[name][label] = fit_loglog_slope(*zip(*pts)) if len(pts) >= 2 else None
    config = dict(seq_lengths=[int(n) for n in seq_lengths], methods=list(methods), batch=batch, heads=heads,
                  head_dim=head_dim, dtype=str(dtype).replace("torch.", ""), device=str(dev), warmup=warmup,
                  repeats=repeats, num_threads=num_threads or previous_threads, **method_kwargs)
    return {"config": config, "records": records, "slopes": slopes, "descriptions": {m: DESCRIPTIONS[m] for m in methods}}


def _measure(seq_lengths, methods, batch, heads, head_dim, dtype, dev, warmup, repeats, memory, max_dense_n, progress,
             method_kwargs) -> list[dict]:
    from dldna.bench import peak_memory_mb, time_fn

    from tqdm.auto import tqdm

    records = []
    steps = [(n, m) for n in seq_lengths for m in methods]
    bar = tqdm(steps, desc="attention zoo", disable=not progress)
    gen = torch.Generator().manual_seed(0)
    current_n, fns, qkv = None, {}, None
    for n, name in bar:
        if n != current_n:
            current_n = n
            fns = zoo_methods(n, head_dim, methods, dtype=dtype, device=dev, **method_kwargs)
            qkv = [torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype=dtype, device=dev) for _ in range(3)]
        record = {"method": name, "n": int(n), "time_s": None, "peak_mb": None, "error": None}
        if max_dense_n is not None and n > max_dense_n and name in ("dense", "sdpa"):
            record["error"] = f"skipped: n > max_dense_n ({max_dense_n})"
        else:
            fn = fns[name]
            try:
                with torch.no_grad():
                    record["time_s"] = time_fn(lambda: fn(*qkv), warmup=warmup, repeats=repeats, device=dev)
                    if memory:
                        record["peak_mb"] = peak_memory_mb(lambda: fn(*qkv), device=dev)
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err):
                    raise
                record["error"] = "out of memory"
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        records.append(record)
    return records


def crossover_n(result: dict, method: str, baseline: str) -> int | None:
    """Smallest measured ``N`` from which ``method`` is faster than ``baseline`` at every larger measured ``N``."""
    times = {}
    for r in result["records"]:
        if r["time_s"] is not None:
            times.setdefault(r["method"], {})[r["n"]] = r["time_s"]
    shared = sorted(set(times.get(method, {})) & set(times.get(baseline, {})))
    faster = [times[method][n] < times[baseline][n] for n in shared]
    for i, n in enumerate(shared):
        if all(faster[i:]):
            return n
    return None


def zoo_errors(
    n: int = 257, head_dim: int = 32, window: int = 64, block_size: int = 32, k_proj: int = 64, num_features: int = 128,
    lsh_chunk: int = 32, n_hashes: int = 4, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Relative error ``|out - ref| / |ref|`` (Frobenius) of each method, float64, against (a) dense attention
    with its own mask and (b) full attention (causal for the causal methods).

    Exact sparse methods have (a) ~1e-16 and (b) large (they drop pairs); approximations (Linformer, FAVOR+) are
    compared with full attention only (Linformer with mean-pooling ``E = F``). ``n`` odd on purpose (block-sparse uses the largest multiple of
    ``block_size`` below it).
    """
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    full_causal, full = attention(q, k, v, causal=True), attention(q, k, v)

    def err(a, b):
        return float((a - b).norm() / b.norm())

    out = {}
    sw = sliding_window_attention(q, k, v, window)
    out["sliding_window"] = {"vs_own_mask": err(sw, attention(q, k, v, mask=sliding_window_mask(n, window))),
                             "vs_full": err(sw, full_causal)}
    nb = (n // block_size) * block_size
    layout = bigbird_block_layout(nb // block_size, 3, 1, 1, seed)
    qb, kb, vb = q[:, :, :nb], k[:, :, :nb], v[:, :, :nb]
    bs = block_sparse_attention(qb, kb, vb, layout, block_size)
    out["block_sparse"] = {"vs_own_mask": err(bs, attention(qb, kb, vb, mask=block_sparse_mask(nb, block_size, layout))),
                           "vs_full": err(bs, attention(qb, kb, vb))}
    pool = pooling_projection(k_proj, n, dtype=torch.float64)
    out["linformer"] = {"vs_full": err(linformer_attention(q, k, v, pool, pool), full)}
    out["performer"] = {"vs_full": err(performer_attention(q, k, v, num_features, generator=gen), full)}
    out["performer_causal"] = {"vs_full": err(performer_attention(q, k, v, num_features, True, generator=gen), full_causal)}
    n_buckets = max(2, 2 * round(n / lsh_chunk / 2))
    out["lsh"] = {"vs_full": err(lsh_attention(q, k, v, n_buckets, n_hashes, generator=gen, chunk_size=lsh_chunk), full)}
    return out


def plot_zoo_scaling(result: dict, title: str = "", methods: Sequence[str] | None = None):
    """Log-log time and peak memory vs ``N`` per method (``dldna.plots.plot_loglog_scaling``, slopes over the four
    largest lengths); returns the figure."""
    from dldna.plots import plot_loglog_scaling

    series = {}
    for name in methods or result["config"]["methods"]:
        rows = [{"seq_len": r["n"], "seconds": r["time_s"] if r["time_s"] is not None else float("nan"),
                 "peak_mb": r["peak_mb"] if r["peak_mb"] is not None else float("nan")}
                for r in result["records"] if r["method"] == name]
        series[name] = sorted(rows, key=lambda r: r["seq_len"])
    cfg = result["config"]
    return plot_loglog_scaling(series, title=title or f"{cfg['device']}, {cfg['dtype']}, batch {cfg['batch']}, "
                               f"heads {cfg['heads']}, head_dim {cfg['head_dim']}", fit_last=4)


def zoo_table(result: dict, methods: Sequence[str] | None = None) -> str:
    """Text table of time (ms) and peak memory (MiB) per method and ``N``, with fitted slopes."""
    methods = list(methods or result["config"]["methods"])
    lengths = sorted({r["n"] for r in result["records"]})
    cell = {(r["method"], r["n"]): r for r in result["records"]}
    lines = [f"{'method':>17} {'':>5} " + " ".join(f"{n:>9}" for n in lengths) + "   slope"]
    for name in methods:
        for key, unit, label in (("time_s", 1e3, "ms"), ("peak_mb", 1.0, "MiB")):
            vals = [cell.get((name, n), {}).get(key) for n in lengths]
            text = " ".join(f"{v * unit:9.2f}" if v is not None else f"{'-':>9}" for v in vals)
            slope = result["slopes"].get(name, {}).get("time" if key == "time_s" else "memory")
            lines.append(f"{name if key == 'time_s' else '':>17} {label:>5} {text}   "
                         + (f"{slope:.2f}" if slope is not None else "-"))
    return "\n".join(lines)


def plot_masks(masks: dict, ncols: int = 4, size: float = 2.6):
    """One heatmap per ``(n, n)`` bool mask (yellow = may attend), with the fraction of kept scores; returns the figure."""
    import matplotlib.pyplot as plt

    nrows = -(-len(masks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, mask) in zip(axes.flat, masks.items()):
        ax.axis("on")
        ax.imshow(torch.as_tensor(mask).float(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{title}\n{float(torch.as_tensor(mask).float().mean()):.0%} kept", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("query i")
    fig.tight_layout()
    return fig


def sliding_window_computed(n: int, window: int, causal: bool = True, chunk_size: int | None = None) -> torch.Tensor:
    """``(n, n)`` bool: the score entries ``sliding_window_attention`` computes (allowed or not) with its chunk plan."""
    from dldna.attention.local import sliding_window_plan

    chunk, n_chunks, back, ahead = sliding_window_plan(n, window, causal, chunk_size)
    computed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n_chunks):
        lo, hi = max(0, (i - back) * chunk), min(n, (i + 1 + ahead) * chunk)
        computed[i * chunk : (i + 1) * chunk, lo:hi] = True
    return computed


def plot_efficient_patterns(n: int = 64, window: int = 8, block_size: int = 8, rank: int = 8):
    """Chapter 2's three early methods for one setting: the banded tiles, a block layout and Linformer's shapes."""
    import matplotlib.pyplot as plt

    from dldna.attention.local import sliding_window_plan

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    chunk = sliding_window_plan(n, window, True)[0]
    picture = sliding_window_computed(n, window).float() * 0.45 + sliding_window_mask(n, window).float() * 0.55
    axes[0].imshow(picture, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"sliding window w={window}: {int(sliding_window_mask(n, window).sum())} allowed,\n"
                      f"{int(sliding_window_computed(n, window).sum())} computed (chunks of {chunk})", fontsize=8)
    if n % block_size == 0:
        nb = n // block_size
        layout = torch.eye(nb, dtype=torch.bool) | torch.eye(nb, dtype=torch.bool).roll(-1, dims=1)
        layout[:, 0] = True
        layout = layout & torch.ones(nb, nb, dtype=torch.bool).tril()
        mask = block_sparse_mask(n, block_size, layout)
        axes[1].imshow(mask.float(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        axes[1].set_title(f"block sparse b={block_size}: {int(layout.sum())} of {nb * nb} tiles\n"
                          f"(local + previous + first block)", fontsize=8)
    else:
        axes[1].text(0.5, 0.5, f"block size {block_size}\ndoes not divide n={n}", ha="center", va="center")
    k = min(rank, n)
    scores = torch.zeros(n, n)
    scores[:, :k] = 1
    axes[2].imshow(scores, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[2].set_title(f"Linformer k={k}: scores are {n} x {k}\n({k / n:.0%} of the N x N matrix)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("key j (or projected key)")
    axes[0].set_ylabel("query i")
    fig.tight_layout()
    return fig


__all__ = [
    "ALL_METHODS", "zoo_methods", "measure_zoo", "crossover_n", "zoo_errors", "plot_zoo_scaling", "zoo_table", "plot_masks",
    "sliding_window_computed", "plot_efficient_patterns",
]
