"""The Triton GQA decode kernel over the paged cache (chapter 6), on CPU under TRITON_INTERPRET=1 or on a GPU."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be on before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from dldna.attention import attention  # noqa: E402
from dldna.attention.paged import PagedKVCache  # noqa: E402
from dldna.kernels.paged_decode import paged_decode_attention, triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs a GPU or TRITON_INTERPRET=1")


def _cache(lengths, n_kv, head_dim, page, dtype, seed=0, fork_last=False):
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(sum(-(-n // page) for n in lengths) + 4, page, n_kv, head_dim, dtype=dtype, device=DEVICE)
    contiguous = []
    for sid, n in enumerate(lengths):
        k = torch.randn(n_kv, n, head_dim, generator=gen)
        v = torch.randn(n_kv, n, head_dim, generator=gen)
        cache.add_sequence(sid)
        if n:
            cache.append(sid, k, v)
        contiguous.append((k, v))
    return cache, contiguous


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2), (6, 1)])  # MHA, GQA, MQA (group 6: padded to 16 rows)
@pytest.mark.parametrize("page,num_splits", [(16, 1), (16, 3), (12, 2)])
def test_kernel_equals_reference_attention(n_heads, n_kv, page, num_splits):
    lengths = [37, 1, 100, 64]
    cache, contiguous = _cache(lengths, n_kv, 32, page, torch.float32)
    tables, seq_lens = cache.batch_tables(range(len(lengths)))
    q = torch.randn(len(lengths), n_heads, 1, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, lse = paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, num_splits=num_splits,
                                      block_n=32, backend="triton", return_lse=True)
    for b, (k, v) in enumerate(contiguous):
        expected, expected_lse = attention(q[b:b + 1].double().cpu(), k[None].double(), v[None].double(),
                                           return_lse=True)
        torch.testing.assert_close(out[b:b + 1].double().cpu(), expected, rtol=0, atol=2e-5)
        torch.testing.assert_close(lse[b].double().cpu(), expected_lse[0, :, 0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_kernel_half_precision(dtype, atol):
    lengths = [70, 5]
    cache, contiguous = _cache(lengths, 2, 16, 16, dtype, seed=3)
    tables, seq_lens = cache.batch_tables(range(2))
    q = torch.randn(2, 8, 1, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    out = paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, num_splits=2, backend="triton")
    assert out.dtype == dtype
    for b, (k, v) in enumerate(contiguous):
        expected = attention(q[b:b + 1].double().cpu(), k[None].to(dtype).double(), v[None].to(dtype).double())
        torch.testing.assert_close(out[b:b + 1].double().cpu(), expected, rtol=0, atol=atol)


def test_empty_sequence_gives_zeros_and_splits_past_the_end_are_ignored():
    cache, contiguous = _cache([0, 40], 1, 16, 16, torch.float32, seed=5)
    tables, seq_lens = cache.batch_tables(range(2))
    q = torch.randn(2, 2, 1, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    out = paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, num_splits=5, block_n=16,
                                 backend="triton")  # 5 splits of 16 tokens: the last ones hold no key
    assert torch.equal(out[0].cpu(), torch.zeros(2, 1, 16))
    k, v = contiguous[1]
    torch.testing.assert_close(out[1:].double().cpu(), attention(q[1:].double().cpu(), k[None].double(),
                                                                 v[None].double()), rtol=0, atol=2e-5)


def test_kernel_reads_through_shared_blocks_after_fork():
    cache, _ = _cache([20], 2, 16, 8, torch.float32, seed=7)
    cache.fork(0, 1)
    extra = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(8))
    cache.append(1, extra, -extra)  # copy-on-write of the partly filled third block
    tables, seq_lens = cache.batch_tables([0, 1])
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, backend="triton")
    ref = paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


def test_bad_arguments_raise_value_errors():
    cache, _ = _cache([10], 2, 16, 8, torch.float32)
    tables, seq_lens = cache.batch_tables([0])
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="heads"):
        paged_decode_attention(torch.randn(1, 3, 1, 16, device=DEVICE), cache.k_blocks, cache.v_blocks, tables,
                               seq_lens)
    with pytest.raises(ValueError, match="q must have shape"):
        paged_decode_attention(q.expand(1, 4, 2, 16), cache.k_blocks, cache.v_blocks, tables, seq_lens)
    with pytest.raises(ValueError, match="backend"):
        paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, backend="cuda")
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, num_splits=0, backend="triton")
    with pytest.raises(ValueError, match="block_n"):
        paged_decode_attention(q, cache.k_blocks, cache.v_blocks, tables, seq_lens, block_n=24, backend="triton")
