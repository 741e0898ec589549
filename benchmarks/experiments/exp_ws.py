"""Scratch: the forward with Triton's automatic Hopper warp specialisation (``tl.range(..., warp_specialize=True)``).

Triton 3.6 splits such a loop into a producer warpgroup (the TMA loads) and two consumer warpgroups, each with half
of a 128-row query block. It did so only under these conditions, found by compiling for sm_90a without a GPU
(``benchmarks/flash_compile_report.py``'s way):
- num_warps=4 (8 was silently left alone);
- tensor descriptors made inside the kernel (``tl.make_tensor_descriptor``); with host-side descriptors, splitting the
  128-row Q tile failed;
- one loop per kernel: any second loop over the same descriptors, the shipped kernel's split into masked and
  unmasked blocks included, made the pass fail, and a branch inside the loop made it skip the loop.
So this kernel has one loop and applies the band mask to every block. Its reference check runs first; the timing
compares it, with and without warp specialisation, with dldna's forward on the stored benchmark's configs and with
cuDNN / FlexAttention.

    PYTHONPATH=$PWD python benchmarks/experiments/exp_ws.py     # logs/exp_ws.log, logs/exp_ws.json
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from benchmarks.attention import WINDOW, _inputs, allowed_pairs, make_fns, problem  # noqa: E402
from dldna.kernels import flash_triton as ft  # noqa: E402
from dldna.kernels import report  # noqa: E402
from dldna.kernels.flash_triton import _softmax_step  # noqa: E402
from dldna.kernels.tiled import band_limits  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _ws_step(acc, l_i, m_i, q, desc_k, desc_v, y_k, start_n, offs_m, n_k, band_lo, band_hi, qk_scale,
             BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, MASKED: tl.constexpr):
    """``flash_triton._fwd_block`` with 2-D descriptor loads: the pass could not split its 4-D loads."""
    k = desc_k.load([y_k + start_n, 0])
    p, acc, l_i, m_ij = _softmax_step(tl.dot(q, tl.trans(k)), acc, l_i, m_i, offs_m, start_n + tl.arange(0, BLOCK_N),
                                      n_k, band_lo, band_hi, qk_scale, MASKED, HAS_LO, HAS_HI)
    v = desc_v.load([y_k + start_n, 0])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd_ws(Q, K, V, O, LSE, H, GROUP, n_q, n_k, band_lo, band_hi, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, WS: tl.constexpr, MASK_ALL: tl.constexpr):
    """Q, K, V, O contiguous (B, H, N, D); grid (cdiv(n_q, BLOCK_M), B * H). MASK_ALL=False skips the mask: a wrong
    answer under a causal or window mask, timed only to show what the mask costs."""
    pid_m = tl.cdiv(n_q, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    bhk = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    y_q = bh * n_q  # this head's first row in the (B * H * N, D) view
    y_k = bhk * n_k
    # Per-program descriptors that end with this head: loads past the end read zeros, stores are clipped.
    desc_q = tl.make_tensor_descriptor(Q, shape=[y_q + n_q, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(O, shape=[y_q + n_q, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(K, shape=[y_k + n_k, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V, shape=[y_k + n_k, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = desc_q.load([y_q + start_m, 0])
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = 0
    hi = n_k
    if HAS_LO:
        lo = tl.maximum(start_m + band_lo, 0) // BLOCK_N * BLOCK_N
    if HAS_HI:
        hi = tl.maximum(tl.minimum(n_k, start_m + BLOCK_M - 1 + band_hi + 1), lo)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        acc, l_i, m_i = _ws_step(acc, l_i, m_i, q, desc_k, desc_v, y_k, start_n, offs_m, n_k, band_lo, band_hi,
                                 qk_scale, BLOCK_N, HAS_LO, HAS_HI, MASK_ALL)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    desc_o.store([y_q + start_m, 0], (acc / l_safe[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + bh.to(tl.int64) * n_q + offs_m, lse, mask=offs_m < n_q)


def ws_forward(q, k, v, causal, window, cfg, ws=True, mask_all=True):
    """(o, lse) of the kernel above; cfg = (block_m, block_n, num_warps, num_stages)."""
    b, h, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    band = band_limits(n_q, n_k, causal, window)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = cfg
    _attn_fwd_ws[(triton.cdiv(n_q, bm), b * h)](
        q, k, v, o, lse, h, h // n_kv, n_q, n_k, band.lo or 0, band.hi or 0, d ** -0.5 * LOG2E,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, HAS_LO=band.lo is not None, HAS_HI=band.hi is not None,
        WS=ws, MASK_ALL=mask_all, num_warps=warps, num_stages=stages)
    return o, lse


def reference(q, k, v, causal, window):
    """float64 (out, lse) with the same band and GQA."""
    n_q, n_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    keep = band_limits(n_q, n_k, causal, window).allowed(torch.arange(n_q, device=q.device),
                                                          torch.arange(n_k, device=q.device))
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


def check():
    """Relative error of the warp-specialised kernel against float64, odd lengths and GQA included."""
    rows = []
    for d in (64, 128):
        for b, h, hk, n in ((1, 4, 4, 1000), (2, 4, 2, 1536), (1, 2, 1, 333)):
            for causal, window in ((True, None), (True, 256), (False, None)):
                gen = torch.Generator(device="cuda").manual_seed(n + d)
                q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                k, v = (torch.randn(b, hk, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
                ref, ref_lse = reference(q, k, v, causal, window)
                for cfg in ((128, 64, 4, 2), (128, 128, 4, 2), (128, 64, 4, 3)):
                    o, lse = ws_forward(q, k, v, causal, window, cfg)
                    rows.append(dict(d=d, shape=(b, h, hk, n), causal=causal, window=window, cfg=cfg,
                                     rel=((o.double() - ref).norm() / ref.norm()).item(),
                                     lse_abs=(lse.double() - ref_lse).abs().max().item()))
                    print("check", rows[-1], flush=True)
    return rows


CASES = [("causal", 128, 16384), ("causal", 64, 4096), ("window", 64, 4096), ("window", 64, 16384),
         ("window", 128, 16384), ("window", 128, 65536), ("window", 64, 65536), ("causal", 64, 16384),
         ("causal", 128, 4096), ("window", 128, 4096)]


def configs(d):
    extra = [(128, 128, 4, 3)] if d == 64 else []  # 3 stages of 128 x 128 tiles do not fit at d = 128
    return [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2)] + extra + [(128, 32, 4, 3)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    record = json.load(open("results/flash_attention_bench.json"))
    results = {"check": check(), "rows": []}
    for mask, d, n in CASES:
        b, h = problem(n, d)
        q, k, v = _inputs(d, n, seed=n + d)  # (they require grad; every call below runs under no_grad)
        window = WINDOW if mask == "window" else None
        flops = 4.0 * d * b * h * allowed_pairs(n, mask)
        ft.restore_tuning()
        report.force_tuned_configs(record, mask, d, n)
        fns = make_fns(mask, d, n, q, k, v)
        peer = "sdpa_cudnn" if mask == "causal" else "flex"
        row = dict(mask=mask, d=d, n=n)
        with torch.no_grad():
            bench(fns["dldna"])  # heat the GPU to its steady clock
            row["dldna"] = bench(fns["dldna"])
            row[peer] = bench(fns[peer])
            ref = fns["dldna"]().float()
            for cfg in configs(d):
                for ws in (True, False):
                    name = f"{'ws' if ws else 'nows'}{cfg}"
                    o, _ = ws_forward(q, k, v, True, window, cfg, ws=ws)
                    row[name + "_err"] = ((o.float() - ref).norm() / ref.norm()).item()
                    row[name] = bench(lambda: ws_forward(q, k, v, True, window, cfg, ws=ws))
            cfg = configs(d)[0]
            row[f"ws_nomask{cfg}"] = bench(lambda: ws_forward(q, k, v, True, window, cfg, ws=True, mask_all=False))
        for key, val in list(row.items()):
            if isinstance(val, float) and not key.endswith("_err"):
                row[key + "_tflops"] = round(flops / (val * 1e-3) / 1e12, 1)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    out = os.environ.get("OUT", "benchmarks/experiments/logs")
    with open(os.path.join(out, "exp_ws.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
