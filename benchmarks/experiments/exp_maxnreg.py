"""Scratch: cap the registers per thread (Triton's ``maxnreg``) so that more programs share an SM.

The window forward at D=64 (64 x 64 tiles, 4 warps) uses 107 registers, which allows four programs per SM; at 96
there is room for five. The dK/dV kernel (210 registers) fits two programs, at 168 three. Each variant caps one of
the three kernels, on the configs of the stored benchmark run, and is timed like a benchmark row; the error column
compares its output and gradients with the uncapped kernels' (a cap changes the register allocation, not the
arithmetic, so it should read 0).

    PYTHONPATH=$PWD python benchmarks/experiments/exp_maxnreg.py     # logs/exp_maxnreg.log, logs/exp_maxnreg.json
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
from benchmarks.attention import BenchRow, allowed_pairs, problem  # noqa: E402
from dldna.kernels import flash_triton as ft  # noqa: E402
from dldna.kernels import report  # noqa: E402

CAP = {"fwd": None, "dq": None, "dkdv": None}
KERNELS = {"fwd": "_attn_fwd", "dq": "_attn_bwd_dq", "dkdv": "_attn_bwd_dkdv"}
ORIGINAL = {kind: getattr(ft, name) for kind, name in KERNELS.items()}


class Capped:
    """Stands in for a kernel in ``flash_triton``'s namespace; its launches add ``maxnreg=CAP[kind]``."""

    def __init__(self, kind):
        self.kind = kind

    def __getitem__(self, grid):
        launch = ORIGINAL[self.kind][grid]
        cap = CAP[self.kind]
        return launch if cap is None else (lambda *a, **k: launch(*a, maxnreg=cap, **k))


VARIANTS = ([("base", {})] + [(f"fwd{c}", {"fwd": c}) for c in (104, 96, 88, 80, 72)]
            + [(f"dkdv{c}", {"dkdv": c}) for c in (200, 184, 168, 160, 128)]
            + [(f"dq{c}", {"dq": c}) for c in (120, 104, 96)])


def main():
    for kind, name in KERNELS.items():
        setattr(ft, name, Capped(kind))
    record = json.load(open("results/flash_attention_bench.json"))
    rows = []
    for mask, d, n in [("window", 64, 4096), ("window", 64, 16384), ("window", 64, 65536), ("causal", 64, 4096)]:
        b, h = problem(n, d)
        case = BenchRow(mask, d, n)
        ft.restore_tuning()
        report.force_tuned_configs(record, mask, d, n)

        def outputs():
            return [x.float() for x in case.outputs()]

        reference = outputs()
        case.time("dldna", "fwd")  # heat the GPU to its steady clock
        row = {"mask": mask, "d": d, "n": n, "flops": 4.0 * d * b * h * allowed_pairs(n, mask)}
        for name, caps in VARIANTS:
            CAP.update(dict.fromkeys(CAP), **caps)
            row[name + "_err"] = max(((x - r).norm() / r.norm()).item() for x, r in zip(outputs(), reference))
            if "fwd" in caps or name == "base":
                row[name + "_fwd"] = case.time("dldna", "fwd")
            if mask == "window":
                row[name + "_fwdbwd"] = case.time("dldna", "fwd+bwd")
            print(name, {key: round(val, 4) for key, val in row.items() if key.startswith(name)}, flush=True)
        CAP.update(dict.fromkeys(CAP))
        row[case.peer + "_fwd"] = case.time(case.peer, "fwd")
        if mask == "window":
            row[case.peer + "_fwdbwd"] = case.time(case.peer, "fwd+bwd")
        row["base_fwd_again"] = case.time("dldna", "fwd")
        print(json.dumps(row), flush=True)
        rows.append(row)
    compiled = [{"kernel": kind, "registers": c.n_regs, "spills": c.n_spills, "shared": c.metadata.shared,
                 "warps": c.metadata.num_warps, "stages": c.metadata.num_stages,
                 "maxnreg": getattr(c.metadata, "maxnreg", None)}
                for kind, kernel in ORIGINAL.items() for cache in kernel.device_caches.values()
                for c in cache[0].values()]
    for c in compiled:
        print("compiled", c)
    out = os.environ.get("OUT", "benchmarks/experiments/logs")
    with open(os.path.join(out, "exp_maxnreg.json"), "w") as f:
        json.dump({"rows": rows, "compiled": compiled}, f, indent=1)


if __name__ == "__main__":
    main()
