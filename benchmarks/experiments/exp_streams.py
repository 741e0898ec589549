"""Scratch: split backward with dQ and dK/dV on two CUDA streams (delta computed first)."""
import sys, os, multiprocessing as mp
import torch
sys.path.insert(0, os.getcwd())
from benchmarks.attention import WINDOW
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exp_fused import force_winners, case_setup, CASES

def compile_class(args):
    mask, d = args
    from dldna.kernels import flash_attention
    from dldna.kernels import flash_triton as ft
    ft.STREAMS = True
    q, k, v = (torch.randn(1, 4, 1024, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    window = WINDOW if mask == "window" else None
    for n in sorted({n for m, dd, n in CASES if m == mask and dd == d}):
        force_winners(mask, d, n)
        ft.force_backward("split")
        flash_attention(q, k, v, causal=True, window=window).sum().backward()
    torch.cuda.synchronize()
    return mask, d

def main():
    with mp.get_context("spawn").Pool(4) as pool:
        print(pool.map(compile_class, sorted({(m, d) for m, d, _ in CASES})), flush=True)
    import triton
    from dldna.kernels import flash_triton as ft
    ft.force_backward("split")
    for mask, d, n in CASES:
        (q, k, v), window, run = case_setup(mask, d, n)
        res, grads = [], []
        for streams in (False, True, False, True):
            ft.STREAMS = streams
            run(); torch.cuda.synchronize()
            grads.append([x.grad.float().clone() for x in (q, k, v)])
            res.append(triton.testing.do_bench(run, warmup=25, rep=100))
        err = max(((a - c).norm() / c.norm()).item() for a, c in zip(grads[1], grads[0]))
        print(f"{mask} D={d} N={n}: fwd+bwd one stream {res[0]:.3f}/{res[2]:.3f}, "
              f"two streams {res[1]:.3f}/{res[3]:.3f} (max rel diff {err:.1e})", flush=True)

if __name__ == "__main__":
    main()
