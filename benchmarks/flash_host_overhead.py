"""Host time per call of dldna's flash_attention vs SDPA, on a problem so small that the GPU work is microseconds.

Wall time of 200 forward calls (100 forward+backward calls, with ``.sum().backward()``) over the number of calls,
after warm-up, at B=1, H=2, N=128, bf16, causal (and a causal window of 64 for dldna). What it shows: how much of a
call is the Python and launch work on the host, which ``do_bench`` hides only up to the length of its L2 flush.

    python benchmarks/flash_host_overhead.py --out-dir results   # on a GPU; -> flash_host_overhead.json
    python benchmarks/flash_host_overhead.py --profile 25         # where the host time goes (cProfile, top 25)
"""
import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from dldna.kernels import flash_attention
from dldna.results import command_line, save_result


def per_call_us(fn, warmup: int, calls: int) -> float:
    """Mean wall time of ``fn()`` in microseconds, the GPU drained before and after."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="save flash_host_overhead.json there (default: print only)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also print the TOP functions by own time of dldna's fwd and fwd+bwd calls (cProfile)")
    args = parser.parse_args()
    rows = []
    for d in (64, 128):
        q, k, v = (torch.randn(1, 2, 128, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        fns = {"dldna": lambda: flash_attention(q, k, v, causal=True),
               "dldna_window": lambda: flash_attention(q, k, v, causal=True, window=64),
               "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for name, fn in fns.items():
            for what, call, warmup, calls in (("fwd us/call", fn, 20, 200),
                                              ("fwd+bwd us/call", lambda: fn().sum().backward(), 5, 100)):
                rows.append({"head_dim": d, "impl": name, "what": what,
                             "us_per_call": round(per_call_us(call, warmup, calls), 1)})
                print(*rows[-1].values())
                if args.profile and name == "dldna":
                    profiler = cProfile.Profile()
                    profiler.runcall(per_call_us, call, 0, calls)
                    print(f"--- cProfile of {calls} calls, D={d}, {what}")
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    if args.out_dir:
        command = command_line("python benchmarks/flash_host_overhead.py")
        print(save_result("flash_host_overhead", {"rows": rows}, command, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
