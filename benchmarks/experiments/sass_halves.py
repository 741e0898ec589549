"""Registers, spills, shared memory and the loops of the forward with two row halves, compiled for sm_90a.

Needs ``row_halves.patch`` applied (its ``KernelConfig.halves``); runs without a GPU, with the device's Triton (3.6).
Each case compiles ``_attn_fwd`` as the benchmark launches it (``flash_compile_report.compile_one``): a shipped winner
and the halves configs that the A/B runs of the experiments README timed beside it. Printed and saved per case: the
instructions of one step of each loop over tiles (``sass_loops.tile_loops``) and how many ``HGMMA``s each issues
among its exponentials (``sass_loops.mma_among_exponentials``).

    git apply benchmarks/experiments/row_halves.patch
    PYTHONPATH=$PWD python benchmarks/experiments/sass_halves.py --out benchmarks/experiments/logs/sass_halves.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import triton

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.sass_loops import FLAGS, mma_among_exponentials, tile_loops  # noqa: E402
from benchmarks.flash_compile_report import compile_one  # noqa: E402
from dldna.kernels import flash_triton as ft  # noqa: E402


def cases():
    """(mask, head_dim, config): per row, the shipped winner first, then the halves configs."""
    halves = dict(tma=True, halves=True)
    K = ft.KernelConfig
    return [("causal", 64, K(64, 128, 4, 2, tma=True)), ("causal", 64, K(128, 128, 4, 2, **halves)),
            ("causal", 64, K(128, 128, 4, 3, **halves)), ("causal", 64, K(128, 64, 4, 2, **halves)),
            ("causal", 64, K(128, 64, 4, 3, **halves)),
            ("causal", 128, K(128, 64, 8, 4)), ("causal", 128, K(128, 64, 4, 2, **halves)),
            ("causal", 128, K(128, 64, 4, 3, **halves)), ("causal", 128, K(128, 32, 4, 3, **halves)),
            ("causal", 128, K(256, 64, 8, 2, **halves)),
            ("window", 64, K(64, 64, 4, 2, tma=True)), ("window", 64, K(128, 64, 4, 3, **halves)),
            ("window", 128, K(64, 64, 4, 3, tma=True)), ("window", 128, K(128, 64, 4, 2, **halves))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for mask, d, cfg in cases():
        info = compile_one(ft._attn_fwd, "bf16", d, cfg, FLAGS[mask], sass=True)
        sass = info.pop("sass")
        info.update(mask=mask, loop_instructions=[n for n, _ in tile_loops(sass)],
                    mma_among_exponentials=mma_among_exponentials(sass))
        rows.append(info)
        print(json.dumps(info), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"target": "sm_90a, compiled without a GPU", "date": time.strftime("%Y-%m-%d"),
                       "triton": triton.__version__, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
