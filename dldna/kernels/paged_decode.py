"""A Triton decode kernel for GQA over a paged KV cache: split over the KV length, then reduce.

Used in chapter 6. One query token per sequence (decoding) attends to that sequence's keys/values, stored in
the blocks of ``dldna.attention.paged.PagedKVCache`` (``(num_blocks, Hkv, page, D)``) and found through its
block table. Decoding reads every cached byte once and does ~2 FLOPs per byte, so the only goal is to stream the
cache at the memory bandwidth:

* one program per ``(sequence, K/V head, split)`` handles **all** ``H // Hkv`` query heads of its group, so each
  K/V byte is read once (GQA without ``repeat_kv``); the group's queries are padded to 16 rows for ``tl.dot``;
* the KV length is cut into ``num_splits`` ranges processed by separate programs (Flash-Decoding, Dao et al.
  2023), so that ``B * Hkv * num_splits`` programs keep every SM busy even at batch 8; each program runs the
  online softmax over ``BLOCK_N`` tokens at a time (gathered from several pages) and writes an unnormalised
  partial output with its running max and sum;
* a second kernel merges the splits: ``out = sum_s e^{m_s - m} acc_s / sum_s e^{m_s - m} l_s``.

``paged_decode_attention`` falls back to the PyTorch reference ``dldna.attention.paged.paged_attention`` when
Triton cannot run (no GPU and no ``TRITON_INTERPRET=1`` set before ``triton`` is imported).
"""
from __future__ import annotations

import math

import torch

from dldna.attention.paged import paged_attention
from dldna.kernels.availability import interpreting, triton_available

try:  # triton is optional: the package imports (and the chapter runs) without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

BACKENDS = ("auto", "triton", "torch")


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, TABLES, LENS, O_PART, M_PART, L_PART, qk_scale, split_len,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                      stride_tb, stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                      BLOCK_N: tl.constexpr, IEEE_DOT: tl.constexpr):
        """Program (b, kv_head, split): online softmax of the group's queries over tokens of one split."""
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(LENS + b)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + offs_g
        g_mask = offs_g < GROUP
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            page = tl.load(TABLES + b * stride_tb + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            slot = offs_n % PAGE
            k = tl.load(k_base + page[:, None] * stride_kb + slot[:, None] * stride_kt + offs_d[None, :],
                        mask=n_mask[:, None], other=0.0)
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # base-2 scores
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt + offs_d[None, :],
                        mask=n_mask[:, None], other=0.0)
            if IEEE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # An empty split (start >= seq_len) stores m = -inf, l = 0, acc = 0: it gets weight 0 in the merge.
        o_ptrs = O_PART + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        tl.store(o_ptrs, acc, mask=g_mask[:, None])
        ml_offset = b * stride_mb + heads * stride_mh + split
        tl.store(M_PART + ml_offset, m_i, mask=g_mask)
        tl.store(L_PART + ml_offset, l_i, mask=g_mask)

    @triton.jit
    def _merge_kernel(O_PART, M_PART, L_PART, OUT, LSE, n_splits, stride_ob, stride_oh, stride_os, stride_mb,
                      stride_mh, stride_outb, stride_outh, stride_lseb, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program (b, head): merge the splits' partial results; a sequence with no keys gets zeros."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, HEAD_DIM)
        s_mask = offs_s < n_splits
        m = tl.load(M_PART + b * stride_mb + h * stride_mh + offs_s, mask=s_mask, other=float("-inf"))
        l = tl.load(L_PART + b * stride_mb + h * stride_mh + offs_s, mask=s_mask, other=0.0)
        m_max = tl.max(m, 0)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_ref)  # 0 for empty splits
        acc = tl.load(O_PART + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                      mask=s_mask[:, None], other=0.0)
        num = tl.sum(acc * w[:, None], 0)
        den = tl.sum(l * w, 0)
        out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
        tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty))
        lse = tl.where(den > 0, (m_ref + tl.log2(tl.where(den > 0, den, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b * stride_lseb + h, lse)


def default_num_splits(batch: int, n_kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Splits so that ``batch * n_kv_heads * splits`` programs come near 4 per SM, each >= ``block_n`` tokens.

    On the H200 (132 SMs) at batch 8 with 8 K/V heads that gives 8 splits; ``benchmarks/paged_decode.py`` sweeps
    the alternatives (more splits write and merge more partial results).
    """
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4 * batch * n_kv_heads  # the interpreter: a few splits, enough to exercise the merge
    splits = max(1, round(target / (batch * n_kv_heads)))
    return max(1, min(splits, math.ceil(max_len / block_n)))


def paged_decode_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
                           num_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                           num_stages: int | None = 2, backend: str = "auto", return_lse: bool = False):
    """Decode attention over a paged cache: ``q`` ``(B, H, 1, D)`` -> ``(B, H, 1, D)``.

    Args:
        k_blocks, v_blocks: ``(num_blocks, Hkv, page, D)`` (``PagedKVCache`` layout), ``H % Hkv == 0``.
        block_tables: ``(B, max_blocks)`` int32; seq_lens: ``(B,)`` int32 (a length of 0 gives zeros).
        num_splits: KV-length splits per sequence (default: enough programs to fill the GPU); block_n: tokens per
            inner step (default 64 on GPU, 32 in the interpreter); num_warps, num_stages: launch options
            (``num_stages=None`` leaves Triton's default).
        backend: ``"triton"``, ``"torch"`` (reference ``paged_attention``) or ``"auto"`` (Triton where it runs).

    The query is the last token of each sequence, so it attends to all ``seq_lens[b]`` keys.
    With ``return_lse`` also returns the natural-log log-sum-exp ``(B, H)`` of the scaled scores.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must have shape (batch, heads, 1, head_dim), got {tuple(q.shape)}")
    if k_blocks.dim() != 4 or k_blocks.shape != v_blocks.shape:
        raise ValueError(f"k_blocks and v_blocks must both be (num_blocks, n_kv_heads, page, head_dim), "
                         f"got {tuple(k_blocks.shape)} and {tuple(v_blocks.shape)}")
    bsz, n_heads, _, head_dim = q.shape
    _, n_kv, page, _ = k_blocks.shape
    if k_blocks.shape[-1] != head_dim:
        raise ValueError(f"k_blocks head_dim {k_blocks.shape[-1]} differs from q's {head_dim}")
    if n_heads % n_kv:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of the K/V heads ({n_kv})")
    if q.dtype != k_blocks.dtype or q.dtype != v_blocks.dtype:
        raise ValueError(f"q, k_blocks, v_blocks must share one dtype, got {q.dtype}, {k_blocks.dtype}, "
                         f"{v_blocks.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != bsz or seq_lens.shape != (bsz,):
        raise ValueError(f"block_tables must be (B={bsz}, max_blocks) and seq_lens (B,), got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if triton_available(q.device) else "torch"
    if backend == "torch":
        if bool((seq_lens == 0).any()):
            raise ValueError("backend='torch' needs seq_lens >= 1")
        out, lse = _reference_with_lse(q, k_blocks, v_blocks, block_tables, seq_lens, scale)
        return (out, lse) if return_lse else out
    if not triton_available(q.device):
        raise ValueError("backend='triton' needs triton and CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                         f"set before triton is imported; got a {q.device.type} tensor")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernel, got {head_dim}")
    if k_blocks.stride(-1) != 1 or v_blocks.stride(-1) != 1 or v_blocks.stride() != k_blocks.stride():
        raise ValueError("k_blocks and v_blocks must have the same strides and a contiguous last dimension")
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    max_len = block_tables.shape[1] * page
    if block_n is None:
        block_n = 32 if interpreting() else 64
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_splits is None:
        num_splits = default_num_splits(bsz, n_kv, max_len, block_n, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    split_len = math.ceil(math.ceil(max_len / num_splits) / block_n) * block_n
    group = n_heads // n_kv
    work_dtype = q.dtype
    if interpreting() and q.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong (TOOLCHAIN.md)
        q, k_blocks, v_blocks = q.float(), k_blocks.float(), v_blocks.float()
    q3 = q[:, :, 0]
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    dev = q.device
    o_part = torch.empty(bsz, n_heads, num_splits, head_dim, device=dev, dtype=torch.float32)
    m_part = torch.empty(bsz, n_heads, num_splits, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    launch = {"num_warps": num_warps}
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _split_kernel[(bsz, n_kv, num_splits)](
        q3, k_blocks, v_blocks, block_tables, seq_lens, o_part, m_part, l_part, scale * 1.4426950408889634,
        split_len, q3.stride(0), q3.stride(1), k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2),
        v_blocks.stride(0), v_blocks.stride(1), v_blocks.stride(2), block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), m_part.stride(0), m_part.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n,
        IEEE_DOT=q.dtype == torch.float32, **launch)
    out = torch.empty(bsz, n_heads, head_dim, device=dev, dtype=work_dtype)
    lse = torch.empty(bsz, n_heads, device=dev, dtype=torch.float32)
    _merge_kernel[(bsz, n_heads)](
        o_part, m_part, l_part, out, lse, num_splits, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        m_part.stride(0), m_part.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4)
    out = out[:, :, None]
    return (out, lse) if return_lse else out


def _reference_with_lse(q, k_blocks, v_blocks, block_tables, seq_lens, scale):
    out = paged_attention(q, k_blocks, v_blocks, block_tables, seq_lens, scale=scale)
    # the log-sum-exp through the same gathered keys (cheap to recompute for a check)
    b, n_kv, d = q.shape[0], k_blocks.shape[1], q.shape[-1]
    k = k_blocks[block_tables.long()].permute(0, 2, 1, 3, 4).reshape(b, n_kv, -1, d)
    group = q.shape[1] // n_kv
    scores = torch.einsum("bkgd,bknd->bkgn", q[:, :, 0].reshape(b, n_kv, group, d), k).float() * scale
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens.long().to(q.device)[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return out, torch.logsumexp(scores, -1).reshape(b, -1)


def unique_kv_bytes(batch: int, n_kv_heads: int, seq_len: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V a decode step must read once: ``2 * batch * n_kv_heads * seq_len * head_dim * dtype_bytes``."""
    return 2 * batch * n_kv_heads * seq_len * head_dim * dtype_bytes


__all__ = ["paged_decode_attention", "default_num_splits", "triton_available", "interpreting", "unique_kv_bytes"]
