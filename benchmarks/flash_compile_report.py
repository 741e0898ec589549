"""Compile the FlashAttention kernels for Hopper (sm_90a) without a GPU and report what the compiler made of them.

For every kernel and config: registers per thread and spill bytes (from ``ptxas -v``), shared memory, and whether
the tensor-core instructions are Hopper's warpgroup MMA (``wgmma`` in PTX, ``HGMMA`` in SASS) or the older
``mma.sync``. Runs on any machine with triton (the compiler ships ``ptxas``); no device time needed.

    python benchmarks/flash_compile_report.py [--dtype bf16] [--head-dims 64 128]   # -> results/flash_compile_report.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dldna.kernels import flash_triton as ft

DIV16 = [["tt.divisibility", 16]]
POINTERS = {"Q", "K", "V", "O", "KP", "VP", "LSE", "LSE2", "DO", "DQ", "DK", "DV", "DELTA", "ROW_SPAN", "COL_IDX",
            "COL_SPAN", "ROW_IDX"}


def _signature(fn, dtype: str, constexprs: dict, ints_not_div16: set[str], floats: set[str]):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        elif name in POINTERS:
            index = "SPAN" in name or "IDX" in name
            sig[name] = "*fp32" if name in ("LSE", "LSE2", "DELTA") else ("*i32" if index else f"*{dtype}")
            attrs[(i,)] = DIV16
        else:
            sig[name] = "i32"
            if name.startswith("stride") and name not in ints_not_div16:
                attrs[(i,)] = DIV16
    return sig, attrs


def ptxas_info(ptx: str, sass: bool = False) -> dict:
    """Registers per thread and spill bytes that ``ptxas -v`` reports for ``ptx`` built for sm_90a (and the SASS
    as ``"sass"`` if ``sass``); the ``ptxas`` shipped with triton, so no GPU or CUDA install is needed."""
    info = {}
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", path, "-o", cubin],
                             capture_output=True, text=True)
        if sass:
            info["sass"] = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True,
                                          text=True, check=True).stdout
    log = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    info["registers"] = int(regs.group(1)) if regs else None
    info["spill_store_bytes"] = int(spill.group(1)) if spill else None
    info["spill_load_bytes"] = int(spill.group(2)) if spill else None
    return info


def compile_one(fn, dtype, head_dim, cfg, flags, kernels=ft, sass=False):
    """Compile kernel ``fn`` for sm_90a; registers, spills, shared memory and MMA instructions of the result (and
    its SASS as ``info["sass"]`` if ``sass``). ``kernels``: the flash_triton module whose launch rules apply."""
    kind = fn.__name__
    # As the benchmark launches them: lengths of whole tiles (RAGGED off) and, with both band limits, its causal
    # window of 1024 keys (band -1023 .. 0); every other constexpr keeps its default.
    band_lo, band_hi = (-1023 if flags[0] else None), (0 if flags[1] else None)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_LO=flags[0], HAS_HI=flags[1],
                      SPARSE=False, USE_TMA=cfg.tma, RAGGED=False, WIDE_BAND=kernels._wide_band(band_lo, band_hi, cfg),
                      EDGES_IN_ONE_LOOP=kernels._edges_in_one_loop(head_dim, band_lo))
    if hasattr(kernels, "_paired_edges"):  # an older module (a baseline of an A/B) has no PAIRED_EDGES
        constexprs["PAIRED_EDGES"] = kernels._paired_edges(head_dim, band_lo, band_hi, cfg)
    if hasattr(kernels, "_early_dp"):  # nor EARLY_DP
        constexprs["EARLY_DP"] = kernels._early_dp(head_dim, cfg)
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    constexprs.update({p.name: p.default for p in fn.params if p.is_constexpr and p.name not in constexprs})
    floats = {"qk_scale", "sm_scale"}
    sig, attrs = _signature(fn, dtype, constexprs, set(), floats)
    if cfg.tma:  # the tiles read through 4-D tensor descriptors, with their block rows
        described = {"_attn_fwd": (("Q", cfg.block_m), ("K", cfg.block_n), ("V", cfg.block_n), ("O", cfg.block_m)),
                     "_attn_bwd_dq": (("K", cfg.block_n), ("V", cfg.block_n)),
                     "_attn_bwd_dkdv": (("Q", cfg.block_m), ("DO", cfg.block_m))}[kind]
        for name, rows in described:
            sig[name] = f"tensordesc<{dtype}[1, 1, {rows}, {head_dim}]>"
            attrs.pop((fn.arg_names.index(name),), None)
        for name, own in (("KP", "K"), ("VP", "V")):  # the paired edge blocks (5-D, two blocks per copy)
            if name in fn.arg_names:
                pair = constexprs.get("PAIRED_EDGES")
                sig[name] = f"tensordesc<{dtype}[1, 1, 2, {cfg.block_n}, {head_dim}]>" if pair else sig[own]
                attrs.pop((fn.arg_names.index(name),), None)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    kernel = triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = kernel.asm["ptx"]
    info = {"kernel": kind, "dtype": dtype, "head_dim": head_dim, "config": repr(cfg), "flags": flags,
            "shared_bytes": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync")}
    info.update(ptxas_info(ptx, sass))
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--flags", default="causal", choices=["full", "causal", "window"])
    parser.add_argument("--kernels", nargs="+", default=["fwd", "dq", "dkdv"], choices=["fwd", "dq", "dkdv"])
    parser.add_argument("--out-dir", default=None, help="save flash_compile_report.json here (default: results/)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    flags = {"full": (False, False), "causal": (False, True), "window": (True, True)}[args.flags]
    kernels = {"fwd": ft._attn_fwd, "dq": ft._attn_bwd_dq, "dkdv": ft._attn_bwd_dkdv}
    kernels = {name: kernels[name] for name in args.kernels}
    rows = []
    for d in args.head_dims:
        for name, fn in kernels.items():
            for cfg in ft._GPU_CONFIGS[name][64 if d <= 64 else 128]:
                # the dK/dV kernel sees the band from the keys' side: a causal upper bound becomes a lower bound
                kflags = flags[::-1] if name == "dkdv" else flags
                try:
                    info = compile_one(fn, args.dtype, d, cfg, kflags)
                except Exception as err:  # report and go on: one failing config must not hide the others
                    info = {"kernel": fn.__name__, "head_dim": d, "config": repr(cfg), "error": repr(err)[:300]}
                rows.append(info)
                print(json.dumps(info), flush=True)
    if not args.no_save:
        from dldna.results import command_line, save_result

        data = {"target": "sm_90a (H100/H200), compiled without a GPU", "flags": args.flags, "dtype": args.dtype,
                "rows": rows}
        command = command_line("python benchmarks/flash_compile_report.py")
        print(save_result("flash_compile_report", data, command, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
