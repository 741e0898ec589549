"""Scratch: forward candidates with 256-row query blocks on 16 warps (four warpgroups per program)."""
import sys, time, os, multiprocessing as mp
import torch
sys.path.insert(0, os.getcwd())
from benchmarks.attention import problem, WINDOW
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exp_fused import compile_forward

CASES = [("causal", 128, 16384), ("causal", 64, 4096), ("window", 64, 4096), ("window", 64, 16384),
         ("window", 128, 16384), ("window", 128, 65536), ("window", 64, 65536)]

def extra(d):
    from dldna.kernels.flash_triton import KernelConfig as K
    if d == 64:
        return [K(256, 64, 16, 3, tma=True), K(256, 128, 16, 2, tma=True), K(256, 64, 16, 2, tma=True),
                K(128, 64, 4, 2, tma=True), K(64, 64, 4, 4, tma=True), K(128, 128, 8, 2, tma=True)]
    return [K(256, 64, 16, 2, tma=True), K(256, 32, 16, 3, tma=True), K(256, 64, 16, 3, tma=True),
            K(64, 64, 4, 4, tma=True), K(128, 32, 8, 3, tma=True)]

def setup(d):
    from dldna.kernels import flash_triton as ft
    base = [c for c in ft._GPU_CONFIGS["fwd"][d]]
    ft._GPU_CONFIGS["fwd"][d] = base + [c for c in extra(d) if c not in base]

def compile_class(args):
    mask, d = args
    setup(d)
    from dldna.kernels import flash_triton as ft
    errs = compile_forward(mask, d, ft.candidate_configs("fwd", d))
    return mask, d, errs

def main():
    t0 = time.time()
    with mp.get_context("spawn").Pool(4) as pool:
        for r in pool.map(compile_class, sorted({(m, d) for m, d, _ in CASES})):
            print(r, flush=True)
    print("compiled", round(time.time() - t0), flush=True)
    setup(64); setup(128)
    from dldna.kernels import flash_attention
    from dldna.kernels import flash_triton as ft
    for mask, d, n in CASES:
        b, h = problem(n, d)
        gen = torch.Generator(device="cuda").manual_seed(n + d)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        window = WINDOW if mask == "window" else None
        flash_attention(q, k, v, causal=True, window=window)
        t = ft.TUNING_LOG[-1]
        print(mask, d, n, "best", t["best"].replace("KernelConfig", ""), flush=True)
        for c, ms in sorted(t["times_ms"].items(), key=lambda x: x[1])[:6]:
            print(f"    {ms:.3f} {c.replace('KernelConfig', '')}")
    for dev, cache in ft._attn_fwd.device_caches.items():
        for key, kern in cache[0].items():
            print("regs", kern.n_regs, "spills", kern.n_spills, kern.metadata.shared, str(key)[-260:-100])

if __name__ == "__main__":
    main()
