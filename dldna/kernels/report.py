"""Tables and figures of the stored GPU results of chapter 5 (benchmark, GPU test matrix, compile report).

Each function takes a record as written by ``dldna.results.save_result`` and returns text or a matplotlib figure
(never shows it). Used in chapter 5.
"""
from __future__ import annotations

import re

import matplotlib.pyplot as plt

IMPLS = ("dldna", "dldna_triton", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex")
# "dldna" is what flash_attention runs (on Hopper the Gluon kernels where flash_gluon.plan_for has them);
# "dldna_triton" the same calls on the Triton kernels alone (timed only where the two differ)
LABELS = {"dldna": "dldna", "dldna_triton": "dldna, Triton kernels only", "sdpa_cudnn": "SDPA cuDNN",
          "sdpa_flash": "SDPA FlashAttention-2", "sdpa_efficient": "SDPA mem-efficient", "flex": "FlexAttention"}


def benchmark_table(record: dict) -> str:
    """TFLOP/s of every implementation per (mask, head_dim, N, pass), and the speed ratio of dldna to the best peer."""
    rows = record["data"]["rows"]
    by = {(r["mask"], r["head_dim"], r["n"], r["pass"], r["impl"]): r for r in rows}
    keys = sorted({(r["mask"], r["head_dim"], r["n"], r["pass"]) for r in rows})
    lines = [f"{'mask':8} {'D':>4} {'N':>6} {'pass':8}" + "".join(f"{i:>16}" for i in IMPLS) + f"{'dldna/best':>12}"]
    for key in keys:
        cells, best_peer = [], None
        for impl in IMPLS:
            r = by.get(key + (impl,))
            if r is None:
                cells.append(f"{'-':>16}")
            elif "tflops" not in r:
                cells.append(f"{'error':>16}")
            else:
                cells.append(f"{r['tflops']:>11.0f} TF/s")
                if not impl.startswith("dldna") and (best_peer is None or r["ms"] < best_peer):
                    best_peer = r["ms"]
        ours = by.get(key + ("dldna",))
        ratio = f"{best_peer / ours['ms']:>11.2f}x" if best_peer and ours and "ms" in ours else f"{'':>12}"
        lines.append(f"{key[0]:8} {key[1]:>4} {key[2]:>6} {key[3]:8}" + "".join(cells) + ratio)
    return "\n".join(lines)


def targets_table(record: dict) -> str:
    """The issue's targets with the measured values, MET or MISSED."""
    out = []
    for t in record["data"]["targets"]:
        value = "not measured" if t["measured"] is None else f"{t['measured']:.3g} {t['unit']}"
        out.append(f"{'MET   ' if t['met'] else 'MISSED'} {t['target']}: {value} (bar {t['bar']})")
    return "\n".join(out)


def peer_speedups(record: dict) -> str:
    """Per peer and pass: in how many rows dldna is faster, and the smallest / median / largest speed-up
    (peer time / dldna time; > 1 means dldna is faster) over every (mask, head_dim, N) both ran."""
    import statistics

    groups: dict[tuple[str, str], list[float]] = {}
    for r in record["data"]["ratios"]:
        groups.setdefault((r["peer"], r["pass"]), []).append(r["speedup_vs_peer"])
    lines = [f"{'peer':24} {'pass':8} {'dldna faster':>13} {'min':>6} {'median':>7} {'max':>6}"]
    for (peer, pass_name), values in sorted(groups.items()):
        faster = sum(v > 1 for v in values)
        lines.append(f"{LABELS.get(peer, peer):24} {pass_name:8} {f'{faster}/{len(values)}':>13} {min(values):>6.2f} "
                     f"{statistics.median(values):>7.2f} {max(values):>6.2f}")
    return "\n".join(lines)


def _tuning_entries(record: dict, mask: str, head_dim: int, n: int):
    """The autotuner's log entries (one per kernel) of one dense benchmark case stored with the run."""
    if mask not in ("full", "causal", "window"):  # a block layout's entries are keyed by the layout, not the mask
        raise ValueError(f"mask must be 'full', 'causal' or 'window' (the dense cases), got {mask!r}")
    causal = mask != "full"
    for entry in record["data"].get("tuning", []):
        if "times_ms" not in entry:
            continue
        key = entry["key"].strip("()").split(", ")
        # key: head_dim, dtype, window?, causal, Nq, Nk, ... (see flash_triton's launchers)
        if int(key[0]) == head_dim and key[2] == str(mask == "window") and key[3] == str(causal) \
                and int(key[4]) == n and int(key[5]) == n:
            yield entry


def kernel_times(record: dict, mask: str, head_dim: int, n: int) -> dict[str, float]:
    """The tuned (fastest) time in ms of each of dldna's kernels (``fwd``, ``dq``, ``dkdv``) for one benchmark
    case, read off the autotuner's log stored with the run (the backward is the ``dq`` plus the ``dkdv`` kernel)."""
    return {e["kernel"]: min(e["times_ms"].values()) for e in _tuning_entries(record, mask, head_dim, n)}


_CONFIG_REPR = re.compile(r"KernelConfig\(block_m=(\d+), block_n=(\d+), num_warps=(\d+), num_stages=(\d+), "
                          r"tma=(True|False)\)")


def tuned_configs(record: dict, mask: str, head_dim: int, n: int) -> dict[str, dict]:
    """The config the tuner picked for each kernel of one benchmark case, as ``KernelConfig`` keyword arguments
    (parsed from the repr the log stores), e.g. to force the same kernels elsewhere:
    ``force_config(kernel, KernelConfig(**fields))``."""
    picked = {}
    for entry in _tuning_entries(record, mask, head_dim, n):
        match = _CONFIG_REPR.fullmatch(entry["best"])
        if match is None:
            raise ValueError(f"unrecognised config in the tuning log: {entry['best']!r}")
        m, bn, warps, stages, tma = match.groups()
        picked[entry["kernel"]] = {"block_m": int(m), "block_n": int(bn), "num_warps": int(warps),
                                   "num_stages": int(stages), "tma": tma == "True"}
    return picked


def force_tuned_configs(record: dict, mask: str, head_dim: int, n: int, kernels=None) -> None:
    """Force each of dldna's kernels to the config the stored run picked for this case (``tuned_configs``), so a
    later script runs the benchmark's kernels without tuning (and compiling) every candidate. ``kernels``: the
    ``flash_triton`` module to set (default: the package's; another copy, e.g. an older version under test).
    Needs triton."""
    if kernels is None:
        from dldna.kernels import flash_triton as kernels

    for kernel, fields in tuned_configs(record, mask, head_dim, n).items():
        kernels.force_config(kernel, kernels.KernelConfig(**fields))


def plot_benchmark(record: dict, passes=("fwd", "fwd+bwd")):
    """TFLOP/s against N: one panel per (mask, head_dim), one line per implementation, solid fwd / dashed fwd+bwd."""
    rows = [r for r in record["data"]["rows"] if "tflops" in r and r["mask"] in ("causal", "window")]
    panels = sorted({(r["mask"], r["head_dim"]) for r in rows})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.4), squeeze=False)
    for ax, (mask, d) in zip(axes[0], panels):
        for i, impl in enumerate(IMPLS):
            for pass_name, style in zip(passes, ("-", "--")):
                pts = sorted((r["n"], r["tflops"]) for r in rows
                             if (r["mask"], r["head_dim"], r["impl"], r["pass"]) == (mask, d, impl, pass_name))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{i}",
                            label=LABELS[impl] if pass_name == passes[0] else None)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mask}, head_dim {d}")
        ax.set_xlabel("sequence length N")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s (unmasked work)")
    labelled = {}  # one legend for the figure: the window panels have fewer implementations than the causal ones
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.legend(labelled.values(), labelled.keys(), loc="upper center", ncol=len(labelled), fontsize=8,
               title="solid: forward, dashed: forward+backward", title_fontsize=8, frameon=False)
    return fig


def gpu_test_summary(record: dict) -> str:
    """Cases passed, worst relative errors per dtype and the failures of the GPU correctness matrix."""
    data = record["data"]
    lines = [f"{data['passed']}/{data['cases']} cases passed; worst relative error (out, dq, dk, dv) per dtype:"]
    lines += [f"  {dtype:9} {err:.2e}" for dtype, err in sorted(data["worst_relative_error"].items())]
    for f in data["failed"]:
        lines.append(f"FAILED {f['case']} {f['dtype']} {tuple(f['shape'])}: {f['error']}")
    if data.get("note"):
        lines.append(data["note"])
    return "\n".join(lines)


def compile_report_table(record: dict) -> str:
    """Registers, spills, shared memory and wgmma count per kernel config, as compiled for sm_90a."""
    lines = [f"{'kernel':16} {'D':>4} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'TMA':>4} {'regs':>5} "
             f"{'spill B':>8} {'smem KiB':>9} {'wgmma':>6}"]
    for r in record["data"]["rows"]:
        if "error" in r:
            lines.append(f"{r['kernel']:16} {r['head_dim']:>4} {r['config']}: {r['error'][:60]}")
            continue
        cfg = r["config"]
        values = dict(part.split("=") for part in cfg[cfg.index("(") + 1 : -1].split(", "))
        lines.append(f"{r['kernel'].replace('_attn_', ''):16} {r['head_dim']:>4} {values['block_m']:>4} "
                     f"{values['block_n']:>4} {values['num_warps']:>5} {values['num_stages']:>6} "
                     f"{'yes' if values.get('tma') == 'True' else 'no':>4} {r['registers']:>5} "
                     f"{r['spill_store_bytes']:>8} {r['shared_bytes'] / 1024:>9.0f} {r['wgmma']:>6}")
    return "\n".join(lines)


_NCU_COLUMNS = (  # (header, raw metric, format)
    ("ms", "gpu__time_duration.sum", lambda v: f"{v / 1e6:.2f}"),
    ("tensor%", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", lambda v: f"{v:.0f}"),
    ("exp2%", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active", lambda v: f"{v:.0f}"),
    ("fma%", "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active", lambda v: f"{v:.0f}"),
    ("L2%", "lts__throughput.avg.pct_of_peak_sustained_elapsed", lambda v: f"{v:.0f}"),
    ("regs", "launch__registers_per_thread", lambda v: f"{v:.0f}"),
    ("warps%", "sm__warps_active.avg.pct_of_peak_sustained_active", lambda v: f"{v:.0f}"),
)
_STALL = "smsp__average_warps_issue_stalled_"


def _kernel_label(name: str) -> str:
    """A short name for a profiled kernel (cuDNN's and Flex's generated names run to a hundred characters)."""
    if name.startswith("cudnn_generated"):
        return "cuDNN " + ("fprop" if "fprop" in name else "bprop" if "bprop" in name else name[16:30])
    if "flex_attention" in name:
        return "Flex"
    return name.replace("void ", "").replace("cudnn::", "cuDNN ").split("(")[0].split("<")[0][:22]


def ncu_table(record: dict, top_stalls: int = 3) -> str:
    """One line per profiled kernel of ``benchmarks/flash_ncu.py``'s record: duration, how busy the tensor cores,
    the exp2 (XU) and FMA pipes and L2 were, registers, active warps (of the SM's 64), and the warp stalls that cost
    the most cycles per issued instruction. Kernels under 0.1 ms are left out."""
    head = (f"{'case':24} {'kernel':22}" + "".join(f"{h:>8}" for h, _, _ in _NCU_COLUMNS)
            + "  top stalls (cycles/instr)")
    lines = [head]
    for run in record["data"]["runs"]:
        case = f"{run['mask']} {run['pass']} D={run['head_dim']} {run['n'] // 1024}k"
        for kernel in run["kernels"]:
            m = kernel["metrics"]
            if m.get("gpu__time_duration.sum", 0) < 1e5:
                continue
            cells = "".join(f"{fmt(m[key]) if isinstance(m.get(key), float) else '-':>8}"
                            for _, key, fmt in _NCU_COLUMNS)
            stalls = sorted(((v, k[len(_STALL):].replace("_per_issue_active.ratio", "")) for k, v in m.items()
                             if k.startswith(_STALL) and isinstance(v, float)
                             and not k.startswith(_STALL + "selected")),  # "selected": issuing, not stalled
                            reverse=True)[:top_stalls]
            lines.append(f"{case:24} {_kernel_label(kernel['kernel']):22}{cells}  "
                         + ", ".join(f"{name} {v:.1f}" for v, name in stalls))
    return "\n".join(lines)


GLUON = "gluon_fwd_gluon_bwd"  # the Gluon forward, dQ and dK/dV kernels of benchmarks/experiments


def gluon_table(record: dict) -> str:
    """The Gluon experiments' record (``benchmarks/experiments/gluon_summary.py``): forward+backward in ms and as
    speed against the row's peer (eager medians, the CUDA-graph replay's speed in brackets) for dldna and the
    all-Gluon pass, then each kernel alone: forward TFLOP/s, dQ and dK/dV ms, Gluon against dldna; then the causal
    4k, D = 64 forward of every run that timed the persistent Gluon forward on a queue."""
    lines = [f"{'mask':6} {'D':>4} {'N':>6}  {'dldna':>16} {'Gluon':>16} {'(graph)':>8}  peer"]
    for row in record["data"]["fwd_bwd"]:
        impls, peer = row["impls"], row["peer"]
        peer_ms = impls[peer]["eager_ms"]
        cells = [f"{impls[i]['eager_ms']:6.3f} ms {peer_ms / impls[i]['eager_ms']:4.2f}x" for i in ("dldna", GLUON)]
        graph = impls[peer]["graph_ms"] / impls[GLUON]["graph_ms"]
        lines.append(f"{row['mask']:6} {row['head_dim']:>4} {row['n']:>6}  {cells[0]:>16} {cells[1]:>16} "
                     f"{f'({graph:.2f}x)':>8}  {LABELS[peer]} {peer_ms:.3f} ms")
    lines += ["", "each kernel alone, Gluon / dldna (peer):",
              f"{'mask':6} {'D':>4} {'N':>6}  {'forward TFLOP/s':>22} {'dQ ms':>15} {'dK/dV ms':>15}"]
    short = {"sdpa_cudnn": "cuDNN", "flex": "Flex"}
    for row in record["data"]["kernels"]:
        fwd, dq, dkdv = row["fwd_tflops"], row["dq_ms"], row["dkdv_ms"]
        peer = next(k for k in fwd if k not in ("gluon", "dldna"))
        forward = f"{fwd['gluon']:.0f} / {fwd['dldna']:.0f} ({short[peer]} {fwd[peer]:.0f})"
        lines.append(f"{row['mask']:6} {row['head_dim']:>4} {row['n']:>6}  {forward:>22} "
                     f"{dq['gluon']:>6.3f} / {dq['dldna']:.3f} {dkdv['gluon']:>6.3f} / {dkdv['dldna']:.3f}")
    lines += ["", "causal 4k, D = 64 forward TFLOP/s (bar 420), Gluon persistent on a queue, 3 stages:",
              f"{'run':28} {'Gluon':>6} {'dldna':>6} {'cuDNN':>6}"]
    for run in record["data"]["forward_4k_d64"]:
        tflops = run["tflops"]
        lines.append(f"{run['log'].removesuffix('.json'):28} {tflops['gluon']:>6.0f} {tflops['dldna']:>6.0f} "
                     f"{tflops['sdpa_cudnn']:>6.0f}")
    lines += ["", "measured by:"] + [f"  {src['date']}  {src['command']}" for src in record["data"]["sources"]]
    return "\n".join(lines)
