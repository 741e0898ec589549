"""Chapter 6 benchmark: GQA decode bandwidth of the paged Triton kernel vs SDPA on a contiguous cache vs a copy.

    python benchmarks/paged_decode.py                       # on a GPU: batch 8, 32 q / 8 kv heads, D 128, L 32k
    python benchmarks/paged_decode.py --out-dir $OUT        # the JSON also goes there
    TRITON_INTERPRET=1 python benchmarks/paged_decode.py --tiny   # CPU check of the whole script (numbers meaningless)

Reports achieved TB/s of *unique* KV bytes (``2 * B * Hkv * L * D * bytes``: every cached key and value read
once) for: the paged kernel (default launch, and the best of a small sweep of launch configurations, each
listed), SDPA with ``enable_gqa=True`` on a contiguous ``(B, Hkv, L, D)`` cache, SDPA after ``repeat_kv``, and a
device-to-device copy of the same number of bytes (counted as read + write, i.e. ``2 * bytes / time``: the
bandwidth ceiling). Checks the kernel's output against SDPA. Saves ``results/paged_decode.json`` (not in
``--tiny`` mode).

Timing: the median of ``triton.testing.do_bench`` for every row, which keeps the GPU busy (an L2 flush) while
the host launches the call, so the rows compare GPU time. Two rows time the other way, each call started from an
idle GPU (``dldna.bench.time_fn``), which adds the host's launch time of the Python wrapper: the difference is
what a decode loop without CUDA graphs would pay. One row replays the kernel from a CUDA graph, one reads the
same cache through an identity block table (pages in order: what the scattered gather costs).
"""
from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from dldna.attention.reference import repeat_kv  # noqa: E402
from dldna.bench import time_fn  # noqa: E402
from dldna.kernels.paged_decode import default_num_splits, paged_decode_attention, unique_kv_bytes  # noqa: E402
from dldna.results import save_result  # noqa: E402


def build_inputs(batch, heads, kv_heads, head_dim, seq_len, page, dtype, device, seed=0):
    """A full paged cache with blocks scattered at random (seeded), its block tables, and the queries."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = -(-seq_len // page)
    num_blocks = batch * blocks_per_seq
    k_blocks = torch.randn(num_blocks, kv_heads, page, head_dim, generator=gen).to(device, dtype)
    v_blocks = torch.randn(num_blocks, kv_heads, page, head_dim, generator=gen).to(device, dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).to(device, torch.int32)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, 1, head_dim, generator=gen).to(device, dtype)
    return q, k_blocks, v_blocks, tables, seq_lens


def contiguous_cache(blocks, tables, seq_len):
    """``(num_blocks, Hkv, page, D)`` + tables -> the contiguous ``(B, Hkv, L, D)`` cache SDPA reads."""
    b = tables.shape[0]
    x = blocks[tables.long()].permute(0, 2, 1, 3, 4)  # (B, Hkv, blocks, page, D)
    return x.reshape(b, blocks.shape[1], -1, blocks.shape[-1])[:, :, :seq_len].contiguous()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--page", type=int, default=16, help="tokens per cache block (vLLM's default is 16)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-sweep", action="store_true", help="time only the default launch configuration")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out-dir", default=None, help="also write the JSON there")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.heads, args.kv_heads, args.head_dim, args.seq_len, args.repeats = 2, 8, 2, 32, 200, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k_blocks, v_blocks, tables, seq_lens = build_inputs(args.batch, args.heads, args.kv_heads, args.head_dim,
                                                           args.seq_len, args.page, dtype, device)
    k, v = contiguous_cache(k_blocks, tables, args.seq_len), contiguous_cache(v_blocks, tables, args.seq_len)
    nbytes = unique_kv_bytes(args.batch, args.kv_heads, args.seq_len, args.head_dim, k.element_size())
    warmup, repeats = (1, args.repeats) if args.tiny else (5, args.repeats)

    def tbps(seconds, moved=nbytes):
        return moved / seconds / 1e12

    def gpu_time(fn):
        """Median seconds of ``fn()`` on the GPU (do_bench); the interpreter has no driver, so wall time there."""
        if device.type != "cuda":
            return time_fn(fn, warmup, repeats, device)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    rows = {}

    # the copy ceiling: read + write the same number of bytes
    src = torch.cat([k.flatten(), v.flatten()])
    dst = torch.empty_like(src)
    t = gpu_time(lambda: dst.copy_(src))
    rows["copy"] = dict(seconds=t, tbps=tbps(t, 2 * nbytes), note="device-to-device copy, (read + write) / time")
    del src, dst
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    t = gpu_time(sdpa)
    rows["sdpa_enable_gqa"] = dict(seconds=t, tbps=tbps(t), note="SDPA enable_gqa=True, contiguous cache")
    t = gpu_time(lambda: F.scaled_dot_product_attention(q, repeat_kv(k, args.heads // args.kv_heads),
                                                        repeat_kv(v, args.heads // args.kv_heads)))
    rows["sdpa_repeat_kv"] = dict(seconds=t, tbps=tbps(t), note="repeat_kv then SDPA, contiguous cache")

    default_block_n = 32 if args.tiny else 64
    default_splits = default_num_splits(args.batch, args.kv_heads, args.seq_len, default_block_n, device)
    configs = [dict(block_n=default_block_n, num_warps=4, num_splits=default_splits, num_stages=2)]
    if not args.no_sweep and not args.tiny:
        # num_splits is a run-time argument (no recompilation), so 8 compiled variants cover the 32 settings
        for block_n, warps, stages, splits in itertools.product((64, 128), (4, 8), (2, 3), (8, 16, 32, 64)):
            configs.append(dict(block_n=block_n, num_warps=warps, num_splits=splits, num_stages=stages))
    if args.tiny:
        configs.append(dict(block_n=16, num_warps=4, num_splits=3, num_stages=None))
    sweep = []
    for cfg in configs:
        try:
            fn = lambda cfg=cfg: paged_decode_attention(q, k_blocks, v_blocks, tables, seq_lens,  # noqa: E731
                                                        backend="triton", **cfg)
            err = (fn().float() - reference).abs().max().item()
            t = gpu_time(fn)
            sweep.append(dict(cfg, seconds=t, tbps=tbps(t), max_abs_err_vs_sdpa_fp32=err))
        except Exception as exc:  # e.g. out of shared memory for a large tile: record and go on
            sweep.append(dict(cfg, error=f"{type(exc).__name__}: {exc}"[:300]))
    ok = [s for s in sweep if "error" not in s]
    best = max(ok, key=lambda s: s["tbps"])
    rows["paged_triton_default"] = dict(sweep[0], note="paged Triton kernel, default launch")
    rows["paged_triton_best"] = dict(best, note="paged Triton kernel, best of the sweep")
    default = lambda: paged_decode_attention(q, k_blocks, v_blocks, tables, seq_lens, backend="triton")  # noqa: E731
    identity = torch.arange(tables.numel(), device=device, dtype=torch.int32).view_as(tables)
    t = gpu_time(lambda: paged_decode_attention(q, k_blocks, v_blocks, identity, seq_lens, backend="triton"))
    rows["paged_triton_identity_table"] = dict(seconds=t, tbps=tbps(t),
                                               note="default launch, pages in order (no scattered gather)")
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            default()
        t = gpu_time(graph.replay)
        rows["paged_triton_cuda_graph"] = dict(seconds=t, tbps=tbps(t), note="default launch, CUDA graph replay")
    for name, fn in (("paged_triton_from_idle", default), ("sdpa_enable_gqa_from_idle", sdpa)):
        t = time_fn(fn, warmup, repeats, device)
        rows[name] = dict(seconds=t, tbps=tbps(t), note="each call from an idle GPU: host launch time included")

    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU (interpreter)'}, {dtype}, "
          f"B={args.batch} H={args.heads} Hkv={args.kv_heads} D={args.head_dim} L={args.seq_len} page={args.page}; "
          f"unique KV {nbytes / 2**30:.3f} GiB")
    print(f"{'what':<28} {'time ms':>9} {'TB/s':>7}  note")
    for name, row in rows.items():
        print(f"{name:<28} {row['seconds'] * 1e3:>9.3f} {row['tbps']:>7.3f}  {row['note']}")
    ratio = rows["paged_triton_best"]["tbps"] / rows["copy"]["tbps"]
    default_ratio = rows["paged_triton_default"]["tbps"] / rows["copy"]["tbps"]
    print(f"paged kernel / copy = {ratio:.1%} best, {default_ratio:.1%} default launch (bar: >= 90%); "
          f"SDPA enable_gqa / copy = "
          f"{rows['sdpa_enable_gqa']['tbps'] / rows['copy']['tbps']:.1%}; "
          f"max |kernel - SDPA fp32| = {best['max_abs_err_vs_sdpa_fp32']:.2e}")
    print("sweep (block_n, warps, splits, stages -> TB/s):")
    for s in sorted(ok, key=lambda s: -s["tbps"])[:10]:
        print(f"  {s['block_n']:>4} {s['num_warps']:>2} {s['num_splits']:>3} {str(s['num_stages']):>4} -> {s['tbps']:.3f}")
    for s in sweep:
        if "error" in s:
            print("  failed:", {k: s[k] for k in ('block_n', 'num_warps', 'num_splits', 'num_stages')}, s["error"])
    data = dict(vars(args), dtype=str(dtype), unique_kv_bytes=nbytes, rows=rows, sweep=sweep,
                kernel_over_copy=ratio, default_kernel_over_copy=default_ratio,
                sdpa_over_copy=rows["sdpa_enable_gqa"]["tbps"] / rows["copy"]["tbps"],
                timer="triton.testing.do_bench median (warmup 25 ms, rep 100 ms); "
                      "*_from_idle rows: dldna.bench.time_fn")
    command = "python " + " ".join(["benchmarks/paged_decode.py", *sys.argv[1:]])
    if not args.tiny:
        print("saved", save_result("paged_decode", data, command))
    if args.out_dir:
        print("saved", save_result("paged_decode" + ("_tiny" if args.tiny else ""), data, command, args.out_dir))


if __name__ == "__main__":
    main()
