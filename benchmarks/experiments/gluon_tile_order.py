"""Check the tile orders of ``gluon_fa3_dkdv.py``, ``gluon_fa3_dq.py`` and ``gluon_fa3_forward.py`` without a GPU:
Python copies of their index arithmetic (``_query_tiles`` / ``_key_tiles``, ``_edge_tile``, the consumers' skip and
mask tests), N from 128 to 2048 and windows from 1 to 2048 keys; for dK/dV with one and two consumers, for dQ with key
tiles of 64 and 128, for the forward with two and three consumers (128- and 192-row blocks). For the forward's
persistent programs it also checks that the mirrored waves (``_walk_tile``) and ``_block_and_head`` give every
(query block, head) once.
For every block and consumer it checks that the loader's sequence holds each tile of ``[lo, hi)`` once, that every
tile with a masked pair goes through the masked step, that no passed-over tile holds an allowed pair, and that the
allowed (query, key) pairs are covered exactly. The copies must follow the kernels by hand: they check the
arithmetic as written on 2026-12-04, not the compiled kernels.

    python benchmarks/experiments/gluon_tile_order.py
"""
ROWS = QROWS = 64
BLOCK_M = 128  # query rows per program of the dQ kernel
BLOCK_N = 128  # keys per tile of the forward


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


def sequence_problems(pid, seq, lo, hi):
    """The loader's ``seq`` of ``(tile, masked)`` for block ``pid`` not holding each tile of ``[lo, hi)`` once."""
    if sorted(t for t, _ in seq) != list(range(lo, hi)):
        return [f"block {pid}: sequence {seq} is not [{lo}, {hi}) once each"]
    return []


def walk_problems(where, seq, pairs_of, passed_over, tile_pairs, needed):
    """The violations of one consumer (``where``, for the messages) walking the loader's ``seq``: a tile taken
    without the mask that holds a masked pair (fewer than ``tile_pairs`` allowed ``pairs_of(tile)``), a tile
    ``passed_over`` with allowed pairs, and the allowed pairs of the tiles it takes differing from ``needed``."""
    found, covered = [], set()
    for t, masked in seq:
        skip = masked and passed_over(t)
        pairs = pairs_of(t)
        if not masked and len(pairs) < tile_pairs:
            found.append(f"{where}: tile {t} has masked pairs but no mask")
        if skip and pairs:
            found.append(f"{where}: tile {t} passed over with allowed pairs")
        if not skip:
            covered |= pairs
    if covered != needed:
        found.append(f"{where}: {len(needed ^ covered)} pairs wrong")
    return found


def problems(n, consumers, window):
    """Every violation of the dK/dV kernel's order for one (N, consumers, window), as strings."""
    found = []
    for pid in range(n // (consumers * ROWS)):
        lo, hi, far = query_tiles(pid, n, consumers, window)
        seq = tile_sequence(lo, hi, far, consumers)
        found += sequence_problems(pid, seq, lo, hi)
        for half in range(consumers):
            k_start = pid * consumers * ROWS + half * ROWS
            keys = range(k_start, k_start + ROWS)
            found += walk_problems(
                f"block {pid} consumer {half}", seq,
                lambda t, keys=keys: {(i, j) for i in range(t * QROWS, t * QROWS + QROWS) for j in keys
                                      if allowed(i, j, window)},
                lambda t, k_start=k_start: (t * QROWS + QROWS - 1 < k_start
                                            or (window > 0 and t * QROWS > k_start + ROWS - 2 + window)),
                QROWS * ROWS, {(i, j) for i in range(n) for j in keys if allowed(i, j, window)})
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
        found += sequence_problems(pid, seq, lo, hi)
        for half in range(BLOCK_M // ROWS):
            q_start = pid * BLOCK_M + half * ROWS
            rows = range(q_start, q_start + ROWS)
            found += walk_problems(
                f"block {pid} consumer {half}", seq,
                lambda j, rows=rows: {(i, c) for i in rows for c in range(j * keys, j * keys + keys)
                                      if allowed(i, c, window)},
                lambda j, q_start=q_start: (j * keys > q_start + ROWS - 1
                                            or (window > 0 and j * keys + keys - 1 <= q_start - window)),
                ROWS * keys, {(i, c) for i in rows for c in range(n) if allowed(i, c, window)})
    return found


def forward_key_tiles(pid_m, n, block_q, window):
    """``(lo, hi)`` as ``gluon_fa3_forward._key_tiles`` computes them for a block of ``block_q`` rows."""
    hi = pid_m + 1 if block_q == BLOCK_N else min(-(-(pid_m + 1) * block_q // BLOCK_N), n // BLOCK_N)
    lo = max(pid_m * block_q + 1 - window, 0) // BLOCK_N if window > 0 else 0
    return lo, hi


def forward_needs_mask(j, pid_m, block_q, window):
    """``gluon_fa3_forward._needs_mask``."""
    masked = (j + 1) * BLOCK_N - 1 > pid_m * block_q
    return masked or (window > 0 and j * BLOCK_N < pid_m * block_q + block_q - window)


def forward_problems(n, consumers, window):
    """Every violation of the forward's order for one (N, consumers, window), as strings: each consumer takes the
    block's tiles up to its own last one (masked where ``forward_needs_mask`` says) and passes over the rest, and only
    consumers whose rows start inside the sequence store."""
    found, block_q = [], consumers * ROWS
    for pid in range(-(-n // block_q)):
        lo, block_hi = forward_key_tiles(pid, n, block_q, window)
        for part in range(consumers):
            q_start = pid * block_q + part * ROWS
            if q_start >= n:
                continue
            hi = min(-(-(q_start + ROWS) // BLOCK_N), block_hi) if block_q > BLOCK_N else block_hi
            seq = [(j, j >= hi or forward_needs_mask(j, pid, block_q, window)) for j in range(lo, block_hi)]
            rows = range(q_start, q_start + ROWS)
            found += walk_problems(
                f"block {pid} consumer {part}", seq,
                lambda j, rows=rows: {(i, c) for i in rows for c in range(j * BLOCK_N, j * BLOCK_N + BLOCK_N)
                                      if allowed(i, c, window)},
                lambda j, hi=hi: j >= hi, ROWS * BLOCK_N,
                {(i, c) for i in rows for c in range(n) if allowed(i, c, window)})
    return found


def walk_tile(wave, grid, pid):
    """``gluon_fa3_forward._walk_tile``."""
    return wave * grid + pid + (wave % 2) * (grid - 1 - 2 * pid)


def block_and_head(tile, n_blocks, n_bh, heads_per_chunk):
    """``gluon_fa3_forward._block_and_head`` (with ``n_blocks`` query blocks per head)."""
    per_chunk = heads_per_chunk * n_blocks
    chunk = tile // per_chunk
    heads_here = min(heads_per_chunk, n_bh - chunk * heads_per_chunk)
    r = tile - chunk * per_chunk
    return n_blocks - 1 - r // heads_here, chunk * heads_per_chunk + r % heads_here


def persistent_walk_problems(n_blocks, n_bh, heads_per_chunk, grid):
    """The mirrored waves of ``grid`` programs (each walking until its tile is past the last) and ``block_and_head``
    not giving every (query block, head) exactly once."""
    n_tiles, tiles = n_blocks * n_bh, []
    for pid in range(grid):
        wave = 0
        while walk_tile(wave, grid, pid) < n_tiles:
            tiles.append(walk_tile(wave, grid, pid))
            wave += 1
    if sorted(tiles) != list(range(n_tiles)):
        return [f"walk of {grid} programs over {n_tiles} tiles: not each once"]
    blocks = sorted(block_and_head(t, n_blocks, n_bh, heads_per_chunk) for t in tiles)
    if blocks != [(m, bh) for m in range(n_blocks) for bh in range(n_bh)]:
        return [f"block_and_head({n_blocks}, {n_bh}, {heads_per_chunk}): not each (block, head) once"]
    return []


def main():
    windows = (0, 1, 63, 64, 65, 100, 127, 128, 129, 300, 1024, 2048)
    cases = [(problems, n, c, w) for c in (1, 2) for n in (128, 384, 640, 1024, 2048) for w in windows]
    cases += [(dq_problems, n, keys, w) for keys in (64, 128) for n in (128, 384, 640, 1024, 2048) for w in windows]
    cases += [(forward_problems, n, c, w) for c in (2, 3) for n in (128, 384, 640, 1024, 2048) for w in windows]
    cases += [(persistent_walk_problems, blocks, bh, chunk, grid) for blocks in (1, 5, 32) for bh in (1, 3, 16)
              for chunk in (1, 2, 16) if chunk <= bh for grid in (1, 7, 132) if grid <= blocks * bh]
    bad = [(fn.__name__, case, p) for fn, *case in cases for p in fn(*case)]
    for name, case, p in bad[:20]:
        print(name, case, p)
    print(f"{len(cases)} cases (kernel, N, consumers or keys per tile, window; or the walk's blocks, heads, chunk, "
          f"programs), {len(bad)} problems")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
