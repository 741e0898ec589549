"""Where the warps of dldna's forward kernel wait, instruction by instruction (Nsight Compute's PC sampling).

``benchmarks/flash_ncu.py`` gives each kernel's stall reasons summed over the whole kernel. This script asks where:
it profiles one forward call of a case of ``flash_ncu.py`` (the same inputs and the configs of the stored benchmark
run) with the SourceCounters section, exports the SASS page (one row per instruction, with its warp-stall samples
by reason), and summarises it: the instructions with the most samples, the samples per opcode, per reason and
inside each loop. ncu runs with ``--clock-control none`` (the device notes: leave the clocks alone).

    python benchmarks/experiments/ncu_stall_sites.py profile --out-dir $OUT     # on the GPU: <case>.csv per case
    python benchmarks/experiments/ncu_stall_sites.py summarize $OUT/<case>.csv  # anywhere (also .csv.gz)

The run of 2026-12-02 (H200, the shipped kernels: ``rotated_full_tiles.patch`` was applied, so it ran with
``DLDNA_ROTATE=0``) is kept as ``logs/ncu_stall_sites_<case>.csv.gz``, the window case's rerun after the pair
descriptors as ``logs/pair_desc/ncu_stall_sites_window_d64_n4096_fwd.csv.gz``; the experiments README reads them.
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = [("window", 64, 4096), ("causal", 128, 16384)]  # forward only: (mask, head_dim, n)


def profile(out_dir: Path) -> None:
    """Profile each case into ``/tmp/<case>.ncu-rep`` and write its SASS page to ``out_dir/<case>.csv``; prints
    ncu's complaints if a step fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for mask, d, n in CASES:
        name = f"{mask}_d{d}_n{n}_fwd"
        rep = Path("/tmp") / f"{name}.ncu-rep"
        cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--kernel-name", "_attn_fwd",
               "--section", "SourceCounters", "--section", "WarpStateStats", "--import-source", "no",
               "-f", "-o", str(rep.with_suffix("")),
               sys.executable, str(ROOT / "benchmarks" / "flash_ncu.py"), "case", mask, str(d), str(n), "fwd", "dldna"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        print(name, "profile rc", done.returncode, done.stderr[-600:] if done.returncode else "", flush=True)
        for extra in (["--print-source", "sass"], []):  # the option's spelling differs between ncu versions
            page = subprocess.run(["ncu", "-i", str(rep), "--page", "source", "--csv", *extra],
                                  capture_output=True, text=True, timeout=300)
            if page.returncode == 0 and page.stdout.count("\n") > 10:
                break
        (out_dir / f"{name}.csv").write_text(page.stdout)
        print(name, "export rc", page.returncode, len(page.stdout), page.stderr[-600:], flush=True)


def _rows(text: str) -> list[dict[str, str]]:
    """The instruction rows of the SASS page: a "Kernel Name" line, then a header starting with "Address"."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
    return [] if start is None else list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def _num(value: str) -> float:
    try:
        return float(value.replace(",", ""))
    except (AttributeError, ValueError):
        return 0.0


def summarize(path: Path, top: int = 30) -> dict:
    """The top instructions by stall samples, samples per opcode and per reason (printed, and returned)."""
    rows = _rows(gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text())
    if not rows:
        raise SystemExit(f"{path}: no rows")
    cols = list(rows[0])
    total_col = next(c for c in cols if c and "Warp Stall Sampling (All" in c)
    source_col = next(c for c in cols if c and c.strip() == "Source")
    reason_cols = [c for c in cols if c and c.startswith("stall_") and "Not Issued" not in c]
    total = sum(_num(r[total_col]) for r in rows)
    print(f"{path.name}: {len(rows)} instructions, {total:.0f} samples")
    by_op = collections.Counter()
    by_reason = collections.Counter()
    for r in rows:
        opcode = re.sub(r"^@!?U?P\w+\s+", "", r[source_col].strip()).split(" ")[0]
        by_op[opcode] += _num(r[total_col])
        for c in reason_cols:
            by_reason[c] += _num(r[c])
    print("\nper opcode (% of samples):")
    for op, s in by_op.most_common(20):
        print(f"  {op:28s} {100 * s / total:5.1f}")
    print("\nper reason (% of samples):")
    for c, s in by_reason.most_common(20):
        print(f"  {c:40s} {100 * s / total:5.1f}")
    print(f"\ntop {top} instructions:")
    ranked = sorted(range(len(rows)), key=lambda i: -_num(rows[i][total_col]))[:top]
    for i in ranked:
        r = rows[i]
        reasons = sorted(((c, _num(r[c])) for c in reason_cols), key=lambda kv: -kv[1])[:3]
        print(f"  #{i:5d} {100 * _num(r[total_col]) / total:5.1f}%  {r[source_col].strip()[:70]:70s} "
              + " ".join(f"{c}={v:.0f}" for c, v in reasons if v))
    print("\nloops (a backward branch over 100+ instructions: first, last instruction, % of samples inside):")
    for first, last in _loops(rows, source_col):
        inside = sum(_num(rows[i][total_col]) for i in range(first, last + 1))
        print(f"  #{first:5d} .. #{last:5d} {100 * inside / total:5.1f}%")
    return {"instructions": len(rows), "samples": total, "per_opcode": dict(by_op), "per_reason": dict(by_reason)}


def _loops(rows: list[dict[str, str]], source_col: str) -> list[tuple[int, int]]:
    """(target, branch) row indices of the branches that jump 100 or more instructions back. Besides the loops this
    also lists the retry stubs of mbarrier waits at the end of the kernel, which jump back into the loop bodies."""
    index = {int(r["Address"], 16): i for i, r in enumerate(rows)}
    found = []
    for i, r in enumerate(rows):
        match = re.search(r"BRA (0x[0-9a-f]+)", r[source_col])
        target = index.get(int(match.group(1), 16)) if match else None
        if target is not None and i - target >= 100:
            found.append((target, i))
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("profile").add_argument("--out-dir", type=Path, required=True)
    s = sub.add_parser("summarize")
    s.add_argument("csv", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.what == "profile":
        profile(args.out_dir)
    else:
        for path in args.csv:
            summarize(path)


if __name__ == "__main__":
    main()
