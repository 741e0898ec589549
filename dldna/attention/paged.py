"""Paged KV cache (vLLM's PagedAttention, Kwon et al. 2023, arXiv:2309.06180) and a batching simulator.

Used in chapter 6.

* ``BlockAllocator``: a fixed pool of ``num_blocks`` cache blocks with reference counts (shared blocks are freed
  when their last user lets go).
* ``PagedKVCache``: K/V storage ``(num_blocks, n_kv_heads, block_size, head_dim)`` plus one *block table* per
  sequence (logical block ``i`` of a sequence -> physical block). ``fork`` shares a prefix between sequences;
  writing into a shared, partly filled block first copies it (copy-on-write). Running out of blocks raises
  ``ValueError`` before anything is modified.
* ``paged_attention``: attention that reads keys/values through block tables; equals ``attention`` on the
  contiguous cache. The Triton kernel ``dldna.kernels.paged_decode`` computes the same for one query token.
* ``simulate_serving``: static batching vs continuous (iteration-level) batching with contiguous or paged KV
  memory on a synthetic request trace (``synthetic_trace``), under an explicit step-cost model.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import torch

from dldna.attention.reference import attention


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------
class BlockAllocator:
    """A pool of ``num_blocks`` physical blocks with reference counts.

    ``allocate()`` hands out a free block (refcount 1) and raises ``ValueError`` when none is left;
    ``share(b)`` adds a user; ``free(b)`` drops one and returns the block to the pool at refcount 0.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = _positive_int("num_blocks", num_blocks)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: allocate() pops block 0 first
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        self._check(block)
        return self._refcount[block]

    def allocate(self) -> int:
        if not self._free:
            raise ValueError(f"out of KV-cache blocks: all num_blocks={self.num_blocks} are in use")
        block = self._free.pop()
        self._refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        self._check(block)
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is free; only allocated blocks can be shared")
        self._refcount[block] += 1

    def free(self, block: int) -> None:
        self._check(block)
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is already free (double free)")
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free.append(block)

    def _check(self, block: int) -> None:
        if not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be an int in [0, {self.num_blocks}), got {block!r}")


class PagedKVCache:
    """One layer's K/V in fixed-size blocks, addressed through per-sequence block tables.

    Args:
        num_blocks: blocks in the pool; block_size: tokens per block (vLLM's default is 16);
        n_kv_heads, head_dim: shape of the keys/values; dtype, device: of the storage.

    Storage ``k_blocks``/``v_blocks`` is ``(num_blocks, n_kv_heads, block_size, head_dim)``: a block holds
    ``block_size`` consecutive tokens of one sequence for every K/V head. Token ``t`` of a sequence lives in
    physical block ``table[t // block_size]`` at slot ``t % block_size``. (vLLM shares one block table across
    all layers; this class holds one layer.) Memory wasted by a sequence is at most ``block_size - 1`` slots of
    its last block, against ``max_seq_len - len`` for a contiguous reservation.
    """

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        _positive_int("num_blocks", num_blocks)
        self.block_size = _positive_int("block_size", block_size)
        self.n_kv_heads = _positive_int("n_kv_heads", n_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.k_blocks = torch.zeros(shape, dtype=dtype, device=device)
        self.v_blocks = torch.zeros(shape, dtype=dtype, device=device)
        self.block_tables: dict[object, list[int]] = {}
        self.seq_lens: dict[object, int] = {}

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _table(self, seq_id) -> list[int]:
        if seq_id not in self.block_tables:
            raise ValueError(f"seq_id {seq_id!r} is not in the cache")
        return self.block_tables[seq_id]

    def add_sequence(self, seq_id) -> None:
        """Register an empty sequence."""
        if seq_id in self.block_tables:
            raise ValueError(f"seq_id {seq_id!r} is already in the cache")
        self.block_tables[seq_id], self.seq_lens[seq_id] = [], 0

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold ``n_tokens`` tokens: ``ceil(n_tokens / block_size)``."""
        return -(-n_tokens // self.block_size)

    def append(self, seq_id, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k``, ``v`` ``(n_kv_heads, T, head_dim)`` to sequence ``seq_id``.

        New blocks are allocated as needed; a shared, partly filled last block is copied first (copy-on-write).
        Raises ``ValueError`` (and changes nothing) when the pool cannot hold the new tokens.
        """
        table = self._table(seq_id)
        expected = (self.n_kv_heads, k.shape[1] if k.dim() == 3 else -1, self.head_dim)
        if k.dim() != 3 or tuple(k.shape) != expected or k.shape != v.shape:
            raise ValueError(f"k and v must both have shape (n_kv_heads={self.n_kv_heads}, T, "
                             f"head_dim={self.head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
        length, new = self.seq_lens[seq_id], k.shape[1]
        fill = length % self.block_size
        cow = fill > 0 and self.allocator.refcount(table[-1]) > 1
        needed = self.blocks_for(length + new) - len(table) + int(cow)
        if needed > self.allocator.num_free:
            raise ValueError(f"cache overflow: sequence {seq_id!r} needs {needed} more blocks but only "
                             f"{self.allocator.num_free} of num_blocks={self.allocator.num_blocks} are free")
        if cow:  # copy-on-write: this sequence gets a private copy of the shared last block
            old, fresh = table[-1], self.allocator.allocate()
            self.k_blocks[fresh].copy_(self.k_blocks[old])
            self.v_blocks[fresh].copy_(self.v_blocks[old])
            self.allocator.free(old)
            table[-1] = fresh
        while len(table) < self.blocks_for(length + new):
            table.append(self.allocator.allocate())
        pos = torch.arange(length, length + new)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        slots = pos % self.block_size
        k, v = k.to(self.k_blocks), v.to(self.v_blocks)
        blocks, slots = blocks.to(self.k_blocks.device), slots.to(self.k_blocks.device)
        self.k_blocks[blocks, :, slots] = k.transpose(0, 1)  # (T, Hkv, D) written at (block, :, slot)
        self.v_blocks[blocks, :, slots] = v.transpose(0, 1)
        self.seq_lens[seq_id] = length + new

    def fork(self, parent_id, child_id) -> None:
        """Make ``child_id`` a copy of ``parent_id`` sharing all its blocks (no K/V is copied)."""
        table = self._table(parent_id)
        if child_id in self.block_tables:
            raise ValueError(f"child_id {child_id!r} is already in the cache")
        for block in table:
            self.allocator.share(block)
        self.block_tables[child_id], self.seq_lens[child_id] = list(table), self.seq_lens[parent_id]

    def free(self, seq_id) -> None:
        """Drop a sequence; its blocks return to the pool when no other sequence shares them."""
        for block in self._table(seq_id):
            self.allocator.free(block)
        del self.block_tables[seq_id], self.seq_lens[seq_id]

    def gather(self, seq_id) -> tuple[torch.Tensor, torch.Tensor]:
        """The contiguous ``(n_kv_heads, L, head_dim)`` keys and values of one sequence."""
        table, length = self._table(seq_id), self.seq_lens[seq_id]
        idx = torch.tensor(table, dtype=torch.long, device=self.k_blocks.device)

        def contiguous(blocks):
            x = blocks[idx].transpose(0, 1).reshape(self.n_kv_heads, -1, self.head_dim)
            return x[:, :length]

        return contiguous(self.k_blocks), contiguous(self.v_blocks)

    def batch_tables(self, seq_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``block_tables`` ``(B, max_blocks)`` int32 (padded with 0) and ``seq_lens`` ``(B,)`` int32 for a batch."""
        tables = [self._table(s) for s in seq_ids]
        width = max(1, max(len(t) for t in tables))
        out = torch.zeros(len(tables), width, dtype=torch.int32)
        for row, table in enumerate(tables):
            out[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
        lens = torch.tensor([self.seq_lens[s] for s in seq_ids], dtype=torch.int32)
        return out.to(self.k_blocks.device), lens.to(self.k_blocks.device)

    def stats(self) -> dict:
        """Blocks in use, tokens stored (shared blocks counted once) and slots allocated but empty."""
        used_blocks = self.allocator.num_used
        seen, tokens = set(), 0
        for seq_id, table in self.block_tables.items():
            for i, block in enumerate(table):
                if block not in seen:
                    seen.add(block)
                    tokens += min(self.block_size, self.seq_lens[seq_id] - i * self.block_size)
        return dict(used_blocks=used_blocks, free_blocks=self.allocator.num_free, stored_tokens=tokens,
                    empty_slots=used_blocks * self.block_size - tokens)


def paged_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of the last ``Tq`` tokens of each sequence to its paged keys/values (reference version).

    Args:
        q: ``(B, H, Tq, D)``: the queries of positions ``seq_lens[b] - Tq ... seq_lens[b] - 1`` (``Tq = 1``
            when decoding); ``H`` a multiple of the K/V heads (GQA).
        k_blocks, v_blocks: ``(num_blocks, Hkv, block_size, D)``; block_tables: ``(B, max_blocks)`` ints;
        seq_lens: ``(B,)`` ints, ``>= Tq``.

    Gathers each sequence's blocks into a padded ``(B, Hkv, max_blocks * block_size, D)`` tensor and calls
    ``attention`` with a mask hiding the padding: the result equals ``attention`` on the contiguous cache.
    """
    if q.dim() != 4 or k_blocks.dim() != 4 or k_blocks.shape != v_blocks.shape:
        raise ValueError(f"q must be (B, H, Tq, D) and k_blocks, v_blocks equal (num_blocks, Hkv, block_size, D), "
                         f"got q {tuple(q.shape)}, k_blocks {tuple(k_blocks.shape)}, v_blocks {tuple(v_blocks.shape)}")
    b, _, n_q, _ = q.shape
    _, n_kv, block_size, d = k_blocks.shape
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be (B={b}, max_blocks), got {tuple(block_tables.shape)}")
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must be (B={b},), got {tuple(seq_lens.shape)}")
    if bool((seq_lens < n_q).any()) or bool((seq_lens > block_tables.shape[1] * block_size).any()):
        raise ValueError(f"seq_lens must lie in [Tq={n_q}, max_blocks * block_size], got {seq_lens.tolist()}")
    tables = block_tables.long()

    def gathered(blocks):  # (B, max_blocks, Hkv, bs, D) -> (B, Hkv, max_blocks * bs, D)
        return blocks[tables].permute(0, 2, 1, 3, 4).reshape(b, n_kv, -1, d)

    k, v = gathered(k_blocks), gathered(v_blocks)
    key_pos = torch.arange(k.shape[2], device=q.device)
    query_pos = seq_lens.long().to(q.device)[:, None] - n_q + torch.arange(n_q, device=q.device)  # (B, Tq)
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal, and hides the padding past seq_len
    return attention(q, k, v, mask=mask[:, None], scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# Serving simulation: static vs continuous batching, contiguous vs paged memory
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One request of a trace: arrival time (s), prompt length and number of tokens to generate."""

    rid: int
    arrival: float
    prompt_len: int
    output_len: int


def synthetic_trace(n_requests: int = 300, rate: float = 20.0, mean_prompt: int = 256, mean_output: int = 128,
                    max_seq_len: int = 2048, seed: int = 0) -> list[Request]:
    """A seeded request trace: Poisson arrivals (``rate`` requests/s) and log-normal prompt/output lengths.

    Lengths have the given means and a long tail (sigma 0.8), clipped so ``prompt + output <= max_seq_len``;
    the spread of output lengths is what makes static batching wait for its longest member.
    """
    _positive_int("n_requests", n_requests)
    _positive_int("max_seq_len", max_seq_len)
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = np.random.default_rng(seed)
    sigma = 0.8

    def lognormal(mean, size):
        return rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size)

    arrivals = np.cumsum(rng.exponential(1.0 / rate, n_requests))
    prompts = np.clip(np.round(lognormal(mean_prompt, n_requests)), 1, max_seq_len // 2).astype(int)
    outputs = np.clip(np.round(lognormal(mean_output, n_requests)), 1, None).astype(int)
    outputs = np.minimum(outputs, max_seq_len - prompts)
    return [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]


@dataclass
class StepCost:
    """Time of one engine iteration (an assumption, not a measurement; defaults sketch a 7B GQA model on an H100).

    ``base`` (s): reading the weights once per iteration (~14 GB at ~3 TB/s); ``per_prefill_token`` (s): compute
    of one prompt token (~2 * 7e9 FLOP at ~700 TFLOP/s); ``per_context_token`` (s): reading one cached token's
    K/V (128 KiB for Mistral-7B at ~3 TB/s) for each decoding sequence.
    """

    base: float = 5e-3
    per_prefill_token: float = 2e-5
    per_context_token: float = 4.4e-8

    def __call__(self, prefill_tokens: int, context_tokens: int) -> float:
        return self.base + self.per_prefill_token * prefill_tokens + self.per_context_token * context_tokens


POLICIES = ("static", "continuous", "paged")


@dataclass
class ServingResult:
    """Outcome of ``simulate_serving``: per-request latencies and a timeline of the KV memory."""

    policy: str
    latency: np.ndarray  # finish - arrival, per request (s)
    ttft: np.ndarray  # first token - arrival (s)
    total_time: float
    output_tokens: int
    preemptions: int
    timeline: dict = field(default_factory=dict)  # time, batch, used_slots, reserved_slots (per iteration)

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the whole trace."""
        return self.output_tokens / self.total_time

    def waste(self) -> float:
        """Time-averaged fraction of reserved KV slots that hold no token (fragmentation + over-reservation)."""
        t = self.timeline
        dt = np.diff(np.append(t["time"], self.total_time))
        reserved = np.asarray(t["reserved_slots"], dtype=float)
        used = np.asarray(t["used_slots"], dtype=float)
        return float(((reserved - used) * dt).sum() / max((reserved * dt).sum(), 1e-12))

    def summary(self) -> dict:
        return dict(policy=self.policy, throughput_tok_s=self.throughput,
                    latency_p50_s=float(np.percentile(self.latency, 50)),
                    latency_p90_s=float(np.percentile(self.latency, 90)),
                    latency_p99_s=float(np.percentile(self.latency, 99)),
                    ttft_p50_s=float(np.percentile(self.ttft, 50)), kv_waste=self.waste(),
                    preemptions=self.preemptions, total_time_s=self.total_time)


@dataclass
class _Running:
    req: Request
    generated: int = 0
    blocks: list = field(default_factory=list)

    @property
    def tokens(self) -> int:  # tokens in its cache: the prompt and every generated token
        return self.req.prompt_len + self.generated


def simulate_serving(trace: list[Request], policy: str, capacity_tokens: int = 32768, max_batch: int = 64,
                     max_seq_len: int = 2048, block_size: int = 16, cost: StepCost | None = None) -> ServingResult:
    """Serve ``trace`` with one engine and ``capacity_tokens`` KV slots; each iteration emits one token per sequence.

    Policies:
        ``"static"``: take up to ``max_batch`` waiting requests, each reserving ``max_seq_len`` slots; run the
        batch (prompts padded to the longest) until its longest output is done; all its responses return then.
        ``"continuous"``: iteration-level scheduling (Orca, Yu et al. 2022): finished sequences leave and waiting
        ones join at every iteration; memory still reserved as ``max_seq_len`` contiguous slots per sequence.
        ``"paged"``: continuous batching with blocks of ``block_size`` allocated on demand from a
        ``BlockAllocator`` (vLLM); when a block is needed and none is free the newest sequence is preempted
        (its blocks freed, recomputed later).

    Time comes from ``cost`` (``StepCost``): a model of the engine, stated, not measured.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    for name, value in (("capacity_tokens", capacity_tokens), ("max_batch", max_batch),
                        ("max_seq_len", max_seq_len), ("block_size", block_size)):
        _positive_int(name, value)
    if not trace:
        raise ValueError("trace must contain at least one request")
    too_long = [r.rid for r in trace if r.prompt_len + r.output_len > max_seq_len]
    if too_long:
        raise ValueError(f"max_seq_len={max_seq_len} is shorter than requests {too_long[:5]}")
    if capacity_tokens < max_seq_len:
        raise ValueError(f"capacity_tokens ({capacity_tokens}) must hold one max_seq_len ({max_seq_len}) sequence")
    cost = cost or StepCost()
    pending = sorted(trace, key=lambda r: r.arrival)
    n = len(pending)
    first_token, finish = {}, {}
    timeline = {"time": [], "batch": [], "used_slots": [], "reserved_slots": []}
    waiting: list = []  # heap of (arrival, rid, _Running) in FCFS order (preempted ones keep their place)
    next_arrival, now, preemptions = 0, 0.0, 0
    running: list[_Running] = []
    allocator = BlockAllocator(capacity_tokens // block_size) if policy == "paged" else None
    slots_per_seq = max_seq_len

    def admit_arrivals():
        nonlocal next_arrival
        while next_arrival < n and pending[next_arrival].arrival <= now:
            r = pending[next_arrival]
            heapq.heappush(waiting, (r.arrival, r.rid, _Running(r)))
            next_arrival += 1

    def record(batch, used, reserved):
        timeline["time"].append(now)
        timeline["batch"].append(batch)
        timeline["used_slots"].append(used)
        timeline["reserved_slots"].append(reserved)

    while len(finish) < n:
        admit_arrivals()
        if not running and not waiting:
            now = max(now, pending[next_arrival].arrival)
            continue
        if policy == "static":
            batch = [heapq.heappop(waiting)[2] for _ in range(min(len(waiting), max_batch,
                                                                   capacity_tokens // slots_per_seq))]
            longest_prompt = max(s.req.prompt_len for s in batch)
            longest_output = max(s.req.output_len for s in batch)
            for step in range(longest_output):
                context = len(batch) * (longest_prompt + step)  # padded rows are computed too
                record(len(batch), sum(s.tokens for s in batch), len(batch) * slots_per_seq)
                now += cost(len(batch) * longest_prompt if step == 0 else 0, context)
                for s in batch:
                    if s.generated < s.req.output_len:
                        s.generated += 1
                        first_token.setdefault(s.req.rid, now)
            for s in batch:
                finish[s.req.rid] = now
            continue
        # continuous / paged: admit what fits, then one iteration for everybody
        prefill = 0
        while waiting and len(running) < max_batch:
            cand = waiting[0][2]
            if policy == "continuous":
                fits = (len(running) + 1) * slots_per_seq <= capacity_tokens
            else:
                fits = -(-(cand.tokens + 1) // block_size) <= allocator.num_free
            if not fits:
                break
            heapq.heappop(waiting)
            if policy == "paged":
                cand.blocks = [allocator.allocate() for _ in range(-(-cand.tokens // block_size))]
            prefill += cand.tokens  # prompt (and, after a preemption, the tokens generated before it)
            running.append(cand)
        if policy == "paged":  # every sequence writes one more token: make room, preempting the newest if needed
            for s in list(running):
                if s not in running:
                    continue
                while len(s.blocks) * block_size < s.tokens + 1:
                    if allocator.num_free == 0:
                        victim = running.pop()  # the most recently admitted sequence
                        for b in victim.blocks:
                            allocator.free(b)
                        victim.blocks = []
                        preemptions += 1
                        heapq.heappush(waiting, (victim.req.arrival, victim.req.rid, victim))
                        if victim is s:
                            break
                    else:
                        s.blocks.append(allocator.allocate())
            reserved = allocator.num_used * block_size
        else:
            reserved = len(running) * slots_per_seq
        if not running:  # everything was preempted (cannot happen while capacity >= max_seq_len)
            continue
        record(len(running), sum(s.tokens for s in running), reserved)
        now += cost(prefill, sum(s.tokens for s in running))
        still = []
        for s in running:
            s.generated += 1
            first_token.setdefault(s.req.rid, now)
            if s.generated >= s.req.output_len:
                finish[s.req.rid] = now
                if policy == "paged":
                    for b in s.blocks:
                        allocator.free(b)
            else:
                still.append(s)
        running = still
    order = [r.rid for r in pending]
    arrival = np.array([r.arrival for r in pending])
    latency = np.array([finish[i] for i in order]) - arrival
    ttft = np.array([first_token[i] for i in order]) - arrival
    for key in timeline:
        timeline[key] = np.asarray(timeline[key])
    return ServingResult(policy, latency, ttft, now - pending[0].arrival, sum(r.output_len for r in pending),
                         preemptions, timeline)


def plot_serving(results: list[ServingResult]):
    """Latency CDFs, throughput and the KV-memory timeline of several policies; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, res in enumerate(results):
        lat = np.sort(res.latency)
        axes[0].plot(lat, np.arange(1, len(lat) + 1) / len(lat), color=f"C{i}", label=res.policy)
        t = res.timeline
        axes[2].plot(t["time"], t["reserved_slots"], color=f"C{i}", lw=1, label=f"{res.policy}: reserved")
        axes[2].plot(t["time"], t["used_slots"], color=f"C{i}", ls=":", lw=1.2, label=f"{res.policy}: holding tokens")
    axes[0].set(xlabel="latency (s)", ylabel="fraction of requests", title="request latency (CDF)")
    axes[0].legend()
    names = [r.policy for r in results]
    axes[1].bar(names, [r.throughput for r in results], color=[f"C{i}" for i in range(len(results))])
    for i, r in enumerate(results):
        axes[1].text(i, r.throughput, f"{r.throughput:.0f}\nwaste {r.waste():.0%}", ha="center", va="bottom")
    axes[1].set(ylabel="generated tokens / s", title="throughput (KV waste)")
    axes[1].margins(y=0.25)
    axes[2].set(xlabel="time (s)", ylabel="KV slots", title="KV memory over time")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def serving_sweep(rates, policies=POLICIES, n_requests: int = 300, seed: int = 0, trace_kwargs: dict | None = None,
                  **sim_kwargs) -> list[dict]:
    """``simulate_serving`` summaries for every arrival ``rate`` (requests/s) and policy, on seeded traces."""
    rows = []
    for rate in rates:
        trace = synthetic_trace(n_requests, rate=rate, seed=seed, **(trace_kwargs or {}))
        for policy in policies:
            rows.append(dict(rate=rate, **simulate_serving(trace, policy, **sim_kwargs).summary()))
    return rows


def plot_serving_sweep(rows: list[dict]):
    """Throughput and median / p99 latency against the request rate, one line per policy; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, policy in enumerate(dict.fromkeys(r["policy"] for r in rows)):
        mine = [r for r in rows if r["policy"] == policy]
        rates = [r["rate"] for r in mine]
        axes[0].plot(rates, [r["throughput_tok_s"] for r in mine], "o-", color=f"C{i}", label=policy)
        axes[1].plot(rates, [r["latency_p50_s"] for r in mine], "o-", color=f"C{i}", label=f"{policy} p50")
        axes[1].plot(rates, [r["latency_p99_s"] for r in mine], "x--", color=f"C{i}", label=f"{policy} p99")
    axes[0].set(xlabel="request rate (1/s)", ylabel="generated tokens / s", title="throughput")
    axes[1].set(xlabel="request rate (1/s)", ylabel="latency (s)", title="request latency", yscale="log")
    axes[0].legend()
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_block_tables(cache: PagedKVCache, seq_ids=None):
    """The block pool as a grid: row = sequence, column = physical block, label = logical block index.

    A column used by several rows is a block shared after ``fork``. Returns the figure.
    """
    import matplotlib.pyplot as plt

    seq_ids = list(cache.block_tables) if seq_ids is None else list(seq_ids)
    n_blocks = cache.allocator.num_blocks
    grid = np.zeros((len(seq_ids), n_blocks))
    fig, ax = plt.subplots(figsize=(min(12, 1 + 0.45 * n_blocks), 0.6 + 0.45 * len(seq_ids)))
    for row, sid in enumerate(seq_ids):
        length = cache.seq_lens[sid]
        for logical, block in enumerate(cache.block_tables[sid]):
            fill = min(cache.block_size, length - logical * cache.block_size) / cache.block_size
            grid[row, block] = fill
            ax.text(block, row, str(logical), ha="center", va="center", fontsize=8)
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.6, aspect="auto")
    ax.set_yticks(range(len(seq_ids)), [str(s) for s in seq_ids])
    ax.set_xticks(range(n_blocks))
    ax.set(xlabel="physical block (shade = fill)", ylabel="sequence", title="block tables (number = logical block)")
    fig.tight_layout()
    return fig


__all__ = ["BlockAllocator", "PagedKVCache", "paged_attention", "Request", "synthetic_trace", "StepCost",
           "ServingResult", "simulate_serving", "plot_serving", "POLICIES", "serving_sweep", "plot_serving_sweep",
           "plot_block_tables"]
