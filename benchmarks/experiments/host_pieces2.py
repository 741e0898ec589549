"""Scratch: where a flash_attention forward+backward spends its host time, phase by phase (GPU only; its output:
logs/host_pieces2.log).

Same inputs as ``host_pieces.py``. Timestamps taken at the end of ``attention_forward`` and at the start and end of
``attention_backward`` split each ``flash_attention(...).sum().backward()`` into four phases (mean microseconds over
300 calls), with the kernel launches replaced by no-ops and with the real ones. Then a cProfile of
``attention_backward`` alone, taken inside the autograd engine's thread that runs it.

    PYTHONPATH=$PWD python benchmarks/experiments/host_pieces2.py
"""
import time, torch, sys, cProfile, pstats, io
sys.path.insert(0, '.')
import dldna.kernels.flash_triton as ft
from dldna.kernels import flash_attention
q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
class Stub:
    def __getitem__(self, grid): return lambda *a, **k: None
real = {n: getattr(ft, n) for n in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")}
stamps = []
orig_fwd, orig_bwd = ft.attention_forward, ft.attention_backward
prof = cProfile.Profile()
PROFILE = [False]
def fwd(*a, **kw):
    out = orig_fwd(*a, **kw); stamps.append(("fwd_end", time.perf_counter())); return out
def bwd(*a, **kw):
    stamps.append(("bwd_start", time.perf_counter()))
    if PROFILE[0]: prof.enable()
    out = orig_bwd(*a, **kw)
    if PROFILE[0]: prof.disable()
    stamps.append(("bwd_end", time.perf_counter())); return out
ft.attention_forward, ft.attention_backward = fwd, bwd
for stub in (True, False):
    for n in real: setattr(ft, n, Stub() if stub else real[n])
    phases = {"call_to_fwd_end": 0, "fwd_end_to_bwd_start": 0, "bwd": 0, "bwd_end_to_return": 0, "total": 0}
    calls = 300
    for i in range(calls + 30):
        stamps.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        flash_attention(q, k, v, causal=True, window=64).sum().backward()
        t4 = time.perf_counter()
        s = dict(stamps)
        if i >= 30:
            phases["call_to_fwd_end"] += s["fwd_end"] - t0
            phases["fwd_end_to_bwd_start"] += s["bwd_start"] - s["fwd_end"]
            phases["bwd"] += s["bwd_end"] - s["bwd_start"]
            phases["bwd_end_to_return"] += t4 - s["bwd_end"]
            phases["total"] += t4 - t0
    print("stub" if stub else "real", {k2: round(v2 / calls * 1e6, 1) for k2, v2 in phases.items()})
for n in real: setattr(ft, n, Stub())
PROFILE[0] = True
for i in range(300):
    flash_attention(q, k, v, causal=True, window=64).sum().backward()
torch.cuda.synchronize()
sio = io.StringIO(); pstats.Stats(prof, stream=sio).sort_stats("tottime").print_stats(25); print(sio.getvalue())
