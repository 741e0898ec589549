"""Scratch: an FA3-style dK/dV kernel in Gluon, behind dldna's dQ kernel (which also writes the base-2 LSE and
``delta = rowsum(dO * O)`` that this kernel reads), with either forward in front.

At causal 16k, D = 128 the shipped dK/dV kernel takes 3.95 of the backward's 6.6 ms, and on the D = 128 sliding
windows it is the largest of the three kernels too; ``gluon_fa3_forward.py`` showed that a warp-specialised Gluon
forward beats the shipped one by 7 to 20 % at D = 128. This kernel does the same to dK/dV:
- one loader warpgroup copies the program's 128 keys' K and V once, then Q and dO tiles of 64 query rows into a ring
  of ``STAGES`` buffers (TMA, mbarriers), and gives its registers to the consumers (``setmaxnreg``);
- two consumer warpgroups, 64 keys each, keep their dK and dV (64 x D fp32) in registers. Per query tile each issues
  ``S^T = K Q^T`` and ``dP^T = V dO^T`` at once (asynchronous ``wgmma``), computes ``P^T`` while ``dP^T`` is still
  in flight, then ``dS^T = P^T (dP^T - delta)``, issues ``dV += P^T dO`` and ``dK += dS^T Q`` together (P^T and dS^T
  from registers) and waits once for both;
- each consumer walks its tiles in two loops: the edge tiles (its diagonal tile, the far edge of a window; masked,
  and those where all of its keys are masked are passed over without computing), then the full tiles (no mask
  code). With the mask behind a runtime branch in one loop instead, ``ptxas`` spilled 812 to 968 bytes at D = 128
  (loop-invariant shared-memory descriptors); with three loops (diagonal, full, far edge) 12 to 20 under the causal
  mask and 64 to 416 under the window; with these two, 4 to 28 and 20 to 80.

Gluon kernels do not run under ``TRITON_INTERPRET=1``; on CPU tensors this one runs in
``dldna.kernels.gluon_emulator`` (``tests/test_gluon_emulator.py`` checks it against float64 there).
Limits: bf16, causal (optionally windowed), ``N % 128 == 0``, D in {64, 128}, no GQA.

    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dkdv.py --out benchmarks/experiments/logs
        [--rounds 3] [--variants 2:2 3:2 2:1] [--dkdv-only] [--cases causal:128:16384 ...] [--log-name NAME]
    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dkdv.py --compile-only   # sm_90a registers, no GPU
"""
import json
import math
import os
import sys

import torch
import triton
from triton.experimental.gluon import language as gl

from dldna.kernels.flash_gluon.dkdv import QROWS, _fa3_dkdv, _launch_regs, fa3_dkdv  # the kernel, in dldna
from dldna.kernels.flash_gluon.forward import ROWS

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.gluon_fa3_forward import (  # noqa: E402
    GluonForwardShippedBackward, causal_band, experiment_parser, fa3_forward, line_logger, parse_cases, rel_diff,
    run_header, time_combos, timed_rounds, write_json)


class Hybrid(torch.autograd.Function):
    """Causal (windowed) attention with the Gluon forward or dldna's, then a dQ kernel and the Gluon dK/dV with
    ``variant = (stages, consumers)``. ``dq_kernel(q, k, v, out, lse, grad_out, window)`` returns ``(dq, lse2,
    delta)``; None: dldna's (``flash_triton.backward_dq``). (The Gluon forward with all of dldna's backward:
    ``GluonForwardShippedBackward``.)"""

    @staticmethod
    def forward(ctx, q, k, v, window, gluon_forward, variant, dq_kernel=None):
        from dldna.kernels import flash_triton

        if gluon_forward:
            out, lse = fa3_forward(q, k, v, window=window)
        else:
            band = causal_band(q, window)
            out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, 1.0 / math.sqrt(q.shape[-1]))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.variant, ctx.dq_kernel = window, variant, dq_kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from dldna.kernels import flash_triton

        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if ctx.dq_kernel is None:
            band, scale = causal_band(q, ctx.window), 1.0 / math.sqrt(q.shape[-1])
            dq, lse2, delta = flash_triton.backward_dq(q, k, v, out, lse, grad_out, band.lo, band.hi, scale)
        else:
            dq, lse2, delta = ctx.dq_kernel(q, k, v, out, lse, grad_out, ctx.window)
        dk, dv = fa3_dkdv(q, k, v, grad_out, lse2, delta, ctx.window, *ctx.variant)
        return dq, dk, dv, None, None, None, None


def hybrids(row, window, variant):
    """The timed combinations of forward and backward kernels, by name, as ``BenchRow.fns`` entries."""
    q, k, v = row.q, row.k, row.v
    return {"dldna_fwd_gluon_dkdv": lambda: Hybrid.apply(q, k, v, window, False, variant),
            "gluon_fwd_gluon_dkdv": lambda: Hybrid.apply(q, k, v, window, True, variant),
            "gluon_fwd_dldna_bwd": lambda: GluonForwardShippedBackward.apply(q, k, v, window)}


def compile_only(d, stages=2, window=0, consumers=2):
    """Registers, spills and shared memory of the sm_90a build (no GPU needed)."""
    from benchmarks.flash_compile_report import ptxas_info
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(rows):
        return f"tensordesc<bf16[{rows}, {d}],{gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)!r}>"

    sig = {"q_desc": desc(QROWS.value), "k_desc": desc(ROWS.value), "v_desc": desc(ROWS.value),
           "do_desc": desc(QROWS.value), "dk_desc": desc(ROWS.value), "dv_desc": desc(ROWS.value),
           "lse2_ptr": "*fp32", "delta_ptr": "*fp32", "n_ctx": "i32", "qk_scale": "fp32", "sm_scale": "fp32",
           "HEAD_DIM": "constexpr", "STAGES": "constexpr", "WINDOW": "constexpr", "CONSUMERS": "constexpr"}
    src = GluonASTSource(_fa3_dkdv, sig, {"HEAD_DIM": d, "STAGES": stages, "WINDOW": window, "CONSUMERS": consumers})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "maxnreg": _launch_regs(consumers)})
    ptx = kernel.asm["ptx"]
    return {"head_dim": d, "stages": stages, "window": window, "consumers": consumers,
            "shared_bytes": kernel.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "setmaxnreg": ptx.count("setmaxnreg"), **ptxas_info(ptx)}


# (B, H, N, D, window): odd B and H, 1 to 8 key blocks, windows shorter than a tile, not a multiple of it, and as
# long as N; the float64 checks of both Gluon backward kernels
CHECK_SHAPES = ((1, 3, 128, 64, None), (2, 1, 384, 128, None), (1, 2, 1024, 64, None), (3, 1, 640, 128, None),
                (1, 3, 640, 64, 100), (2, 1, 768, 128, 300), (1, 2, 1024, 64, 1024), (1, 1, 512, 128, 129),
                (1, 2, 1024, 128, 64))


def max_grad_errors(fns, q, k, v, grad, window):
    """``{f"{name}_{dk|dv|dq}_max_err"}``: the largest error of each gradient of every ``fns[name](q, k, v)``
    (causal, ``window``) against float64 attention's, for the output gradient ``grad``."""
    from dldna.attention import attention, sliding_window_mask

    mask = sliding_window_mask(q.shape[2], window).to(q.device) if window else None
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    attention(q64, k64, v64, mask=mask, causal=True).backward(grad.double())
    errors = {}
    for name, fn in fns.items():
        qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
        fn(qi, ki, vi).backward(grad)
        for label, got, ref in (("dk", ki.grad, k64.grad), ("dv", vi.grad, v64.grad), ("dq", qi.grad, q64.grad)):
            errors[f"{name}_{label}_max_err"] = (got.double() - ref).abs().max().item()
    return errors


def check(variants, log):
    """Largest errors of dK and dV against float64 on ``CHECK_SHAPES``, next to those of dldna's shipped kernels on
    the same inputs (bf16 rounding sets that floor)."""
    from dldna.kernels import flash_attention

    torch.manual_seed(0)
    results = []
    for b, h, n, d, window in CHECK_SHAPES:
        q, k, v, grad = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        fns = {f"gluon_{_label(variant)}": (lambda q, k, v, variant=variant: Hybrid.apply(q, k, v, window, False,
                                                                                         variant))
               for variant in variants}
        fns["dldna"] = lambda q, k, v: flash_attention(q, k, v, causal=True, window=window)
        row = dict(shape=[b, h, n, d], window=window, **max_grad_errors(fns, q, k, v, grad, window))
        results.append(row)
        log(json.dumps(row))
    return results


def _label(variant):
    stages, consumers = variant
    return f"{stages}stages_{consumers}consumers"


def time_dkdv(row, window, variants, rounds, log, **tags):
    """The dK/dV kernels alone, in ms (medians of ``rounds``): the Gluon one in each ``(stages, consumers)`` variant
    and dldna's on its stored tuned config, on the ``lse2`` and ``delta`` of one shipped forward and dQ pass; and
    each Gluon variant's dK and dV against dldna's (relative norm)."""
    from dldna.kernels import flash_triton

    q, k, v = (t.detach() for t in (row.q, row.k, row.v))
    band, scale = causal_band(q, window), 1.0 / math.sqrt(q.shape[-1])
    out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale)
    _, lse2, delta = flash_triton.backward_dq(q, k, v, out, lse, row.grad, band.lo, band.hi, scale)
    fns = {f"gluon_dkdv_{_label(variant)}": (lambda variant=variant: fa3_dkdv(q, k, v, row.grad, lse2, delta,
                                                                             window, *variant))
           for variant in variants}
    fns["dldna_dkdv"] = lambda: flash_triton.backward_dkdv(q, k, v, row.grad, lse2, delta, band.lo, band.hi, scale)
    shipped = fns["dldna_dkdv"]()
    diffs = {name: [rel_diff(a, b) for a, b in zip(fn(), shipped)] for name, fn in fns.items() if name != "dldna_dkdv"}
    log(json.dumps(dict(tags, dkdv_rel_diff_vs_dldna=diffs)))
    rounds_ms, median = timed_rounds(lambda name: round(triton.testing.do_bench(fns[name], return_mode="median"), 4),
                                     list(fns), rounds, log, "dkdv_ms", **tags)
    return dict(dkdv_rel_diff_vs_dldna=diffs, dkdv_rounds_ms=rounds_ms, dkdv_median_ms=median)


def time_rows(cases, rounds, log, combos_for, time_alone, alone_key, fwd_bwd=True):
    """Every ``MASK:HEAD_DIM:N`` case on the shipped kernels' stored tuned configs: forward+backward of the
    combinations ``combos_for(row, window)`` (``time_combos``; skipped when not ``fwd_bwd``), then
    ``time_alone(row, window, **tags)``, the kernel under test alone; each row's summary logged with its
    ``alone_key`` medians. The rows, for the run's .json."""
    from benchmarks.attention import WINDOW, BenchRow, allow_flex_recompiles
    from dldna.kernels import flash_triton, report

    allow_flex_recompiles()
    record = json.load(open("results/flash_attention_bench.json"))
    rows = []
    for mask, d, n in parse_cases(cases):
        window = WINDOW if mask == "window" else None
        row = BenchRow(mask, d, n)
        flash_triton.restore_tuning()
        report.force_tuned_configs(record, mask, d, n)  # the shipped kernels with their stored tuned configs
        tags = dict(mask=mask, d=d, n=n)
        entry = dict(tags, window=window, peer=row.peer)
        triton.testing.do_bench(lambda: row.outputs("dldna"), warmup=200, rep=500)  # heat the GPU to its clock
        if fwd_bwd:
            entry.update(time_combos(row, combos_for(row, window), rounds, log, **tags))
        entry.update(time_alone(row, window, **tags))
        log(json.dumps({k: entry[k] for k in ("mask", "d", "n", "fwd_bwd_median_ms", "fwd_bwd_speed_vs_peer",
                                              alone_key, "rel_diff_vs_dldna") if k in entry}))
        rows.append(entry)
    return rows


def main():
    parser = experiment_parser("gluon_fa3_dkdv", 3, ["causal:128:16384", "window:128:16384", "window:128:4096",
                                                     "window:128:65536", "causal:64:4096", "window:64:16384"])
    parser.add_argument("--variants", nargs="+", default=["2:2", "3:2"],
                        help="STAGES:CONSUMERS of the Gluon kernel (Q/dO tiles in flight, 64-key warpgroups per "
                             "program): each is checked and timed alone, the first also in forward+backward")
    parser.add_argument("--dkdv-only", action="store_true",
                        help="time the dK/dV kernels alone, skipping the float64 checks and forward+backward")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 checks")
    args = parser.parse_args()
    if args.compile_only:  # printed only: the log files hold GPU runs
        for d in (64, 128):
            for window in (0, 1024):
                for stages in (2, 3):
                    for consumers in (2, 1):
                        print(json.dumps(compile_only(d, stages, window, consumers)))
        return
    log = line_logger(args.out, args.log_name)
    variants = [tuple(int(x) for x in variant.split(":")) for variant in args.variants]
    result = dict(run_header("gluon_fa3_dkdv.py"),
                  check=None if args.dkdv_only or args.no_check else check(variants, log))
    result["rows"] = time_rows(args.cases, args.rounds, log, lambda row, window: hybrids(row, window, variants[0]),
                               lambda row, window, **tags: time_dkdv(row, window, variants, args.rounds, log, **tags),
                               "dkdv_median_ms", fwd_bwd=not args.dkdv_only)
    write_json(args.out, args.log_name, result)


if __name__ == "__main__":
    main()
