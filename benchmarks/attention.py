"""FlashAttention peer comparison on one GPU: dldna's Triton kernel vs PyTorch SDPA backends and FlexAttention.

For N in {1k, 4k, 16k, 64k}, head_dim in {64, 128}, masks {causal, causal sliding window 1024}, forward and
forward+backward, bf16, median time of ``triton.testing.do_bench`` with its default 25 ms warm-up and 100 ms of
timed calls: long enough for the GPU to settle at the clock it holds under its power limit (from an idle GPU the
same kernel timed up to 6 % faster). Each row is timed in ``--rounds`` rounds (3), the implementations in reverse
order every other round, and gives the median round: under the board's power cap a kernel's clock depends on what
ran just before it, and one timing of a row was seen 3.5 to 8 % off its kernels' time in the same run. Every
row records the median SM clock and board power over its rounds. Peers:
``scaled_dot_product_attention`` with the FLASH (FlashAttention-2), CUDNN and EFFICIENT backends (causal only: none
takes a window without a dense mask) and ``flex_attention`` compiled, with its block mask built once per shape
(``dldna.bench.flex_block_mask``). One extra row: a BigBird block layout, ``block_sparse_flash_attention`` vs
FlexAttention with the same layout.

TFLOP/s count only unmasked work: forward ``4 * D * B * H * pairs`` with pairs = N^2/2 for causal (as is usual)
and the exact number of allowed pairs for windows and layouts; forward+backward counts 3.5x the forward (the
backward does 2.5x: five matmuls instead of two). Batch x heads keep 16k tokens and a model width of 2048.

Compilation runs first in parallel processes that only compile (they fill the Triton and Inductor caches); then
one process times every row, so each timing has the GPU alone. Rows are logged as they finish (and appended to
``flash_attention_bench.partial.jsonl``); the whole run goes to ``<out-dir>/flash_attention_bench.json`` via
``dldna.results.save_result``.

    python benchmarks/attention.py --out-dir results --compile-workers 8
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

import torch

WINDOW = 1024
SPARSE_BLOCK = 128
PEERS_CAUSAL = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")
OURS = ("dldna", "dldna_triton")  # what ships (Gluon kernels where they apply), and the Triton kernels alone


def problem(n: int, d: int) -> tuple[int, int]:
    """(batch, heads) for sequence length n and head_dim d: 16k tokens per batch, model width 2048."""
    return max(1, 16384 // n), 2048 // d


def allowed_pairs(n: int, mask: str, layout: torch.Tensor | None = None) -> float:
    if mask == "causal":
        return n * n / 2
    if mask == "window":
        w = min(WINDOW, n)
        return float(w * n - w * (w - 1) // 2)
    if mask == "bigbird":
        from dldna.kernels.flash_attention import block_mask_from_layout

        return float(block_mask_from_layout(layout, SPARSE_BLOCK, n, n).sum())
    raise ValueError(mask)


def cases(ns, head_dims) -> list[tuple[str, int, int]]:
    """Every (mask, D, N); the rows the targets name come first (they are timed first)."""
    first = [("causal", 128, 16384), ("causal", 64, 4096), ("window", 64, 4096), ("window", 64, 16384),
             ("window", 64, 65536), ("window", 128, 16384), ("window", 128, 65536)]
    every = [(m, d, n) for m in ("causal", "window") for d in head_dims for n in ns]
    ordered = [c for c in first if c in every] + [c for c in every if c not in first]
    return ordered + [("bigbird", 64, 16384)]


def _layout(n: int) -> torch.Tensor:
    from dldna.attention.masks import bigbird_block_layout

    return bigbird_block_layout(n // SPARSE_BLOCK, 3, 1, 3, seed=0)


def _triton_only_fn(q, k, v, window):
    """``{"dldna_triton": fn}``: dldna with its Triton kernels only, where the shipped call runs Gluon ones (on
    Hopper, ``dldna.kernels.flash_gluon.plan_for``); else ``{}``, the two being the same."""
    from dldna.kernels import flash_attention, flash_gluon
    from dldna.kernels.tiled import band_limits

    band = band_limits(q.shape[2], k.shape[2], True, window)
    if flash_gluon.plan_for(q, k, v, band.lo, band.hi) is None:
        return {}

    def triton_only():
        with flash_gluon.triton_only():
            return flash_attention(q, k, v, causal=True, window=window)

    return {"dldna_triton": triton_only}


def make_fns(mask: str, d: int, n: int, q, k, v):
    """{impl: fn()} for this case; every fn returns the attention output."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from dldna.bench import flex_block_mask
    from dldna.kernels import block_sparse_flash_attention, flash_attention

    fns = {}
    flex = torch.compile(flex_attention, dynamic=False)
    if mask == "bigbird":
        layout = _layout(n).cuda()
        fns["dldna"] = lambda: block_sparse_flash_attention(q, k, v, layout, SPARSE_BLOCK)

        def mask_mod(b, h, q_idx, kv_idx):
            return layout[q_idx // SPARSE_BLOCK, kv_idx // SPARSE_BLOCK]
    elif mask == "causal":
        fns["dldna"] = lambda: flash_attention(q, k, v, causal=True)
        fns.update(_triton_only_fn(q, k, v, None))

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            fns[name] = sdpa
    else:
        fns["dldna"] = lambda: flash_attention(q, k, v, causal=True, window=WINDOW)
        fns.update(_triton_only_fn(q, k, v, WINDOW))

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)

    # built without torch.compile: create_block_mask(_compile=True) stalled this script's timing process twice
    block_mask = flex_block_mask(mask_mod, n, block_size=128, device="cuda")
    fns["flex"] = lambda: flex(q, k, v, block_mask=block_mask)
    return fns


def _inputs(d, n, seed):
    b, h = problem(n, d)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    return q, k, v


def compile_ours(mask, d):
    """Compile every tuning config of our kernels for (mask, head_dim) at a short length (the compiled kernels do
    not depend on N); the other kernels stay on a forced config meanwhile, so nothing is tuned (timed) here."""
    from dldna.kernels import flash_attention, flash_gluon
    from dldna.kernels import flash_triton as ft

    q, k, v = (torch.randn(1, 4, 1024, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    window = WINDOW if mask == "window" else None
    flash_attention(q, k, v, causal=True, window=window).sum().backward()  # the Gluon kernels, on Hopper
    with flash_gluon.triton_only():
        for _ in ft.each_config(lambda kernel: ft.candidate_configs(kernel, d)):
            flash_attention(q, k, v, causal=True, window=window).sum().backward()


def compile_peers(case):
    """Run every implementation of a case once, without and with autograd (Inductor compiles both graphs)."""
    mask, d, n = case
    q, k, v = _inputs(d, n, seed=0)
    for impl, fn in make_fns(mask, d, n, q, k, v).items():
        if impl.startswith("dldna") and mask != "bigbird":
            continue  # compile_ours did these
        try:
            with torch.no_grad():
                fn()
            fn().sum().backward()
        except Exception:  # reported when timed
            pass
    torch.cuda.synchronize()
    del q, k, v
    torch.cuda.empty_cache()


def compile_jobs(all_cases):
    ours = sorted({(m, d) for m, d, _ in all_cases if m != "bigbird"})
    return [("ours", job) for job in ours] + [("peers", case) for case in all_cases]


def pass_call(fn, pass_name: str, grad):
    """One timed call of a row: ``fn()`` without autograd (``"fwd"``) or ``fn().backward(grad)`` (``"fwd+bwd"``)."""
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return fn()
    elif pass_name == "fwd+bwd":
        def run():
            fn().backward(grad)
    else:
        raise ValueError(f"pass_name must be 'fwd' or 'fwd+bwd', got {pass_name!r}")
    return run


def time_pass(fn, pass_name: str, grad, inputs, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median ms of one row: ``pass_call(fn, pass_name, grad)`` timed by ``do_bench`` with the gradients of ``inputs``
    cleared before every call."""
    import triton

    return triton.testing.do_bench(pass_call(fn, pass_name, grad), warmup=warmup_ms, rep=rep_ms,
                                   grad_to_none=list(inputs), return_mode="median")


class BenchRow:
    """One benchmark row (mask, head_dim ``d``, length ``n``) as every script times it: the seeded bf16 ``q, k, v``
    (requiring grad), the output gradient ``grad``, the implementations ``fns`` (``make_fns``) and ``peer``, the
    fastest other one for the mask (cuDNN under a causal mask, FlexAttention otherwise)."""

    def __init__(self, mask: str, d: int, n: int):
        self.q, self.k, self.v = _inputs(d, n, seed=n + d)
        self.grad = torch.randn_like(self.q)
        self.fns = make_fns(mask, d, n, self.q, self.k, self.v)
        self.peer = "sdpa_cudnn" if mask == "causal" else "flex"

    def time(self, impl: str, pass_name: str, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
        """``time_pass`` of implementation ``impl`` (a key of ``fns``)."""
        return time_pass(self.fns[impl], pass_name, self.grad, (self.q, self.k, self.v), warmup_ms, rep_ms)

    def outputs(self, impl: str = "dldna") -> list[torch.Tensor]:
        """Copies of ``impl``'s output and of the q, k, v gradients of one forward+backward."""
        for t in (self.q, self.k, self.v):
            t.grad = None
        out = self.fns[impl]()
        out.backward(self.grad)
        return [out.detach().clone()] + [t.grad.clone() for t in (self.q, self.k, self.v)]


def round_order(impls: list[str], r: int) -> list[str]:
    """The order of the implementations in round ``r``: as listed in even rounds, reversed in odd ones, so that each
    one follows different implementations from round to round (under the board's power cap a kernel's clock depends
    on what ran just before it)."""
    return list(impls) if r % 2 == 0 else list(impls)[::-1]


def time_case(case, deadline, rep_ms, log, warmup_ms=25.0, gpu=None, rounds=1):
    """Rows of one case: every implementation, forward and forward+backward, timed in ``rounds`` rounds
    (``round_order``). A row's ``ms`` is the median of its rounds (``ms_rounds``, in round order); the first round
    is what a single-round run times."""
    from dldna.kernels import flash_triton as ft

    mask, d, n = case
    b, h = problem(n, d)
    layout = _layout(n) if mask == "bigbird" else None
    fwd_flops = 4.0 * d * b * h * allowed_pairs(n, mask, layout)
    case_row = BenchRow(mask, d, n)
    impls = list(case_row.fns)
    keys = [(impl, pass_name) for impl in impls for pass_name in ("fwd", "fwd+bwd")]
    times = {key: [] for key in keys}
    spans = {key: [] for key in keys}  # (t0, t1) of each timing, for the clock and power samples
    errors = {}
    log_start = len(ft.TUNING_LOG)
    for r in range(rounds):
        for impl in round_order(impls, r):
            for key in ((impl, "fwd"), (impl, "fwd+bwd")):
                if key in errors or time.time() > deadline:
                    continue
                t0 = time.time()
                try:
                    times[key].append(case_row.time(*key, warmup_ms, rep_ms))
                except Exception as err:
                    errors[key] = repr(err)[:300]
                spans[key].append((t0, time.time()))
    rows = []
    for impl, pass_name in keys:
        row = {"mask": mask, "head_dim": d, "n": n, "batch": b, "heads": h, "impl": impl, "pass": pass_name,
               "window": WINDOW if mask == "window" else None}
        done = times[(impl, pass_name)]
        if done:
            ms = statistics.median(done)
            flops = fwd_flops * (1.0 if pass_name == "fwd" else 3.5)
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            if rounds > 1:
                row["ms_rounds"] = done
            if gpu is not None:
                row.update(gpu.within(spans[(impl, pass_name)]))
        else:
            row["error"] = errors.get((impl, pass_name), "skipped: time budget of this run spent")
        row["wall_s"] = round(sum(t1 - t0 for t0, t1 in spans[(impl, pass_name)]), 1)
        rows.append(row)
        log(row)
    tuning = ft.TUNING_LOG[log_start:]
    del case_row
    torch.cuda.empty_cache()
    return rows, tuning


def allow_flex_recompiles():
    """Raise dynamo's recompile limits: one compiled FlexAttention per row and grad mode. At the defaults a long run
    falls back to eager FlexAttention, which runs out of memory at 64k."""
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512


def compile_worker(jobs):
    """Pre-compilation only (no timing): fills the Triton and Inductor caches that the timing process reads."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # several of these run at once: no process pool each
    allow_flex_recompiles()
    for kind, job in jobs:
        t0 = time.time()
        try:
            compile_ours(*job) if kind == "ours" else compile_peers(job)
            print(f"[compile] {kind} {job} in {time.time() - t0:.0f} s", flush=True)
        except Exception:
            print(f"[compile] {kind} {job} FAILED: {traceback.format_exc()[-600:]}", flush=True)


def summarize(rows):
    """Speed ratios (peer time / our time; > 1 means dldna is faster) and the issue's targets, met or missed."""
    by = {(r["mask"], r["head_dim"], r["n"], r["impl"], r["pass"]): r for r in rows if "ms" in r}
    ratios = []
    for (mask, d, n, impl, pass_name), r in sorted(by.items()):
        if impl == "dldna":
            continue
        ours = by.get((mask, d, n, "dldna", pass_name))
        if ours:
            ratios.append({"mask": mask, "head_dim": d, "n": n, "pass": pass_name, "peer": impl,
                           "speedup_vs_peer": r["ms"] / ours["ms"]})

    def tf(mask, d, n, impl, p):
        r = by.get((mask, d, n, impl, p))
        return r["tflops"] if r else None

    def ratio(mask, d, n, peer, p):
        a, b = by.get((mask, d, n, peer, p)), by.get((mask, d, n, "dldna", p))
        return a["ms"] / b["ms"] if a and b else None

    targets = []

    def target(name, value, bar, unit):
        targets.append({"target": name, "measured": value, "bar": bar, "unit": unit,
                        "met": (value is not None and value >= bar)})

    target("forward causal N=16k D=128", tf("causal", 128, 16384, "dldna", "fwd"), 550, "TFLOP/s")
    target("forward+backward causal N=16k D=128, vs cuDNN", ratio("causal", 128, 16384, "sdpa_cudnn", "fwd+bwd"),
           0.85, "x cuDNN speed")
    target("forward causal N=4k D=64", tf("causal", 64, 4096, "dldna", "fwd"), 420, "TFLOP/s")
    for d in (64, 128):
        for n in (4096, 16384, 65536):
            for p in ("fwd", "fwd+bwd"):
                target(f"sliding window {WINDOW} N={n // 1024}k D={d} {p}, vs FlexAttention",
                       ratio("window", d, n, "flex", p), 1.2, "x Flex speed")
        for p in ("fwd", "fwd+bwd"):
            a, b = by.get(("window", d, 16384, "dldna", p)), by.get(("window", d, 65536, "dldna", p))
            # time(64k) <= 1.1 * 4 * time(16k)  <=>  4.4 * time(16k) / time(64k) >= 1
            value = 4.4 * a["ms"] / b["ms"] if a and b else None
            target(f"sliding window {WINDOW} D={d} {p}: 4.4 x time(16k) / time(64k) (linear in N)", value, 1.0,
                   "ratio")
    return ratios, targets


def print_table(rows, targets):
    print(f"\n{'mask':8} {'D':>4} {'N':>6} {'pass':8} " + " ".join(f"{i:>14}" for i in OURS + PEERS_CAUSAL))
    keys = sorted({(r["mask"], r["head_dim"], r["n"], r["pass"]) for r in rows})
    by = {(r["mask"], r["head_dim"], r["n"], r["pass"], r["impl"]): r for r in rows}
    for key in keys:
        cells = []
        for impl in OURS + PEERS_CAUSAL:
            r = by.get(key + (impl,))
            cells.append(f"{r['tflops']:9.0f} TF/s" if r and "tflops" in r else f"{'-' if not r else 'err':>14}")
        print(f"{key[0]:8} {key[1]:>4} {key[2]:>6} {key[3]:8} " + " ".join(cells))
    print("\ntargets:")
    for t in targets:
        value = "n/a" if t["measured"] is None else f"{t['measured']:.3g}"
        print(f"  {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {value} {t['unit']} (bar {t['bar']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="where flash_attention_bench.json goes (default results/)")
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--compile-workers", type=int, default=8, help="processes that pre-compile (0: none)")
    parser.add_argument("--compile-budget-s", type=float, default=200.0)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop timing new rows after this many seconds")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up per row (its default)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench timing window per row (its default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each row is timed (the order of the implementations reversed every other round); "
                        "a row gives the median")
    parser.add_argument("--wait-file", default=None, help="compile at once, but time only once this file exists")
    parser.add_argument("--no-clock", action="store_true",
                        help="do not sample the SM clock and power (nvidia-smi) meanwhile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import faulthandler

    from dldna.results import command_line, save_result

    t0 = time.time()
    deadline = t0 + args.budget_s
    all_cases = cases(args.ns, args.head_dims)
    allow_flex_recompiles()
    # 1. compile in parallel processes (CPU-bound); they exit before any timing starts
    if args.compile_workers > 0:
        ctx = mp.get_context("spawn")
        jobs = compile_jobs(all_cases)
        procs = [ctx.Process(target=compile_worker, args=(jobs[i::args.compile_workers],))
                 for i in range(min(args.compile_workers, len(jobs)))]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=max(1.0, t0 + args.compile_budget_s - time.time()))
            if p.is_alive():
                p.terminate()
        print(f"[main] compile phase {time.time() - t0:.0f} s", flush=True)
    while args.wait_file and not os.path.exists(args.wait_file) and time.time() < deadline:
        time.sleep(0.5)  # e.g. a test run still on the GPU
    # 2. time every row in this one process, so the GPU runs one thing at a time; progress goes out row by row
    from dldna.results import results_dir

    partial = open(os.path.join(args.out_dir or results_dir(), "flash_attention_bench.partial.jsonl"), "w")

    def log(row):
        partial.write(json.dumps(row) + "\n")
        partial.flush()
        value = f"{row['tflops']:.0f} TFLOP/s" if "tflops" in row else row.get("error", "")[:80]
        if row.get("sm_clock_mhz"):
            value += f" at {row['sm_clock_mhz']:.0f} MHz"
        print(f"[{time.time() - t0:5.0f}s] {row['mask']} D={row['head_dim']} N={row['n']} {row['impl']} "
              f"{row['pass']}: {value} ({row['wall_s']} s)", flush=True)

    rows, tuning, errors = [], [], []
    from dldna.bench import GpuMonitor
    from dldna.kernels import flash_triton as ft

    with (contextlib.nullcontext() if args.no_clock else GpuMonitor()) as gpu:
        for case in all_cases:
            faulthandler.dump_traceback_later(120, exit=False)  # a row stuck for 2 minutes prints where it is
            try:
                r, _ = time_case(case, deadline, args.rep_ms, log, args.warmup_ms, gpu, args.rounds)
                rows += r
            except Exception:
                errors.append({"case": case, "error": traceback.format_exc()[-800:]})
                print(f"[main] {case} FAILED: {errors[-1]['error']}", flush=True)
            faulthandler.cancel_dump_traceback_later()
    tuning = list(ft.TUNING_LOG)
    ratios, targets = summarize(rows)
    data = {
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
        "tuning": tuning,
        "errors": errors,
        "dtype": "bfloat16",
        "flop_convention": "fwd 4*D*B*H*pairs (causal pairs N^2/2, windows/layouts exact); fwd+bwd 3.5x fwd",
        "timer": f"triton.testing.do_bench median, warm-up {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms, L2 flushed; "
                 f"{args.rounds} round(s) per row, the implementations reversed every other round, the median round "
                 "(ms_rounds: each round's); sm_clock_mhz, power_w: medians of nvidia-smi samples over the row's "
                 "rounds",
        "rounds": args.rounds,
        "wall_s": round(time.time() - t0, 1),
    }
    command = command_line("python benchmarks/attention.py")
    path = save_result("flash_attention_bench", data, command, out_dir=args.out_dir)
    print_table(rows, targets)
    print(f"\nwrote {path} in {time.time() - t0:.0f} s; errors: {len(data['errors'])}")
    for e in data["errors"][:5]:
        print(json.dumps(e)[:800])


if __name__ == "__main__":
    main()
