"""Scratch: why some rows of ``benchmarks/attention.py`` time slower than the tuner timed the same kernel.

In the stored run of 2026-12-02, five forward rows took 4 to 11 % longer than the tuner's ``do_bench`` of the
kernel they ran, seconds earlier in the same process. For each case this script, in one process:

1. times the row exactly as the benchmark does (``BenchRow.time``; its first call tunes the forward);
2. times the same row three more times;
3. times the bare launch three times (``flash_triton.attention_forward``: no checks, no autograd Function);
4. reads the tuner's own time of the config it picked.

If only (1) is slow, the row after tuning is; if (1) and (2) are slow and (3) is not, the wrapper is.

    PYTHONPATH=$PWD python benchmarks/experiments/row_vs_tuner.py --out $OUT/row_vs_tuner.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.ab_kernels import save_rows  # noqa: E402
from benchmarks.attention import WINDOW, BenchRow  # noqa: E402
from dldna.kernels import flash_triton as ft  # noqa: E402

CASES = [("window", 128, 16384), ("window", 128, 65536), ("window", 64, 65536)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for mask, d, n in CASES:
        case = BenchRow(mask, d, n)
        start = len(ft.TUNING_LOG)
        row = {"mask": mask, "d": d, "n": n, "row_first": case.time("dldna", "fwd")}
        tuned = [e for e in ft.TUNING_LOG[start:] if e.get("kernel") == "fwd" and "best" in e][-1]
        row["tuner_best"] = min(tuned["times_ms"].values())
        row["config"] = tuned["best"]
        row["row_again"] = [case.time("dldna", "fwd") for _ in range(3)]
        q, k, v = case.q, case.k, case.v
        band = (-(WINDOW - 1), 0)
        with torch.no_grad():
            row["bare"] = [triton.testing.do_bench(lambda: ft.attention_forward(q, k, v, *band, 1 / math.sqrt(d)),
                                                   return_mode="median") for _ in range(3)]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del case
        torch.cuda.empty_cache()
    if args.out:
        save_rows(args.out, rows)


if __name__ == "__main__":
    main()
