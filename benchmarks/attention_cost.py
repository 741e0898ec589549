"""Chapter 1 benchmark: time and peak memory of naive attention vs fused SDPA against sequence length.

    python benchmarks/attention_cost.py                      # on a GPU: bf16, N = 1k .. 64k
    python benchmarks/attention_cost.py --device cpu --max-n 4096

Saves ``results/attention_cost_<device>.json`` (see ``dldna.results``) and prints a table.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dldna.bench import fit_loglog_slope, measure_attention_scaling
from dldna.results import save_result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-n", type=int, default=None)
    parser.add_argument("--max-n", type=int, default=None)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default: results/)")
    args = parser.parse_args(argv)

    on_gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    min_n = args.min_n or (1024 if on_gpu else 128)
    max_n = args.max_n or (65536 if on_gpu else 4096)
    lengths = []
    n = min_n
    while n <= max_n:
        lengths.append(n)
        n *= 2

    impls = ["naive", "sdpa"]
    data = {"dtype": str(dtype), "batch": 1, "heads": args.heads, "head_dim": args.head_dim, "series": {}}
    for impl in impls:
        rows = measure_attention_scaling(
            lengths, impl, batch=1, heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=args.device, progress=True
        )
        data["series"][impl] = rows
        ok = [r for r in rows if r["status"] == "ok"]
        for key in ("seconds", "peak_mb"):
            tail = ok[-4:]  # fit the large-N end, where fixed overheads no longer dominate
            slope = fit_loglog_slope([r["seq_len"] for r in tail], [r[key] for r in tail]) if len(tail) > 1 else float("nan")
            data.setdefault("slopes", {}).setdefault(impl, {})[key] = slope
        print(f"\n{impl}: {args.device} {dtype}, B=1 H={args.heads} D={args.head_dim}")
        print(f"{'N':>7} {'time ms':>10} {'peak MiB':>10} {'scores MiB':>11}  status")
        for r in rows:
            print(f"{r['seq_len']:>7} {r['seconds'] * 1e3:>10.3f} {r['peak_mb']:>10.1f} {r['scores_mb']:>11.1f}  {r['status']}")
        print("fitted slopes (large N):", data["slopes"][impl])
    kind = "gpu" if on_gpu else "cpu"
    path = save_result(f"attention_cost_{kind}", data, "python " + " ".join(["benchmarks/attention_cost.py", *sys.argv[1:]]), args.out_dir)
    print("saved", path)


if __name__ == "__main__":
    main()
