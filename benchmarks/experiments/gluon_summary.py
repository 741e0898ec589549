"""Gather the Gluon experiments' H200 runs (``gluon_fa3_forward.py``, ``gluon_fa3_dq.py``, ``gluon_fa3_dkdv.py``,
``host_gaps.py --gluon``) from ``benchmarks/experiments/logs`` into ``results/flash_gluon.json``, the record that
chapter 5 prints with ``dldna.kernels.report.gluon_table``. Reads logs only (no GPU); each figure keeps the command
of the run that measured it (``data.sources``).

    python benchmarks/experiments/gluon_summary.py
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.getcwd())
LOGS = "benchmarks/experiments/logs"
ROWS = (("causal", 128, 16384), ("window", 128, 16384), ("window", 128, 4096))  # the rows every run timed
SOURCES = {"fwd_bwd": "host_gaps_gluon_cached_layouts.json", "fwd": ("gluon_fa3_window_fwdbwd.json",
                                                                     "gluon_fa3_window_fwdbwd_2.json"),
           "dq": "gluon_dq.json", "dkdv": "gluon_dkdv_two_loops_full.json",
           "fwd_4k_d64": ("gluon_fwd_queue_variants.json", "gluon_fwd_queue_4k_d64.json", "gluon_fwd_queue_final.json")}
QUEUE_FORWARD = "gluon_v2_overlap_queue_3stages"  # persistent programs on a queue, 3 stages: the 4k, D = 64 forward


def _load(name):
    with open(os.path.join(LOGS, name)) as f:
        return json.load(f)


def _row(rows, mask, d, n, d_key="d"):
    return next(r for r in rows if (r["mask"], r[d_key], r["n"]) == (mask, d, n))


def fwd_bwd_rows(record):
    """Per row and implementation of a ``host_gaps.py`` record: the medians of the eager and graph rounds (ms)."""
    out = []
    for mask, d, n in ROWS:
        impls = {r["impl"]: {"eager_ms": statistics.median(r["eager_ms"]), "graph_ms": statistics.median(r["graph_ms"])}
                 for r in record["rows"] if (r["mask"], r["d"], r["n"]) == (mask, d, n) and r["pass"] == "fwd+bwd"}
        out.append({"mask": mask, "head_dim": d, "n": n, "peer": "sdpa_cudnn" if mask == "causal" else "flex",
                    "impls": impls})
    return out


def kernel_rows(fwd_records, dq_record, dkdv_record):
    """Per row: the forward's TFLOP/s (Gluon v2, dldna, the peer) and the dQ and dK/dV kernels alone in ms (the
    Gluon variant that the forward+backward rows use, and dldna's)."""
    fwd_rows = [r for rec in fwd_records for r in rec["rows"]]
    out = []
    for mask, d, n in ROWS:
        fwd = _row(fwd_rows, mask, d, n)["median_tflops"]
        dq = _row(dq_record["rows"], mask, d, n)["dq_median_ms"]
        dkdv = _row(dkdv_record["rows"], mask, d, n)["dkdv_median_ms"]
        peer = "sdpa_cudnn" if mask == "causal" else "flex"
        out.append({"mask": mask, "head_dim": d, "n": n,
                    "fwd_tflops": {"gluon": fwd["gluon_v2_overlap"], "dldna": fwd["dldna"], peer: fwd[peer]},
                    "dq_ms": {"gluon": dq["gluon_dq_64keys_2stages"], "dldna": dq["dldna_dq"]},
                    "dkdv_ms": {"gluon": dkdv["gluon_dkdv_2stages_2consumers"], "dldna": dkdv["dldna_dkdv"]}})
    return out


def forward_4k_d64_rows(names, records):
    """Per run that timed it: causal 4k, D = 64 forward TFLOP/s (medians) of the queue forward, dldna and cuDNN."""
    out = []
    for name, record in zip(names, records):
        tflops = _row(record["rows"], "causal", 64, 4096)["median_tflops"]
        out.append({"log": name, "date": record["date"],
                    "tflops": {"gluon": tflops[QUEUE_FORWARD], "dldna": tflops["dldna"],
                               "sdpa_cudnn": tflops["sdpa_cudnn"]}})
    return out


def main():
    records = {key: ([_load(n) for n in name] if isinstance(name, tuple) else _load(name))
               for key, name in SOURCES.items()}
    named = [pair for key, name in SOURCES.items()  # (log, record) of every run, in SOURCES' order
             for pair in (zip(name, records[key]) if isinstance(name, tuple) else [(name, records[key])])]
    every = [rec for _, rec in named]
    devices = {r["device"] for r in every}
    if len(devices) != 1:
        raise SystemExit(f"the runs come from more than one device: {sorted(devices)}")
    sources = [{"log": name, "date": rec["date"], "command": rec["command"]} for name, rec in named]
    record = {"name": "flash_gluon", "device": devices.pop(), "date": max(r["date"] for r in every),
              "torch": records["dq"]["torch"], "triton": records["dq"]["triton"],
              "command": "python benchmarks/experiments/gluon_summary.py",
              "data": {"fwd_bwd": fwd_bwd_rows(records["fwd_bwd"]),
                       "kernels": kernel_rows(records["fwd"], records["dq"], records["dkdv"]),
                       "forward_4k_d64": forward_4k_d64_rows(SOURCES["fwd_4k_d64"], records["fwd_4k_d64"]),
                       "sources": sources}}
    with open("results/flash_gluon.json", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print("wrote results/flash_gluon.json from", ", ".join(s["log"] for s in sources))


if __name__ == "__main__":
    main()
