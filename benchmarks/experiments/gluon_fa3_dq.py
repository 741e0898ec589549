"""Scratch: an FA3-style dQ kernel in Gluon, so that with ``gluon_fa3_forward.py`` and ``gluon_fa3_dkdv.py`` the
whole causal (windowed) attention runs on warp-specialised Gluon kernels.

With the Gluon forward and dK/dV kernels, what is left of the window D = 128 forward+backward is mostly dldna's dQ
kernel (``gluon_fa3_dkdv.py``'s last runs). This kernel computes what that one does, in the layout of the Gluon
forward. The kernel is ``dldna.kernels.flash_gluon.dq`` (its docstring describes it); this script checks and
times it.

Gluon kernels do not run under ``TRITON_INTERPRET=1``; on CPU tensors this one runs in
``dldna.kernels.gluon_emulator`` (``tests/test_gluon_emulator.py`` checks it against float64 there).
Limits: bf16, causal (optionally windowed), ``N % 128 == 0``, D in {64, 128}, no GQA.

    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dq.py --out benchmarks/experiments/logs
        [--rounds 3] [--variants 64:2 128:2] [--cases window:128:16384 ...] [--dq-only | --no-check] [--log-name NAME]
    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dq.py --host-time   # launch cost of each entry point
    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_dq.py --compile-only   # sm_90a registers, no GPU
"""
import json
import math
import os
import sys

import torch
import triton
from triton.experimental.gluon import language as gl

from dldna.kernels.flash_gluon.dq import _fa3_dq, fa3_dq  # the kernel, in dldna (tested there on the CPU)
from dldna.kernels.flash_gluon.forward import MAXNREG, ROWS, _descriptor

sys.path.insert(0, os.getcwd())
from benchmarks.experiments.gluon_fa3_dkdv import (  # noqa: E402
    CHECK_SHAPES, Hybrid, max_grad_errors, time_rows)
from benchmarks.experiments.gluon_fa3_forward import (  # noqa: E402
    causal_band, experiment_parser, line_logger, parse_cases, rel_diff, run_header, timed_rounds, write_json)


def compile_only(d, keys=64, stages=2, window=0):
    """Registers, spills and shared memory of the sm_90a build (no GPU needed)."""
    from benchmarks.flash_compile_report import ptxas_info
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(rows):
        return f"tensordesc<bf16[{rows}, {d}],{gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)!r}>"

    sig = {"q_desc": desc(ROWS.value), "k_desc": desc(keys), "v_desc": desc(keys), "do_desc": desc(ROWS.value),
           "dq_desc": desc(ROWS.value), "o_ptr": "*bf16", "lse_ptr": "*fp32", "lse2_ptr": "*fp32",
           "delta_ptr": "*fp32", "n_ctx": "i32", "qk_scale": "fp32", "sm_scale": "fp32", "HEAD_DIM": "constexpr",
           "KEYS": "constexpr", "STAGES": "constexpr", "WINDOW": "constexpr"}
    src = GluonASTSource(_fa3_dq, sig, {"HEAD_DIM": d, "KEYS": keys, "STAGES": stages, "WINDOW": window})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": MAXNREG})
    ptx = kernel.asm["ptx"]
    return {"head_dim": d, "keys": keys, "stages": stages, "window": window, "shared_bytes": kernel.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "setmaxnreg": ptx.count("setmaxnreg"), **ptxas_info(ptx)}


def _label(variant):
    keys, stages = variant
    return f"{keys}keys_{stages}stages"


def _dq_kernel(variant):
    """``Hybrid``'s ``dq_kernel`` for this kernel with ``variant = (keys, stages)``."""
    return lambda q, k, v, out, lse, grad_out, window: fa3_dq(q, k, v, out, lse, grad_out, window, *variant)


def check(variants, dkdv_variant, log):
    """Largest errors of dQ (and of dK, dV behind it) against float64 on ``gluon_fa3_dkdv.CHECK_SHAPES``, for the
    Gluon forward, this dQ kernel and the Gluon dK/dV, next to those of dldna's shipped kernels on the same inputs;
    and how far this kernel's ``lse2`` and ``delta`` are from those of dldna's dQ kernel on the shipped forward
    (relative norm)."""
    from dldna.kernels import flash_attention, flash_triton

    torch.manual_seed(0)
    results = []
    for b, h, n, d, window in CHECK_SHAPES:
        q, k, v, grad = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        fns = {f"gluon_{_label(variant)}": (lambda q, k, v, variant=variant: Hybrid.apply(
            q, k, v, window, True, dkdv_variant, _dq_kernel(variant))) for variant in variants}
        fns["dldna"] = lambda q, k, v: flash_attention(q, k, v, causal=True, window=window)
        row = dict(shape=[b, h, n, d], window=window, **max_grad_errors(fns, q, k, v, grad, window))
        band, scale = causal_band(q, window), 1.0 / math.sqrt(d)
        out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale)
        _, lse2, delta = flash_triton.backward_dq(q, k, v, out, lse, grad, band.lo, band.hi, scale)
        for variant in variants:
            _, my_lse2, my_delta = fa3_dq(q, k, v, out, lse, grad, window, *variant)
            row[f"gluon_{_label(variant)}_lse2_delta_rel_diff"] = [rel_diff(my_lse2, lse2), rel_diff(my_delta, delta)]
        results.append(row)
        log(json.dumps(row))
    return results


def time_dq(row, window, variants, rounds, log, **tags):
    """The dQ kernels alone, in ms (medians of ``rounds``): this one in each ``(keys, stages)`` variant and dldna's
    on its stored tuned config, on the ``(out, lse)`` of one shipped forward; and each variant's dQ against dldna's
    (relative norm)."""
    from dldna.kernels import flash_triton

    q, k, v = (t.detach() for t in (row.q, row.k, row.v))
    band, scale = causal_band(q, window), 1.0 / math.sqrt(q.shape[-1])
    out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale)
    fns = {f"gluon_dq_{_label(variant)}": (lambda variant=variant: fa3_dq(q, k, v, out, lse, row.grad, window,
                                                                         *variant))
           for variant in variants}
    fns["dldna_dq"] = lambda: flash_triton.backward_dq(q, k, v, out, lse, row.grad, band.lo, band.hi, scale)
    shipped = fns["dldna_dq"]()
    diffs = {name: [rel_diff(a, b) for a, b in zip(fn(), shipped)] for name, fn in fns.items() if name != "dldna_dq"}
    log(json.dumps(dict(tags, dq_lse2_delta_rel_diff_vs_dldna=diffs)))
    rounds_ms, median = timed_rounds(lambda name: round(triton.testing.do_bench(fns[name], return_mode="median"), 4),
                                     list(fns), rounds, log, "dq_ms", **tags)
    return dict(dq_lse2_delta_rel_diff_vs_dldna=diffs, dq_rounds_ms=rounds_ms, dq_median_ms=median)


def gluon_backward_combos(row, window, variant, dkdv_variant):
    """The timed combinations with this dQ kernel (``variant``) and the Gluon dK/dV (``dkdv_variant``) behind either
    forward, and the Gluon forward and dK/dV behind dldna's dQ kernel, by name, as ``BenchRow.fns`` entries."""
    from benchmarks.experiments.gluon_fa3_dkdv import hybrids

    q, k, v = row.q, row.k, row.v
    return {"gluon_fwd_gluon_bwd": lambda: Hybrid.apply(q, k, v, window, True, dkdv_variant, _dq_kernel(variant)),
            "dldna_fwd_gluon_bwd": lambda: Hybrid.apply(q, k, v, window, False, dkdv_variant, _dq_kernel(variant)),
            "gluon_fwd_gluon_dkdv": hybrids(row, window, dkdv_variant)["gluon_fwd_gluon_dkdv"]}


def host_us(fn, calls=200):
    """Host time per call of ``fn`` in microseconds: ``calls`` calls back to back without a synchronisation (the
    GPU's queue fills, so this is the launch path's own time while it stays under the kernels')."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def time_host(cases, variant, dkdv_variant, log):
    """Host microseconds per call of each kernel's Python entry point, Gluon's and dldna's, and of building one
    Gluon ``TensorDescriptor``: whether a forward+backward's three launches can outrun its GPU time."""
    from benchmarks.attention import WINDOW, BenchRow
    from benchmarks.experiments.gluon_fa3_dkdv import fa3_dkdv
    from benchmarks.experiments.gluon_fa3_forward import fa3_forward
    from dldna.kernels import flash_triton, report

    record = json.load(open("results/flash_attention_bench.json"))
    rows = []
    for mask, d, n in cases:
        window = WINDOW if mask == "window" else None
        row = BenchRow(mask, d, n)
        flash_triton.restore_tuning()
        report.force_tuned_configs(record, mask, d, n)
        q, k, v, do = (t.detach() for t in (row.q, row.k, row.v, row.grad))
        band, scale = causal_band(q, window), 1.0 / math.sqrt(d)
        out, lse = flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale)
        _, lse2, delta = flash_triton.backward_dq(q, k, v, out, lse, do, band.lo, band.hi, scale)
        q2 = q.view(-1, d)
        fns = {"gluon_fwd": lambda: fa3_forward(q, k, v, window=window),
               "gluon_dq": lambda: fa3_dq(q, k, v, out, lse, do, window, *variant),
               "gluon_dkdv": lambda: fa3_dkdv(q, k, v, do, lse2, delta, window, *dkdv_variant),
               "dldna_fwd": lambda: flash_triton.attention_forward(q, k, v, band.lo, band.hi, scale),
               "dldna_dq": lambda: flash_triton.backward_dq(q, k, v, out, lse, do, band.lo, band.hi, scale),
               "dldna_dkdv": lambda: flash_triton.backward_dkdv(q, k, v, do, lse2, delta, band.lo, band.hi, scale),
               "one_gluon_descriptor": lambda: _descriptor(q2, ROWS.value)}
        entry = dict(mask=mask, d=d, n=n, host_us={name: round(host_us(fn), 1) for name, fn in fns.items()})
        log(json.dumps(entry))
        rows.append(entry)
    return rows


def main():
    parser = experiment_parser("gluon_fa3_dq", 3, ["window:128:16384", "window:128:4096", "window:128:65536",
                                                   "causal:128:16384", "window:64:16384"])
    parser.add_argument("--variants", nargs="+", default=["64:2", "128:2"],
                        help="KEYS:STAGES of this kernel (keys per tile, K/V tiles in flight): each is checked and "
                             "timed alone, the first also in forward+backward")
    parser.add_argument("--dkdv-variant", default="2:2", help="STAGES:CONSUMERS of the Gluon dK/dV kernel")
    parser.add_argument("--dq-only", action="store_true", help="time the dQ kernels alone, skipping the checks")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 checks")
    parser.add_argument("--host-time", action="store_true",
                        help="only the host time per call of every kernel's Python entry point")
    args = parser.parse_args()
    if args.compile_only:  # printed only: the log files hold GPU runs
        for d in (64, 128):
            for window in (0, 1024):
                for keys in (64, 128):
                    for stages in (2, 3):
                        print(json.dumps(compile_only(d, keys, stages, window)))
        return
    log = line_logger(args.out, args.log_name)
    variants = [tuple(int(x) for x in variant.split(":")) for variant in args.variants]
    dkdv_variant = tuple(int(x) for x in args.dkdv_variant.split(":"))
    if args.host_time:
        write_json(args.out, args.log_name, dict(run_header("gluon_fa3_dq.py"), rows=time_host(
            parse_cases(args.cases), variants[0], dkdv_variant, log)))
        return
    result = dict(run_header("gluon_fa3_dq.py"),
                  check=None if args.dq_only or args.no_check else check(variants, dkdv_variant, log))
    result["rows"] = time_rows(
        args.cases, args.rounds, log,
        lambda row, window: gluon_backward_combos(row, window, variants[0], dkdv_variant),
        lambda row, window, **tags: time_dq(row, window, variants, args.rounds, log, **tags),
        "dq_median_ms", fwd_bwd=not args.dq_only)
    write_json(args.out, args.log_name, result)


if __name__ == "__main__":
    main()
