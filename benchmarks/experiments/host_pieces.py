"""Scratch: host time of the pieces of a flash_attention call (GPU only; its output: logs/host_pieces.log).

At B=1, H=2, N=128, D=64, bf16, a causal window of 64: microseconds per call of each helper on the launch path,
of a do-nothing autograd.Function's forward+backward (``ident_fn_fwd_bwd``), and of the whole call with the
three kernels' launches replaced by no-ops (``*_stub_launch``), beside the real one.

    PYTHONPATH=$PWD python benchmarks/experiments/host_pieces.py
"""
import importlib, torch, sys
sys.path.insert(0, '.')
import dldna.kernels.flash_triton as ft
fa = importlib.import_module("dldna.kernels.flash_attention")  # the module: the package exports a function of that name
from dldna.kernels import flash_attention
from benchmarks.flash_host_overhead import per_call_us
def us(fn, n=2000):
    return round(per_call_us(fn, warmup=100, calls=n), 2)
q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
class Ident(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): return g
class Stub:
    def __getitem__(self, grid): return lambda *a, **k: None
res = {}
res["empty_cuda"] = us(lambda: torch.empty((1, 2, 128, 64), device=q.device, dtype=q.dtype))
res["empty_cuda_f32_3d"] = us(lambda: torch.empty((1, 2, 128), device=q.device, dtype=torch.float32))
res["tma_ok"] = us(lambda: ft._tma_ok(q, k, v, q))
res["no_layout"] = us(lambda: ft._no_layout(q.device))
res["check_common"] = us(lambda: fa._check_common(q, k, v, None))
res["resolve_backend"] = us(lambda: fa._resolve_backend("auto", q.device))
res["interpreting"] = us(lambda: ft.interpreting())
res["strides_x4"] = us(lambda: [ft._strides(t) for t in (q, k, v, q)])
res["cdiv"] = us(lambda: ft.triton.cdiv(128, 64))
res["descriptor_x4"] = us(lambda: [ft._descriptor(t, 64) for t in (q, k, v, q)])
res["ident_fn_fwd_bwd"] = us(lambda: Ident.apply(q).sum().backward(), 500)
res["clone_sum_bwd"] = us(lambda: (q * 1).sum().backward(), 500)
with torch.no_grad():
    res["fwd_call"] = us(lambda: flash_attention(q, k, v, causal=True, window=64))
    res["attention_forward"] = us(lambda: ft.attention_forward(q, k, v, -63, 0, 0.125))
res["fwd_bwd_call"] = us(lambda: flash_attention(q, k, v, causal=True, window=64).sum().backward(), 500)
real = {n: getattr(ft, n) for n in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")}
for n in real: setattr(ft, n, Stub())
with torch.no_grad():
    res["fwd_call_stub_launch"] = us(lambda: flash_attention(q, k, v, causal=True, window=64))
    res["attention_forward_stub_launch"] = us(lambda: ft.attention_forward(q, k, v, -63, 0, 0.125))
res["fwd_bwd_call_stub_launch"] = us(lambda: flash_attention(q, k, v, causal=True, window=64).sum().backward(), 500)
for n, f in real.items(): setattr(ft, n, f)
import json; print(json.dumps(res, indent=1))
