"""Scratch: an FA3-style causal forward written in Gluon (``triton.experimental.gluon``), Triton's lower-level
dialect where the kernel itself lays out warps, shared memory, barriers and asynchronous tensor-core calls.

The shipped forward (``dldna.kernels.flash_triton._attn_fwd``) is one program of 8 warps that waits on each
tile's matmul before its softmax; Triton 3.6 has no pass that overlaps them on NVIDIA GPUs. FlashAttention-3 (Shah
et al. 2024) gets past FlashAttention-2 on Hopper with two things that this script writes by hand:
- warp specialisation: one loader warpgroup issues the TMA copies of K and V into a two-stage ring of shared memory
  while two consumer warpgroups, 64 query rows each, run the matmuls and the softmax; the loader gives its registers
  to the consumers (``setmaxnreg``), so each consumer can keep its 64 x 128 scores and 64 x D output in registers;
- (variant ``gluon_v2_overlap``) the overlap inside a consumer: the score matmul of key tile j is issued, then the P @ V
  matmul of tile j-1, and the softmax of tile j runs while that second matmul is still in flight.
The two consumers are scheduled by the hardware, not by FA3's named-barrier ping-pong. Later variants: three
consumers on 192-row blocks (D = 64 only, as FA3 there), the shipped kernels' program order (``chunk_heads``), and
persistent programs, one per SM, that load the next tile's Q and K/V while they finish the last (``persistent``).

With ``window`` the same kernel runs the causal sliding window (query i sees keys i - window < j <= i): the key
tiles before the block's first key are skipped and only the edge tiles are masked. ``--fwd-bwd`` also times a
forward+backward whose backward is dldna's (which reads the same ``(out, lse)``).

Gluon kernels do not run under ``TRITON_INTERPRET=1``, the CPU CI's way of testing Triton kernels; on CPU tensors this
one runs in ``dldna.kernels.gluon_emulator`` instead (``tests/test_gluon_emulator.py`` checks every variant against
float64 there, and mutated copies that must fail). The script measures whether the approach pays, on one H200,
against the shipped kernel and the fastest peers (cuDNN and FlashAttention-2 under a causal mask, FlexAttention
under a window) in one process.
Limits: bf16, causal (optionally windowed), ``N % 128 == 0``, D in {64, 128}, no backward of its own.

    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_forward.py --out benchmarks/experiments/logs
        [--rounds 5] [--variants gluon_v1 gluon_v2_overlap ...] [--cases causal:128:16384 window:64:65536 ...]
        [--fwd-bwd] [--log-name NAME]
    PYTHONPATH=$PWD python benchmarks/experiments/gluon_fa3_forward.py --compile-only   # sm_90a registers, no GPU
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch
import triton
from triton.experimental.gluon import language as gl

# the kernel and its launcher live in dldna (where the CPU CI tests them through the Gluon emulator)
from dldna.kernels.flash_gluon.forward import BLOCK_N, ROWS, SCHEDULES, _build_problem, _fa3_fwd, _maxnreg, fa3_forward


def causal_band(q, window):
    """dldna's band of causal attention (``window``: sliding) for ``q`` of ``(B, H, N, D)`` and keys as long."""
    from dldna.kernels.tiled import band_limits

    return band_limits(q.shape[2], q.shape[2], True, window)


def rel_diff(a, ref):
    """``|a - ref| / |ref|`` (Frobenius norms, in float32)."""
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


class GluonForwardShippedBackward(torch.autograd.Function):
    """Causal (windowed) attention with this script's forward and ``dldna``'s backward kernels, which read the same
    ``(out, lse)``: what forward+backward would take with the Gluon forward shipped."""

    @staticmethod
    def forward(ctx, q, k, v, window):
        out, lse = fa3_forward(q, k, v, window=window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from dldna.kernels import flash_triton

        q, k, v, out, lse = ctx.saved_tensors
        band = causal_band(q, ctx.window)
        grads = flash_triton.attention_backward(q, k, v, out, lse, grad_out.contiguous(), band.lo, band.hi,
                                                1.0 / math.sqrt(q.shape[-1]))
        return *grads, None


def compile_only(d, overlap, stages=2, window=0, consumers=2, chunk_heads=False, persistent=None):
    """Registers, spills and shared memory of the sm_90a build (no GPU needed), as ``flash_compile_report``;
    ``chunk_heads`` (host side only) is taken for ``VARIANTS``' sake."""
    from benchmarks.flash_compile_report import ptxas_info
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(rows):
        return f"tensordesc<bf16[{rows}, {d}],{gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)!r}>"

    sig = {"q_desc": desc(ROWS.value), "k_desc": desc(BLOCK_N.value), "v_desc": desc(BLOCK_N.value),
           "o_desc": desc(ROWS.value), "lse_ptr": "*fp32", "counter": "*i32",
           "n_ctx": "i32", "n_bh": "i32", "heads_per_chunk": "i32", "qk_scale": "fp32", "HEAD_DIM": "constexpr",
           "OVERLAP": "constexpr", "STAGES": "constexpr", "WINDOW": "constexpr", "CONSUMERS": "constexpr",
           "SCHEDULE": "constexpr"}
    src = GluonASTSource(_fa3_fwd, sig, {"HEAD_DIM": d, "OVERLAP": overlap, "STAGES": stages, "WINDOW": window,
                                         "CONSUMERS": consumers, "SCHEDULE": SCHEDULES[persistent]})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "maxnreg": _maxnreg(consumers)})
    ptx = kernel.asm["ptx"]
    info = {"head_dim": d, "overlap": overlap, "stages": stages, "window": window, "consumers": consumers,
            "persistent": persistent,
            "shared_bytes": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "setmaxnreg": ptx.count("setmaxnreg"), **ptxas_info(ptx)}
    return info, ptx


VARIANTS = {"gluon_v1": dict(overlap=False), "gluon_v2_overlap": dict(overlap=True),
            "gluon_v2_overlap_3stages": dict(overlap=True, stages=3),
            "gluon_v2_overlap_3wg": dict(overlap=True, consumers=3),
            "gluon_v2_overlap_chunked": dict(overlap=True, chunk_heads=True),
            "gluon_v2_overlap_3wg_chunked": dict(overlap=True, consumers=3, chunk_heads=True),
            "gluon_v2_overlap_persistent": dict(overlap=True, chunk_heads=True, persistent="walk"),
            "gluon_v2_overlap_3wg_persistent": dict(overlap=True, consumers=3, chunk_heads=True, persistent="walk"),
            "gluon_v2_overlap_queue": dict(overlap=True, chunk_heads=True, persistent="queue"),
            "gluon_v2_overlap_3wg_queue": dict(overlap=True, consumers=3, chunk_heads=True, persistent="queue"),
            "gluon_v2_overlap_queue_3stages": dict(overlap=True, stages=3, chunk_heads=True, persistent="queue"),
            "gluon_v2_overlap_queue_headwise": dict(overlap=True, persistent="queue"),
            "gluon_v2_overlap_queue_3stages_headwise": dict(overlap=True, stages=3, persistent="queue"),
            }  # fa3_forward's arguments


def runs_at(variant, d):
    """Whether the variant (a ``VARIANTS`` entry) builds at head_dim ``d`` (``_build_problem``): at 128, not with
    three consumers (registers) nor with three stages beside a persistent program's output buffers (261 KB of shared
    memory)."""
    return _build_problem(d, variant.get("consumers", 2), variant.get("stages", 2), variant.get("persistent")) is None


def check(log):
    """Max errors of every variant's output and lse against float64 on small causal and windowed shapes (odd B and H,
    1 to 8 key tiles, windows shorter than a tile, not a multiple of it, and as long as N), next to SDPA's error on
    the same inputs (the bf16 rounding of the output sets that floor)."""
    from dldna.attention import attention, sliding_window_mask

    torch.manual_seed(0)
    results = []
    for b, h, n, d, window in ((1, 3, 128, 64, None), (2, 1, 384, 128, None), (1, 2, 1024, 64, None),
                               (3, 1, 640, 128, None), (1, 3, 640, 64, 100), (2, 1, 768, 128, 300),
                               (1, 2, 1024, 64, 1024), (1, 1, 512, 128, 129)):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        mask = sliding_window_mask(n, window).to("cuda") if window else None
        ref, lse_ref = attention(q.double(), k.double(), v.double(), mask=mask, causal=True, return_lse=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        sdpa_err = (sdpa.double() - ref).abs().max().item()
        for name, variant in VARIANTS.items():
            if not runs_at(variant, d):
                continue
            out, lse = fa3_forward(q, k, v, window=window, poison=True, **variant)
            row = dict(shape=[b, h, n, d], window=window, variant=name,
                       max_err=(out.double() - ref).abs().max().item(), sdpa_max_err=sdpa_err,
                       lse_err=(lse.double() - lse_ref).abs().max().item())
            results.append(row)
            log(json.dumps(row))
    return results


def timed_rounds(measure, names, rounds, log, label, **tags):
    """``measure(name)`` for every name, ``rounds`` times in ``round_order``: the rounds (each logged under ``label``
    with ``tags``) and every name's median over them."""
    from benchmarks.attention import round_order

    results = []
    for r in range(rounds):
        results.append({name: measure(name) for name in round_order(names, r)})
        log(json.dumps({**tags, "round": r, label: results[-1]}))
    return results, {name: sorted(rd[name] for rd in results)[rounds // 2] for name in names}


def line_logger(out_dir, name):
    """A function that prints a line and appends it to ``out_dir/name.log`` (flushed: a killed run keeps its lines)."""
    os.makedirs(out_dir, exist_ok=True)
    log_file = open(os.path.join(out_dir, name + ".log"), "w")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log


def parse_cases(cases):
    """``MASK:HEAD_DIM:N`` strings as ``(mask, d, n)`` tuples."""
    return [(m, int(d), int(n)) for m, d, n in (case.split(":") for case in cases)]


def time_combos(row, combos, rounds, log, **tags):
    """Forward+backward in ms (medians of ``rounds``) of the ``BenchRow.fns`` entries ``combos`` beside dldna and the
    row's peer, the speed of each against the peer, and how far each combination's output and gradients are from
    dldna's (relative norm)."""
    row.fns.update(combos)
    names = list(combos) + ["dldna", row.peer]
    shipped = row.outputs("dldna")
    diffs = {name: {label: rel_diff(a, b) for label, a, b in zip(("out", "dq", "dk", "dv"), row.outputs(name),
                                                                 shipped)}
             for name in combos}
    rounds_ms, med = timed_rounds(lambda name: round(row.time(name, "fwd+bwd"), 4), names, rounds, log, "fwd_bwd_ms",
                                  **tags)
    return dict(rel_diff_vs_dldna=diffs, fwd_bwd_rounds_ms=rounds_ms, fwd_bwd_median_ms=med,
                fwd_bwd_speed_vs_peer={name: med[row.peer] / med[name] for name in names})


def time_fwd_bwd(row, mask, window, rounds, log):
    """Forward+backward in ms, median of ``rounds``: the Gluon forward with dldna's backward, dldna, and the row's
    peer; and how far the hybrid's output and gradients are from dldna's."""
    tags = dict(mask=mask, d=row.q.shape[-1], n=row.q.shape[2])
    combos = {"gluon_fwd_dldna_bwd": lambda: GluonForwardShippedBackward.apply(row.q, row.k, row.v, window)}
    timed = time_combos(row, combos, rounds, log, **tags)
    entry = {"hybrid_rel_diff_vs_dldna": timed.pop("rel_diff_vs_dldna")["gluon_fwd_dldna_bwd"], **timed}
    log(json.dumps(dict(tags, fwd_bwd_median_ms=entry["fwd_bwd_median_ms"],
                        speed_vs_peer=entry["fwd_bwd_speed_vs_peer"], diff=entry["hybrid_rel_diff_vs_dldna"])))
    return entry


def experiment_parser(log_name, rounds, cases):
    """The flags every Gluon experiment script takes: where its log goes, ``--compile-only``, the rounds per row
    and the ``MASK:HEAD_DIM:N`` rows (defaults ``log_name``, ``rounds``, ``cases``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/experiments/logs")
    parser.add_argument("--log-name", default=log_name, help="file name of the .log and .json")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=rounds, help="timing rounds per row (order reversed every other)")
    parser.add_argument("--cases", nargs="+", default=cases,
                        help="MASK:HEAD_DIM:N rows (MASK causal or window), timed at the benchmark's batch x heads")
    return parser


def run_header(script):
    """Device, versions, date and command line of a run of ``benchmarks/experiments/<script>``, for its .json."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(),
            "command": f"PYTHONPATH=$PWD python benchmarks/experiments/{script} " + " ".join(sys.argv[1:])}


def write_json(out_dir, name, result):
    """``result`` as ``out_dir/name.json``, beside the run's .log."""
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)


def main():
    parser = experiment_parser("gluon_fa3_forward", 5, ["causal:128:16384", "causal:64:4096", "causal:64:16384",
                                                        "causal:128:4096"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--fwd-bwd", action="store_true",
                        help="also time forward+backward with the Gluon forward (v2) and dldna's backward")
    args = parser.parse_args()
    if args.compile_only:  # printed only: the log files hold GPU runs
        for d in (64, 128):
            for window in (0, 1024):
                for variant in VARIANTS.values():
                    if runs_at(variant, d):
                        print(json.dumps(compile_only(d, window=window, **variant)[0]))
        return
    log = line_logger(args.out, args.log_name)
    sys.path.insert(0, os.getcwd())
    from benchmarks.attention import WINDOW, BenchRow, allow_flex_recompiles, allowed_pairs, problem, time_pass
    from dldna.kernels import flash_triton, report

    allow_flex_recompiles()
    record = json.load(open("results/flash_attention_bench.json"))
    result = dict(run_header("gluon_fa3_forward.py"), check=check(log), rows=[])
    variants = {name: VARIANTS[name] for name in args.variants}  # per row: those that build at its head_dim
    for mask, d, n in parse_cases(args.cases):
        window = WINDOW if mask == "window" else None
        b, h = problem(n, d)
        row = BenchRow(mask, d, n)
        flash_triton.restore_tuning()
        report.force_tuned_configs(record, mask, d, n)  # the shipped kernel with its stored tuned config
        q, k, v = row.q.detach(), row.k.detach(), row.v.detach()
        with torch.no_grad():
            ref = row.fns[row.peer]().float()
            row_variants = {name: variant for name, variant in variants.items() if runs_at(variant, d)}
            errs = {name: rel_diff(fa3_forward(q, k, v, window=window, **variant)[0], ref)
                    for name, variant in row_variants.items()}
        flops = 4.0 * d * b * h * allowed_pairs(n, mask)
        fns = {name: (lambda variant=variant: fa3_forward(q, k, v, window=window, **variant))
               for name, variant in row_variants.items()}
        peers = ("dldna", "sdpa_cudnn", "sdpa_flash") if mask == "causal" else ("dldna", "flex")
        fns.update({name: row.fns[name] for name in peers})
        entry = dict(mask=mask, d=d, n=n, batch=b, heads=h, window=window, rel_err_vs_peer=errs, peer=row.peer)
        inputs = (row.q, row.k, row.v)
        with torch.no_grad():
            triton.testing.do_bench(fns["dldna"], warmup=200, rep=500)  # heat the GPU to its steady clock
            entry["rounds"], entry["median_tflops"] = timed_rounds(
                lambda name: round(flops / (time_pass(fns[name], "fwd", row.grad, inputs) * 1e-3) / 1e12, 1),
                list(fns), args.rounds, log, "tflops", mask=mask, d=d, n=n)
        log(json.dumps(dict(mask=mask, d=d, n=n, median_tflops=entry["median_tflops"], rel_err=errs)))
        if args.fwd_bwd:
            entry.update(time_fwd_bwd(row, mask, window, args.rounds, log))
        result["rows"].append(entry)
    write_json(args.out, args.log_name, result)


if __name__ == "__main__":
    main()
