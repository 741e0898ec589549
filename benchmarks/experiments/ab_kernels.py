"""A/B: two versions of ``dldna/kernels/flash_triton.py`` timed in one process, on the same inputs and configs.

The baseline is a copy of the module from another commit; the candidate is the working tree's. Each row is timed
for both versions on the config that won that row in ``results/flash_attention_bench.json`` (so nothing is
tuned), in alternating order over ``--rounds`` rounds, beside FlexAttention (windows) or cuDNN (causal). Both
versions' outputs and q/k/v gradients are compared with each other: a change that only drops checks that cannot
fail must give the same numbers bit for bit. ``--extra`` adds configs to time on the candidate: forward ones
(``bm,bn,warps,stages,tma[,maxnreg]``, timed forward only) or, prefixed ``dq:`` or ``dkdv:``, backward ones (timed
forward+backward, the other kernels on the row's winners); each is also checked against the candidate. The JSON
keeps every round's ``do_bench`` median; the printed line (and the experiments README) gives the fastest round.

    git show 64b8023:dldna/kernels/flash_triton.py > /tmp/flash_triton_base.py
    PYTHONPATH=$PWD python benchmarks/experiments/ab_kernels.py --baseline /tmp/flash_triton_base.py --out ab.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.getcwd())
from benchmarks.attention import BenchRow, allow_flex_recompiles, allowed_pairs, problem  # noqa: E402
from dldna.kernels import report  # noqa: E402

fa = importlib.import_module("dldna.kernels.flash_attention")  # the module (the package exports its function)

ROWS = [("window", 64, 4096), ("window", 64, 16384), ("window", 64, 65536), ("window", 128, 4096),
        ("window", 128, 16384), ("window", 128, 65536), ("causal", 64, 4096), ("causal", 128, 16384)]


def load_module(path: str, name: str):
    """Import the file at ``path`` as module ``name`` (a second copy of flash_triton beside the package's)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def force_winners(module, record, mask, d, n):
    """Force ``module``'s three kernels onto the configs that won this row in the stored run (the BigBird row: 64 x 64
    tiles, 4 warps, 3 stages, which won all three kernels in the runs of 64b8023 and 19b22ff)."""
    module.restore_tuning()
    if mask == "bigbird":
        for kernel in ("fwd", "dq", "dkdv"):
            module.force_config(kernel, module.KernelConfig(64, 64, 4, 3))
    else:
        report.force_tuned_configs(record, mask, d, n, kernels=module)


def use_version(module, record, mask, d, n) -> None:
    """Put ``module``'s kernels behind ``flash_attention``, forced onto the configs that won this row."""
    fa._kernels = module
    force_winners(module, record, mask, d, n)


def parse_rows(specs, default=ROWS) -> list[tuple[str, int, int]]:
    """``mask:head_dim:n`` strings as ``(mask, d, n)``; ``default`` if there are none."""
    return [(m, int(d), int(n)) for m, d, n in (r.split(":") for r in specs)] if specs else default


def max_abs_diff(tensors, others) -> float:
    """Largest elementwise difference between two lists of tensors (outputs and gradients), pair by pair."""
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(tensors, others))


KERNELS = {"fwd": "_attn_fwd", "dq": "_attn_bwd_dq", "dkdv": "_attn_bwd_dkdv"}


def save_rows(path: str, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` as JSON with the device, date, versions and command line."""
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                   "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
                   "rows": rows}, f, indent=1)


def parse_extra(module, spec: str):
    """``[dq:|dkdv:]bm,bn,warps,stages,tma[,maxnreg]`` -> (kernel, KernelConfig, maxnreg or None). After ``tma``,
    ``field=value`` items set other ``KernelConfig`` fields and ``maxnreg=R`` the launch option."""
    kernel, _, fields = spec.rpartition(":")
    values = fields.split(",")
    named = dict(item.split("=") for item in values[5:] if "=" in item)
    plain = [item for item in values[5:] if "=" not in item]
    maxnreg = named.pop("maxnreg", plain[0] if plain else None)
    config = module.KernelConfig(*map(int, values[:4]), tma=values[4] == "1", **{k: int(v) for k, v in named.items()})
    return kernel or "fwd", config, int(maxnreg) if maxnreg else None


class WithOptions:
    """Stands in for a kernel of a flash_triton module; its launches add Triton launch options (``maxnreg``)."""

    def __init__(self, kernel, **options):
        self.kernel, self.options = kernel, options

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **self.options, **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="path of the baseline flash_triton.py")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[],
                        help="[dq:|dkdv:]block_m,block_n,warps,stages,tma[,maxnreg] (default kernel: fwd)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", nargs="*", default=None, help="mask:head_dim:n (default: ROWS); bigbird:64:16384 "
                        "times block_sparse_flash_attention")
    args = parser.parse_args()
    allow_flex_recompiles()
    versions = {"base": load_module(args.baseline, "flash_triton_base"), "new": fa._kernels}
    extra = [parse_extra(fa._kernels, spec) for spec in args.extra]
    record = json.load(open("results/flash_attention_bench.json"))
    rows, start = [], time.time()
    for mask, d, n in parse_rows(args.rows):
        b, h = problem(n, d)
        case = BenchRow(mask, d, n)

        def use(name):
            use_version(versions[name], record, mask, d, n)

        results = {}
        for name in versions:
            use(name)
            results[name] = case.outputs()
        pairs = allowed_pairs(n, mask) if mask != "bigbird" else None  # (the layout's pairs: attention.py)
        row = {"mask": mask, "d": d, "n": n, "flops_fwd": pairs and 4.0 * d * b * h * pairs,
               "max_abs_diff": max_abs_diff(results["base"], results["new"])}
        case.time("dldna", "fwd")  # heat the GPU to its steady clock
        for r in range(args.rounds):
            for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                use(name)
                row.setdefault(f"{name}_fwd", []).append(case.time("dldna", "fwd"))
                row.setdefault(f"{name}_fwdbwd", []).append(case.time("dldna", "fwd+bwd"))
            row.setdefault(f"{case.peer}_fwd", []).append(case.time(case.peer, "fwd"))
            row.setdefault(f"{case.peer}_fwdbwd", []).append(case.time(case.peer, "fwd+bwd"))
        use("new")  # (also without extras: the restore_tuning below is the candidate's)
        for kernel, cfg, maxnreg in extra:
            use("new")  # the row's winners, then this one config
            fa._kernels.force_config(kernel, cfg)
            name = ("" if kernel == "fwd" else f"{kernel} ") + f"{cfg}" + (f" maxnreg={maxnreg}" if maxnreg else "")
            pass_name = "fwd" if kernel == "fwd" else "fwd+bwd"
            function = KERNELS[kernel]
            original = getattr(fa._kernels, function)
            if maxnreg:
                setattr(fa._kernels, function, WithOptions(original, maxnreg=maxnreg))
            key = f"new_{pass_name.replace('+', '')} {name}"
            try:
                row[key] = case.time("dldna", pass_name)
                checked = case.outputs()[:1 if kernel == "fwd" else None]  # zip stops at the shorter list
                row[f"max_abs_diff {name}"] = max_abs_diff(checked, results["new"])
            except Exception as err:  # out of resources for this tile shape
                row[key] = repr(err)[:200]
            finally:
                setattr(fa._kernels, function, original)
        fa._kernels.restore_tuning()
        summary = {key: (round(min(val), 4) if isinstance(val, list) else val) for key, val in row.items()}
        print(f"[{time.time() - start:6.1f}s]", json.dumps(summary), flush=True)
        rows.append(row)
        if args.out:  # after every row: a run cut short keeps what it measured
            save_rows(args.out, rows)


if __name__ == "__main__":
    main()
