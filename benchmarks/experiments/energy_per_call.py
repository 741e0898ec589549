"""Energy per call: ours against the peer on a few benchmark rows, each run back to back for a few seconds.

Under a long load an H200 holds its board at the 700 W power cap by lowering the SM clock, and dldna's kernels,
which draw more power than FlexAttention's, get the lower clock (chapter 5, "Rows and kernels"). Whether that is
because they do their work faster or because the same work costs them more energy, the energy per call says:
each implementation runs its row's call in a loop (no cache flush between calls) for ``--seconds``, and the
board's energy counter (NVML, ``nvmlDeviceGetTotalEnergyConsumption``, in mJ) is read before and after. Also
reported: ms per call, mean power and the SM clock NVML reads at the end. Our kernels run on the configs that won
each row in ``results/flash_attention_bench.json`` (forced: nothing is tuned).

    PYTHONPATH=$PWD python benchmarks/experiments/energy_per_call.py --rows window:128:16384 --out energy.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.attention import BenchRow, allow_flex_recompiles, allowed_pairs, pass_call, problem  # noqa: E402
from benchmarks.experiments.ab_kernels import force_winners, parse_rows, save_rows  # noqa: E402
from dldna.kernels import flash_triton  # noqa: E402


def measure(step, inputs, seconds: float, nvml, handle) -> dict:
    """Run ``step`` back to back for ``seconds``; ms per call, J per call, mean W and the SM clock at the end."""
    def call():
        for t in inputs:
            t.grad = None
        step()

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    calls, t0 = 0, time.perf_counter()
    e0 = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            call()
        calls += 10
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    joules = (nvml.nvmlDeviceGetTotalEnergyConsumption(handle) - e0) / 1000.0
    clock = nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)
    return {"ms_per_call": 1000.0 * elapsed / calls, "joules_per_call": joules / calls, "watts": joules / elapsed,
            "sm_clock_mhz_at_end": clock, "calls": calls}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=None, help="mask:head_dim:n (default: ab_kernels.ROWS)")
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import pynvml as nvml  # nvidia-ml-py

    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    allow_flex_recompiles()
    record = json.load(open("results/flash_attention_bench.json"))
    rows, start = [], time.time()
    for mask, d, n in parse_rows(args.rows):
        force_winners(flash_triton, record, mask, d, n)
        row = BenchRow(mask, d, n)
        inputs = (row.q, row.k, row.v)
        b, h = problem(n, d)
        flops_fwd = 4.0 * d * b * h * allowed_pairs(n, mask)
        for pass_name in args.passes:
            for r in range(args.rounds):
                impls = ["dldna", row.peer] if r % 2 == 0 else [row.peer, "dldna"]
                for impl in impls:
                    result = measure(pass_call(row.fns[impl], pass_name, row.grad), inputs, args.seconds, nvml, handle)
                    flops = flops_fwd * (1.0 if pass_name == "fwd" else 3.5)
                    result.update({"mask": mask, "d": d, "n": n, "impl": impl, "pass": pass_name, "round": r,
                                   "tflop_per_joule": flops / result["joules_per_call"] / 1e12})
                    print(f"[{time.time() - start:6.1f}s] {mask} d={d} n={n} {impl:10s} {pass_name:7s} round {r}: "
                          f"{result['ms_per_call']:.4f} ms, {result['joules_per_call']:.4f} J, "
                          f"{result['watts']:.0f} W, {result['sm_clock_mhz_at_end']} MHz, "
                          f"{result['tflop_per_joule']:.3f} TFLOP/J", flush=True)
                    rows.append(result)
        del row, inputs
        torch.cuda.empty_cache()
        if args.out:
            save_rows(args.out, rows)
    flash_triton.restore_tuning()
    nvml.nvmlShutdown()


if __name__ == "__main__":
    main()
