"""GPU correctness matrix of dldna.kernels.flash_attention / block_sparse_flash_attention (run on the device).

Every case draws fresh random inputs, poisons the allocator with NaN first (outputs that the kernels fail to write
show up as NaN), and compares the output, the log-sum-exp and dq/dk/dv with the float64 dense reference
``dldna.attention.attention`` computed from the same (rounded) inputs, by relative Frobenius error.

Matrix: head_dim {16, 32, 64, 128} x dtype {fp16, bf16} (+ fp32/TF32 at 64) x mask {full, causal, causal window,
symmetric window} x shapes {MHA with tails, whole tiles, GQA, MQA with Nq < Nk, Nq > Nk with empty rows, one query
(decode)}; then every tuning config of each kernel at head_dim 64 and 128 (bf16, causal and window; a length with a
ragged tail and one of whole tiles), block-sparse layouts from dldna.attention.masks, and the calls that the Hopper
Gluon kernels take (``dldna.kernels.flash_gluon.plan_for``: bf16 MHA, N a multiple of 128, causal and windows of 100
and 1024 at head_dim 64 and 128, an odd head count, more tiles than SMs, and the causal 16k forwards). Groups run
in parallel processes (compilation dominates).

    python benchmarks/gpu_test_flash.py --jobs 14 --out gpu_test.jsonl
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
import traceback

import torch

BOUNDS = {"float16": 5e-3, "bfloat16": 2e-2, "float32": 5e-3}  # output; gradients get twice this
SHAPES = [  # (B, H, Hkv, Nq, Nk)
    (2, 4, 4, 1000, 1000),  # MHA, ragged tail
    (1, 4, 2, 1024, 1024),  # whole tiles: the masked tiles skip the bounds checks
    (1, 8, 2, 1537, 1537),  # GQA 4:1
    (2, 6, 1, 513, 1021),  # MQA, Nq < Nk (queries at the end, as with a KV cache)
    (1, 4, 2, 300, 77),  # Nq > Nk: under a causal mask the first rows see nothing
    (3, 4, 4, 1, 4097),  # one query (decode)
]
# --smoke: the same code paths on CPU under the Triton interpreter with tiny shapes (checks this script itself).
SMOKE = os.environ.get("DLDNA_GPU_TEST_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
if SMOKE:
    SHAPES = [(1, 2, 1, 45, 70), (1, 2, 2, 40, 19)]
MASKS = {"full": (False, None), "causal": (True, None), "window": (True, 100), "sym_window": (False, 129)}
# (B, H, N) of the Gluon group: an odd head count; more tiles than an H100's 132 SMs (persistent programs take several)
GLUON_SHAPES = [(2, 3, 1152), (2, 8, 2176)]
GLUON_WINDOWS = (None, 100, 1024)


def groups() -> list[tuple]:
    if SMOKE:
        return [("matrix", 16, "float16"), ("configs", 64, "window"), ("sparse", None, None)]
    out = [("matrix", d, dt) for d in (16, 32, 64, 128) for dt in ("float16", "bfloat16")]
    out.append(("matrix", 64, "float32"))
    out += [("configs", d, mask) for d in (64, 128) for mask in ("causal", "window")]
    out.append(("sparse", None, None))
    out += [("gluon", d, None) for d in (64, 128)]
    return out


def _poison():
    if SMOKE:
        return
    junk = torch.empty(96 * 2**20, dtype=torch.float32, device=DEVICE)  # 384 MiB: the outputs are carved from it
    junk.fill_(float("nan"))
    del junk


def _token_mask(n_q, n_k, causal, window, device):
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=device)[None, :]
    if causal:
        keep = j <= i
        return keep if window is None else keep & (i - j < window)
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device) if window is None else (i - j).abs() <= window // 2


def _rel(x, ref):
    x = x.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(fn, shape, dtype, mask, seed):
    """Run ``fn(q, k, v) -> (out, lse)`` fwd + bwd and return the relative errors against float64."""
    from dldna.attention import attention

    b, h, h_kv, n_q, n_k, d = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, device=DEVICE, generator=gen).to(dtype)
               for hh, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k)))
    grad = torch.randn(b, h, n_q, d, device=DEVICE, generator=gen, dtype=torch.float64)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention(q64, k64, v64, mask=mask, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    _poison()
    out, lse = fn(qt, kt, vt)
    _poison()
    grads = torch.autograd.grad(out, (qt, kt, vt), grad.to(dtype))
    if not SMOKE:
        torch.cuda.synchronize()
    finite = torch.isfinite(ref_lse)
    errs = {"out": _rel(out, ref), "dq": _rel(grads[0], ref_grads[0]), "dk": _rel(grads[1], ref_grads[1]),
            "dv": _rel(grads[2], ref_grads[2])}
    errs["lse_max_abs"] = (lse[finite].double() - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    errs["lse_inf_match"] = bool(torch.equal(torch.isfinite(lse), finite))
    errs["empty_rows_zero"] = bool((out[~finite] == 0).all()) if (~finite).any() else True
    return errs


def passed(errs, dtype_name):
    bound = BOUNDS[dtype_name]
    ok = errs["out"] < bound and all(errs[g] < 2 * bound for g in ("dq", "dk", "dv"))
    return bool(ok and errs["lse_max_abs"] < 10 * bound and errs["lse_inf_match"] and errs["empty_rows_zero"])


def run_group(group) -> list[dict]:
    from dldna.kernels import block_sparse_flash_attention, flash_attention
    from dldna.kernels import flash_triton as ft

    kind, a, b_ = group
    rows = []
    ft.restore_tuning()  # a worker process may have run another group before: tune afresh

    def record(name, dtype_name, fn, shape, mask, seed):
        t0 = time.time()
        try:
            errs = check(fn, shape, getattr(torch, dtype_name), mask, seed)
            ok = passed(errs, dtype_name)
        except Exception as err:  # a crash is a failure, recorded with its message
            errs, ok = {"error": repr(err)[:500], "trace": traceback.format_exc()[-1500:]}, False
        rows.append({"group": repr(group), "case": name, "dtype": dtype_name, "shape": shape, "pass": ok,
                     "errors": errs, "seconds": round(time.time() - t0, 2)})

    if kind == "matrix":
        d, dtype_name = a, b_
        for kernel in ("fwd", "dq", "dkdv"):  # one config each; the configs group sweeps the rest
            ft.force_config(kernel, ft.candidate_configs(kernel, d)[0])
        for s_i, (bb, h, h_kv, n_q, n_k) in enumerate(SHAPES):
            for mask_name, (causal, window) in MASKS.items():
                def fn(q, k, v, causal=causal, window=window):
                    return flash_attention(q, k, v, causal=causal, window=window, return_lse=True, backend="triton")

                mask = _token_mask(n_q, n_k, causal, window, DEVICE)
                record(f"{mask_name} {(bb, h, h_kv, n_q, n_k)}", dtype_name, fn, (bb, h, h_kv, n_q, n_k, d), mask,
                       seed=1000 * s_i + d)
    elif kind == "configs":
        d, mask_name = a, b_
        causal, window = MASKS[mask_name][0], 1024 if mask_name == "window" else None
        for n in (70, 64) if SMOKE else (2100, 2048):  # ragged tail, whole tiles
            shape = (1, 4, 2, n, n, d)
            mask = _token_mask(n, n, causal, window, DEVICE)
            for kernel, cfg in ft.each_config(lambda kernel: ft.candidate_configs(kernel, d)):
                def fn(q, k, v):
                    return flash_attention(q, k, v, causal=causal, window=window, return_lse=True, backend="triton")

                record(f"{mask_name} n={n} {kernel}={cfg}", "bfloat16", fn, shape, mask, seed=(hash(cfg) + n) % 1000)
    elif kind == "gluon":
        from dldna.kernels import flash_gluon
        from dldna.kernels.tiled import band_limits

        d = a
        cases = [(shape, window) for shape in GLUON_SHAPES for window in GLUON_WINDOWS]
        # causal from 16k on, the plan's other forward: 3 consumer warpgroups on 192-row blocks (64), a program per
        # tile (128)
        cases.append(((1, 2, 16384), None))
        for (bb, h, n), window in cases:
            probe = torch.empty(bb, h, n, d, device=DEVICE, dtype=torch.bfloat16)
            band = band_limits(n, n, True, window)
            plan = flash_gluon.plan_for(probe, probe, probe, band.lo, band.hi)

            def fn(q, k, v, window=window, plan=plan):
                if plan is None:
                    raise RuntimeError("the Gluon kernels did not take this call (flash_gluon.plan_for gave None)")
                return flash_attention(q, k, v, causal=True, window=window, return_lse=True, backend="triton")

            mask_name = "causal" if window is None else f"window {window}"
            record(f"gluon {mask_name} {(bb, h, n)} {plan}", "bfloat16", fn, (bb, h, h, n, n, d),
                   _token_mask(n, n, True, window, DEVICE), seed=n + d + (window or 0))
    else:
        from dldna.attention.masks import bigbird_block_layout, longformer_block_layout, strided_block_layout
        from dldna.kernels.flash_attention import block_mask_from_layout

        def sparse_attention(layout, block):
            """The call under test for one layout, as ``record`` runs it."""
            return lambda q, k, v: block_sparse_flash_attention(q, k, v, layout, block, return_lse=True,
                                                                backend="triton")

        cases = ((64, 64, "bfloat16"), (128, 128, "bfloat16"), (64, 128, "float16"), (32, 32, "float16"))
        for block, d, dtype_name in cases[-1:] if SMOKE else cases:
            nb = 4 if SMOKE else 12
            layouts = {
                "longformer": longformer_block_layout(nb, 1, [0]),
                "bigbird": bigbird_block_layout(nb, 3, 1, 2, seed=0),
                "strided": strided_block_layout(nb, 3),
            }
            n = nb * block - block // 3  # ragged last block
            for (name, layout), length in itertools.product(layouts.items(), (n, nb * block)):  # ragged, whole blocks
                mask = block_mask_from_layout(layout.to(DEVICE), block, length, length)
                record(f"sparse {name} block={block} n={length}", dtype_name, sparse_attention(layout, block),
                       (2, 4, 2, length, length, d), mask, seed=block + d + length)
            # every candidate config of each kernel once, on the BigBird layout (tiles that divide the block)
            name, layout = "bigbird", layouts["bigbird"]
            mask = block_mask_from_layout(layout.to(DEVICE), block, n, n)
            for kernel, cfg in ft.each_config(lambda kernel: ft.layout_candidate_configs(kernel, block, d)):
                record(f"sparse {name} block={block} {kernel}={cfg}", dtype_name, sparse_attention(layout, block),
                       (2, 4, 2, n, n, d), mask, seed=block + d + 1)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", default="gpu_test.jsonl")
    parser.add_argument("--out-dir", default=None,
                        help="also write <out-dir>/flash_attention_gpu_test.json (device, date, command) with every row")
    parser.add_argument("--only", nargs="+", choices=["matrix", "configs", "sparse", "gluon"], default=None,
                        help="run only these groups")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or DLDNA_GPU_TEST_SMOKE=1 TRITON_INTERPRET=1 for a CPU smoke run)")
    t0 = time.time()
    rows = []
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        todo = [g for g in groups() if args.only is None or g[0] in args.only]
        futures = {pool.submit(run_group, g): g for g in todo}
        for fut in cf.as_completed(futures):
            try:
                rows += fut.result()
            except Exception as err:
                rows.append({"group": repr(futures[fut]), "case": "whole group", "pass": False, "errors": repr(err)})
            print(f"[{time.time() - t0:6.1f}s] done {futures[fut]}", flush=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    failed = [r for r in rows if not r["pass"]]
    worst = {}
    for r in rows:
        if isinstance(r.get("errors"), dict) and "out" in r["errors"]:
            key = r.get("dtype")
            worst[key] = max(worst.get(key, 0.0), *(r["errors"][g] for g in ("out", "dq", "dk", "dv")))
    print(f"{len(rows) - len(failed)}/{len(rows)} cases passed in {time.time() - t0:.0f} s; worst relative error "
          f"per dtype: {worst}")
    if args.out_dir:
        from dldna.results import command_line, save_result

        data = {"cases": len(rows), "passed": len(rows) - len(failed), "worst_relative_error": worst,
                "failed": failed, "groups": args.only or "all", "wall_s": round(time.time() - t0, 1),
                "bounds": "relative Frobenius error vs float64 on the same rounded inputs: out < 5e-3 (fp16, "
                          "fp32/TF32) / 2e-2 (bf16), gradients < 2x that; lse within 10x; rows without keys zero "
                          "with lse -inf", "rows": rows}
        shown = list(sys.argv[1:])
        if "--out-dir" in shown:  # where the file went is not part of what was run
            i = shown.index("--out-dir")
            del shown[i : i + 2]
        command = command_line("python benchmarks/gpu_test_flash.py", shown)
        print("wrote", save_result("flash_attention_gpu_test", data, command, out_dir=args.out_dir))
    for r in failed[:20]:
        print("FAILED", r["group"], r["case"], r.get("dtype"), json.dumps(r["errors"])[:600])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
