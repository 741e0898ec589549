"""FlashAttention (chapter 5): the tiled PyTorch version and the Triton kernels under Triton's CPU interpreter.

Every check compares outputs, log-sum-exps and q/k/v gradients with the float64 dense reference
``dldna.attention.attention`` on fresh random inputs with odd sizes (tails), GQA/MQA, causal, sliding windows
(causal and symmetric), Nq != Nk and fully masked rows. The full GPU matrix is benchmarks/gpu_test_flash.py.
"""
from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
import torch

# The interpreter must be on before the kernels are decorated (at the first import of dldna.kernels.flash_triton).
os.environ["TRITON_INTERPRET"] = "1"

from dldna.attention.reference import attention  # noqa: E402
from dldna.kernels import flash_attention, block_sparse_flash_attention, online_softmax  # noqa: E402
from dldna.kernels.flash_attention import block_mask_from_layout, cached_layout_spans, layout_spans  # noqa: E402
from dldna.kernels.tiled import (  # noqa: E402
    IOCounter,
    band_limits,
    block_range,
    hbm_bytes_flash,
    tiled_attention_forward,
    tiled_flash_attention,
)

# Relative Frobenius error bounds against float64 on the same (rounded) inputs.
BOUNDS = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


def _triton_kernels():
    triton = pytest.importorskip("triton")
    from dldna.kernels import flash_triton

    if not getattr(flash_triton._attn_fwd, "__class__", None).__name__.startswith("Interpreted"):
        flash_triton = importlib.reload(flash_triton)  # imported earlier without the interpreter: re-decorate
    return triton, flash_triton


def _mask(n_q, n_k, causal, window):
    """Token mask of the band, written independently of band_limits from the documented definitions."""
    i = torch.arange(n_q)[:, None] + (n_k - n_q)
    j = torch.arange(n_k)[None, :]
    if causal:
        keep = j <= i
        return keep if window is None else keep & (i - j < window)
    return torch.ones(n_q, n_k, dtype=torch.bool) if window is None else (i - j).abs() <= window // 2


def _inputs(b, h, h_kv, n_q, n_k, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h_kv, n_k, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h_kv, n_k, d, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(b, h, n_q, d, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def _rel(x, ref):
    x = x.double()
    assert torch.isfinite(x).all(), "non-finite values in the result"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_against_reference(fn, q, k, v, grad, mask, bound):
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention(q64, k64, v64, mask=mask, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(qt, kt, vt)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (qt, kt, vt), grad.to(q.dtype))
    assert _rel(out, ref) < bound
    for g, g_ref in zip(grads, ref_grads):
        assert _rel(g, g_ref) < 2 * bound
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # rows without keys: -inf in both
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < 10 * bound
    if not finite.all():
        assert (out[~finite] == 0).all()  # fully masked rows are zeros, not NaN


# ------------------------------------------------------------------------- the algorithm, in numpy/PyTorch
def test_online_softmax_matches_softmax_and_rescales():
    x = np.random.default_rng(0).normal(size=37) * 5
    probs, history = online_softmax(x, block=8)
    ref = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(probs, ref, rtol=1e-12)
    assert len(history) == math.ceil(37 / 8)
    m, l = history[-1]
    assert m == x.max() and math.isclose(l, np.exp(x - m).sum(), rel_tol=1e-12)
    assert all(b[0] >= a[0] for a, b in zip(history, history[1:]))  # the running max never decreases


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 5), (True, 17), (False, 6), (False, 1)])
@pytest.mark.parametrize("n_q,n_k", [(29, 29), (13, 40), (40, 13)])
def test_block_range_classifies_every_block(causal, window, n_q, n_k):
    """Blocks outside [lo, hi) hold no allowed pair; blocks in [full_lo, full_hi) hold only allowed pairs."""
    band = band_limits(n_q, n_k, causal, window)
    allowed = _mask(n_q, n_k, causal, window)
    for bm, bn in [(4, 8), (8, 4), (5, 3)]:
        for start in range(0, n_q, bm):
            rows = allowed[start : start + bm]
            lo, full_lo, full_hi, hi = block_range(start, bm, n_k, bn, band)
            assert lo % bn == 0 and full_lo % bn == 0 and full_hi % bn == 0 and lo <= full_lo <= full_hi
            assert not rows[:, :lo].any() and not rows[:, max(hi, lo):].any()
            if full_hi > full_lo:  # the unmasked loop reads no key past the end and no forbidden pair
                assert rows[:, full_lo:full_hi].all() and full_hi <= n_k


def test_band_limits_matches_the_documented_masks():
    for n_q, n_k in [(9, 9), (5, 11), (11, 5)]:
        for causal, window in [(False, None), (True, None), (True, 3), (False, 4)]:
            band = band_limits(n_q, n_k, causal, window)
            assert torch.equal(band.allowed(torch.arange(n_q), torch.arange(n_k)), _mask(n_q, n_k, causal, window))
    with pytest.raises(ValueError, match="window"):
        band_limits(4, 4, True, 0)


@pytest.mark.parametrize(
    "h,h_kv,n_q,n_k,d,causal,window",
    [(4, 2, 37, 37, 8, False, None), (3, 1, 45, 45, 16, True, None), (2, 2, 53, 53, 8, True, 9),
     (2, 1, 50, 50, 8, False, 13), (2, 2, 20, 45, 8, True, None), (2, 2, 45, 20, 8, True, 4)],
)
def test_tiled_pytorch_flash_attention_matches_reference(h, h_kv, n_q, n_k, d, causal, window):
    q, k, v, grad = _inputs(2, h, h_kv, n_q, n_k, d, torch.float64, seed=n_q + h)

    def fn(q, k, v):
        return tiled_flash_attention(q, k, v, causal, window, return_lse=True, block_m=16, block_n=8)

    _check_against_reference(fn, q, k, v, grad, _mask(n_q, n_k, causal, window), 1e-12)


def test_tiled_io_count_equals_formula():
    n, d, bm = 96, 16, 32
    q, k, v, _ = _inputs(1, 1, 1, n, n, d, torch.float16, seed=1)
    io = IOCounter()
    tiled_attention_forward(q, k, v, block_m=bm, block_n=bm, io=io)
    assert io.total == hbm_bytes_flash(n, d, bm, bytes_per_el=2)
    io_causal = IOCounter()
    tiled_attention_forward(q, k, v, causal=True, block_m=bm, block_n=bm, io=io_causal)
    assert io_causal.total < io.total  # blocks above the diagonal are never read


def test_torch_backend_of_flash_attention_matches_reference():
    q, k, v, grad = _inputs(1, 4, 2, 41, 41, 16, torch.float32, seed=3)

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, window=10, return_lse=True, backend="torch")

    _check_against_reference(fn, q, k, v, grad, _mask(41, 41, True, 10), 1e-5)


# ------------------------------------------------------------------------- the Triton kernels (interpreter)
TRITON_CASES = [
    # dtype, h, h_kv, n_q, n_k, d, causal, window
    (torch.float32, 2, 2, 67, 67, 16, False, None),  # full attention, ragged tail
    (torch.float16, 4, 2, 70, 70, 32, True, None),  # GQA, causal
    (torch.float32, 2, 1, 100, 100, 16, True, 20),  # MQA, causal sliding window (skips blocks)
    (torch.float16, 2, 2, 77, 77, 16, False, 25),  # symmetric window
    (torch.float32, 2, 2, 40, 90, 64, True, None),  # Nq < Nk (KV-cache alignment), head_dim 64
    (torch.float32, 2, 1, 90, 40, 16, True, 7),  # Nq > Nk: the first rows see no key at all
    (torch.bfloat16, 2, 2, 50, 50, 16, True, None),  # bf16 (run in fp32 by the interpreter)
    (torch.float16, 1, 1, 33, 33, 128, True, None),  # head_dim 128
    # Lengths that are whole 32-token tiles (no bounds checks) and bands wider than two tiles (WIDE_BAND: the
    # left-edge tiles skip the band_hi check), alone and together; 65 is the narrowest band that counts as wide.
    (torch.float32, 2, 1, 192, 192, 16, True, 70),  # whole tiles, wide window, MQA
    (torch.float16, 2, 2, 160, 160, 32, False, 81),  # whole tiles, wide symmetric window (j - i in [-40, 40])
    (torch.float32, 2, 2, 130, 130, 16, True, 65),  # ragged tail, the narrowest wide window
    (torch.float32, 2, 2, 96, 128, 16, True, None),  # whole tiles, Nq < Nk, causal
    # head_dim > 64 with a band: the forward walks both edges' masked tiles in one loop (EDGES_IN_ONE_LOOP)
    (torch.float16, 1, 1, 100, 100, 128, True, 40),  # causal window, ragged tail
    (torch.float32, 2, 1, 128, 128, 128, False, 81),  # symmetric wide window, whole tiles
    # Causal windows of whole tiles (PAIRED_EDGES): a query block folds its left-edge and diagonal tiles in one
    # step where it has both; the first blocks (no left edge) and a block whose diagonal passes n_k do not.
    (torch.float32, 2, 1, 160, 160, 16, True, 64),  # whole tiles, MQA
    (torch.float16, 2, 2, 100, 100, 32, True, 32),  # ragged tail, a window of one tile (no full tiles between)
    (torch.float32, 1, 1, 96, 160, 16, True, 64),  # Nq < Nk by a whole tile: band_hi = 64 still pairs
    (torch.float32, 2, 2, 90, 120, 16, True, 64),  # Nq < Nk by 30: band_hi is not a whole tile, no pairing
    (torch.float16, 1, 1, 128, 128, 128, True, 64),  # head_dim 128: no pairing (slower there on an H200)
]


@pytest.mark.parametrize("dtype,h,h_kv,n_q,n_k,d,causal,window", TRITON_CASES)
def test_triton_flash_attention_matches_reference(dtype, h, h_kv, n_q, n_k, d, causal, window):
    _triton_kernels()
    q, k, v, grad = _inputs(1, h, h_kv, n_q, n_k, d, dtype, seed=n_q * 7 + d)

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=causal, window=window, return_lse=True, backend="triton")

    _check_against_reference(fn, q, k, v, grad, _mask(n_q, n_k, causal, window), BOUNDS[dtype])


def test_triton_forward_accepts_strided_inputs_and_scale():
    _triton_kernels()
    q, k, v, grad = _inputs(1, 2, 2, 45, 45, 16, torch.float32, seed=11)
    # (B, N, H, D) storage viewed as (B, H, N, D), as attention layers produce it
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, scale=0.3, return_lse=True, backend="triton")

    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref = attention(q64, k64, v64, causal=True, scale=0.3)
    out, _ = fn(qs, ks, vs)
    assert _rel(out, ref) < BOUNDS[torch.float32]


@pytest.mark.parametrize("tma_kernels,window,n", [(("fwd",), 30, 75), (("fwd",), 32, 75), (("fwd",), 64, 150),
                                                 (("dq", "dkdv"), 30, 75), (("dq", "dkdv"), 32, 75)])
def test_triton_kernels_through_tensor_descriptors(tma_kernels, window, n, monkeypatch):
    """The Hopper path (tiles fetched through 4-D tensor descriptors, tails zero-filled) computes the same,
    forward and backward (GQA: the dK/dV loop over a group's query heads indexes the descriptors). A window of a
    whole number of the 32-token tiles pairs the forward's edge tiles (``_fwd_edge_pair``), which then come through
    the 5-D pair descriptors (``_pair_descriptor``): one tile apart (window 32) or two (window 64, over a ragged
    length)."""
    _, ft = _triton_kernels()
    q, k, v, grad = _inputs(1, 4, 2, n, n, 16, torch.float16, seed=5)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided: the descriptors carry all four strides
    pair_spans = []
    real_pair_descriptor = ft._pair_descriptor

    def recording_pair_descriptor(t, span, rows):
        pair_spans.append(span)
        return real_pair_descriptor(t, span, rows)

    monkeypatch.setattr(ft, "_pair_descriptor", recording_pair_descriptor)
    for kernel in tma_kernels:
        ft.force_config(kernel, ft.KernelConfig(32, 32, 4, 1, tma=True))
    try:
        def fn(q, k, v):
            return flash_attention(q, k, v, causal=True, window=window, return_lse=True, backend="triton")

        _check_against_reference(fn, q, k, v, grad, _mask(n, n, True, window), BOUNDS[torch.float16])
    finally:
        for kernel in tma_kernels:
            ft.force_config(kernel, None)
    paired = "fwd" in tma_kernels and window % 32 == 0
    assert pair_spans == ([window] * 2 if paired else [])  # K's and V's, for the one forward call


def test_paired_edges_only_where_the_edge_tiles_are_complementary():
    """``_paired_edges``: square tiles, head_dim <= 64, a causal band whose width and upper limit are whole tiles."""
    _, ft = _triton_kernels()
    square, wide = ft.KernelConfig(64, 64), ft.KernelConfig(128, 64)
    assert ft._paired_edges(64, -1023, 0, square)  # a causal window of 1024 keys
    assert ft._paired_edges(32, -63, 64, square)  # Nq < Nk by one tile: band_hi = 64
    assert ft._paired_edges(64, -63, 0, square)  # a window of one tile
    assert not ft._paired_edges(128, -1023, 0, square)  # slower at head_dim 128 on an H200
    assert not ft._paired_edges(64, -1023, 0, wide)  # two blocks per edge: not implemented
    assert not ft._paired_edges(64, -1022, 0, square)  # a window of 1023 keys
    assert not ft._paired_edges(64, -1023, 30, square)  # band_hi not a whole tile
    assert not ft._paired_edges(64, -40, 40, square)  # a symmetric window (odd width)
    assert not ft._paired_edges(64, None, 0, square) and not ft._paired_edges(64, -1023, None, square)


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16)])
@pytest.mark.parametrize("window", [None, 20, 32])
def test_triton_kernels_with_tiles_longer_than_wide_and_wider_than_long(block_m, block_n, window):
    """Tiles of unequal sides (the H200 tuner tries 64 x 128 forward and 128 x 32 dQ tiles, among others): the
    block ranges of the causal diagonal and of the window's left edge still cover exactly the allowed keys. A window
    of 32 is a whole number of tiles of either side, but only square tiles pair their edges (``_paired_edges``):
    these must take the edge loops."""
    _, ft = _triton_kernels()
    n = 93 if window == 32 else 61  # 93: the rows 32..63 have both window edges inside K, where pairing would apply
    q, k, v, grad = _inputs(1, 2, 1, n, n, 16, torch.float32, seed=block_m + block_n + (window or 0))
    for kernel in ("fwd", "dq", "dkdv"):
        ft.force_config(kernel, ft.KernelConfig(block_m, block_n, 4, 1, tma=kernel == "fwd"))
    try:
        def fn(q, k, v):
            return flash_attention(q, k, v, causal=True, window=window, return_lse=True, backend="triton")

        _check_against_reference(fn, q, k, v, grad, _mask(n, n, True, window), BOUNDS[torch.float32])
    finally:
        ft.restore_tuning()


@pytest.mark.parametrize("early_dp", [True, False])
def test_dkdv_with_early_dp_or_without(early_dp, monkeypatch):
    """The dK/dV kernel computes the same gradients whichever order ``_early_dp`` picks (the interpreter's 32 x 32
    tiles would always take the early product)."""
    _, ft = _triton_kernels()
    asked = []
    monkeypatch.setattr(ft, "_early_dp", lambda head_dim, cfg: asked.append(head_dim) or early_dp)
    q, k, v, grad = _inputs(1, 4, 2, 75, 75, 32, torch.float16, seed=3)

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, window=30, return_lse=True, backend="triton")

    _check_against_reference(fn, q, k, v, grad, _mask(75, 75, True, 30), BOUNDS[torch.float16])
    assert asked == [32]  # one dK/dV launch


def test_backward_dq_writes_the_lse2_and_delta_that_backward_dkdv_reads():
    """``backward_dq`` returns, besides dQ, the base-2 LSE (``+inf`` for rows without keys, so that P = 0 there) and
    ``delta = rowsum(dO * O)`` that a dK/dV kernel reads (``backward_dkdv``, or the Gluon one in
    benchmarks/experiments/gluon_fa3_dkdv.py)."""
    _, ft = _triton_kernels()
    n_q, n_k, d = 45, 37, 16  # causal, bottom-right aligned: the first 8 query rows have no key
    q, k, v, grad = _inputs(2, 3, 3, n_q, n_k, d, torch.float32, seed=11)
    band, scale = band_limits(n_q, n_k, True, None), 1.0 / math.sqrt(d)
    out, lse = ft.attention_forward(q, k, v, band.lo, band.hi, scale)
    do = grad.float()
    _, lse2, delta = ft.backward_dq(q, k, v, out, lse, do, band.lo, band.hi, scale)
    no_keys = ~_mask(n_q, n_k, True, None).any(-1)
    assert int(no_keys.sum()) == 8 and torch.isinf(lse[..., no_keys]).all()
    expected = torch.where(torch.isfinite(lse), lse.double() / math.log(2), math.inf)
    torch.testing.assert_close(lse2.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta.double(), (out.double() * do.double()).sum(-1), rtol=1e-5, atol=1e-5)


def test_early_dp_only_where_it_does_not_spill():
    """``_early_dp``: every D <= 64 config, and at D = 128 the tiles of at most 16 scores per thread."""
    _, ft = _triton_kernels()
    assert ft._early_dp(64, ft.KernelConfig(64, 128, 8, 3)) and ft._early_dp(128, ft.KernelConfig(32, 64, 4, 4))
    assert ft._early_dp(128, ft.KernelConfig(32, 128, 8, 2)) and ft._early_dp(128, ft.KernelConfig(64, 64, 8, 3))
    assert not ft._early_dp(128, ft.KernelConfig(64, 128, 8, 2, tma=True))
    assert not ft._early_dp(128, ft.KernelConfig(64, 64, 4, 2, tma=True))


def test_each_config_forces_one_kernel_at_a_time_and_restores_tuning():
    _, ft = _triton_kernels()
    a, b = ft.KernelConfig(16, 16, 4, 1), ft.KernelConfig(32, 32, 4, 1)
    seen = []
    for kernel, cfg in ft.each_config(lambda kernel: [a, b] if kernel == "dq" else [a]):
        seen.append((kernel, cfg, dict(ft._forced)))
    assert [(k, c) for k, c, _ in seen] == [("fwd", a), ("dq", a), ("dq", b), ("dkdv", a)]
    assert seen[2][2] == {"fwd": a, "dq": b, "dkdv": a}  # the others stay on their first config
    assert ft._forced == {}


@pytest.mark.parametrize("chunk_bytes", [26_880, 53_760])
def test_triton_tile_order_in_chunks_of_heads(chunk_bytes, monkeypatch):
    """Causal programs run heads in chunks (``_tile``): every tile exactly once, also when the last chunk is short.
    26 880 bytes make chunks of 3 of the 8 query heads (3, 3, 2) and 1 K/V head for dK/dV; 53 760 make chunks of 6
    (6, 2) and of 3 of the 4 K/V heads (3, 1)."""
    _, ft = _triton_kernels()
    monkeypatch.setattr(ft, "L2_CHUNK_BYTES", chunk_bytes)
    assert ft._heads_per_chunk(8, 70, 16 * 4, True) == chunk_bytes // 8960
    assert ft._heads_per_chunk(8, 70, 16 * 4, False) == 1
    q, k, v, grad = _inputs(2, 4, 2, 70, 70, 16, torch.float32, seed=chunk_bytes % 97)

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, return_lse=True, backend="triton")

    _check_against_reference(fn, q, k, v, grad, _mask(70, 70, True, None), BOUNDS[torch.float32])


def test_layout_spans_list_each_rows_kept_columns_in_order():
    gen = torch.Generator().manual_seed(3)
    layout = torch.rand(5, 7, generator=gen) < 0.4
    layout[0] = False  # nothing kept
    layout[1] = True  # everything kept
    spans, cols = layout_spans(layout)
    assert spans.dtype == cols.dtype == torch.int32 and spans.shape == (10,) and cols.shape == (35,)
    for r in range(5):
        begin, end = spans[2 * r].item(), spans[2 * r + 1].item()
        assert begin == 7 * r
        assert cols[begin:end].tolist() == layout[r].nonzero().flatten().tolist()


def test_layout_spans_are_cached_per_layout_until_it_changes_or_dies():
    import gc

    fa = importlib.import_module("dldna.kernels.flash_attention")
    cpu = torch.device("cpu")
    layout = torch.eye(4, dtype=torch.bool)
    of_rows, of_cols = cached_layout_spans(layout, cpu)  # (spans, cols) of the layout and of its transpose
    assert of_rows[0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert cached_layout_spans(layout, cpu)[0] is of_rows  # the second call builds nothing
    layout[0, 3] = True  # changed in place: rebuilt
    of_rows, of_cols = cached_layout_spans(layout, cpu)
    assert of_rows[0].tolist()[:2] == [0, 2] and of_rows[1].tolist()[:2] == [0, 3]
    assert of_cols[0].tolist()[6:] == [12, 14] and of_cols[1].tolist()[12:14] == [0, 3]
    key = (id(layout), cpu)
    assert key in fa._SPANS
    del layout
    gc.collect()
    assert key not in fa._SPANS  # dropped with the layout


def test_block_sparse_path_never_waits_for_the_gpu(monkeypatch):
    """``nonzero``, ``bincount`` and ``.item()`` make the host wait for the GPU: none may run on the call path."""
    _triton_kernels()
    q, k, v, grad = _inputs(1, 2, 2, 64, 64, 16, torch.float32, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    layout = torch.eye(4, dtype=torch.bool)

    def waits(*args, **kwargs):
        raise AssertionError("a GPU-to-host synchronisation on the block-sparse path")

    for owner, name in ((torch, "nonzero"), (torch.Tensor, "nonzero"), (torch, "bincount"), (torch.Tensor, "item")):
        monkeypatch.setattr(owner, name, waits)
    block_sparse_flash_attention(q, k, v, layout, 16, backend="triton").backward(grad.float())
    assert all(t.grad is not None for t in (q, k, v))


@pytest.mark.parametrize("n_q,n_k", [(70, 83), (64, 96), (64, 83), (70, 96)])
@pytest.mark.parametrize("dtype,block", [(torch.float32, 32), (torch.float16, 16)])
def test_triton_block_sparse_matches_reference(dtype, block, n_q, n_k):
    """Ragged lengths (bounds checks), whole layout blocks (the forward skips its checks) and one of each."""
    _triton_kernels()
    q, k, v, grad = _inputs(1, 4, 2, n_q, n_k, 16, dtype, seed=block + n_q + n_k)
    gen = torch.Generator().manual_seed(block)
    layout = torch.rand(-(-n_q // block), -(-n_k // block), generator=gen) < 0.5
    layout[:, -1] = True  # the ragged last key block
    layout[1] = False  # a block row with nothing kept: zeros
    mask = block_mask_from_layout(layout, block, n_q, n_k)

    def fn(q, k, v):
        return block_sparse_flash_attention(q, k, v, layout, block, return_lse=True, backend="triton")

    _check_against_reference(fn, q, k, v, grad, mask, BOUNDS[dtype])


def test_argument_validation():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48),
                        backend="triton")
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, q, q, causal=True, window=0)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(torch.randn(1, 3, 8, 16), q, q)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, q, q, backend="cuda")
    with pytest.raises(TypeError, match="causal"):
        flash_attention(q, q, q, causal=1)
    with pytest.raises(ValueError, match="layout"):
        block_sparse_flash_attention(q, q, q, torch.ones(3, 3, dtype=torch.bool), 4)
    with pytest.raises(TypeError, match="layout"):
        block_sparse_flash_attention(q, q, q, torch.ones(2, 2), 4)


# ------------------------------------------------------------------------- chapter helpers
def test_block_schedule_skips_and_masks_the_right_tiles():
    from dldna.kernels.tiled import block_schedule

    plan = block_schedule(96, 96, 32, 32, causal=True)
    assert plan.tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 1]]  # diagonal masked, below full, above skipped
    window = block_schedule(256, 256, 32, 32, causal=True, window=70)
    assert (window.sum(dim=1)[3:] == window.sum(dim=1)[3]).all()  # constant work per row: O(N * window)
    allowed = _mask(256, 256, True, 70).reshape(8, 32, 8, 32).any(dim=3).any(dim=1)
    assert torch.equal(window > 0, allowed)  # visited exactly the tiles holding an allowed pair


def test_report_helpers_on_a_synthetic_record():
    import matplotlib

    matplotlib.use("Agg")
    from dldna.kernels.report import benchmark_table, plot_benchmark, targets_table

    rows = [{"mask": "causal", "head_dim": 64, "n": n, "pass": p, "impl": impl, "ms": ms, "tflops": 100 / ms}
            for n in (1024, 4096) for p in ("fwd", "fwd+bwd")
            for impl, ms in (("dldna", 1.0), ("dldna_triton", 0.5), ("flex", 2.0))]
    rows.append({"mask": "causal", "head_dim": 64, "n": 4096, "pass": "fwd", "impl": "sdpa_cudnn", "error": "x"})
    record = {"data": {"rows": rows, "targets": [{"target": "t", "measured": None, "bar": 1, "unit": "x",
                                                  "met": False}]}}
    table = benchmark_table(record)
    # dldna twice as fast as the best peer (flex); its own Triton-only row is not a peer
    assert "2.00x" in table and "0.50x" not in table and "error" in table
    assert "MISSED t: not measured" in targets_table(record)
    fig = plot_benchmark(record)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 6
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dldna", "dldna, Triton kernels only",
                                                                   "FlexAttention"]


def test_peer_speedups_and_kernel_times_read_the_stored_fields():
    from dldna.kernels.report import kernel_times, peer_speedups

    ratios = [{"peer": "flex", "pass": "fwd", "speedup_vs_peer": s} for s in (0.5, 1.5, 2.0)]
    tuning = [{"kernel": kernel, "key": f"(128, 'torch.bfloat16', {window}, True, 16384, 16384, False)",
               "times_ms": {"a": ms + 10 * window, "b": ms + 11}}
              for kernel, ms in (("fwd", 2.0), ("dq", 3.0)) for window in (False, True)]
    tuning.append({"kernel": "dkdv", "key": "(64, 'torch.bfloat16', False, True, 16384, 16384, False)",
                   "times_ms": {"a": 9.0}})  # another head_dim
    tuning.append({"kernel": "fwd", "key": "(128, ...)", "config": "x", "error": "OutOfResources"})  # failed config
    record = {"data": {"ratios": ratios, "tuning": tuning}}
    line = peer_speedups(record).splitlines()[1]
    assert line.split()[:2] == ["FlexAttention", "fwd"] and line.split()[2:] == ["2/3", "0.50", "1.50", "2.00"]
    assert kernel_times(record, "causal", 128, 16384) == {"fwd": 2.0, "dq": 3.0}
    assert kernel_times(record, "window", 128, 16384) == {"fwd": 12.0, "dq": 13.0}
    assert kernel_times(record, "causal", 64, 16384) == {"dkdv": 9.0}
    assert kernel_times(record, "causal", 128, 4096) == {}
    with pytest.raises(ValueError, match="mask"):  # a layout row must not read the causal row's entries
        kernel_times(record, "bigbird", 128, 16384)


@pytest.mark.parametrize("sparse", [False, True])
def test_backward_gets_no_zero_gradient_for_the_unused_lse(sparse, monkeypatch):
    """The log-sum-exp output is not differentiable; autograd must not materialise a zero gradient for it (on the
    GPU that was one extra fill kernel per backward, seen in the Nsight Compute profile)."""
    _triton_kernels()
    module = importlib.import_module("dldna.kernels.flash_attention")  # the package re-exports the function
    function = module._BlockSparseFlashAttention if sparse else module._FlashAttention
    backward, seen = function.backward, []

    def spy(ctx, grad_out, grad_lse):
        seen.append(grad_lse)
        return backward(ctx, grad_out, grad_lse)

    monkeypatch.setattr(function, "backward", staticmethod(spy))
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    if sparse:
        out = block_sparse_flash_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool).tril(), 16, backend="triton")
    else:
        out = flash_attention(q, k, v, causal=True, backend="triton")
    out.backward(torch.ones_like(out))
    assert seen == [None]
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_ncu_table_lists_kernels_with_their_top_stalls():
    from dldna.kernels.report import ncu_table

    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio".format
    metrics = {"gpu__time_duration.sum": 2.5e6, "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": 54.2,
               "launch__registers_per_thread": 211.0, stall("barrier"): 2.7, stall("wait"): 1.3,
               stall("selected"): 1.0, stall("mio_throttle"): 1.1, stall("gmma"): 0.1}
    record = {"data": {"runs": [{"mask": "causal", "pass": "fwd", "head_dim": 128, "n": 16384, "kernels": [
        {"kernel": "_attn_fwd", "metrics": metrics},
        {"kernel": "void at::vectorized_elementwise_kernel<4>(int)", "metrics": {"gpu__time_duration.sum": 2e3}},
        {"kernel": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", "metrics": dict(metrics)}]}]}}
    lines = ncu_table(record).splitlines()
    assert len(lines) == 3  # header, and the two kernels over 0.1 ms
    assert lines[1].split()[:8] == ["causal", "fwd", "D=128", "16k", "_attn_fwd", "2.50", "54", "-"]
    assert lines[1].endswith("barrier 2.7, wait 1.3, mio_throttle 1.1")  # "selected" is issuing, not a stall
    assert "cuDNN fprop" in lines[2]


def _json_from_compiler_subprocess(code):
    """Run ``code`` in a fresh Python without ``TRITON_INTERPRET`` (set for this module's tests, under which Triton
    would not compile for a GPU target), the repository importable, and parse the JSON of its last printed line."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gluon_experiments_compile_for_hopper_without_a_gpu():
    """The three Gluon kernels of ``benchmarks/experiments`` (not shipped: Gluon has no CPU interpreter) still compile
    for sm_90a with this Triton, at D = 128 under the window (the forward persistent, its largest shared memory), and
    the forward with three consumers at D = 64: warpgroup MMA, the loader's registers handed over (``setmaxnreg``),
    shared memory within the SM's 227 KB, and no spills but the dK/dV kernel's few (4 to 80 bytes with Triton 3.6)."""
    pytest.importorskip("triton.experimental.gluon")
    code = (
        "import json\n"
        "from benchmarks.experiments import gluon_fa3_dkdv, gluon_fa3_dq, gluon_fa3_forward\n"
        "rows = [gluon_fa3_forward.compile_only(128, True, 2, 1024, persistent='queue')[0],\n"
        "        gluon_fa3_forward.compile_only(64, True, 2, 0, consumers=3, persistent='queue')[0],\n"
        "        gluon_fa3_dq.compile_only(128, 64, 2, 1024), gluon_fa3_dkdv.compile_only(128, 2, 1024, 2)]\n"
        "print(json.dumps(rows))\n"
    )
    forward, forward_3wg, dq, dkdv = _json_from_compiler_subprocess(code)
    for row in (forward, forward_3wg, dq, dkdv):
        assert row["wgmma"] > 0 and row["setmaxnreg"] > 0 and row["shared_bytes"] <= 227 * 1024, row
    for row in (forward, forward_3wg, dq):
        assert row["spill_store_bytes"] == 0, row
    assert dkdv["spill_store_bytes"] <= 128, dkdv


def test_gluon_tile_orders_cover_every_allowed_pair_once(monkeypatch):
    """The Python copies of the Gluon dK/dV, dQ and forward kernels' tile arithmetic (``gluon_tile_order.py``) on
    small N: each tile once, masked where a pair is masked, every allowed pair covered, every (block, head) once in a
    persistent walk; and a shifted diagonal, a 192-row block's last tile dropped and a mis-mirrored wave are caught."""
    from benchmarks.experiments import gluon_tile_order as order

    for n in (128, 384, 640):
        for window in (0, 1, 63, 64, 65, 129, 300):
            for consumers in (1, 2):
                assert order.problems(n, consumers, window) == [], (n, consumers, window)
            for keys in (64, 128):
                assert order.dq_problems(n, keys, window) == [], (n, keys, window)
            for consumers in (2, 3):
                assert order.forward_problems(n, consumers, window) == [], (n, consumers, window)
    for blocks, heads, chunk, grid in ((5, 3, 1, 7), (5, 3, 2, 7), (32, 16, 16, 132), (1, 1, 1, 1)):
        assert order.persistent_walk_problems(blocks, heads, chunk, grid) == [], (blocks, heads, chunk, grid)
    real_forward, real_walk = order.forward_key_tiles, order.walk_tile
    monkeypatch.setattr(order, "forward_key_tiles", lambda pid, n, block_q, window: (
        real_forward(pid, n, block_q, window)[0], min((pid + 1) * block_q // order.BLOCK_N, n // order.BLOCK_N)))
    assert order.forward_problems(640, 3, 0)  # 192-row blocks: a key tile that a block ends inside, dropped
    monkeypatch.setattr(order, "forward_key_tiles", real_forward)
    monkeypatch.setattr(order, "walk_tile", lambda wave, grid, pid: real_walk(wave, grid, pid) + wave % 2)
    assert order.persistent_walk_problems(5, 3, 1, 7)
    real = order.key_tiles

    def one_full_tile_too_many(pid, keys, window):
        lo, hi, full_lo, full_hi = real(pid, keys, window)
        return lo, hi, full_lo, full_hi + 1

    monkeypatch.setattr(order, "key_tiles", one_full_tile_too_many)
    assert order.dq_problems(384, 64, 0)  # a diagonal tile taken as full


def test_gluon_table_divides_the_peer_time_by_each_implementation_time():
    from dldna.kernels.report import gluon_table

    def times(eager, graph):
        return {"eager_ms": eager, "graph_ms": graph}

    record = {"data": {
        "fwd_bwd": [{"mask": "window", "head_dim": 128, "n": 4096, "peer": "flex",
                     "impls": {"dldna": times(1.25, 1.3), "gluon_fwd_gluon_bwd": times(1.0, 1.04),
                               "flex": times(1.5, 1.56)}}],
        "kernels": [{"mask": "window", "head_dim": 128, "n": 4096, "fwd_tflops": {"gluon": 423, "dldna": 377,
                                                                                   "flex": 292},
                     "dq_ms": {"gluon": 0.349, "dldna": 0.428}, "dkdv_ms": {"gluon": 0.472, "dldna": 0.534}}],
        "forward_4k_d64": [{"log": "run_b.json", "date": "2026-12-04",
                            "tflops": {"gluon": 421.6, "dldna": 394.4, "sdpa_cudnn": 416.6}}],
        "sources": [{"log": "a.json", "date": "2026-12-04", "command": "python x.py --rows window:128:4096"}]}}
    lines = gluon_table(record).splitlines()
    assert lines[1].split() == ["window", "128", "4096", "1.250", "ms", "1.20x", "1.000", "ms", "1.50x", "(1.50x)",
                                "FlexAttention", "1.500", "ms"]
    assert "423 / 377 (Flex 292)" in lines[5] and lines[5].split()[-6:] == ["0.349", "/", "0.428", "0.472", "/",
                                                                              "0.534"]
    assert lines[-4].split() == ["run_b", "422", "394", "417"]
    assert lines[-1] == "  2026-12-04  python x.py --rows window:128:4096"


def test_the_stored_gluon_record_has_every_row_and_its_runs():
    """``results/flash_gluon.json`` (``benchmarks/experiments/gluon_summary.py``) holds the rows chapter 5 prints, each
    implementation timed eagerly and as a graph, the causal 4k, D = 64 forward of each queue run, and the command of
    every run it was gathered from."""
    from dldna.results import load_result

    record = load_result("flash_gluon")
    rows = {(r["mask"], r["head_dim"], r["n"]): r for r in record["data"]["fwd_bwd"]}
    assert set(rows) == {("causal", 128, 16384), ("window", 128, 16384), ("window", 128, 4096)}
    for row in rows.values():
        assert {"dldna", "gluon_fwd_gluon_bwd", row["peer"]} <= set(row["impls"])
        assert all(t["eager_ms"] > 0 and t["graph_ms"] > 0 for t in row["impls"].values())
    assert len(record["data"]["sources"]) == 8 and all("gluon" in s["command"] for s in record["data"]["sources"])
    queue_runs = record["data"]["forward_4k_d64"]
    assert [run["log"] for run in queue_runs] == [s["log"] for s in record["data"]["sources"][-3:]]
    assert all(run["tflops"]["gluon"] > run["tflops"]["sdpa_cudnn"] for run in queue_runs)  # as chapter 5 says


def test_tuned_configs_parse_the_stored_winners():
    """The stored run's picks come back as KernelConfig fields; a repr of another form is an error, not a default."""
    from dldna.kernels.report import tuned_configs
    from dldna.results import load_result

    picked = tuned_configs(load_result("flash_attention_bench"), "causal", 128, 16384)
    assert sorted(picked) == ["dkdv", "dq", "fwd"]
    for kernel, fields in picked.items():
        rebuilt = "KernelConfig(" + ", ".join(f"{name}={value}" for name, value in fields.items()) + ")"
        stored = [e["best"] for e in load_result("flash_attention_bench")["data"]["tuning"]
                  if e.get("kernel") == kernel and e["key"].startswith("(128, 'torch.bfloat16', False, True, 16384,")]
        assert stored == [rebuilt]
    record = {"data": {"tuning": [{"kernel": "fwd", "key": "(64, 'torch.bfloat16', False, True, 1024, 1024, False)",
                                   "times_ms": {"a": 1.0}, "best": "Config(64, 64)"}]}}
    with pytest.raises(ValueError, match="unrecognised config"):
        tuned_configs(record, "causal", 64, 1024)


def test_experiment_helpers_fit_lines_and_parse_configs():
    """``kernel_split.fit_line`` recovers a kernel's fixed part and slope; ``ab_kernels.parse_extra`` reads a config
    with extra fields and the ``maxnreg`` launch option, named or plain (and rejects a field KernelConfig lacks)."""
    _, ft = _triton_kernels()
    from benchmarks.experiments.ab_kernels import parse_extra
    from benchmarks.experiments.kernel_split import fit_line

    fixed, slope = fit_line([256, 512, 1024, 2048], [0.1 + 2e-4 * w for w in (256, 512, 1024, 2048)])
    assert fixed == pytest.approx(0.1) and slope == pytest.approx(2e-4)
    assert parse_extra(ft, "64,64,4,2,1,maxnreg=128") == ("fwd", ft.KernelConfig(64, 64, 4, 2, tma=True), 128)
    assert parse_extra(ft, "dq:64,64,4,2,1,96") == ("dq", ft.KernelConfig(64, 64, 4, 2, tma=True), 96)
    assert parse_extra(ft, "128,64,8,3,0") == ("fwd", ft.KernelConfig(128, 64, 8, 3), None)
    with pytest.raises(TypeError):
        parse_extra(ft, "64,64,4,2,1,persistent=2")  # the shipped kernels have no persistent grid


def test_benchmark_rounds_reverse_the_order_every_other_round():
    """``benchmarks/attention.py`` times each row in rounds; odd rounds reverse the order of the implementations, so
    each one follows others than in the first round (which is the order of a single-round run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("attention_bench", "benchmarks/attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    impls = ["dldna", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"]
    orders = [bench.round_order(impls, r) for r in range(3)]
    assert orders[0] == orders[2] == impls and orders[1] == impls[::-1]
    before = [{order[i + 1]: order[i] for i in range(len(order) - 1)} for order in orders]
    assert all(before[0].get(impl) != before[1].get(impl) for impl in impls)


def test_force_tuned_configs_forces_the_stored_picks_until_restore_tuning():
    _, ft = _triton_kernels()
    from dldna.kernels.report import force_tuned_configs, tuned_configs
    from dldna.results import load_result

    record = load_result("flash_attention_bench")
    try:
        force_tuned_configs(record, "window", 64, 4096)
        assert ft._forced == {kernel: ft.KernelConfig(**fields)
                              for kernel, fields in tuned_configs(record, "window", 64, 4096).items()}
    finally:
        ft.restore_tuning()
    assert ft._forced == {}


def test_package_works_without_triton():
    """``import dldna.kernels`` and ``flash_attention`` must work where triton is not installed (tiled fallback)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from dldna.kernels import flash_attention, triton_available\n"
        "from dldna.attention import attention\n"
        "q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(3))\n"
        "assert not triton_available('cpu') and not triton_available('cuda')\n"
        "err = (flash_attention(q, k, v, causal=True) - attention(q, k, v, causal=True)).abs().max().item()\n"
        "assert err < 1e-12, err\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("name", ["causal", "window", "layout"])
def test_flex_block_mask_equals_create_block_mask(name):
    """The benchmark's compile-free FlexAttention block mask equals PyTorch's own, block for block."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from dldna.bench import flex_block_mask

    layout = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) < 0.4
    mask_mod = {
        "causal": lambda b, h, q, kv: q >= kv,
        "window": lambda b, h, q, kv: (q >= kv) & (q - kv < 40),
        "layout": lambda b, h, q, kv: layout[q // 16, kv // 16],
    }[name]
    ours = flex_block_mask(mask_mod, 96, block_size=16)
    theirs = create_block_mask(mask_mod, None, None, 96, 96, device="cpu", BLOCK_SIZE=16, _compile=False)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    for field in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field).to(getattr(ours, field).dtype))
    q, k, v = (torch.randn(1, 2, 96, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager (unfused) flex_attention on CPU
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours), flex_attention(q, k, v, block_mask=theirs))
    with pytest.raises(ValueError, match="block_size"):
        flex_block_mask(mask_mod, 100, block_size=16)


def test_kernels_compile_for_hopper_without_a_gpu():
    """The window configs the H200 picked compile for sm_90a (``benchmarks/flash_compile_report.py``, which also
    checks that the report's kernel signatures follow the kernels'): warpgroup MMA, no mma.sync, no spills, and the
    loops over tiles that ``benchmarks/experiments/sass_loops.py`` counts."""
    code = (
        "import json\n"
        "from benchmarks.flash_compile_report import compile_one\n"
        "from dldna.kernels import flash_triton as ft\n"
        "cases = [(ft._attn_fwd, ft.KernelConfig(64, 64, 4, 2, tma=True), (True, True)),\n"
        "         (ft._attn_bwd_dq, ft.KernelConfig(64, 64, 4, 3, tma=True), (True, True)),\n"
        "         (ft._attn_bwd_dkdv, ft.KernelConfig(64, 64, 4, 3), (True, True))]\n"
        "rows = [compile_one(fn, 'bf16', 64, cfg, flags, sass=True) for fn, cfg, flags in cases]\n"
        "from benchmarks.experiments.sass_loops import mma_among_exponentials, tile_loops\n"
        "overlap = mma_among_exponentials(rows[2]['sass'])\n"
        "loops = [[size for size, _ in tile_loops(row.pop('sass'))] for row in rows]\n"
        "print(json.dumps([rows, loops, overlap]))\n"
    )
    rows, loops, dkdv_overlap = _json_from_compiler_subprocess(code)
    for row in rows:
        assert row["wgmma"] > 0 and row["mma_sync"] == 0, row
        assert row["spill_store_bytes"] == 0 and row["registers"] <= 255, row
    # The SASS shows the loops of the source: the forward's window edge, full tiles and diagonal (a full tile checks
    # nothing, so it is the shortest), and dK/dV's full then masked tiles.
    fwd, _, dkdv = loops
    assert len(fwd) == 3 and fwd[1] < min(fwd[0], fwd[2]), loops
    assert len(dkdv) == 2 and dkdv[0] < dkdv[1], loops
    # EARLY_DP: both dK/dV loops issue the dP^T product among the exponentials of P^T
    assert len(dkdv_overlap) == 2 and min(dkdv_overlap) > 0, dkdv_overlap


# ------------------------------------------------------------------ the Gluon kernels that Hopper GPUs run
def test_gluon_plan_only_for_the_calls_its_kernels_take(monkeypatch):
    """``flash_gluon.plan_for``: bf16, MHA, Nq == Nk a multiple of 128, D 64 / 128, causal (windowed), on Hopper."""
    pytest.importorskip("triton.experimental.gluon")
    from dldna.kernels import flash_gluon

    def plan(shape=(1, 2, 256, 64), kv_shape=None, dtype=torch.bfloat16, causal=True, window=None):
        q = torch.empty(shape, dtype=dtype)
        k = torch.empty(kv_shape or shape, dtype=dtype)
        band = band_limits(q.shape[2], k.shape[2], causal, window)
        return flash_gluon.plan_for(q, k, k, band.lo, band.hi)

    assert plan() is None  # a CPU tensor: no Hopper GPU
    monkeypatch.setattr(flash_gluon, "_hopper", lambda device: True)
    assert plan() == flash_gluon.Plan(None, dict(persistent="queue", stages=3), dict(keys=64),
                                      dict(stages=2, consumers=2))
    assert plan((1, 2, 16384, 64)).forward == dict(persistent="queue", consumers=3)
    assert plan((1, 2, 16384, 128)).forward == {}  # a program per tile
    assert plan((1, 2, 256, 128), window=100) == flash_gluon.Plan(100, dict(persistent="queue"), dict(keys=64),
                                                                  dict(stages=2, consumers=2))
    assert plan(window=1024) == flash_gluon.Plan(1024, None, None, dict(stages=2, consumers=1))
    for refused in (dict(dtype=torch.float16), dict(kv_shape=(1, 1, 256, 64)), dict(shape=(1, 2, 200, 64)),
                    dict(shape=(1, 2, 256, 32)), dict(causal=False), dict(causal=False, window=64),
                    dict(kv_shape=(1, 2, 384, 64))):
        assert plan(**refused) is None, refused


@pytest.mark.parametrize("d,window", [(64, None), (128, None), (128, 100)])
def test_flash_attention_takes_the_gluon_kernels_where_the_plan_has_them(d, window, monkeypatch):
    """With a Hopper GPU faked (the Gluon kernels then run in the emulator on these CPU tensors), every pass of a
    plan without Triton kernels runs in Gluon, and outputs, LSE and gradients match float64."""
    pytest.importorskip("triton.experimental.gluon")
    _, flash_triton = _triton_kernels()
    from dldna.kernels import flash_gluon

    def refuse(*_, **__):
        raise AssertionError("a Triton kernel ran where the plan has a Gluon one")

    monkeypatch.setattr(flash_gluon, "_hopper", lambda device: True)
    monkeypatch.setattr(flash_triton, "attention_forward", refuse)
    monkeypatch.setattr(flash_triton, "attention_backward", refuse)
    monkeypatch.setattr(flash_triton, "backward_dq", refuse)
    q, k, v, grad = _inputs(2, 3, 3, 256, 256, d, torch.bfloat16, seed=d + (window or 0))

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, window=window, return_lse=True, backend="triton")

    _check_against_reference(fn, q, k, v, grad, _mask(256, 256, True, window), BOUNDS[torch.bfloat16])


def test_gluon_dkdv_reads_the_lse2_and_delta_of_the_triton_dq_kernel():
    """The window D = 64 plan: the Triton forward and dQ kernels (here in fp32, the interpreter's bf16 products
    being wrong), then the Gluon dK/dV kernel on the base-2 LSE and ``delta`` that the dQ kernel wrote."""
    pytest.importorskip("triton.experimental.gluon")
    _, flash_triton = _triton_kernels()
    from dldna.kernels.flash_gluon.dkdv import fa3_dkdv

    n, window = 256, 100
    q, k, v, grad = _inputs(1, 2, 2, n, n, 64, torch.bfloat16, seed=11)
    band = band_limits(n, n, True, window)
    scale = 0.7 / math.sqrt(64)  # not the default: the scale must reach both kernels
    q32, k32, v32 = q.float(), k.float(), v.float()
    out, lse = flash_triton.attention_forward(q32, k32, v32, band.lo, band.hi, scale)
    _, lse2, delta = flash_triton.backward_dq(q32, k32, v32, out, lse, grad.float(), band.lo, band.hi, scale)
    dk, dv = fa3_dkdv(q, k, v, grad.bfloat16(), lse2, delta, window=window, consumers=1, scale=scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention(q64, k64, v64, mask=_mask(n, n, True, window), scale=scale)
    _, dk_ref, dv_ref = torch.autograd.grad(ref, (q64, k64, v64), grad)
    assert _rel(dk, dk_ref) < 2 * BOUNDS[torch.bfloat16] and _rel(dv, dv_ref) < 2 * BOUNDS[torch.bfloat16]
