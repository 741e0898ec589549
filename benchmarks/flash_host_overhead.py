"""Host time per call of dldna's flash_attention vs SDPA, on a problem so small that the GPU work is microseconds.

Wall time of 200 forward calls (100 forward+backward calls, with ``.sum().backward()``) over the number of calls,
after warm-up, at B=1, H=2, N=128, bf16, causal (and a causal window of 64 for dldna). What it shows: how much of a
call is the Python and launch work on the host, which ``do_bench`` hides only up to the length of its L2 flush.

    python benchmarks/flash_host_overhead.py      # on a GPU; prints one line per implementation and pass
"""
import time, torch, torch.nn.functional as F
from dldna.kernels import flash_attention
for d in (64, 128):
    q, k, v = (torch.randn(1, 2, 128, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fns = {"dldna": lambda: flash_attention(q, k, v, causal=True),
           "dldna_window": lambda: flash_attention(q, k, v, causal=True, window=64),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, fn in fns.items():
        for _ in range(20): fn()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(200): fn()
        torch.cuda.synchronize(); print(d, name, "fwd us/call", round((time.perf_counter() - t0) / 200 * 1e6, 1))
        def fb():
            fn().sum().backward()
        for _ in range(5): fb()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(100): fb()
        torch.cuda.synchronize(); print(d, name, "fwd+bwd us/call", round((time.perf_counter() - t0) / 100 * 1e6, 1))
