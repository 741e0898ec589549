"""Scratch: how one kernel's ``do_bench`` time drifts over consecutive calls, with the GPU's clock, power,
temperature and clock-limit reasons sampled by ``nvidia-smi`` over each call.

``row_vs_tuner.py`` timed dldna's window forward at N = 64k, D = 64 at 1.56, 1.65 and 1.69 ms in three calls in a
row. Here dldna's forward (the stored run's config, forced) and FlexAttention's take turns: ``--calls`` consecutive
``do_bench`` calls of one, then of the other, for ``--rounds`` rounds, each call with the medians of the samples
taken during it.

    PYTHONPATH=$PWD python benchmarks/experiments/drift.py --out $OUT/drift.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.ab_kernels import save_rows  # noqa: E402
from benchmarks.attention import BenchRow  # noqa: E402
from dldna.bench import GpuMonitor  # noqa: E402
from dldna.kernels import report  # noqa: E402

FIELDS = ("clocks.sm", "power.draw", "temperature.gpu")
REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # what limits the clock; newer name first


def limit_reason_field() -> str:
    """The name this driver's ``nvidia-smi`` knows for the clock-limit reasons."""
    return next(r for r in REASONS if subprocess.run(["nvidia-smi", f"--query-gpu={r}", "--format=csv,noheader"],
                                                     capture_output=True, timeout=30).returncode == 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="window:64:65536")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mask, d, n = args.case.split(":")
    d, n = int(d), int(n)
    report.force_tuned_configs(json.load(open("results/flash_attention_bench.json")), mask, d, n)
    case = BenchRow(mask, d, n)
    for impl in ("dldna", case.peer):
        case.time(impl, "fwd", rep_ms=20)  # compile and warm up
    rows = []
    with GpuMonitor(interval_ms=50, fields=FIELDS + (limit_reason_field(),)) as gpu:
        for r in range(args.rounds):
            for impl in ("dldna", case.peer):
                for call in range(args.calls):
                    t0 = time.time()
                    ms = case.time(impl, "fwd")
                    row = {"round": r, "impl": impl, "call": call, "ms": ms, **gpu.between(t0, time.time())}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.out:
        save_rows(args.out, rows)


if __name__ == "__main__":
    main()
