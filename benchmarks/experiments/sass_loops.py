"""Instructions per loop step of the FlashAttention kernels, compiled for sm_90a without a GPU, for two versions.

For each row of ``ab_kernels.ROWS``, each of the three kernels is compiled with the config that won the row in
``results/flash_attention_bench.json``, as the benchmark launches it (``flash_compile_report.compile_one``), once
from a baseline module file and once from the working tree's ``flash_triton``. Printed and saved: registers, spills
and, for every loop over tiles (``tile_loops``, in code order: for the forward and dQ, left window edge, full
tiles, diagonal; for dK/dV, full tiles, then masked), the instruction count of one step and its most common
opcodes, per warp. Run it with the device's Triton (3.6 for the stored benchmark run: ``pip install triton==3.6.0``
in a separate environment works on a CPU), since another version may compile differently.

    git show HEAD:dldna/kernels/flash_triton.py > /tmp/flash_triton_base.py
    PYTHONPATH=$PWD python benchmarks/experiments/sass_loops.py --baseline /tmp/flash_triton_base.py --out x.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import triton

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.ab_kernels import ROWS, load_module  # noqa: E402
from benchmarks.experiments.sass_sparse_dkdv import loops, opcode, opcode_counts  # noqa: E402
from benchmarks.flash_compile_report import compile_one  # noqa: E402
from dldna.kernels import flash_triton, report  # noqa: E402

FLAGS = {"window": (True, True), "causal": (False, True)}  # (HAS_LO, HAS_HI) of the forward and dQ kernels


def tile_loops(sass: str) -> list[tuple[int, dict]]:
    """(instructions, top opcodes) of each loop over tiles, in code order: a loop closed by a conditional branch
    that issues tensor-core MMAs. (An unconditional backward branch returns from a retry stub of an mbarrier wait
    into the middle of a loop; it closes no loop.)"""
    return [(len(body), opcode_counts(body)) for body in _tile_loop_bodies(sass)]


def _tile_loop_bodies(sass: str) -> list[list[str]]:
    """The instructions of each loop over tiles, as ``tile_loops`` defines them, in code order."""
    return [body for _, _, body in sorted(loops(sass))
            if body[-1].startswith("@") and any(t.startswith("HGMMA") for t in body)]


def mma_among_exponentials(sass: str) -> list[int]:
    """For each loop of ``tile_loops`` (same order): how many tensor-core MMAs (``HGMMA``) are issued between its
    first and last exponential (``MUFU.EX2``), i.e. run while the exponentials do (0 if it has fewer than two)."""
    counts = []
    for body in _tile_loop_bodies(sass):
        ops = [opcode(t) for t in body]
        ex2 = [i for i, op in enumerate(ops) if op.startswith("MUFU.EX2")]
        counts.append(sum(op.startswith("HGMMA") for op in ops[ex2[0]:ex2[-1]]) if len(ex2) > 1 else 0)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="path of the baseline flash_triton.py")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    versions = {"base": load_module(args.baseline, "flash_triton_base"), "new": flash_triton}
    record = json.load(open("results/flash_attention_bench.json"))
    rows = []
    for mask, d, n in ROWS:
        for kernel, fields in report.tuned_configs(record, mask, d, n).items():
            flags = FLAGS[mask][::-1] if kernel == "dkdv" else FLAGS[mask]  # dK/dV sees the band from the keys
            row = {"mask": mask, "head_dim": d, "n": n, "kernel": kernel, "config": fields}
            for name, module in versions.items():
                fn = {"fwd": module._attn_fwd, "dq": module._attn_bwd_dq, "dkdv": module._attn_bwd_dkdv}[kernel]
                info = compile_one(fn, "bf16", d, module.KernelConfig(**fields), flags, kernels=module, sass=True)
                row[name] = {"registers": info["registers"], "spill_store_bytes": info["spill_store_bytes"],
                             "loops": tile_loops(info.pop("sass"))}
            print(json.dumps({k: v for k, v in row.items() if k != "config"} | {
                name: [row[name]["registers"], [size for size, _ in row[name]["loops"]]] for name in versions}),
                flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"target": "sm_90a, compiled without a GPU", "triton": triton.__version__,
                       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
