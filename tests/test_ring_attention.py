"""Ring attention over gloo processes equals dense attention (forward and backward) in float64."""
import pytest
import torch

from dldna.attention import attention
from dldna.attention.ring import (
    check_and_measure_worker,
    default_cases,
    exactness_worker,
    gather_sequence,
    launch,
    merge_partials,
    ring_attention,
    shard_sequence,
    work_per_rank,
)

TOL = 1e-10


@pytest.fixture(scope="module")
def ring_reports():
    """One spawn of 4 gloo processes checks P = 2 (two rings side by side) and P = 4."""
    return launch(check_and_measure_worker, 4, default_cases(), 1024, (2, 4))


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_matches_dense_forward_and_backward(ring_reports, world_size):
    cases = default_cases()
    for per_rank in ring_reports:  # every rank gathered the full tensors of its ring
        reports = per_rank[world_size]["exactness"]
        assert len(reports) == len(cases)
        for case, rep in zip(cases, reports):
            assert rep["seq_len"] == case["seq_len"] and rep["world_size"] == world_size
            for name in ("out", "dq", "dk", "dv"):
                assert rep[name] < TOL, (name, rep)


def test_per_rank_memory_falls_with_world_size(ring_reports):
    peak = {P: max(r[P]["memory"]["peak_mb"] for r in ring_reports) for P in (2, 4)}
    n_local = {P: ring_reports[0][P]["memory"]["n_local"] for P in (2, 4)}
    assert n_local == {2: 512, 4: 256}
    assert 0 < peak[4] < 0.7 * peak[2], peak


def test_cases_cover_odd_lengths_causal_and_both_layouts():
    cases = default_cases()
    assert any(c["seq_len"] % 8 for c in cases)  # not divisible by 2P for P = 2, 4
    assert {c["causal"] for c in cases} == {False, True}
    assert {c["layout"] for c in cases} == {"contiguous", "zigzag"}
    assert any(c.get("kv_heads", 2) < c.get("heads", 2) for c in cases)


def _qkv(n, seed=0, heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, dim, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_single_process_ring_equals_dense(causal):
    n = 23
    q, k, v = _qkv(n)
    local = [shard_sequence(t, 0, 1).requires_grad_(True) for t in (q, k, v)]
    out = ring_attention(*local, seq_len=n, causal=causal, q_tile=5)
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attention(*ref_in, causal=causal)
    assert (gather_sequence([out.detach()], n) - ref.detach()).abs().max() < TOL
    dout = torch.randn_like(ref)
    out.backward(shard_sequence(dout, 0, 1))
    ref.backward(dout)
    for mine, theirs in zip(local, ref_in):
        assert (gather_sequence([mine.grad], n) - theirs.grad).abs().max() < TOL


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_gather_roundtrip_pads_odd_lengths(layout):
    x = torch.arange(2 * 3 * 13 * 4, dtype=torch.float64).view(2, 3, 13, 4)
    shards = [shard_sequence(x, r, 4, layout) for r in range(4)]
    assert len({s.shape[-2] for s in shards}) == 1 and shards[0].shape[-2] * 4 >= 13
    assert torch.equal(gather_sequence(shards, 13, layout), x)


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    n = 64
    zig, cont = work_per_rank(4, n, True, "zigzag"), work_per_rank(4, n, True, "contiguous")
    assert max(zig) == min(zig)
    assert max(cont) > 3 * min(cont)
    assert sum(zig) == sum(cont) == n * (n + 1) // 2  # every allowed pair exactly once
    odd = work_per_rank(4, 37, False, "zigzag")
    assert sum(odd) == 37 * 37


def test_merge_partials_equals_attention_over_the_union():
    q, k, v = _qkv(11, seed=3)
    out_a, lse_a = attention(q, k[:, :, :4], v[:, :, :4], return_lse=True)
    out_b, lse_b = attention(q, k[:, :, 4:], v[:, :, 4:], return_lse=True)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = attention(q, k, v, return_lse=True)
    assert (out - ref).abs().max() < TOL and (lse - ref_lse).abs().max() < TOL
    empty = torch.full_like(lse_a, float("-inf"))
    merged, merged_lse = merge_partials(torch.zeros_like(out_a), empty, torch.zeros_like(out_a), empty)
    assert torch.equal(merged, torch.zeros_like(out_a)) and torch.isinf(merged_lse).all()


def test_wrong_shard_length_and_bad_arguments_raise():
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="shard_sequence"):
        ring_attention(q, k, v, seq_len=7)  # one process, zigzag: 2 chunks of 4 = 8 positions, not 10
    with pytest.raises(ValueError, match="seq_len"):
        ring_attention(q, k, v, seq_len=0)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, k, v, seq_len=10, layout="striped")
    with pytest.raises(ValueError, match="q_tile"):
        ring_attention(q, k, v, seq_len=10, q_tile=0)
    with pytest.raises(ValueError, match="world_size"):
        launch(exactness_worker, 0, [])
