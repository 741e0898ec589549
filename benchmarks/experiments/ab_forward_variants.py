"""Forward A/B of several versions of ``dldna/kernels/flash_triton.py`` in one process (``ab_kernels.py`` times two,
forward and backward; this one times any number, forward only).

Each module file given is timed on every row with the forward config that won the row in
``results/flash_attention_bench.json``, the versions in a rotating order over ``--rounds`` rounds, beside the row's
peer (FlexAttention for windows, cuDNN for causal rows). The first file is the baseline: every other version's
output is compared with it (largest difference) and, on the first head of the first batch entry, all versions'
are compared with a float64 reference. The JSON keeps every round's ``do_bench`` median. ``--config
NAME@D=SPEC`` times version NAME (a file's name without ``.py``) at head_dim D on another forward config than the
stored winner: SPEC as ``ab_kernels.parse_extra`` reads it, ``bm,bn,warps,stages,tma`` followed by any
``field=value`` of ``KernelConfig`` (e.g. ``persistent=2``) and ``maxnreg=R`` (a Triton launch option). The same
file may be given under several names.

    PYTHONPATH=$PWD python benchmarks/experiments/ab_forward_variants.py base.py lazy.py --rounds 3 --out x.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.attention import WINDOW, BenchRow, allow_flex_recompiles, allowed_pairs, problem  # noqa: E402
from benchmarks.experiments.ab_kernels import (  # noqa: E402
    WithOptions, load_module, parse_extra, parse_rows, save_rows, use_version)
from dldna.attention import attention, sliding_window_mask  # noqa: E402

ROWS = [("window", 64, 4096), ("window", 64, 16384), ("window", 64, 65536), ("causal", 64, 4096),
        ("window", 128, 16384), ("causal", 128, 16384)]


def reference_error(out: torch.Tensor, case: BenchRow, mask: str) -> float:
    """Largest |out - float64 attention| over the first head of the first batch entry, relative to max |ref|
    (the reference: ``dldna.attention.attention``, with ``sliding_window_mask`` for windows)."""
    q, k, v = (t[:1, :1].double() for t in (case.q, case.k, case.v))
    if mask == "window":
        ref = attention(q, k, v, mask=sliding_window_mask(q.shape[2], WINDOW).to(q.device))
    else:
        ref = attention(q, k, v, causal=True)
    return ((out[:1, :1].double() - ref).abs().max() / ref.abs().max()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="flash_triton.py files; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", nargs="*", default=None, help="mask:head_dim:n (default: ROWS)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", nargs="*", default=[], help="NAME@D=SPEC: version NAME's forward config at D")
    args = parser.parse_args()
    allow_flex_recompiles()
    names = [os.path.basename(path).removesuffix(".py") for path in args.modules]
    versions = {name: load_module(path, f"flash_variant_{i}") for i, (name, path) in
                enumerate(zip(names, args.modules))}
    configs = {}  # (name, head_dim) -> (KernelConfig, maxnreg)
    for item in args.config:
        target, spec = item.split("=", 1)
        name, d = target.split("@")
        kernel, config, maxnreg = parse_extra(versions[name], spec)
        if kernel != "fwd":
            raise ValueError(f"--config sets forward configs only, got {item!r}")
        configs[(name, int(d))] = config, maxnreg
    plain_fwd = {name: module._attn_fwd for name, module in versions.items()}
    record = json.load(open("results/flash_attention_bench.json"))
    rows, start = [], time.time()
    for mask, d, n in parse_rows(args.rows, ROWS):
        b, h = problem(n, d)
        case = BenchRow(mask, d, n)

        def use(name):
            module = versions[name]
            use_version(module, record, mask, d, n)
            module._attn_fwd = plain_fwd[name]
            if (name, d) in configs:
                config, maxnreg = configs[(name, d)]
                module.force_config("fwd", config)
                if maxnreg:
                    module._attn_fwd = WithOptions(plain_fwd[name], maxnreg=maxnreg)

        row = {"mask": mask, "d": d, "n": n, "flops_fwd": 4.0 * d * b * h * allowed_pairs(n, mask),
               "configs": {name: repr(configs[(name, d)][0]) if (name, d) in configs else "stored winner"
                           for name in names}}
        outputs = {}
        for name in names:
            use(name)
            with torch.no_grad():
                outputs[name] = case.fns["dldna"]()
            row[f"ref_err {name}"] = reference_error(outputs[name], case, mask) if n <= 16384 else None
            row[f"max_abs_diff {name}"] = (outputs[name].float() - outputs[names[0]].float()).abs().max().item()
        del outputs
        case.time("dldna", "fwd")  # heat the GPU to its steady clock
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                use(name)
                row.setdefault(name, []).append(case.time("dldna", "fwd"))
            row.setdefault(case.peer, []).append(case.time(case.peer, "fwd"))
        for module in versions.values():
            module.restore_tuning()
        summary = {key: (round(sorted(val)[len(val) // 2], 4) if isinstance(val, list) else val)
                   for key, val in row.items()}
        print(f"[{time.time() - start:6.1f}s] medians", json.dumps(summary), flush=True)
        rows.append(row)
        if args.out:
            save_rows(args.out, rows)


if __name__ == "__main__":
    main()
