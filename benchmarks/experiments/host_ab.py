"""Scratch: host time per flash_attention call with the launch helpers of b9c51ae against the working tree's (GPU only).

b9c51ae's ``_strides`` read the three strides one call each, and its launchers sized the grid with ``triton.cdiv``;
the working tree reads ``t.stride()`` once and divides with ``_cdiv``. Both versions run in one process, alternating
over three rounds, at B=1, H=2, N=128, D=64, bf16, causal window 64: microseconds per forward call (no grad) and per
``.sum().backward()`` call (``host_breakdown.per_call_us``). Output: logs/host_ab.json.

    PYTHONPATH=$PWD python benchmarks/experiments/host_ab.py --out logs/host_ab.json
"""
import argparse
import json
import time

import torch
import triton

import dldna.kernels.flash_triton as ft
from benchmarks.experiments.host_breakdown import per_call_us
from dldna.kernels import flash_attention


def old_strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    new = {"_strides": ft._strides, "_cdiv": ft._cdiv}
    old = {"_strides": old_strides, "_cdiv": triton.cdiv}
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    call = lambda: flash_attention(q, k, v, causal=True, window=64)  # noqa: E731
    results = {"b9c51ae": {"fwd": [], "fwd+bwd": []}, "tree": {"fwd": [], "fwd+bwd": []}}
    for _ in range(3):
        for name, helpers in (("b9c51ae", old), ("tree", new)):
            for attr, fn in helpers.items():
                setattr(ft, attr, fn)
            with torch.no_grad():
                results[name]["fwd"].append(per_call_us(call, calls=2000, warmup=100))
            results[name]["fwd+bwd"].append(per_call_us(lambda: call().sum().backward(), calls=500, warmup=20))
    for attr, fn in new.items():
        setattr(ft, attr, fn)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            record = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "us_per_call": results}
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
