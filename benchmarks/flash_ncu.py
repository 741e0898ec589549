"""Nsight Compute counters for dldna's FlashAttention kernels and their peers: what limits each one.

Three cases of ``benchmarks/attention.py`` (same shapes and inputs): the causal forward and backward at N = 16k,
D = 128, and the sliding-window (1024) forward at N = 4k, D = 64. Each (case, implementation) is profiled in its own
process under ``ncu``: the kernels are compiled first, outside the profiled range (``torch.cuda.profiler.start``
and ``stop``; dldna's run the configs the stored benchmark run picked), then one call is profiled with the
SpeedOfLight, Occupancy, LaunchStats, ComputeWorkloadAnalysis, MemoryWorkloadAnalysis and WarpStateStats sections.
The peers are cuDNN (causal) and FlexAttention (window), the fastest peer of each case.

    python benchmarks/flash_ncu.py profile --out-dir /tmp/ncu        # on the GPU: one raw CSV per run
    python benchmarks/flash_ncu.py summarize /tmp/ncu --out-dir results  # -> results/flash_ncu.json

The summary keeps, per kernel, the metrics that answer "what limits it": duration and clock, SM / tensor-pipe /
exp2 (XU) / FMA / L2 throughput, registers, occupancy and the warp-stall reasons. ncu holds the SM clock at its base
rate and replays each kernel many times, so its durations are for comparison within this file, not against
``do_bench``. ``dldna.kernels.report.ncu_table`` prints the summary (chapter 5).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

RUNS = [  # (mask, head_dim, n, pass, impl)
    ("causal", 128, 16384, "fwd", "dldna"),
    ("causal", 128, 16384, "fwd", "sdpa_cudnn"),
    ("causal", 128, 16384, "bwd", "dldna"),
    ("causal", 128, 16384, "bwd", "sdpa_cudnn"),
    ("window", 64, 4096, "fwd", "dldna"),
    ("window", 64, 4096, "fwd", "flex"),
]
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis",
            "WarpStateStats")
# Metric names (or prefixes) kept by ``summarize``: ncu's raw names; the rest of the raw page (~750) is dropped.
KEEP = ("gpu__time_duration.sum", "gpc__cycles_elapsed.avg.per_second",
        "sm__throughput.avg.pct_of_peak_sustained_elapsed", "lts__throughput.avg.pct_of_peak_sustained_elapsed",
        "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
        "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
        "smsp__issue_active.avg.per_cycle_active", "launch__registers_per_thread", "launch__shared_mem_per_block",
        "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem", "launch__grid_size",
        "launch__block_size", "sm__warps_active.avg.pct_of_peak_sustained_active",
        "smsp__average_warp_latency_per_inst_issued.ratio", "smsp__average_warps_issue_stalled_")


def _run_name(mask: str, d: int, n: int, pass_name: str, impl: str) -> str:
    """The stem of one run's CSV file."""
    return f"{mask}_d{d}_n{n}_{pass_name}_{impl}"


def run_case(mask: str, d: int, n: int, pass_name: str, impl: str) -> None:
    """Compile (and for peers, tune), then profile one call: the forward, or the backward of a forward made outside
    the profiled range. dldna's kernels run the configs of the stored benchmark run."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attention import _inputs, make_fns

    if impl == "dldna":
        from dldna.kernels.report import force_tuned_configs
        from dldna.results import load_result

        force_tuned_configs(load_result("flash_attention_bench"), mask, d, n)
    q, k, v = _inputs(d, n, seed=n + d)
    fn = make_fns(mask, d, n, q, k, v)[impl]
    grad = torch.randn_like(q)
    for _ in range(3):  # tuning and compilation happen here, unprofiled
        if pass_name == "fwd":
            with torch.no_grad():
                fn()
        else:
            q.grad = k.grad = v.grad = None
            fn().backward(grad)
    out = None if pass_name == "fwd" else fn()
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    if pass_name == "fwd":
        with torch.no_grad():
            fn()
    else:
        out.backward(grad)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def profile(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for mask, d, n, pass_name, impl in RUNS:
        name = _run_name(mask, d, n, pass_name, impl)
        cmd = ["ncu", "--profile-from-start", "off", "--page", "raw", "--csv"]
        for section in SECTIONS:
            cmd += ["--section", section]
        cmd += [sys.executable, __file__, "case", mask, str(d), str(n), pass_name, impl]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        (out_dir / f"{name}.csv").write_text(done.stdout)
        print(name, "rc", done.returncode, done.stderr[-400:] if done.returncode else "", flush=True)


def _raw_rows(text: str) -> list[dict[str, str]]:
    """The kernel rows of an ``ncu --page raw --csv`` output (header line, then a units line, then kernels)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if len(lines) < 3:
        return []
    return list(csv.DictReader(io.StringIO("\n".join([lines[0]] + lines[2:]))))


def _number(value: str):
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return value


def summarize(csv_dir: Path, out_dir: Path | None) -> Path:
    """The ``KEEP`` metrics of every profiled kernel, per run, saved with provenance as ``flash_ncu.json``."""
    from dldna.results import save_result

    runs = []
    for mask, d, n, pass_name, impl in RUNS:
        path = csv_dir / f"{_run_name(mask, d, n, pass_name, impl)}.csv"
        kernels = []
        for row in _raw_rows(path.read_text()) if path.exists() else []:
            metrics = {key: _number(val) for key, val in row.items() if key and key.startswith(KEEP)}
            kernels.append({"kernel": row.get("Kernel Name", "")[:160], "metrics": metrics})
        runs.append({"mask": mask, "head_dim": d, "n": n, "pass": pass_name, "impl": impl, "kernels": kernels})
    return save_result("flash_ncu", {"runs": runs, "sections": list(SECTIONS)},
                       command=f"python benchmarks/flash_ncu.py profile --out-dir {csv_dir}; "
                               f"python benchmarks/flash_ncu.py summarize {csv_dir}", out_dir=out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--out-dir", type=Path, required=True)
    s = sub.add_parser("summarize")
    s.add_argument("csv_dir", type=Path)
    s.add_argument("--out-dir", type=Path, default=None)
    c = sub.add_parser("case")
    c.add_argument("mask")
    c.add_argument("d", type=int)
    c.add_argument("n", type=int)
    c.add_argument("pass_name")
    c.add_argument("impl")
    args = parser.parse_args(argv)
    if args.what == "profile":
        profile(args.out_dir)
    elif args.what == "summarize":
        print(summarize(args.csv_dir, args.out_dir))
    else:
        run_case(args.mask, args.d, args.n, args.pass_name, args.impl)


if __name__ == "__main__":
    main()
