"""Chapter 6: KV caches of MHA/GQA/MQA/MLA/CLA, their byte arithmetic, the paged cache and the serving simulator."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dldna.attention import attention
from dldna.attention.grouped import (
    REAL_MODELS, KVDecoderConfig, LayerCache, MultiHeadAttention, MultiHeadLatentAttention, TinyDecoder,
    allocated_cache_bytes, cache_nbytes, greedy_decode, kv_cache_bytes, kv_cache_table, matched_intermediate_size,
    mla_kv_cache_bytes, model_kv_bytes,
)
from dldna.attention.paged import (
    BlockAllocator, PagedKVCache, paged_attention, simulate_serving, synthetic_trace,
)

SMALL = dict(vocab_size=37, hidden_size=48, n_layers=4, n_heads=4, head_dim=12, intermediate_size=40,
             kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10)
VARIANTS = {
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "mqa_cla2": dict(n_kv_heads=1, cla_share=2),
    "gqa_cla4": dict(n_kv_heads=2, cla_share=4),
    "mla": dict(attention="mla"),
    "mla_qlora": dict(attention="mla", q_lora_rank=16),
}


def random_model(variant: str, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    model = TinyDecoder(KVDecoderConfig(**SMALL, **VARIANTS[variant])).double()
    for p in model.parameters():  # large weights: attention patterns far from uniform, so mistakes show
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_with_cache_equals_full_forward(variant):
    model = random_model(variant)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    for absorb in ([False, True] if "mla" in variant else [False]):
        caches = model.new_cache()
        steps = [model(ids[:, :6], caches, absorb=absorb)]  # prefill 6 tokens, then one token at a time
        steps += [model(ids[:, t:t + 1], caches, absorb=absorb) for t in range(6, 17)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)
        assert all(c is None or c.seq_len == 17 for c in caches)


def test_greedy_decode_matches_recomputing_the_prefix():
    model = random_model("mqa_cla2")
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    out = greedy_decode(model, prompt, 8)
    seq = prompt
    for _ in range(8):  # no cache: full forward of the whole prefix every step
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_cla_consumers_have_no_kv_projections_and_no_cache():
    model = TinyDecoder(KVDecoderConfig(**SMALL, n_kv_heads=1, cla_share=2))
    owners = [hasattr(layer.self_attn, "k_proj") for layer in model.layers]
    assert owners == [True, False, True, False]
    assert [c is not None for c in model.new_cache()] == owners


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = MultiHeadAttention(48, n_heads=6, n_kv_heads=2, head_dim=8).double()
    mha = MultiHeadAttention(48, n_heads=6, n_kv_heads=6, head_dim=8).double()
    mha.q_proj.weight.data.copy_(gqa.q_proj.weight)
    mha.o_proj.weight.data.copy_(gqa.o_proj.weight)
    for name in ("k_proj", "v_proj"):  # K/V head j of GQA serves query heads 3j..3j+2
        w = getattr(gqa, name).weight.view(2, 1, 8, 48).expand(2, 3, 8, 48).reshape(48, 48)
        getattr(mha, name).weight.data.copy_(w)
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    pos = torch.arange(9)
    torch.testing.assert_close(gqa(x, pos)[0], mha(x, pos)[0], rtol=0, atol=1e-12)


def test_mla_absorbed_path_equals_expanded_path_and_reads_only_the_latent():
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(40, n_heads=5, kv_lora_rank=14, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=6, q_lora_rank=12).double()
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.4)
    x = torch.randn(2, 11, 40, dtype=torch.float64)
    naive, (c_kv, k_rope) = mla(x, torch.arange(11))
    absorbed, _ = mla(x, torch.arange(11), absorb=True)
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-10)
    assert c_kv.shape == (2, 1, 11, 14) and k_rope.shape == (2, 1, 11, 4)
    cache = LayerCache()
    mla(x, torch.arange(11), cache)
    assert cache.nbytes() == mla_kv_cache_bytes(1, 14, 4, 11, 2, dtype_bytes=8)


def test_mla_matches_hugging_face_deepseek_v2_attention():
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding

    nope, rope, heads, rank = 12, 8, 4, 20
    for q_lora_rank in (None, 24):
        config = DeepseekV2Config(hidden_size=48, num_attention_heads=heads, num_key_value_heads=heads,
                                  kv_lora_rank=rank, q_lora_rank=q_lora_rank, qk_nope_head_dim=nope,
                                  qk_rope_head_dim=rope, v_head_dim=10, vocab_size=10, num_hidden_layers=1)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        hf = DeepseekV2Attention(config, layer_idx=0).double()
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.3)
        ours = MultiHeadLatentAttention(48, heads, rank, nope, rope, 10, q_lora_rank=q_lora_rank).double()
        # HF rotates adjacent pairs (2i, 2i+1); we rotate (i, i + rope/2): permute the RoPE output features.
        perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
        state = {k: v.clone() for k, v in hf.state_dict().items()}
        q_name = "q_proj.weight" if q_lora_rank is None else "q_b_proj.weight"
        w = state[q_name].view(heads, nope + rope, -1)
        w[:, nope:] = w[:, nope:][:, perm]
        state["kv_a_proj_with_mqa.weight"][rank:] = state["kv_a_proj_with_mqa.weight"][rank:][perm]
        ours.load_state_dict(state, strict=True)
        x = torch.randn(2, 7, 48, dtype=torch.float64)
        pos = torch.arange(7)[None].expand(2, -1)
        mask = torch.full((7, 7), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        expected, _ = hf(x, attention_mask=mask, position_embeddings=DeepseekV2RotaryEmbedding(config)(x, pos))
        # HF computes RoPE in float32, hence the tolerance
        torch.testing.assert_close(ours(x, torch.arange(7))[0], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x, torch.arange(7), absorb=True)[0], expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- arithmetic
def test_kv_cache_bytes_of_real_models():
    per_token = {row["model"]: row["bytes_per_token"] for row in kv_cache_table()}
    assert per_token["Llama-2-7B"] == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    assert per_token["Mistral-7B"] == 128 * 1024
    assert per_token["DeepSeek-V2"] == 60 * (512 + 64) * 2
    assert per_token["Mistral-7B + CLA2"] == 64 * 1024
    assert per_token["Llama-2-7B as MQA + CLA2"] == 8 * 1024
    llama = next(s for s in REAL_MODELS if s["model"] == "Llama-2-7B")
    assert model_kv_bytes(llama, seq_len=4096, batch=1) == 2 * 2**30  # 2 GiB at 4k tokens
    assert kv_cache_bytes(32, 8, 128, 4096, 8, 2, cla_share=2) == 4096 * 8 * 64 * 1024


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_formula_equals_bytes_of_allocated_cache(variant, dtype):
    config = KVDecoderConfig(**SMALL, **VARIANTS[variant])
    dtype_bytes = torch.finfo(dtype).bits // 8
    allocated = allocated_cache_bytes(config, seq_len=13, batch=3, dtype=dtype)
    assert allocated == config.kv_bytes_per_token(dtype_bytes) * 13 * 3


def test_matched_intermediate_size_equalises_parameters():
    target = TinyDecoder(KVDecoderConfig(**SMALL)).num_parameters()

    def params(base, width):
        return TinyDecoder(KVDecoderConfig(**{**base.__dict__, "intermediate_size": width})).num_parameters()

    for variant in ("mqa", "mqa_cla2", "mla"):
        base = KVDecoderConfig(**SMALL, **VARIANTS[variant])
        width = matched_intermediate_size(base, target, multiple=8)
        assert width % 8 == 0 and width > SMALL["intermediate_size"]  # fewer K/V weights -> wider MLP
        gap = abs(params(base, width) - target)
        assert gap <= min(abs(params(base, width + 8) - target), abs(params(base, width - 8) - target))
        assert abs(params(base, matched_intermediate_size(base, target, multiple=1)) - target) / target < 0.01


def test_bad_configs_raise_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="n_kv_heads"):
        MultiHeadAttention(48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        KVDecoderConfig(**{**SMALL, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="cla_share"):
        KVDecoderConfig(**SMALL, cla_share=3)
    with pytest.raises(ValueError, match="cla_share"):
        kv_cache_bytes(32, 8, 128, 10, 1, cla_share=3)
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(32, 8, 128, -1, 1)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_kv_cache_bytes(60, 0, 64, 10, 1)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(num_blocks=4, block_size=0, n_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


# ---------------------------------------------------------------------------------------------------- paged cache
def _filled_cache(lengths, block_size=5, n_kv=2, head_dim=6, num_blocks=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_blocks, block_size, n_kv, head_dim, dtype=torch.float64)
    contiguous = {}
    for sid, length in enumerate(lengths):
        k = torch.randn(n_kv, length, head_dim, generator=gen, dtype=torch.float64)
        v = torch.randn(n_kv, length, head_dim, generator=gen, dtype=torch.float64)
        cache.add_sequence(sid)
        cache.append(sid, k[:, :length // 2], v[:, :length // 2])  # two appends: the second fills partial blocks
        cache.append(sid, k[:, length // 2:], v[:, length // 2:])
        contiguous[sid] = (k, v)
    return cache, contiguous


@pytest.mark.parametrize("n_q", [1, 3])
def test_paged_attention_equals_contiguous_attention(n_q):
    lengths = [7, 23, 3, 16]
    cache, contiguous = _filled_cache(lengths)
    tables, seq_lens = cache.batch_tables(range(len(lengths)))
    q = torch.randn(len(lengths), 6, n_q, 6, dtype=torch.float64)  # 6 query heads on 2 K/V heads
    out = paged_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens)
    for sid in range(len(lengths)):
        k, v = contiguous[sid]
        expected = attention(q[sid:sid + 1], k[None], v[None], causal=True)
        torch.testing.assert_close(out[sid:sid + 1], expected, rtol=0, atol=1e-12)


def test_fork_shares_blocks_and_copy_on_write_keeps_both_sequences_correct():
    cache, contiguous = _filled_cache([12], block_size=5)  # blocks: 5 + 5 + 2 (last one partly filled)
    used = cache.allocator.num_used
    cache.fork(0, "child")
    assert cache.allocator.num_used == used  # nothing copied yet
    assert all(cache.allocator.refcount(b) == 2 for b in cache.block_tables[0])
    k_new, v_new = torch.ones(2, 1, 6, dtype=torch.float64), -torch.ones(2, 1, 6, dtype=torch.float64)
    cache.append("child", k_new, v_new)  # writes into the shared partial block: it is copied first
    assert cache.allocator.num_used == used + 1
    assert cache.block_tables[0][:2] == cache.block_tables["child"][:2]
    assert cache.block_tables[0][2] != cache.block_tables["child"][2]
    k, v = contiguous[0]
    assert torch.equal(cache.gather(0)[0], k) and torch.equal(cache.gather(0)[1], v)
    assert torch.equal(cache.gather("child")[0], torch.cat([k, k_new], 1))
    assert torch.equal(cache.gather("child")[1], torch.cat([v, v_new], 1))
    cache.free(0)
    cache.free("child")
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_cache_overflow_raises_and_changes_nothing():
    cache = PagedKVCache(num_blocks=3, block_size=4, n_kv_heads=1, head_dim=2)
    cache.add_sequence("a")
    cache.append("a", torch.zeros(1, 10, 2), torch.zeros(1, 10, 2))
    with pytest.raises(ValueError, match="num_blocks"):
        cache.append("a", torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))  # 13 tokens need 4 blocks
    assert cache.seq_lens["a"] == 10 and cache.allocator.num_free == 0
    cache.append("a", torch.ones(1, 2, 2), torch.ones(1, 2, 2))  # 12 tokens still fit
    assert cache.gather("a")[0][0, -2:].eq(1).all()
    with pytest.raises(ValueError, match="seq_id"):
        cache.append("missing", torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
    allocator = BlockAllocator(2)
    block = allocator.allocate()
    allocator.free(block)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(block)
    with pytest.raises(ValueError, match="block must be"):
        allocator.free(7)


ops = st.lists(st.tuples(st.sampled_from(["add", "append", "fork", "free"]), st.integers(0, 7),
                         st.integers(0, 7), st.integers(1, 9)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, block_size=st.integers(1, 4), num_blocks=st.integers(1, 12))
def test_allocator_never_leaks_blocks(ops, block_size, num_blocks):
    """Random add/append/fork/free sequences (overflows included) against a shadow model of the contents."""
    cache = PagedKVCache(num_blocks, block_size, n_kv_heads=1, head_dim=1, dtype=torch.float64)
    shadow: dict[int, list[float]] = {}
    counter = 0.0
    for op, a, b, n in ops:
        if op == "add" and a not in shadow:
            cache.add_sequence(a)
            shadow[a] = []
        elif op == "append" and a in shadow:
            values = [counter + i for i in range(n)]
            counter += n
            x = torch.tensor(values, dtype=torch.float64).view(1, n, 1)
            try:
                cache.append(a, x, -x)
                shadow[a] += values
            except ValueError as err:
                assert "num_blocks" in str(err)
        elif op == "fork" and a in shadow and b not in shadow:
            cache.fork(a, b)
            shadow[b] = list(shadow[a])
        elif op == "free" and a in shadow:
            cache.free(a)
            del shadow[a]
        # invariants after every operation
        refs: dict[int, int] = {}
        for table in cache.block_tables.values():
            for block in table:
                refs[block] = refs.get(block, 0) + 1
        assert cache.allocator.num_used == len(refs)
        assert cache.allocator.num_free + len(refs) == num_blocks
        assert all(cache.allocator.refcount(blk) == count for blk, count in refs.items())
        for sid, values in shadow.items():
            k, v = cache.gather(sid)
            assert k.flatten().tolist() == values and v.flatten().tolist() == [-x for x in values]
    for sid in list(shadow):
        cache.free(sid)
    assert cache.allocator.num_free == num_blocks


# ---------------------------------------------------------------------------------------------------- serving
def test_serving_simulation_orders_the_policies():
    trace = synthetic_trace(120, rate=40.0, mean_prompt=128, mean_output=96, max_seq_len=1024, seed=3)
    results = {p: simulate_serving(trace, p, capacity_tokens=8192, max_seq_len=1024, block_size=16)
               for p in ("static", "continuous", "paged")}
    for res in results.values():
        assert res.output_tokens == sum(r.output_len for r in trace)
        assert (res.latency > 0).all() and (res.ttft <= res.latency + 1e-12).all()
    s = {p: r.summary() for p, r in results.items()}
    assert s["paged"]["throughput_tok_s"] > s["continuous"]["throughput_tok_s"] > s["static"]["throughput_tok_s"]
    assert s["paged"]["latency_p50_s"] < s["continuous"]["latency_p50_s"] < s["static"]["latency_p50_s"]
    # paged memory wastes at most the partly filled last block of each sequence
    assert s["paged"]["kv_waste"] < 0.15 < s["continuous"]["kv_waste"]
    with pytest.raises(ValueError, match="policy"):
        simulate_serving(trace, "magic")
    with pytest.raises(ValueError, match="max_seq_len"):
        simulate_serving(trace, "paged", max_seq_len=16)


def test_paged_simulation_preempts_when_memory_runs_out_and_still_finishes():
    trace = synthetic_trace(60, rate=200.0, mean_prompt=64, mean_output=256, max_seq_len=1024, seed=1)
    res = simulate_serving(trace, "paged", capacity_tokens=1024, max_batch=64, max_seq_len=1024, block_size=16)
    assert res.preemptions > 0
    assert len(res.latency) == 60 and res.output_tokens == sum(r.output_len for r in trace)
    assert res.timeline["reserved_slots"].max() <= 1024


def test_layer_cache_counts_bytes():
    cache = LayerCache()
    cache.append(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 7))
    cache.append(torch.zeros(2, 3, 1, 5), torch.zeros(2, 3, 1, 7))
    assert cache.seq_len == 5 and cache.nbytes() == 2 * 3 * 5 * (5 + 7) * 4
    assert cache_nbytes([cache, None]) == cache.nbytes()
    with pytest.raises(ValueError, match="expected 2 tensors"):
        cache.append(torch.zeros(2, 3, 1, 5))
