"""Ring attention (Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context") over ``torch.distributed``: the sequence is sharded over P processes, every rank keeps its own query
block, and the key/value blocks travel around the ring, one hop per step, while each rank computes attention of
its queries against the block it holds. Partial results are merged exactly with their log-sum-exp, so the output
equals dense softmax attention; the backward pass is a second ring in which the dK/dV accumulators travel with
their K/V block and arrive back at their owner after P hops.

Sharding. The (padded) sequence is cut into chunks of ``c = ceil(N / n_chunks)`` tokens.
``layout="contiguous"``: P chunks, rank r holds chunk r. ``layout="zigzag"``: 2P chunks, rank r holds chunks
r and 2P-1-r, so that under a causal mask every rank does the same amount of work (Brandon et al. 2023,
"Striped Attention"; the zig-zag form is the one used by Megatron-LM's context parallelism). Padding positions
(global position >= N) are masked as keys and return zeros as queries, so any N is handled.

Per-rank memory: the local Q/K/V/O blocks, one K/V block in flight, and one ``(q_tile, c)`` score tile:
O(N/P · d + q_tile · N/P), i.e. O(N/P) for a fixed ``q_tile`` (measured in chapter 14).

Used in chapter 14. Launch with ``python -m dldna.attention.ring --nproc 4`` or
``torchrun --nproc-per-node 4 -m dldna.attention.ring``.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dldna.attention.reference import attention, check_qkv, repeat_kv

LAYOUTS = ("contiguous", "zigzag")


# ----------------------------------------------------------------------------------------------- sharding
def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def shard_chunks(rank: int, world_size: int, layout: str = "zigzag") -> list[int]:
    """Indices of the sequence chunks held by ``rank``: ``[rank]`` (contiguous) or ``[rank, 2P-1-rank]`` (zigzag)."""
    _check_layout(layout)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]


def chunk_size(seq_len: int, world_size: int, layout: str = "zigzag") -> int:
    """Tokens per chunk, ``ceil(seq_len / n_chunks)`` with ``n_chunks = P`` (contiguous) or ``2P`` (zigzag)."""
    _check_layout(layout)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    n_chunks = world_size if layout == "contiguous" else 2 * world_size
    return -(-seq_len // n_chunks)


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = -2) -> torch.Tensor:
    """The part of ``x`` (full sequence along ``dim``) that ``rank`` holds: its chunks, zero-padded, concatenated.

    ``x``: ``(B, H, N, D)`` with the default ``dim=-2``. Returns ``(B, H, len(chunks) * c, D)``.
    """
    chunks = shard_chunks(rank, world_size, layout)
    n = x.shape[dim]
    c = chunk_size(n, world_size, layout)
    n_chunks = world_size if layout == "contiguous" else 2 * world_size
    pad = n_chunks * c - n
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return torch.cat([x.narrow(dim, a * c, c) for a in chunks], dim=dim)


def gather_sequence(shards: Sequence[torch.Tensor], seq_len: int, layout: str = "zigzag", dim: int = -2) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: ``shards[r]`` is rank r's part; returns the first ``seq_len`` positions."""
    world_size = len(shards)
    c = chunk_size(seq_len, world_size, layout)
    pieces: dict[int, torch.Tensor] = {}
    for rank, shard in enumerate(shards):
        chunks = shard_chunks(rank, world_size, layout)
        if shard.shape[dim] != len(chunks) * c:
            raise ValueError(f"shards[{rank}] has {shard.shape[dim]} positions along dim {dim}, expected {len(chunks) * c}")
        for i, a in enumerate(chunks):
            pieces[a] = shard.narrow(dim, i * c, c)
    full = torch.cat([pieces[a] for a in sorted(pieces)], dim=dim)
    return full.narrow(dim, 0, seq_len)


# ----------------------------------------------------------------------------------------------- schedule
def pair_kind(q_chunk: int, k_chunk: int, chunk: int, seq_len: int, causal: bool) -> str:
    """How query chunk ``q_chunk`` meets key chunk ``k_chunk``: ``"skip"`` (nothing allowed), ``"full"``
    (every pair allowed, no mask needed) or ``"masked"`` (diagonal under causal masking, or padding inside)."""
    if q_chunk * chunk >= seq_len or k_chunk * chunk >= seq_len or (causal and k_chunk > q_chunk):
        return "skip"
    padded = (q_chunk + 1) * chunk > seq_len or (k_chunk + 1) * chunk > seq_len
    return "masked" if padded or (causal and k_chunk == q_chunk) else "full"


def ring_schedule(world_size: int, seq_len: int, causal: bool, layout: str = "zigzag") -> list[list[list[tuple]]]:
    """The work of every rank at every ring step: ``schedule[step][rank]`` lists ``(q_chunk, k_chunk, kind)``.

    At step ``s`` rank ``r`` holds the K/V of rank ``(r - s) mod P``; pairs of kind ``"skip"`` are left out.
    The forward and backward passes follow exactly this schedule (it is also what chapter 14 draws).
    """
    c = chunk_size(seq_len, world_size, layout)
    schedule = []
    for step in range(world_size):
        per_rank = []
        for rank in range(world_size):
            src = (rank - step) % world_size
            pairs = [
                (a, b, pair_kind(a, b, c, seq_len, causal))
                for a in shard_chunks(rank, world_size, layout)
                for b in shard_chunks(src, world_size, layout)
            ]
            per_rank.append([p for p in pairs if p[2] != "skip"])
        schedule.append(per_rank)
    return schedule


def _tile_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: int, causal: bool) -> torch.Tensor:
    """``(tile, c)`` bool mask from global positions: real key, real query, and ``k <= q`` when causal."""
    allowed = (k_pos[None, :] < seq_len) & (q_pos[:, None] < seq_len)
    if causal:
        allowed &= k_pos[None, :] <= q_pos[:, None]
    return allowed


def _tiles(q_local: int, chunks: list[int], chunk: int, q_tile: int):
    """Yield ``(local_row_slice, global_positions, chunk_index)`` for every query tile of the local block."""
    for i, a in enumerate(chunks):
        for t0 in range(0, chunk, q_tile):
            t1 = min(t0 + q_tile, chunk)
            yield slice(i * chunk + t0, i * chunk + t1), torch.arange(a * chunk + t0, a * chunk + t1), a


# ----------------------------------------------------------------------------------------------- merging
def merge_partials(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Merge two partial softmax-attention results over disjoint key sets into the result over their union.

    ``out``: ``(..., n, D)`` normalised output over keys A with log-sum-exp ``lse`` ``(..., n)``; the same for
    keys B. Returns ``(out_AB, lse_AB)`` with ``lse_AB = logaddexp(lse_A, lse_B)`` and
    ``out_AB = exp(lse_A - lse_AB) out_A + exp(lse_B - lse_AB) out_B``. Rows with no key in A or B
    (``lse = -inf``) stay finite: zeros with ``lse = -inf``. Used in chapter 14 (ring and dilated attention).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_a = torch.exp(lse - safe).unsqueeze(-1)
    w_b = torch.exp(block_lse - safe).unsqueeze(-1)
    return (w_a * out + w_b * block_out).to(out.dtype), new_lse


# ----------------------------------------------------------------------------------------------- comms
def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _start_shift(tensor: torch.Tensor, rank: int, world_size: int, group):
    """Start sending ``tensor`` to the next rank and receiving the previous rank's into a fresh buffer."""
    recv = torch.empty_like(tensor)
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    ops = [dist.P2POp(dist.isend, tensor, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for req in requests:
        req.wait()


# ----------------------------------------------------------------------------------------------- passes
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _ring_forward(q, k, v, seq_len, causal, scale, layout, group, q_tile):
    rank, world = _world(group)
    c = chunk_size(seq_len, world, layout)
    mine = shard_chunks(rank, world, layout)
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v]).contiguous()
    for step in range(world):
        src = (rank - step) % world
        if step < world - 1:  # the next block is already on its way while we compute on this one
            next_kv, requests = _start_shift(kv, rank, world, group)
        for rows, q_pos, a in _tiles(q.shape[-2], mine, c, q_tile):
            for j, b in enumerate(shard_chunks(src, world, layout)):
                kind = pair_kind(a, b, c, seq_len, causal)
                if kind == "skip":
                    continue
                k_pos = torch.arange(b * c, (b + 1) * c)
                mask = _tile_mask(q_pos, k_pos, seq_len, causal).to(q.device) if kind == "masked" else None
                kb, vb = kv[0, :, :, j * c:(j + 1) * c], kv[1, :, :, j * c:(j + 1) * c]
                o_blk, l_blk = attention(q[:, :, rows], kb, vb, mask=mask, scale=scale, return_lse=True)
                out[:, :, rows], lse[:, :, rows] = merge_partials(out[:, :, rows], lse[:, :, rows], o_blk, l_blk)
        if step < world - 1:
            _wait(requests)
            kv = next_kv
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, seq_len, causal, scale, layout, group, q_tile):
    rank, world = _world(group)
    c = chunk_size(seq_len, world, layout)
    mine = shard_chunks(rank, world, layout)
    acc = _acc_dtype(q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    b_, h_kv = k.shape[0], k.shape[1]
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # D_i = sum_d dO_id O_id, (B, H, n)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v]).contiguous()
    dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
    for step in range(world):
        src = (rank - step) % world
        if step < world - 1:
            next_kv, kv_requests = _start_shift(kv, rank, world, group)
        for rows, q_pos, a in _tiles(q.shape[-2], mine, c, q_tile):
            qt, dot = q[:, :, rows].to(acc), dout[:, :, rows].to(acc)
            for j, b in enumerate(shard_chunks(src, world, layout)):
                kind = pair_kind(a, b, c, seq_len, causal)
                if kind == "skip":
                    continue
                cols = slice(j * c, (j + 1) * c)
                kb = repeat_kv(kv[0, :, :, cols].to(acc), n_rep)
                vb = repeat_kv(kv[1, :, :, cols].to(acc), n_rep)
                scores = (qt @ kb.transpose(-2, -1)) * scale
                if kind == "masked":
                    mask = _tile_mask(q_pos, torch.arange(b * c, (b + 1) * c), seq_len, causal).to(q.device)
                    scores = scores.masked_fill(~mask, float("-inf"))
                probs = torch.exp(scores - safe_lse[:, :, rows, None])
                dprobs = dot @ vb.transpose(-2, -1)
                dscores = probs * (dprobs - delta[:, :, rows, None])
                dq[:, :, rows] += (dscores @ kb) * scale
                dk_blk = (dscores.transpose(-2, -1) @ qt) * scale
                dv_blk = probs.transpose(-2, -1) @ dot
                dkv[0, :, :, cols] += dk_blk.view(b_, h_kv, n_rep, c, -1).sum(2)
                dkv[1, :, :, cols] += dv_blk.view(b_, h_kv, n_rep, c, -1).sum(2)
        if world > 1:  # the accumulators follow their K/V block; after P hops they are home
            next_dkv, dkv_requests = _start_shift(dkv, rank, world, group)
            if step < world - 1:
                _wait(kv_requests)
                kv = next_kv
            _wait(dkv_requests)
            dkv = next_dkv
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_len, causal, scale, layout, group, q_tile):
        out, lse = _ring_forward(q, k, v, seq_len, causal, scale, layout, group, q_tile)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (seq_len, causal, scale, layout, group, q_tile)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_len: int,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    group: Any = None,
    q_tile: int | None = None,
    return_lse: bool = False,
):
    """Exact softmax attention of a sequence sharded over the ranks of ``group`` (forward and backward).

    Args:
        q, k, v: this rank's shard, as made by :func:`shard_sequence`: ``(B, H, n_local, D)`` for q and
            ``(B, Hkv, n_local, D)`` for k/v (GQA allowed), ``n_local = len(shard_chunks(rank, P, layout)) * c``.
        seq_len: the true (unpadded) sequence length N; padding positions are masked.
        causal: global causal mask (query at global position i sees keys j <= i).
        layout: ``"zigzag"`` (load-balanced under causal masking) or ``"contiguous"``.
        group: a ``torch.distributed`` process group (default: the world); without an initialised process
            group this runs on one process (P = 1).
        q_tile: query rows per score tile (default: the whole chunk); fixes the score memory at ``q_tile x c``.
        return_lse: also return the log-sum-exp per query row ``(B, H, n_local)`` (not differentiable).

    Returns this rank's output shard ``(B, H, n_local, D)`` (zeros at padding positions). Communication:
    ``isend/irecv`` of one K/V block per step, overlapped with the compute of the current block. Used in chapter 14.
    """
    check_qkv(q, k, v)
    rank, world = _world(group)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    c = chunk_size(seq_len, world, layout)
    n_local = len(shard_chunks(rank, world, layout)) * c
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-2] != n_local:
            raise ValueError(
                f"{name} holds {t.shape[-2]} positions but rank {rank} of {world} must hold {n_local} for "
                f"seq_len={seq_len} with layout={layout!r}; shard inputs with shard_sequence(x, rank, world_size, layout)"
            )
    if q_tile is None:
        q_tile = c
    if not isinstance(q_tile, int) or q_tile < 1:
        raise ValueError(f"q_tile must be a positive int, got {q_tile!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(q, k, v, seq_len, causal, scale, layout, group, q_tile)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------- launcher
def _spawn_entry(rank, world_size, backend, init_file, result_dir, worker, args):
    torch.set_num_threads(1)  # P processes share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(worker: Callable, world_size: int, *args, backend: str = "gloo") -> list:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` fresh processes with a process group initialised.

    ``worker`` must be importable (a module-level function of a package, not one defined in a notebook) and
    return plain Python values / tensors; the list of per-rank return values comes back. ``backend``:
    ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank). Uses ``torch.multiprocessing.spawn``; under ``torchrun``
    call the worker directly after ``init_process_group`` (see :func:`main`). Used in chapter 14.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' needs {world_size} GPUs, found {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dldna_ring_") as tmp:
        init_file = os.path.join(tmp, "store")
        mp.spawn(_spawn_entry, args=(world_size, backend, init_file, tmp, worker, args), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


# ----------------------------------------------------------------------------------------------- workers
def _full_inputs(seq_len, batch, heads, kv_heads, head_dim, seed, dtype, dev):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, dtype=dtype)
    dout = torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=dtype)
    return [t.to(dev) for t in (q, k, v, dout)]


def _worker_device(group=None) -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ring_groups(rank: int, world_size: int, sizes: Sequence[int]) -> dict:
    """Split the world into consecutive sub-rings: ``{P: the group of P ranks this rank belongs to}`` for each
    ``P`` in ``sizes`` (each must divide ``world_size``). Every rank must call this with the same ``sizes``.
    One spawn of 4 processes thus checks P = 1, 2 and 4 (two P = 2 rings run side by side)."""
    groups = {}
    for size in sizes:
        if not isinstance(size, int) or size < 1 or world_size % size:
            raise ValueError(f"each ring size must be a positive divisor of world_size={world_size}, got {size!r}")
        for start in range(0, world_size, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                groups[size] = group
    return groups


def exactness_worker(rank: int, world_size: int, cases: Sequence[dict], group: Any = None) -> list[dict]:
    """For each case (keys ``seq_len, causal, layout`` and optional ``batch, heads, kv_heads, head_dim, q_tile,
    seed``) run ring attention over ``group`` (default: the world), forward + backward on float64 inputs, and
    compare the gathered output and gradients with the dense reference. Returns (on every rank) one dict per case
    with the max abs errors. Used in chapter 14 and ``tests/test_ring_attention.py``."""
    dev = _worker_device(group)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    rank, world_size = _world(group)
    reports = []
    for case in cases:
        n, causal, layout = case["seq_len"], case["causal"], case.get("layout", "zigzag")
        heads, kv_heads = case.get("heads", 2), case.get("kv_heads", case.get("heads", 2))
        q, k, v, dout = _full_inputs(n, case.get("batch", 1), heads, kv_heads, case.get("head_dim", 8),
                                     case.get("seed", 0), dtype, dev)
        local = [shard_sequence(t, rank, world_size, layout).requires_grad_(i < 3) for i, t in enumerate((q, k, v, dout))]
        out = ring_attention(*local[:3], seq_len=n, causal=causal, layout=layout, group=group, q_tile=case.get("q_tile"))
        out.backward(local[3])
        tensors = [out.detach(), local[0].grad, local[1].grad, local[2].grad]
        gathered = []
        for t in tensors:
            parts = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(parts, t.contiguous(), group=group)
            gathered.append(gather_sequence(parts, n, layout))
        qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
        ref = attention(qr, kr, vr, causal=causal)
        ref.backward(dout)
        errors = {name: (g - r).abs().max().item() for name, g, r in
                  zip(("out", "dq", "dk", "dv"), gathered, (ref.detach(), qr.grad, kr.grad, vr.grad))}
        reports.append({**case, "world_size": world_size, "dtype": str(dtype), **errors})
    return reports


def memory_worker(rank: int, world_size: int, seq_len: int, heads: int = 4, head_dim: int = 32,
                  q_tile: int = 64, causal: bool = True, layout: str = "zigzag", group: Any = None) -> dict:
    """Peak memory (MiB) this rank allocates during one ring-attention forward + backward over ``group``
    (default: the world; without a process group, one process), inputs excluded, measured with
    :func:`dldna.bench.peak_memory_mb`; float32, batch 1. Used in chapter 14."""
    from dldna.bench import peak_memory_mb

    dev = _worker_device(group)
    rank, world_size = _world(group)
    n_local = len(shard_chunks(rank, world_size, layout)) * chunk_size(seq_len, world_size, layout)
    gen = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(1, heads, n_local, head_dim, generator=gen).to(dev) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        out = ring_attention(q, k, v, seq_len=seq_len, causal=causal, layout=layout, group=group, q_tile=q_tile)
        out.backward(dout)
        return None

    step()  # warm-up (first collectives allocate communicator state)
    for t in (q, k, v):
        t.grad = None
    peak = peak_memory_mb(step, device=dev)
    return {"rank": rank, "world_size": world_size, "seq_len": seq_len, "n_local": n_local, "peak_mb": peak}


def check_and_measure_worker(rank: int, world_size: int, cases: Sequence[dict], memory_seq_len: int,
                             sizes: Sequence[int] | None = None, q_tile: int = 64) -> dict:
    """Both jobs of chapter 14 in one spawn (starting processes is the slow part): for every ring size ``P`` in
    ``sizes`` (default: the world size), the exactness cases of :func:`exactness_worker` and the per-rank peak
    memory of :func:`memory_worker`. Returns ``{P: {"exactness": [...], "memory": {...}}}``."""
    groups = ring_groups(rank, world_size, sizes or [world_size])
    return {size: {"exactness": exactness_worker(rank, world_size, cases, group=group),
                   "memory": memory_worker(rank, world_size, memory_seq_len, q_tile=q_tile, group=group)}
            for size, group in groups.items()}


def default_cases(odd_lengths: Sequence[int] = (37, 64)) -> list[dict]:
    """The exactness cases of the test and the chapter: causal and not, both layouts, odd and even lengths,
    a GQA case and a tiled case."""
    cases = [{"seq_len": n, "causal": causal, "layout": layout}
             for n in odd_lengths for causal in (False, True) for layout in LAYOUTS]
    cases.append({"seq_len": 29, "causal": True, "layout": "zigzag", "heads": 4, "kv_heads": 2, "batch": 2, "q_tile": 2})
    return cases


def main(argv: Sequence[str] | None = None) -> None:
    """Exactness check and per-rank memory: ``python -m dldna.attention.ring --nproc 4`` (spawns gloo
    processes) or ``torchrun --nproc-per-node 4 -m dldna.attention.ring`` (uses the torchrun environment)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--memory-seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    cases = default_cases()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        if args.backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(args.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        reports = exactness_worker(rank, world, cases)
        memory = [memory_worker(rank, world, args.memory_seq_len)]
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        reports = launch(exactness_worker, args.nproc, cases, backend=args.backend)[0]
        memory = launch(memory_worker, args.nproc, args.memory_seq_len, backend=args.backend)
    for r in reports:
        print(f"P={r['world_size']} N={r['seq_len']:4d} causal={r['causal']!s:5} {r['layout']:10} "
              f"max|err| out {r['out']:.1e} dq {r['dq']:.1e} dk {r['dk']:.1e} dv {r['dv']:.1e}")
    for m in memory:
        print(f"rank {m['rank']}: {m['n_local']} local positions, peak {m['peak_mb']:.2f} MiB")


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------- figures
def plot_ring_schedule(world_size: int = 4, causal: bool = True, layout: str = "zigzag"):
    """Draw the ring schedule step by step: one panel per step showing the chunk-level attention matrix
    (rows: query chunks, columns: key chunks); the tiles computed at that step are coloured by the rank
    computing them (hatched: masked diagonal tiles), tiles done at earlier steps are grey. Returns the figure.
    Used in chapter 14."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    n_chunks = world_size if layout == "contiguous" else 2 * world_size
    schedule = ring_schedule(world_size, n_chunks * 4, causal, layout)
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, world_size, figsize=(2.9 * world_size, 4.0), squeeze=False)
    done: set = set()
    for step, ax in enumerate(axes[0]):
        for a, b in done:
            ax.add_patch(Rectangle((b, a), 1, 1, color="0.85"))
        for rank in range(world_size):
            for a, b, kind in schedule[step][rank]:
                ax.add_patch(Rectangle((b, a), 1, 1, facecolor=colors(rank), edgecolor="white",
                                       hatch="///" if kind == "masked" else None))
                done.add((a, b))
        ax.set_xlim(0, n_chunks)
        ax.set_ylim(n_chunks, 0)
        ax.set_aspect("equal")
        ax.set_xticks([i + 0.5 for i in range(n_chunks)], [str(i) for i in range(n_chunks)], fontsize=7)
        ax.set_yticks([i + 0.5 for i in range(n_chunks)], [str(i) for i in range(n_chunks)], fontsize=7)
        held = ", ".join(f"r{r}:KV{(r - step) % world_size}" for r in range(world_size))
        ax.set_title(f"step {step}\n{held}", fontsize=8)
        ax.set_xlabel("key chunk", fontsize=8)
    axes[0][0].set_ylabel("query chunk", fontsize=8)
    handles = [Patch(color=colors(r), label=f"rank {r}") for r in range(world_size)] + [Patch(color="0.85", label="earlier steps")]
    fig.legend(handles=handles, loc="lower center", ncol=world_size + 1, fontsize=8, frameon=False)
    fig.suptitle(f"Ring attention, P={world_size}, {layout} sharding, {'causal' if causal else 'non-causal'}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.93))
    return fig


def work_per_rank(world_size: int, seq_len: int, causal: bool = True, layout: str = "zigzag") -> list[int]:
    """Query-key scores each rank evaluates over the whole ring (masked tiles count their allowed pairs)."""
    c = chunk_size(seq_len, world_size, layout)
    work = [0] * world_size
    for step in ring_schedule(world_size, seq_len, causal, layout):
        for rank, pairs in enumerate(step):
            for a, b, kind in pairs:
                if kind == "full":
                    work[rank] += c * c
                else:
                    q_pos, k_pos = torch.arange(a * c, (a + 1) * c), torch.arange(b * c, (b + 1) * c)
                    work[rank] += int(_tile_mask(q_pos, k_pos, seq_len, causal).sum())
    return work
