"""Measurement helpers: wall time, peak memory and log-log slopes. Used in chapters 1-6.

Times are medians over repeats after a warmup (CUDA events on GPU); memory is the *peak* allocated during the
call (``tracemalloc`` on CPU, the CUDA caching allocator's ``max_memory_allocated`` on GPU), in MiB.
"""
from __future__ import annotations

import gc
import os
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
    recorded by ``torch.profiler(profile_memory=True)``: every allocation and free with its own timestamp, in
    time order; the running maximum is the peak. (Summing each op's *self* memory at the op's start time is
    wrong inside an autograd Function or ``record_function`` scope: frees made there are charged to the scope's
    start, which can drive the running sum far below zero.)
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
    timeline = cpu_memory_timeline(fn)
    return max((live for _, live in timeline), default=0) / MB


def cpu_memory_timeline(fn: Callable[[], object]) -> list[tuple[int, int]]:
    """Bytes held by PyTorch's CPU allocator over the run of ``fn()``, as ``[(time_ns, live_bytes), ...]``.

    Replays every allocation (+size) and free (-size) that ``torch.profiler(profile_memory=True)`` records, in
    time order, starting from 0 (memory allocated before the call is not counted).
    """
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # Kineto otherwise logs two lines to stderr per profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    try:
        from torch._C._profiler import _EventType

        allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    except (ImportError, AttributeError):  # private API moved: fall back to per-op self memory
        allocations = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()]
    timeline, live = [], 0
    for time_ns, size in sorted(allocations, key=lambda a: a[0]):
        live += size
        timeline.append((time_ns, live))
    return timeline


def fit_loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``: the measured growth exponent (y ~ x^slope)."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"xs and ys need the same length >= 2, got {x.size} and {y.size}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("xs and ys must be positive for a log-log fit")
    slope, _ = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope)


class GpuMonitor:
    """Samples the GPU with ``nvidia-smi`` every ``interval_ms`` in the background: by default the SM clock (MHz) and
    the board's power draw (W). ``between(t0, t1)`` gives the median of each over a ``time.time()`` interval (None
    where nvidia-smi is missing or gave no number then). A kernel's speed follows the clock, and under a long heavy
    load the GPU lowers its clock to stay within its power limit (an H200 at 700 W ran FlashAttention at 1.6-1.9 GHz
    instead of 1.98 GHz; under that cap the kernel that draws more power per clock gets the lower clock).

        with GpuMonitor() as gpu:
            t0 = time.time(); ...; print(gpu.between(t0, time.time()))

    ``fields``: the ``nvidia-smi --query-gpu`` fields to sample, e.g. also ``temperature.gpu`` or
    ``clocks_event_reasons.active`` (what limits the clock: 0x4 is the software power cap). The numeric ones of
    ``KEYS`` give medians under those keys; any other field gives the sorted list of the values it took.
    """

    KEYS = {"clocks.sm": "sm_clock_mhz", "power.draw": "power_w", "temperature.gpu": "temp_c"}

    def __init__(self, interval_ms: int = 100, fields: tuple[str, ...] = ("clocks.sm", "power.draw")):
        self.interval_ms = interval_ms
        self.fields = tuple(fields)
        self.samples: list[tuple[float, tuple]] = []  # (time.time(), one value per field; None where unreadable)
        self._proc = None

    def __enter__(self) -> "GpuMonitor":
        import shutil
        import subprocess
        import threading

        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={','.join(self.fields)}", "--format=csv,noheader,nounits",
             f"-lms={self.interval_ms}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _value(self, field: str, text: str):
        if field not in self.KEYS:
            return text
        try:
            return float(text)
        except ValueError:  # "[N/A]" or a message instead of a number
            return None

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = [part.strip() for part in line.split(",")]
            if len(parts) != len(self.fields):
                continue
            values = tuple(self._value(field, part) for field, part in zip(self.fields, parts))
            if any(v is not None for v in values):
                self.samples.append((time.time(), values))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def between(self, t0: float, t1: float) -> dict:
        return self.within([(t0, t1)])

    def within(self, intervals: list[tuple[float, float]]) -> dict:
        """As ``between``, over the samples of several ``(t0, t1)`` intervals together."""
        inside = [values for t, values in self.samples if any(t0 <= t <= t1 for t0, t1 in intervals)]
        out = {}
        for i, field in enumerate(self.fields):
            seen = [values[i] for values in inside if values[i] is not None]
            if field in self.KEYS:
                out[self.KEYS[field]] = statistics.median(seen) if seen else None
            else:
                out[field] = sorted(set(seen))
        return out


def flex_block_mask(mask_mod: Callable, n: int, block_size: int = 128, device: torch.device | str = "cpu"):
    """FlexAttention ``BlockMask`` for an ``n x n`` mask shared by all batches and heads, built without
    ``torch.compile``.

    ``create_block_mask(..., _compile=False)`` evaluates ``mask_mod`` on the whole ``n x n`` grid at once (34 GB of
    int64 differences for a 64k window mask) and ``_compile=True`` starts an Inductor compilation per shape; here
    ``mask_mod`` is evaluated one query-block row at a time (memory O(block_size * n)). Blocks where every pair is
    allowed become *full* blocks (no mask_mod call inside the kernel), blocks with some allowed pairs *partial*.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if n <= 0 or block_size <= 0 or n % block_size:
        raise ValueError(f"n must be a positive multiple of block_size={block_size}, got n={n}")
    blocks = n // block_size
    kv_idx = torch.arange(n, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    allowed_per_block = torch.empty(blocks, blocks, dtype=torch.long, device=device)
    for row in range(blocks):
        q_idx = torch.arange(row * block_size, (row + 1) * block_size, device=device)[:, None]
        allowed = torch.as_tensor(mask_mod(zero, zero, q_idx, kv_idx)).expand(block_size, n)
        allowed_per_block[row] = allowed.reshape(block_size, blocks, block_size).sum(dim=(0, 2))
    full = allowed_per_block == block_size * block_size
    partial = (allowed_per_block > 0) & ~full

    def counts_and_indices(kept: torch.Tensor):
        # kept block columns first, in increasing order (stable sort of a 0/1 key)
        order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices
        return kept.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(*counts_and_indices(partial), *counts_and_indices(full), BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


ATTENTION_IMPLS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": _sdpa,
}


def attention_impl(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Attention implementations measured in chapter 1: ``"naive"`` (textbook, O(N^2) memory) or
    ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``, a fused kernel where one exists)."""
    from dldna.attention.reference import naive_attention

    impls = {"naive": naive_attention, **ATTENTION_IMPLS}
    if name not in impls:
        raise ValueError(f"impl must be one of {sorted(impls)}, got {name!r}")
    return impls[name]


def measure_attention_scaling(
    seq_lengths: Sequence[int],
    impl: str = "naive",
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    progress: bool = False,
) -> list[dict]:
    """Measure time and peak memory of one attention call for each sequence length.

    Returns one dict per length: ``seq_len``, ``seconds`` (median), ``peak_mb`` (peak allocated during the call,
    inputs excluded), ``scores_mb`` (size of one ``(B, H, N, N)`` score matrix, the theoretical O(N^2) term) and
    ``status`` (``"ok"`` or ``"out of memory"``; OOM rows carry NaN numbers).
    """
    if not seq_lengths or any(int(n) <= 0 for n in seq_lengths):
        raise ValueError(f"seq_lengths must be a non-empty list of positive ints, got {seq_lengths!r}")
    for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim), ("repeats", repeats)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    fn = attention_impl(impl)
    dev = torch.device(device)
    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    lengths = list(seq_lengths)
    if progress:
        from tqdm.auto import tqdm

        lengths = tqdm(lengths, desc=f"{impl} attention")
    for n in lengths:
        n = int(n)
        row = {"seq_len": n, "scores_mb": batch * heads * n * n * element / MB}
        try:
            gen = torch.Generator(device=dev).manual_seed(n)
            q, k, v = (torch.randn(batch, heads, n, head_dim, device=dev, dtype=dtype, generator=gen) for _ in range(3))
            row["peak_mb"] = peak_memory_mb(lambda: fn(q, k, v), device=dev)
            row["seconds"] = time_fn(lambda: fn(q, k, v), warmup=1, repeats=repeats, device=dev)
            row["status"] = "ok"
        except torch.OutOfMemoryError:
            row.update(peak_mb=float("nan"), seconds=float("nan"), status="out of memory")
        finally:
            q = k = v = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def growth_table(rows: Sequence[dict], exponent: float = 2.0) -> list[dict]:
    """Measured growth of time and memory relative to the first row, beside the theoretical ``(N/N0)^exponent``."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    if not ok:
        raise ValueError("rows holds no successful measurement")
    base = ok[0]
    return [
        {
            "seq_len": r["seq_len"],
            "theory": (r["seq_len"] / base["seq_len"]) ** exponent,
            "memory": r["peak_mb"] / base["peak_mb"],
            "time": r["seconds"] / base["seconds"],
        }
        for r in ok
    ]
