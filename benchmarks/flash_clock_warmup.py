"""Why one kernel's time moves by several percent: the GPU's clock under its power limit (run on a GPU).

At causal N=16k, D=128, bf16 (batch 1, 16 heads), the forward through ``flash_attention`` with its tuned config is
timed three ways, three rounds each: (1) after a second of idle GPU, 25 ms of calls (``do_bench(warmup=5,
rep=25)``); (2) the same right after 300 ms of calls; (3) ``do_bench`` with its defaults (25 ms warm-up, 100 ms
timed), as benchmarks/attention.py times every row. Each timing records the median SM clock that nvidia-smi
sampled meanwhile. Then the same kernel through the bare launcher ``flash_triton.attention_forward`` (no argument
checks, no autograd) against ``flash_attention``: equal times mean the host's work per call is hidden.

    python benchmarks/flash_clock_warmup.py [--out-dir results]    # -> flash_clock_warmup.json
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import triton

from dldna.bench import GpuMonitor
from dldna.kernels import flash_attention
from dldna.kernels import flash_triton as ft
from dldna.results import command_line, save_result


def timed(gpu: GpuMonitor, fn, **bench_args) -> dict:
    t0 = time.time()
    ms = triton.testing.do_bench(fn, return_mode="median", **bench_args)
    return {"ms": ms, **gpu.between(t0, time.time())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    n, d, heads = 16384, 128, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    scale = d ** -0.5

    def through_wrapper():
        return flash_attention(q, k, v, causal=True)

    def bare_launcher():
        return ft.attention_forward(q, k, v, None, 0, scale)

    rows = []
    with torch.no_grad(), GpuMonitor() as gpu:
        through_wrapper()  # tunes the forward for this shape (and compiles)
        torch.cuda.synchronize()
        for round_ in range(args.rounds):
            time.sleep(1.0)
            rows.append({"round": round_, "timing": "after 1 s idle, 25 ms of calls",
                         **timed(gpu, through_wrapper, warmup=5, rep=25)})
            triton.testing.do_bench(through_wrapper, warmup=300, rep=1)
            rows.append({"round": round_, "timing": "after 300 ms of calls, 25 ms of calls",
                         **timed(gpu, through_wrapper, warmup=5, rep=25)})
            rows.append({"round": round_, "timing": "do_bench defaults (25 ms warm-up, 100 ms)",
                         **timed(gpu, through_wrapper)})
            rows.append({"round": round_, "timing": "bare launcher, do_bench defaults", **timed(gpu, bare_launcher)})
    flops = 4 * d * heads * n * n / 2
    for row in rows:
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        print(f"round {row['round']}  {row['timing']:<40} {row['ms']:.3f} ms  {row['tflops']:4.0f} TFLOP/s  "
              f"{row['sm_clock_mhz']} MHz", flush=True)
    data = {"case": "causal forward N=16384 D=128 bf16, batch 1, 16 heads", "rows": rows,
            "config": repr([t["best"] for t in ft.TUNING_LOG if t.get("kernel") == "fwd"])}
    print(save_result("flash_clock_warmup", data, command_line("python benchmarks/flash_clock_warmup.py"),
                      out_dir=args.out_dir))


if __name__ == "__main__":
    main()
