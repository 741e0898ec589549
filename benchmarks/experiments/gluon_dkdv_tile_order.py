"""Check the tile order of ``gluon_fa3_dkdv.py`` without a GPU: a Python copy of its index arithmetic
(``_query_tiles``, ``_edge_tile``, the consumers' skip and mask tests) for one and two consumers, N from 128 to 2048
and windows from 1 to 2048 keys. For every key block and consumer it checks that the loader's sequence holds each
tile of ``[lo, hi)`` once, that every tile with a masked pair goes through the masked step, that no passed-over tile
holds an allowed pair, and that the allowed (query, key) pairs are covered exactly. The copy must follow the kernel
by hand: it is a check of the arithmetic as written on 2026-12-04, not of the compiled kernel.

    python benchmarks/experiments/gluon_dkdv_tile_order.py
"""
ROWS = QROWS = 64


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
    """Every violation for one (N, consumers, window), as strings."""
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


def main():
    cases = [(n, c, w) for c in (1, 2) for n in (128, 384, 640, 1024, 2048)
             for w in (0, 1, 63, 64, 65, 100, 127, 128, 129, 300, 1024, 2048)]
    bad = [(case, p) for case in cases for p in problems(*case)]
    for case, p in bad[:20]:
        print(case, p)
    print(f"{len(cases)} cases (N, consumers, window), {len(bad)} problems")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
