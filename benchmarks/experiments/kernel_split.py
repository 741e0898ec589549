"""Each kernel's own time (forward, dQ, dK/dV) for several versions of ``flash_triton.py`` and several window sizes.

Where does a sliding window's backward lose against a causal one? At causal 16k, D = 128 the dQ kernel computes
its three matrix products at 630 TFLOP/s; on the window 1024 it reaches 440. A program's fixed costs (its prologue:
loading Q, dO, O and computing delta; its epilogue; the partly masked edge steps; the launch) are the same for
every window, while the full steps grow with it. So the kernels are timed at several windows, on the
configs that won the window 1024 row in ``results/flash_attention_bench.json`` (forced, nothing is tuned), and a
line ``t = fixed + per_key * window`` is fitted per kernel: ``fixed / t(1024)`` is the share of the time a
longer loop would not dilute.

Kernel times come from ``torch.profiler`` (device time of each launch, the L2 flushed between iterations as
``do_bench`` does), the versions in a rotating order over ``--rounds`` rounds (median round). Every version's
outputs and gradients are compared with the first (baseline) file's; ablation versions that skip work on purpose
(to measure what it costs) are expected to differ and are marked so by their file name (``ablate_*``).

    PYTHONPATH=$PWD python benchmarks/experiments/kernel_split.py base.py variant.py --d 128 --out split.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.attention import problem  # noqa: E402
from benchmarks.experiments.ab_kernels import KERNELS, load_module, max_abs_diff, save_rows, use_version  # noqa: E402

fa = importlib.import_module("dldna.kernels.flash_attention")  # the module (the package exports its function)


def kernel_ms(step, iters: int, flush: torch.Tensor) -> dict[str, float]:
    """Mean device ms per launch of each of our kernels over ``iters`` calls of ``step``, with ``flush`` (a buffer
    larger than the L2) zeroed before each."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            step()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        for kernel, name in KERNELS.items():
            if event.key == name:
                total = getattr(event, "device_time_total", None) or event.cuda_time_total
                totals[kernel] = total / event.count / 1000.0
    return totals


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; returns ``(a, b)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="flash_triton.py files; the first is the baseline")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--windows", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = [os.path.basename(p).removesuffix(".py") for p in args.modules]
    versions = {name: load_module(p, f"flash_split_{i}") for i, (name, p) in enumerate(zip(names, args.modules))}
    record = json.load(open("results/flash_attention_bench.json"))
    b, h = problem(args.n, args.d)
    gen = torch.Generator(device="cuda").manual_seed(args.n + args.d)
    q, k, v = (torch.randn(b, h, args.n, args.d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    grad = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    rows, start = [], time.time()
    for window in args.windows:
        def step():
            for t in (q, k, v):
                t.grad = None
            fa.flash_attention(q, k, v, causal=True, window=window).backward(grad)

        row = {"d": args.d, "n": args.n, "batch": b, "heads": h, "window": window, "ms": {}, "max_abs_diff": {}}
        outputs = {}
        for name in names:
            use_version(versions[name], record, "window", args.d, args.n)
            for t in (q, k, v):
                t.grad = None
            out = fa.flash_attention(q, k, v, causal=True, window=window)
            out.backward(grad)
            outputs[name] = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
            row["max_abs_diff"][name] = max_abs_diff(outputs[name], outputs[names[0]])
        del outputs
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                use_version(versions[name], record, "window", args.d, args.n)
                for kernel, ms in kernel_ms(step, args.iters, flush).items():
                    row["ms"].setdefault(name, {}).setdefault(kernel, []).append(ms)
        medians = {name: {kern: round(sorted(ms)[len(ms) // 2], 4) for kern, ms in per.items()}
                   for name, per in row["ms"].items()}
        print(f"[{time.time() - start:6.1f}s] window {window}", json.dumps(medians), json.dumps(row["max_abs_diff"]),
              flush=True)
        row["median_ms"] = medians
        rows.append(row)
        if args.out:
            save_rows(args.out, rows)
    fits = {}
    for name in names:
        for kernel in KERNELS:
            ys = [row["median_ms"][name].get(kernel) for row in rows]
            if None in ys or len(ys) < 2:
                continue
            fixed, per_key = fit_line([row["window"] for row in rows], ys)
            at_1024 = fixed + per_key * 1024
            fits.setdefault(name, {})[kernel] = {"fixed_ms": fixed, "per_1024_keys_ms": per_key * 1024,
                                                 "fixed_share_at_1024": fixed / at_1024}
    print(json.dumps(fits, indent=1))
    if args.out:
        save_rows(args.out, rows + [{"fits": fits}])
    fa._kernels = versions[names[0]]


if __name__ == "__main__":
    main()
