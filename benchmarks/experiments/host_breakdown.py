"""Scratch: where the host time of one flash_attention call goes, launch by launch (GPU only).

At B=1, H=2, N=128, bf16 (GPU work of microseconds), for each of the three kernels it times, in microseconds per
call: the whole launch through ``kernel[grid](...)`` as ``flash_triton`` makes it; Triton's argument binding alone
(the binder that ``JITFunction.run`` calls first); the compiled kernel launched directly with the same arguments
(``CompiledKernel[grid](*all_args)``, which skips the binding and the cache lookup); and building the tensor
descriptors. Then the whole fwd and fwd+bwd calls, and a cProfile of fwd+bwd.

    PYTHONPATH=$PWD python benchmarks/experiments/host_breakdown.py [--out x.json]
"""
import argparse
import cProfile
import json
import pstats
import time

import torch

import dldna.kernels.flash_triton as ft
from benchmarks.flash_host_overhead import per_call_us as _per_call_us
from dldna.kernels import flash_attention


def per_call_us(fn, calls: int = 300, warmup: int = 30) -> float:
    """``flash_host_overhead.per_call_us`` with this script's defaults: mean microseconds per ``fn()``."""
    return _per_call_us(fn, warmup, calls)


class Recorder:
    """Stands in for a kernel of ``flash_triton``: records the grid and arguments of its launches, then launches."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.fn[grid](*args, **kwargs)
            self.calls.append((grid, args, kwargs, compiled))
            return compiled
        return launch


def all_args(fn, args, kwargs):
    """Every parameter's value in signature order, as ``JITFunction.run`` passes them to the compiled kernel."""
    values = list(args)
    for p in fn.params[len(args):]:
        values.append(kwargs.get(p.name, p.default))
    return values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = {}
    torch.manual_seed(0)
    for d in (64, 128):
        q, k, v = (torch.randn(1, 2, 128, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for label, kw in (("causal", dict(causal=True)), ("window", dict(causal=True, window=64))):
            call_fwd = lambda: flash_attention(q, k, v, **kw)  # noqa: E731
            call_bwd = lambda: call_fwd().sum().backward()  # noqa: E731
            call_bwd()
            names = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")
            recorders = {n: Recorder(getattr(ft, n)) for n in names}
            for n in names:
                setattr(ft, n, recorders[n])
            try:
                call_bwd()
            finally:
                for n in names:
                    setattr(ft, n, recorders[n].fn)
            row = {"fwd_call": per_call_us(lambda: torch.no_grad()(call_fwd)()),
                   "fwd_bwd_call": per_call_us(call_bwd, calls=100, warmup=10)}
            for n in names:
                grid, a, kwa, compiled = recorders[n].calls[-1]
                fn = recorders[n].fn
                device = torch.cuda.current_device()
                binder = fn.device_caches[device][4]
                full = all_args(fn, a, kwa)
                row[n] = {
                    "jit_launch": per_call_us(lambda: fn[grid](*a, **kwa)),
                    "binder_only": per_call_us(lambda: binder(*a, **kwa)),
                    "compiled_launch": per_call_us(lambda: compiled[tuple(grid) + (1, 1)](*full)),
                    "registers": getattr(compiled, "n_regs", None),
                    "tensor_descriptors": sum(type(x).__name__ == "TensorDescriptor" for x in a),
                    "config": repr(kwa.get("BLOCK_M")) + "x" + repr(kwa.get("BLOCK_N")) + f" tma={kwa.get('USE_TMA')}",
                }
                descs = [(x.base, x.block_shape[2]) for x in a if type(x).__name__ == "TensorDescriptor"]
                if descs:
                    row[n]["make_descriptors"] = per_call_us(lambda: [ft._descriptor(t, r) for t, r in descs])
            rows[f"d{d}_{label}"] = row
            print(d, label, json.dumps(row, indent=1))
        profiler = cProfile.Profile()
        profiler.runcall(per_call_us, call_bwd, 100, 0)
        print(f"--- cProfile, D={d}, window fwd+bwd, 100 calls")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
