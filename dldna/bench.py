"""Measurement helpers: wall time, peak memory and log-log slopes. Used in chapters 1-6.

Times are medians over repeats after a warmup (CUDA events on GPU); memory is the *peak* allocated during the
call (``tracemalloc`` on CPU, the CUDA caching allocator's ``max_memory_allocated`` on GPU), in MiB.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch

MB = 2**20


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    samples = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(dev)
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Peak memory allocated by PyTorch *during* ``fn()``, above what was allocated before it, in MiB.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: PyTorch's CPU allocator does not
    go through Python's allocator (``tracemalloc`` sees nothing), so we replay the allocator's own events as
    recorded by ``torch.profiler(profile_memory=True)``: each op's self allocation and each free, in time
    order; the running maximum is the peak.
    """
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del out
        return (peak - base) / MB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / MB


def fit_loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``: the measured growth exponent (y ~ x^slope)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"xs and ys need the same length >= 2, got {x.size} and {y.size}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("xs and ys must be positive for a log-log fit")
    slope, _ = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope)
