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

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.attention import _inputs, allowed_pairs, make_fns, problem, time_pass  # noqa: E402
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
        q, k, v = _inputs(d, n, seed=n + d)
        grad = torch.randn_like(q)
        ft.restore_tuning()
        report.force_tuned_configs(record, mask, d, n)
        fns = make_fns(mask, d, n, q, k, v)
        peer = "flex" if mask == "window" else "sdpa_cudnn"

        def time_fwd(fn):
            return time_pass(fn, "fwd", grad, (q, k, v))

        def time_fwd_bwd(fn):
            return time_pass(fn, "fwd+bwd", grad, (q, k, v))

        def outputs():
            for t in (q, k, v):
                t.grad = None
            out = fns["dldna"]()
            out.backward(grad)
            return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]

        reference = outputs()
        time_fwd(fns["dldna"])  # heat the GPU to its steady clock
        row = {"mask": mask, "d": d, "n": n, "flops": 4.0 * d * b * h * allowed_pairs(n, mask)}
        for name, caps in VARIANTS:
            CAP.update(dict.fromkeys(CAP), **caps)
            row[name + "_err"] = max(((x - r).norm() / r.norm()).item() for x, r in zip(outputs(), reference))
            if "fwd" in caps or name == "base":
                row[name + "_fwd"] = time_fwd(fns["dldna"])
            if mask == "window":
                row[name + "_fwdbwd"] = time_fwd_bwd(fns["dldna"])
            print(name, {key: round(val, 4) for key, val in row.items() if key.startswith(name)}, flush=True)
        CAP.update(dict.fromkeys(CAP))
        row[peer + "_fwd"] = time_fwd(fns[peer])
        if mask == "window":
            row[peer + "_fwdbwd"] = time_fwd_bwd(fns[peer])
        row["base_fwd_again"] = time_fwd(fns["dldna"])
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
