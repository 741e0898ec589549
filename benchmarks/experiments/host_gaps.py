"""How much of a benchmark row is the GPU waiting for the host? Each row timed eagerly and as a CUDA graph replay.

``benchmarks/attention.py`` times a row with ``do_bench``: the L2 is flushed, a start event is recorded, the call
runs, an end event is recorded. Whenever the host has not yet launched the next kernel when the GPU finishes the
previous one, the GPU idles, and that idle time is in the row. A CUDA graph replays the same kernels without the
host in between, so ``eager - graph`` bounds what faster host code could save. The kernels' own device time
(``torch.profiler``, same flushes) gives the remaining gaps. Our kernels run on the configs that won each row in
``results/flash_attention_bench.json`` (forced: nothing is tuned); the peer is FlexAttention (windows) or cuDNN
(causal). Forward rows run under ``no_grad``, forward+backward rows as ``fn().backward(grad)`` with the
gradients cleared before each call, both as the benchmark does.

    PYTHONPATH=$PWD python benchmarks/experiments/host_gaps.py --rows window:128:16384 --out gaps.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.getcwd())
from benchmarks.attention import BenchRow, pass_call  # noqa: E402
from benchmarks.experiments.ab_kernels import force_winners, parse_rows, save_rows  # noqa: E402
from dldna.kernels import flash_triton  # noqa: E402


def graph_of(step, inputs):
    """``step`` captured in a CUDA graph (after warm-up calls on a side stream, as PyTorch's docs do it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in inputs:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in inputs:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def device_ms(step, inputs, iters: int, flush: torch.Tensor) -> dict[str, float]:
    """Per call: the summed device time of the kernels ``step`` launches, and the span from the end of the L2 flush
    to the end of the last kernel (idle time included), medians over ``iters`` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for t in inputs:
                t.grad = None
            flush.zero_()
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda e: e.time_range.start)
    calls, current = [], None
    for e in kernels:
        if "fill" in e.name.lower() and e.time_range.elapsed_us() > 20:  # the flush (a 256 MB zero_)
            current = {"flush_end": e.time_range.end, "busy": 0.0, "last_end": e.time_range.end, "kernels": 0,
                       "first_gap": None}
            calls.append(current)
        elif current is not None:
            if current["first_gap"] is None:
                current["first_gap"] = e.time_range.start - current["flush_end"]
            current["busy"] += e.time_range.elapsed_us()
            current["last_end"] = max(current["last_end"], e.time_range.end)
            current["kernels"] += 1

    def median(values):
        values = sorted(values)
        return values[len(values) // 2] / 1000.0

    return {"busy_ms": median([c["busy"] for c in calls]),
            "span_ms": median([c["last_end"] - c["flush_end"] for c in calls]),
            "first_gap_ms": median([c["first_gap"] or 0.0 for c in calls]),
            "kernels_per_call": sorted(c["kernels"] for c in calls)[len(calls) // 2]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=None, help="mask:head_dim:n (default: ab_kernels.ROWS)")
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--gluon", action="store_true",
                        help="also the Gluon kernels of gluon_fa3_*.py (Hopper only; causal and window rows)")
    args = parser.parse_args()
    record = json.load(open("results/flash_attention_bench.json"))
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    rows, start = [], time.time()
    for mask, d, n in parse_rows(args.rows):
        force_winners(flash_triton, record, mask, d, n)
        row = BenchRow(mask, d, n)
        inputs = (row.q, row.k, row.v)
        impls = ["dldna", row.peer]
        if args.gluon:
            from benchmarks.attention import WINDOW
            from benchmarks.experiments.gluon_fa3_dq import gluon_backward_combos

            row.fns.update(gluon_backward_combos(row, WINDOW if mask == "window" else None, (64, 2), (2, 2)))
            impls += ["gluon_fwd_gluon_bwd", "gluon_fwd_gluon_dkdv"]
        for impl in impls:
            for pass_name in args.passes:
                step = pass_call(row.fns[impl], pass_name, row.grad)
                result = {"mask": mask, "d": d, "n": n, "impl": impl, "pass": pass_name,
                          "eager_ms": [], "graph_ms": []}
                try:
                    graph = graph_of(step, inputs)
                except Exception as err:  # e.g. an implementation that cannot be captured
                    graph, result["graph_error"] = None, repr(err)[:300]
                for _ in range(args.rounds):
                    result["eager_ms"].append(triton.testing.do_bench(step, grad_to_none=list(inputs),
                                                                      return_mode="median"))
                    if graph is not None:
                        result["graph_ms"].append(triton.testing.do_bench(graph.replay, return_mode="median"))
                result["device"] = device_ms(step, inputs, args.iters, flush)
                eager, replay = min(result["eager_ms"]), min(result["graph_ms"] or [float("nan")])
                print(f"[{time.time() - start:6.1f}s] {mask} d={d} n={n} {impl:10s} {pass_name:7s} eager {eager:.4f} "
                      f"graph {replay:.4f} ({100 * (eager - replay) / eager:+.1f} %) device busy "
                      f"{result['device']['busy_ms']:.4f} span {result['device']['span_ms']:.4f} first gap "
                      f"{result['device']['first_gap_ms']:.4f}", flush=True)
                rows.append(result)
                del graph
        del row, inputs
        torch.cuda.empty_cache()
        if args.out:
            save_rows(args.out, rows)
    flash_triton.restore_tuning()


if __name__ == "__main__":
    main()
