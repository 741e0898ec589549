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
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.ab_kernels import save_rows  # noqa: E402
from benchmarks.attention import BenchRow  # noqa: E402
from dldna.kernels import report  # noqa: E402

FIELDS = ["clocks.sm", "power.draw", "temperature.gpu"]
REASONS = ["clocks_event_reasons.active", "clocks_throttle_reasons.active"]  # newer name first


class Sampler:
    """``nvidia-smi`` samples ``(time, clock MHz, power W, temperature C, limit reasons)`` every 50 ms."""

    def __init__(self):
        reason = next(r for r in REASONS if subprocess.run(
            ["nvidia-smi", f"--query-gpu={r}", "--format=csv,noheader"], capture_output=True).returncode == 0)
        self.samples = []
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(FIELDS + [reason])}",
                                      "--format=csv,noheader,nounits", "-lms=50"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.time(), float(parts[0]), float(parts[1]), float(parts[2]), parts[3]))
            except (ValueError, IndexError):
                continue

    def between(self, t0, t1):
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {}
        return {"sm_clock_mhz": statistics.median(s[1] for s in inside),
                "power_w": statistics.median(s[2] for s in inside), "temp_c": max(s[3] for s in inside),
                "reasons": sorted({s[4] for s in inside})}


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
    sampler, rows = Sampler(), []
    for r in range(args.rounds):
        for impl in ("dldna", case.peer):
            for call in range(args.calls):
                t0 = time.time()
                ms = case.time(impl, "fwd")
                row = {"round": r, "impl": impl, "call": call, "ms": ms, **sampler.between(t0, time.time())}
                print(json.dumps(row), flush=True)
                rows.append(row)
    sampler.proc.terminate()
    if args.out:
        save_rows(args.out, rows)


if __name__ == "__main__":
    main()
