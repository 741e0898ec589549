"""Check the tile orders of ``gluon_fa3_dkdv.py`` and ``gluon_fa3_dq.py`` without a GPU: Python copies of their
index arithmetic (``_query_tiles`` / ``_key_tiles``, ``_edge_tile``, the consumers' skip and mask tests), N from 128
to 2048 and windows from 1 to 2048 keys; for dK/dV with one and two consumers, for dQ with key tiles of 64 and 128.
For every block and consumer it checks that the loader's sequence holds each tile of ``[lo, hi)`` once, that every
tile with a masked pair goes through the masked step, that no passed-over tile holds an allowed pair, and that the
allowed (query, key) pairs are covered exactly. The copies must follow the kernels by hand: they check the
arithmetic as written on 2026-12-04, not the compiled kernels.

    python benchmarks/experiments/gluon_tile_order.py
"""
ROWS = QROWS = 64
BLOCK_M = 128  # query rows per program of the dQ kernel


def query_tiles(pid_n, n, consumers, window):
    """``(lo, hi, far)`` as ``_query_tiles`` computes them (``window`` 0: causal)."""
    k0 = pid_n * consumers * ROWS
    lo, hi = k0 // QROWS, n // QROWS
    far = hi
    if window > 0:
        hi = min(hi, (k0 + consumers * ROWS - 2 + window) // QROWS + 1)
        far = min(max((k0 + window) // QROWS, lo + consumers), hi)
    return lo, hi, far


def tile_sequence(lo, hi, far, consumers):
    """The loader's order: ``(tile, masked)``, the edge tiles first (``_edge_tile``), then the full ones."""
    edges = [(lo + e if e < consumers else far + e - consumers, True) for e in range(consumers + hi - far)]
    return edges + [(t, False) for t in range(lo + consumers, far)]


def allowed(i, j, window):
    return i >= j and (window == 0 or i < j + window)


def problems(n, consumers, window):
    """Every violation of the dK/dV kernel's order for one (N, consumers, window), as strings."""
    found = []
    for pid in range(n // (consumers * ROWS)):
        lo, hi, far = query_tiles(pid, n, consumers, window)
        seq = tile_sequence(lo, hi, far, consumers)
        if sorted(t for t, _ in seq) != list(range(lo, hi)):
            found.append(f"block {pid}: sequence {seq} is not [{lo}, {hi}) once each")
        for half in range(consumers):
            k_start = pid * consumers * ROWS + half * ROWS
            covered = set()
            for t, masked in seq:
                q0 = t * QROWS
                skip = masked and (q0 + QROWS - 1 < k_start or (window > 0 and q0 > k_start + ROWS - 2 + window))
                pairs = {(i, j) for i in range(q0, q0 + QROWS) for j in range(k_start, k_start + ROWS)
                         if allowed(i, j, window)}
                if not masked and len(pairs) < QROWS * ROWS:
                    found.append(f"block {pid} consumer {half}: tile {t} has masked pairs but no mask")
                if skip and pairs:
                    found.append(f"block {pid} consumer {half}: tile {t} passed over with allowed pairs")
                if not skip:
                    covered |= pairs
            needed = {(i, j) for i in range(n) for j in range(k_start, k_start + ROWS) if allowed(i, j, window)}
            if covered != needed:
                found.append(f"block {pid} consumer {half}: {len(needed ^ covered)} pairs wrong")
    return found


def key_tiles(pid_m, keys, window):
    """``(lo, hi, full_lo, full_hi)`` as ``gluon_fa3_dq._key_tiles`` computes them (``window`` 0: causal)."""
    q0 = pid_m * BLOCK_M
    hi, full_hi = (q0 + BLOCK_M) // keys, (q0 + 1) // keys
    lo = full_lo = 0
    if window > 0:
        lo = max(q0 + 1 - window, 0) // keys
        full_lo = min(max(-(-max(q0 + BLOCK_M - window, 0) // keys), lo), full_hi)
    return lo, hi, full_lo, full_hi


def key_tile_sequence(lo, hi, full_lo, full_hi):
    """The dQ loader's order (``_tile_order``): ``(tile, masked)``, the diagonal's and the far edge's tiles first."""
    n_diag = hi - full_hi
    edges = [(full_hi + e if e < n_diag else lo + e - n_diag, True) for e in range(n_diag + full_lo - lo)]
    return edges + [(j, False) for j in range(full_lo, full_hi)]


def dq_problems(n, keys, window):
    """Every violation of the dQ kernel's order for one (N, keys per tile, window), as strings."""
    found = []
    for pid in range(n // BLOCK_M):
        lo, hi, full_lo, full_hi = key_tiles(pid, keys, window)
        seq = key_tile_sequence(lo, hi, full_lo, full_hi)
        if sorted(j for j, _ in seq) != list(range(lo, hi)):
            found.append(f"block {pid}: sequence {seq} is not [{lo}, {hi}) once each")
        for half in range(BLOCK_M // ROWS):
            q_start = pid * BLOCK_M + half * ROWS
            covered = set()
            for j, masked in seq:
                k0 = j * keys
                skip = masked and (k0 > q_start + ROWS - 1 or (window > 0 and k0 + keys - 1 <= q_start - window))
                pairs = {(i, c) for i in range(q_start, q_start + ROWS) for c in range(k0, k0 + keys)
                         if allowed(i, c, window)}
                if not masked and len(pairs) < ROWS * keys:
                    found.append(f"block {pid} consumer {half}: tile {j} has masked pairs but no mask")
                if skip and pairs:
                    found.append(f"block {pid} consumer {half}: tile {j} passed over with allowed pairs")
                if not skip:
                    covered |= pairs
            needed = {(i, c) for i in range(q_start, q_start + ROWS) for c in range(n) if allowed(i, c, window)}
            if covered != needed:
                found.append(f"block {pid} consumer {half}: {len(needed ^ covered)} pairs wrong")
    return found


def main():
    windows = (0, 1, 63, 64, 65, 100, 127, 128, 129, 300, 1024, 2048)
    cases = [(problems, n, c, w) for c in (1, 2) for n in (128, 384, 640, 1024, 2048) for w in windows]
    cases += [(dq_problems, n, keys, w) for keys in (64, 128) for n in (128, 384, 640, 1024, 2048) for w in windows]
    bad = [(fn.__name__, case, p) for fn, *case in cases for p in fn(*case)]
    for name, case, p in bad[:20]:
        print(name, case, p)
    print(f"{len(cases)} cases (kernel, N, consumers or keys per tile, window), {len(bad)} problems")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
