"""Scratch: fused-backward dQ variants (1 pointer atomics on dQ^T, 2 pointer atomics on dQ, 3 TMA reduce-add)."""
import sys, time, os, multiprocessing as mp
import torch
sys.path.insert(0, os.getcwd())
from benchmarks.attention import WINDOW
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exp_fused import force_winners, case_setup

CASES = [("window", 64, 4096), ("window", 128, 16384), ("causal", 128, 16384), ("causal", 64, 4096)]
VARIANTS = (1, 2, 3)

def fused_cfgs(d):
    from dldna.kernels.flash_triton import KernelConfig as K
    return [K(64, 64, 4, 3), K(64, 128, 8, 3)] if d == 64 else [K(32, 128, 8, 3), K(64, 128, 8, 2), K(32, 64, 4, 4)]

def compile_class(args):
    mask, d, variant = args
    from dldna.kernels import flash_attention
    from dldna.kernels import flash_triton as ft
    ft.FUSED_VARIANT = variant
    q, k, v = (torch.randn(1, 4, 1024, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    window = WINDOW if mask == "window" else None
    n = [n for m, dd, n in CASES if m == mask and dd == d][0]
    force_winners(mask, d, n)
    ft.force_backward("fused")
    errs = []
    for cfg in fused_cfgs(d):
        ft.force_config("fused_bwd", cfg)
        try:
            flash_attention(q, k, v, causal=True, window=window).sum().backward()
        except Exception as e:
            errs.append(f"{cfg}: {e!r}"[:300])
    return mask, d, variant, errs

def main():
    t0 = time.time()
    with mp.get_context("spawn").Pool(8) as pool:
        for r in pool.map(compile_class, [(m, d, v) for m, d, _ in CASES for v in VARIANTS]):
            print(r, flush=True)
    print("compiled", round(time.time() - t0), flush=True)
    import triton
    from dldna.kernels import flash_triton as ft
    for mask, d, n in CASES:
        (q, k, v), window, run = case_setup(mask, d, n)
        ft.force_backward("split")
        run()
        ref = [x.grad.float().clone() for x in (q, k, v)]
        line = [f"{mask} D={d} N={n}: split {triton.testing.do_bench(run, warmup=25, rep=100):.3f}"]
        ft.force_backward("fused")
        for variant in VARIANTS:
            ft.FUSED_VARIANT = variant
            for cfg in fused_cfgs(d):
                ft.force_config("fused_bwd", cfg)
                try:
                    run()
                    err = max(((x.grad.float() - r).norm() / r.norm()).item() for x, r in zip((q, k, v), ref))
                    t = triton.testing.do_bench(run, warmup=25, rep=100)
                    tiles = f"{cfg.block_m}x{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s"
                    line.append(f"v{variant} {tiles} {t:.3f} (err {err:.1e})")
                except Exception as e:
                    line.append(f"v{variant} {cfg}: {e!r}"[:200])
        print("\n   ".join(line), flush=True)
    try:
        for dev, cache in ft._attn_bwd_dkdv.device_caches.items():
            for key, kern in cache[0].items():
                print("regs", kern.n_regs, "spills", kern.n_spills, str(key)[-330:-100])
    except Exception as e:
        print("no reg info", repr(e))

if __name__ == "__main__":
    main()
