"""The forward's rotated loop over full tiles (``rotated_full_tiles.patch``) against the shipped loop, on the same
forward config in one process: each (row, config) is timed with ``flash_triton.ROTATE_FULL_TILES`` off and on, in
alternating order over two rounds, and the two outputs are compared (the rotation does the same arithmetic in the
same order, so they should agree bit for bit). The dQ and dK/dV kernels are not involved (forward only).

    PYTHONPATH=$PWD python benchmarks/experiments/rotated_equal.py --out rotated_equal.json   # patch applied
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.attention import BenchRow, allowed_pairs, problem  # noqa: E402
from benchmarks.experiments.ab_kernels import save_rows  # noqa: E402
from dldna.kernels import flash_triton as ft  # noqa: E402

CASES = [("causal", 128, 16384, [(128, 64, 8, 3, 0), (128, 64, 8, 3, 1), (128, 64, 8, 2, 1)]),
         ("causal", 64, 4096, [(64, 64, 4, 2, 1), (128, 64, 8, 3, 1)]),
         ("window", 64, 4096, [(64, 64, 4, 2, 1)])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for mask, d, n, configs in CASES:
        b, h = problem(n, d)
        case = BenchRow(mask, d, n)
        flops = 4.0 * d * b * h * allowed_pairs(n, mask)
        for fields in configs:
            ft.force_config("fwd", ft.KernelConfig(*fields[:4], tma=bool(fields[4])))
            row = {"mask": mask, "d": d, "n": n, "config": fields}
            outs = {}
            for rotate in (False, True):
                ft.ROTATE_FULL_TILES = rotate
                with torch.no_grad():
                    outs[rotate] = case.fns["dldna"]().clone()
            row["max_abs_diff"] = (outs[True].float() - outs[False].float()).abs().max().item()
            for r in range(2):
                for rotate in ((False, True) if r % 2 == 0 else (True, False)):
                    ft.ROTATE_FULL_TILES = rotate
                    row.setdefault("rotated_ms" if rotate else "shipped_ms", []).append(case.time("dldna", "fwd"))
            row["tflops"] = {k: flops / min(row[k]) / 1e9 for k in ("shipped_ms", "rotated_ms")}
            print(json.dumps(row), flush=True)
            rows.append(row)
        ft.restore_tuning()
    if args.out:
        save_rows(args.out, rows)


if __name__ == "__main__":
    main()
