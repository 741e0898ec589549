"""Dilated (LongNet) and hierarchical attention against the dense reference; the RMT toy's mechanics."""
import pytest
import torch

from dldna.attention import attention
from dldna.attention.dilated import dilated_attention, dilated_pairs, longnet_mask
from dldna.attention.hierarchical import hierarchical_attention, hierarchical_pairs
from dldna.attention.masks import segment_dilated_mask
from dldna.attention.recurrent_memory import RecallTask, RecurrentMemoryTransformer, RMTConfig

TOL = 1e-10


def _qkv(n, heads=4, kv_heads=None, dim=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, n, dim, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


BRANCHES = [([4, 8, 16], [1, 2, 4]), ([6], [3]), ([5, 12], [1, 3]), ([16], [1])]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [37, 48])
@pytest.mark.parametrize("branches", BRANCHES, ids=str)
def test_dilated_equals_dense_with_union_mask(causal, n, branches):
    w, r = branches
    q, k, v = _qkv(n, seed=n)
    out = dilated_attention(q, k, v, w, r, causal=causal)
    ref = attention(q, k, v, mask=longnet_mask(n, w, r, num_heads=4, causal=causal))
    assert (out - ref).abs().max() < TOL


def test_dilated_gqa_and_lse():
    q, k, v = _qkv(29, heads=4, kv_heads=2)
    out, lse = dilated_attention(q, k, v, [4, 8], [1, 2], causal=True, return_lse=True)
    ref, ref_lse = attention(q, k, v, mask=longnet_mask(29, [4, 8], [1, 2], 4, causal=True), return_lse=True)
    assert (out - ref).abs().max() < TOL and (lse - ref_lse).abs().max() < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_without_dedup_is_longnet_sum_over_branch_key_sets(causal):
    n, w, r, heads = 33, [4, 8, 16], [1, 2, 4], 4
    q, k, v = _qkv(n, heads=heads)
    out = dilated_attention(q, k, v, w, r, causal=causal, deduplicate=False)
    mask = torch.stack([torch.cat([segment_dilated_mask(n, wi, ri, h % ri, causal) for wi, ri in zip(w, r)], dim=1)
                        for h in range(heads)])
    ref = attention(q, torch.cat([k] * 3, dim=2), torch.cat([v] * 3, dim=2), mask=mask)
    assert (out - ref).abs().max() < TOL
    # overlapping branches double-count shared keys, so the two combinations really differ
    assert (out - dilated_attention(q, k, v, w, r, causal=causal)).abs().max() > 1e-3


def test_longnet_mask_heads_cover_every_position_and_one_full_branch_is_dense():
    m = longnet_mask(32, [8, 16], [2, 4], num_heads=4)
    assert m.any(0).diagonal().all()  # every position is on some head's grid
    assert not m[0].diagonal().all()  # but not on head 0's alone
    assert torch.equal(longnet_mask(10, [16], [1], 2)[0], torch.ones(10, 10, dtype=torch.bool))


def test_dilated_pairs_grow_linearly():
    w, r = [8, 16, 32], [1, 2, 4]
    assert dilated_pairs(1024, w, r) * 2 == dilated_pairs(2048, w, r)
    assert dilated_pairs(64, [64], [1]) == 64 * 64


def test_dilated_rejects_bad_branches():
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="equal length"):
        dilated_attention(q, k, v, [4, 8], [1])
    with pytest.raises(ValueError, match="dilation rate"):
        dilated_attention(q, k, v, [2], [4])
    with pytest.raises(ValueError, match="segment_lengths"):
        dilated_attention(q, k, v, [0], [1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [23, 32])
def test_hierarchical_exact_cases(causal, n):
    q, k, v = _qkv(n, heads=3, seed=n)
    ref = attention(q, k, v, causal=causal)
    assert (hierarchical_attention(q, k, v, 1, causal) - ref).abs().max() < TOL  # every block is one token
    assert (hierarchical_attention(q, k, v, n, causal) - ref).abs().max() < TOL  # one block: all local
    # keys/values constant inside blocks of 5: a pooled key with + log(count) stands exactly for its block
    idx = torch.arange(n) // 5
    kb, vb = (t[:, :, idx] for t in _qkv(-(-n // 5), heads=3, seed=1)[1:])
    assert (hierarchical_attention(q, kb, vb, 5, causal) - attention(q, kb, vb, causal=causal)).abs().max() < TOL
    # general inputs: an approximation, and the test would notice if it were silently exact/dense
    assert (hierarchical_attention(q, k, v, 5, causal) - ref).abs().max() > 1e-2


def test_hierarchical_cost_and_arguments():
    assert hierarchical_pairs(1024, 32) == 32 * 32 * 32 + 1024 * 32
    assert hierarchical_pairs(4096, 64) < 4096**2 / 10
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="block_size"):
        hierarchical_attention(q, k, v, 0)


def test_recall_task_answer_is_in_the_first_segment():
    task = RecallTask(num_segments=3, segment_len=8, num_pairs=3)
    tokens, answer = task.sample(64, torch.Generator().manual_seed(0))
    assert tokens.shape == (64, 24) and ((answer >= 0) & (answer < task.num_values)).all()
    for row, a in zip(tokens, answer):
        assert row[-2] == task.query_token
        keys, values = row[0:6:2].tolist(), row[1:6:2].tolist()
        assert len(set(keys)) == 3 and values[keys.index(row[-1].item())] == task.num_keys + a
        assert (row[6:-2] >= task.num_keys + task.num_values).all()  # noise elsewhere
    with pytest.raises(ValueError, match="segment_len"):
        RecallTask(segment_len=3, num_pairs=2)


def _model(m, bptt=None):
    torch.manual_seed(0)
    task = RecallTask()
    cfg = RMTConfig(vocab_size=task.vocab_size, num_classes=task.num_values, segment_len=task.segment_len,
                    num_memory_tokens=m, hidden_size=32, num_attention_heads=2, intermediate_size=64, bptt_segments=bptt)
    return task, RecurrentMemoryTransformer(cfg)


def test_memory_carries_information_across_segments_and_no_memory_does_not():
    for m, should_change in ((4, True), (0, False)):
        task, model = _model(m)
        tokens, _ = task.sample(4, torch.Generator().manual_seed(1))
        changed = tokens.clone()
        changed[:, : task.segment_len] = (changed[:, : task.segment_len] + 1) % task.vocab_size
        diff = (model(tokens) - model(changed)).abs().max().item()
        assert (diff > 1e-6) == should_change, (m, diff)


def test_truncated_bptt_stops_gradients_at_the_bound():
    for bptt, reaches_first in ((None, True), (2, False), (3, True)):
        task, model = _model(4, bptt)
        tokens, _ = task.sample(2, torch.Generator().manual_seed(2))  # 3 segments
        embedded = []  # the hook returns None, so it records the outputs without replacing them
        hook = model.embed_tokens.register_forward_hook(lambda mod, inp, out: embedded.append(out))
        logits = model(tokens)
        hook.remove()
        assert len(embedded) == 3
        grad = torch.autograd.grad(logits.sum(), embedded[0], allow_unused=True)[0]
        reached = grad is not None and grad.abs().max().item() > 0
        assert reached == reaches_first, bptt


def test_rmt_config_validation():
    with pytest.raises(ValueError, match="num_memory_tokens"):
        RMTConfig(vocab_size=10, num_classes=2, segment_len=4, num_memory_tokens=-1)
    with pytest.raises(ValueError, match="bptt_segments"):
        RMTConfig(vocab_size=10, num_classes=2, segment_len=4, bptt_segments=0)
