"""Chapters 2-3 benchmark: time and peak memory vs N of every efficient attention against dense and SDPA.

    python benchmarks/attention_zoo.py --device cuda --dtype bfloat16 \\
        --sizes 1024 2048 4096 8192 16384 32768 65536              # GPU -> results/attention_zoo_gpu.json
    python benchmarks/attention_zoo.py --device cpu --sizes 256 512 1024 2048   # -> results/attention_zoo_cpu.json
    python benchmarks/attention_zoo.py --memory-bar-only           # N=16384, window 256, float32 CPU memory bar

Every run also measures (unless ``--no-memory-bar``) the bar of issue 3: peak memory of
``sliding_window_attention`` against the dense reference with the same mask at N=16384, window 256, float32, on
the CPU (batch 1, head 1, head_dim 32), stored under ``memory_bar``. Saves via ``dldna.results.save_result``.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dldna.attention.zoo import ALL_METHODS, crossover_n, measure_zoo
from dldna.results import save_result


def memory_bar(n: int = 16384, window: int = 256, head_dim: int = 32) -> dict:
    """Peak CPU memory (MiB) of the banded sliding window vs the dense reference with the materialised mask."""
    from dldna.attention import attention, sliding_window_attention, sliding_window_mask
    from dldna.bench import peak_memory_mb

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, head_dim, generator=gen) for _ in range(3))
    mask = sliding_window_mask(n, window)
    with torch.no_grad():
        banded = peak_memory_mb(lambda: sliding_window_attention(q, k, v, window))
        dense = peak_memory_mb(lambda: attention(q, k, v, mask=mask))
        err = float((sliding_window_attention(q, k, v, window) - attention(q, k, v, mask=mask)).abs().max())
    return {"n": n, "window": window, "head_dim": head_dim, "dtype": "float32", "device": "cpu",
            "sliding_window_peak_mb": banded, "dense_peak_mb": dense, "ratio": banded / dense,
            "max_abs_diff_float32": err, "bar": "ratio < 0.10", "met": banded / dense < 0.10}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--k-proj", type=int, default=256)
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--lsh-chunk", type=int, default=64)
    parser.add_argument("--n-hashes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads during the run")
    parser.add_argument("--max-dense-n", type=int, default=None, help="skip dense/SDPA above this N")
    parser.add_argument("--name", default=None, help="result name (default attention_zoo_gpu / attention_zoo_cpu)")
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default: results/)")
    parser.add_argument("--no-memory-bar", action="store_true")
    parser.add_argument("--memory-bar-only", action="store_true")
    parser.add_argument("--memory-bar-n", type=int, default=16384)
    args = parser.parse_args(argv)
    command = "python " + " ".join(["benchmarks/attention_zoo.py", *(sys.argv[1:] if argv is None else argv)])

    data: dict = {}
    if not args.memory_bar_only:
        on_gpu = args.device.startswith("cuda")
        dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
        sizes = args.sizes or ([1024, 2048, 4096, 8192, 16384, 32768, 65536] if on_gpu else [256, 512, 1024, 2048])
        data = measure_zoo(
            sizes, args.methods, batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=dtype,
            device=args.device, repeats=args.repeats, max_dense_n=args.max_dense_n, window=args.window,
            block_size=args.block_size, k_proj=args.k_proj, num_features=args.num_features, lsh_chunk=args.lsh_chunk,
            n_hashes=args.n_hashes, num_threads=args.threads,
        )
        print(f"\n{args.device} {dtype}, batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}")
        print(f"{'method':>17} {'N':>7} {'time ms':>10} {'peak MiB':>10}  note")
        for r in data["records"]:
            t = f"{r['time_s'] * 1e3:10.3f}" if r["time_s"] is not None else f"{'-':>10}"
            m = f"{r['peak_mb']:10.1f}" if r["peak_mb"] is not None else f"{'-':>10}"
            print(f"{r['method']:>17} {r['n']:>7} {t} {m}  {r['error'] or ''}")
        print("\nslopes (log-log, four largest N):")
        for name, s in data["slopes"].items():
            print(f"{name:>17}: time {s['time']}, memory {s['memory']}")
        data["crossovers"] = {
            f"{m} vs {base}": crossover_n(data, m, base)
            for m in args.methods if m not in ("dense", "sdpa") for base in ("dense", "sdpa") if base in args.methods
        }
        print("\ncrossover N (method faster from here on):", data["crossovers"])
    if args.memory_bar_only or not args.no_memory_bar:
        data["memory_bar"] = memory_bar(args.memory_bar_n)
        mb = data["memory_bar"]
        print(f"\nmemory bar, N={mb['n']} window {mb['window']} float32 CPU: sliding {mb['sliding_window_peak_mb']:.1f} "
              f"MiB vs dense {mb['dense_peak_mb']:.1f} MiB = {mb['ratio']:.2%} ({'met' if mb['met'] else 'MISSED'})")
    name = args.name or ("attention_zoo_memory_bar" if args.memory_bar_only else
                         f"attention_zoo_{'gpu' if args.device.startswith('cuda') else 'cpu'}")
    path = save_result(name, data, command, args.out_dir)
    print("saved", path)
    return data


if __name__ == "__main__":
    main()
