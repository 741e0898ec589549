"""Tests for the attention zoo (chapters 2-4): masks, sliding-window, block-sparse, Linformer, FAVOR+, LSH.

Every fast or sparse method is checked against ``dldna.attention.attention`` (the dense oracle) with the
materialised mask, in float64, on random inputs with odd lengths and several batch/head counts.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dldna.attention import attention
from dldna.attention import masks as M

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def qkv(b, h, n, d, seed, hkv=None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    q = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=dtype)
    return q, k, v


def brute(n, rule):
    """Dense mask from a plain Python rule ``rule(i, j) -> bool``: the definitions as the papers write them."""
    return torch.tensor([[bool(rule(i, j)) for j in range(n)] for i in range(n)])


# ------------------------------------------------------------------------------------------------ masks
@SETTINGS
@given(n=st.integers(1, 40), window=st.integers(1, 45), causal=st.booleans())
def test_sliding_window_convention(n, window, causal):
    if causal:
        expected = brute(n, lambda i, j: 0 <= i - j < window)
    else:
        expected = brute(n, lambda i, j: abs(i - j) <= window // 2)
    assert torch.equal(M.sliding_window_mask(n, window, causal), expected)


def test_sliding_window_counts_self_hf_convention():
    # window=4 keys including the query itself: row 10 sees 7, 8, 9, 10 (the Mistral / HF convention)
    row = M.sliding_window_mask(16, 4)[10]
    assert row.nonzero().flatten().tolist() == [7, 8, 9, 10]
    assert torch.equal(M.causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())


@SETTINGS
@given(n=st.integers(1, 40), window=st.integers(1, 9), dilation=st.integers(1, 5), causal=st.booleans())
def test_dilated_mask(n, window, dilation, causal):
    if causal:
        rule = lambda i, j: (i - j) % dilation == 0 and 0 <= (i - j) // dilation < window  # noqa: E731
    else:
        rule = lambda i, j: (i - j) % dilation == 0 and abs(i - j) // dilation <= window // 2  # noqa: E731
    got = M.dilated_mask(n, window, dilation, causal)
    assert torch.equal(got, brute(n, rule))
    assert int(got.sum(1).max()) <= (window if causal else 2 * (window // 2) + 1)
    if dilation == 1:
        assert torch.equal(got, M.sliding_window_mask(n, window, causal))


def test_segment_dilated_mask():
    got = M.segment_dilated_mask(8, segment=4, dilation=2, offset=1)
    expected = brute(8, lambda i, j: i // 4 == j // 4 and i % 4 % 2 == 1 and j % 4 % 2 == 1)
    assert torch.equal(got, expected)
    assert torch.equal(M.segment_dilated_mask(8, 4, 1, causal=True), brute(8, lambda i, j: i // 4 == j // 4 and j <= i))


@SETTINGS
@given(n=st.integers(1, 40), stride=st.integers(1, 9))
def test_strided_mask(n, stride):
    rule = lambda i, j: j <= i and (i - j < stride or (i - j) % stride == 0)  # noqa: E731
    assert torch.equal(M.strided_mask(n, stride), brute(n, rule))


@SETTINGS
@given(n=st.integers(1, 40), stride=st.integers(1, 9), data=st.data())
def test_fixed_mask(n, stride, data):
    c = data.draw(st.integers(1, stride))
    rule = lambda i, j: j <= i and (j // stride == i // stride or j % stride >= stride - c)  # noqa: E731
    assert torch.equal(M.fixed_mask(n, stride, c), brute(n, rule))


@SETTINGS
@given(n=st.integers(1, 40), window=st.integers(0, 8), data=st.data())
def test_longformer_mask_symmetric_global(n, window, data):
    glob = data.draw(st.lists(st.integers(0, n - 1), max_size=3))
    got = M.longformer_mask(n, window, glob)
    assert torch.equal(got, brute(n, lambda i, j: abs(i - j) <= window or i in glob or j in glob))
    assert torch.equal(got, got.T)


@SETTINGS
@given(n_blocks=st.integers(1, 12), block_size=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_block_sparse_mask_expands_layout(n_blocks, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    layout = torch.rand(n_blocks, n_blocks, generator=gen) < 0.4
    n = n_blocks * block_size
    got = M.block_sparse_mask(n, block_size, layout)
    assert torch.equal(got, brute(n, lambda i, j: bool(layout[i // block_size, j // block_size])))
    assert torch.equal(M.block_layout_from_mask(got, block_size), layout)


@SETTINGS
@given(n_blocks=st.integers(1, 16), w=st.sampled_from([1, 3, 5]), g=st.integers(0, 2), r=st.integers(0, 3),
       seed=st.integers(0, 1000))
def test_bigbird_layout(n_blocks, w, g, r, seed):
    g = min(g, n_blocks)
    layout = M.bigbird_block_layout(n_blocks, w, g, r, seed)
    window = M.sliding_window_mask(n_blocks, w, causal=False)
    assert (layout | ~window).all(), "window blocks kept"
    assert layout[:g].all() and layout[:, :g].all(), "global rows and columns kept"
    for row in range(g, n_blocks):
        base = int((window[row] | (torch.arange(n_blocks) < g)).sum())
        assert int(layout[row].sum()) == min(n_blocks, base + r), "exactly r random blocks where room allows"
    assert torch.equal(layout, M.bigbird_block_layout(n_blocks, w, g, r, seed)), "seeded"
    mask = M.bigbird_mask(n_blocks * 2, 2, w, g, r, seed)
    assert torch.equal(mask, M.block_sparse_mask(n_blocks * 2, 2, layout))


def test_block_layouts_are_the_token_patterns_on_blocks():
    assert torch.equal(M.strided_block_layout(9, 3), M.strided_mask(9, 3))
    assert torch.equal(M.fixed_block_layout(9, 3, 1), M.fixed_mask(9, 3, 1))
    assert torch.equal(M.longformer_block_layout(9, 1, [0]), M.longformer_mask(9, 1, [0]))
    assert torch.equal(M.sliding_window_block_layout(9, 2), M.sliding_window_mask(9, 2))
    # a covering layout of a token mask keeps exactly the tiles that hold an allowed pair
    tok = M.sliding_window_mask(10, 3)
    cover = M.block_layout_from_mask(tok, 4)  # 10 is not a multiple of 4: tail tile included
    assert cover.shape == (3, 3)
    assert torch.equal(cover, torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool))


def test_mask_mod_composition_and_materialize():
    causal, window = M.make_causal(), M.make_sliding_window(5, causal=False)
    both = M.materialize(M.and_masks(causal, window), 11)
    assert torch.equal(both, M.causal_mask(11) & M.sliding_window_mask(11, 5, causal=False))
    either = M.materialize(M.or_masks(causal, window), 11)
    assert torch.equal(either, M.causal_mask(11) | M.sliding_window_mask(11, 5, causal=False))
    rect = M.materialize(causal, 3, 7)
    assert rect.shape == (3, 7) and rect.sum() == 6


def test_receptive_field_grows_with_layers():
    mask = M.sliding_window_mask(32, 4)
    widths = [int(M.receptive_field(mask, layers)[31].sum()) for layers in range(4)]
    assert widths == [1, 4, 7, 10], widths  # each causal window-4 layer adds window - 1 positions
    strided = M.strided_mask(64, 8)
    assert int(M.receptive_field(strided, 2)[63].sum()) == 64  # two strided layers reach every earlier token


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: M.sliding_window_mask(8, 0), "window"),
        (lambda: M.sliding_window_mask(0, 2), "n"),
        (lambda: M.dilated_mask(8, 2, 0), "dilation"),
        (lambda: M.block_sparse_mask(10, 4, torch.ones(2, 2, dtype=torch.bool)), "block_size"),
        (lambda: M.block_sparse_mask(8, 4, torch.ones(3, 3, dtype=torch.bool)), "layout"),
        (lambda: M.block_sparse_mask(8, 4, torch.ones(2, 2)), "layout"),
        (lambda: M.fixed_mask(8, 2, 3), "c"),
        (lambda: M.longformer_mask(8, 1, [8]), "global_tokens"),
        (lambda: M.longformer_mask(8, -1, [0]), "window"),
        (lambda: M.bigbird_block_layout(8, 2), "window_blocks"),
        (lambda: M.bigbird_mask(10, 4), "block_size"),
    ],
)
def test_mask_argument_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_masks_drive_the_dense_reference():
    q, k, v = qkv(2, 3, 13, 5, seed=1)
    mask = M.longformer_mask(13, 2, [0, 7])
    out = attention(q, k, v, mask=mask)
    ref = torch.empty_like(out)
    for i in range(13):  # row by row softmax over the allowed keys only
        keys = mask[i].nonzero().flatten()
        w = torch.softmax(q[:, :, i : i + 1] @ k[:, :, keys].transpose(-2, -1) / math.sqrt(5), dim=-1)
        ref[:, :, i : i + 1] = w @ v[:, :, keys]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_mask_mods_work_with_flex_attention_block_masks():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    n, bs = 64, 16
    for mod, dense in [
        (M.make_longformer(n, 3, [0, 40]), M.longformer_mask(n, 3, [0, 40])),
        (M.make_dilated(4, 3), M.dilated_mask(n, 4, 3)),
        (M.make_strided(8), M.strided_mask(n, 8)),
    ]:
        block_mask = flex.create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=bs)
        kept = block_mask.to_dense()[0, 0].bool()
        assert torch.equal(kept, M.block_layout_from_mask(dense, bs))


# ------------------------------------------------------------------------------------------------ local.py
from dldna.attention.local import block_sparse_attention, sliding_window_attention  # noqa: E402


@SETTINGS
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), rep=st.integers(1, 2), n=st.integers(1, 67), d=st.sampled_from([3, 8]),
    window=st.integers(1, 70), causal=st.booleans(), chunk=st.one_of(st.none(), st.integers(1, 20)),
    seed=st.integers(0, 10**6),
)
def test_sliding_window_equals_dense(b, hkv, rep, n, d, window, causal, chunk, seed):
    q, k, v = qkv(b, hkv * rep, n, d, seed, hkv=hkv)
    got = sliding_window_attention(q, k, v, window, causal=causal, chunk_size=chunk)
    ref = attention(q, k, v, mask=M.sliding_window_mask(n, window, causal))
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-10


def test_sliding_window_gradients_match_dense():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 37, 8, seed=3))
    mask = M.sliding_window_mask(37, 6, causal=False)
    grad_out = torch.randn(2, 2, 37, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(sliding_window_attention(q, k, v, 6, causal=False, chunk_size=5), (q, k, v), grad_out)
    ref = torch.autograd.grad(attention(q, k, v, mask=mask), (q, k, v), grad_out)
    for g, r in zip(grads, ref):
        assert (g - r).abs().max() < 1e-10


@SETTINGS
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), rep=st.integers(1, 2), n_blocks=st.integers(1, 7),
    block_size=st.sampled_from([1, 3, 5]), density=st.floats(0.0, 1.0), causal=st.booleans(), seed=st.integers(0, 10**6),
)
def test_block_sparse_equals_dense(b, hkv, rep, n_blocks, block_size, density, causal, seed):
    n = n_blocks * block_size
    q, k, v = qkv(b, hkv * rep, n, 4, seed, hkv=hkv)
    layout = torch.rand(n_blocks, n_blocks, generator=torch.Generator().manual_seed(seed)) < density
    got = block_sparse_attention(q, k, v, layout, block_size, causal=causal)
    mask = M.block_sparse_mask(n, block_size, layout) & (M.causal_mask(n) if causal else True)
    ref = attention(q, k, v, mask=mask)
    assert not torch.isnan(got).any()
    assert (got - ref).abs().max() < 1e-10


@SETTINGS
@given(pattern=st.sampled_from(["bigbird", "longformer", "strided", "fixed"]), n_blocks=st.integers(1, 9),
       bs=st.sampled_from([1, 2, 3]), width=st.integers(0, 4), extra=st.integers(0, 3), seed=st.integers(0, 1000),
       data=st.data())
def test_block_sparse_runs_the_named_block_patterns(pattern, n_blocks, bs, width, extra, seed, data):
    glob = data.draw(st.lists(st.integers(0, n_blocks - 1), max_size=2))
    stride = width + 1
    layout = {
        "bigbird": lambda: M.bigbird_block_layout(n_blocks, 2 * width + 1, min(extra, n_blocks), extra, seed=seed),
        "longformer": lambda: M.longformer_block_layout(n_blocks, width, glob),
        "strided": lambda: M.strided_block_layout(n_blocks, stride),
        "fixed": lambda: M.fixed_block_layout(n_blocks, stride, min(extra + 1, stride)),
    }[pattern]()
    causal = pattern in ("strided", "fixed")
    q, k, v = qkv(1 + seed % 2, 3, n_blocks * bs, 5, seed=seed)
    mask = M.block_sparse_mask(n_blocks * bs, bs, layout) & (M.causal_mask(n_blocks * bs) if causal else True)
    got = block_sparse_attention(q, k, v, layout, bs, causal=causal)
    assert (got - attention(q, k, v, mask=mask)).abs().max() < 1e-10


def test_block_sparse_one_softmax_per_row_and_empty_rows_are_zero():
    n_blocks, bs = 4, 2
    layout = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    layout[0, :] = True  # block row 0 sees all 4 tiles; block row 1 sees none
    layout[2, 2] = layout[3, 1] = layout[3, 3] = True
    q, k, _ = qkv(1, 1, 8, 4, seed=2)
    v = torch.ones(1, 1, 8, 4, dtype=torch.float64)  # with v = 1 every normalised row returns exactly 1
    out = block_sparse_attention(q, k, v, layout, bs)
    assert torch.allclose(out[0, 0, [0, 1, 4, 5, 6, 7]], torch.ones(6, 4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(out[0, 0, 2:4], torch.zeros(2, 4, dtype=torch.float64))
    # the printed chapter's per-tile softmax would give rows summing to the number of kept tiles (4 for row 0)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda q, k, v: sliding_window_attention(q, k, v, 0), "window"),
        (lambda q, k, v: sliding_window_attention(q, k, v, -3), "window"),
        (lambda q, k, v: sliding_window_attention(q, k[:, :, :5], v[:, :, :5], 3), "seq length"),
        (lambda q, k, v: sliding_window_attention(q, k[:, :, :5], v, 3), "k and v"),
        (lambda q, k, v: sliding_window_attention(q, k[..., :3], v[..., :3], 3), "head_dim"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(3, 3, dtype=torch.bool), 4), "block_size"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(3, 3, dtype=torch.bool), 3), "layout"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(2, 3, dtype=torch.bool), 3), "layout"),
    ],
)
def test_local_argument_errors(call, name):
    q, k, v = qkv(1, 2, 6, 4, seed=0)
    with pytest.raises(ValueError, match=name):
        call(q, k, v)


def test_sliding_window_memory_is_a_small_fraction_of_dense():
    """Same N/window ratio (64) as the bar's N=16384, window=256; benchmarks/attention_zoo.py measures 16k itself."""
    from dldna.bench import peak_memory_mb

    n, window = 4096, 64
    q, k, v = qkv(1, 1, n, 16, seed=0, dtype=torch.float32)
    mask = M.sliding_window_mask(n, window)
    banded = peak_memory_mb(lambda: sliding_window_attention(q, k, v, window))
    dense = peak_memory_mb(lambda: attention(q, k, v, mask=mask))
    assert dense > 3 * n * n * 4 / 2**20 * 0.9, dense  # the dense reference holds several N x N float32 matrices
    assert banded < 0.10 * dense, (banded, dense)


# ------------------------------------------------------------------------------------------------ lowrank.py / linear.py
from dldna.attention.linear import (  # noqa: E402
    elu_features, favor_error, favor_features, kernel_attention_dense, linear_attention, orthogonal_random_matrix,
    performer_attention, random_projection, softmax_kernel_estimates,
)
from dldna.attention.lowrank import linformer_attention, linformer_projection  # noqa: E402


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 41), k_proj=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_linformer_projects_the_sequence_axis(b, h, n, k_proj, seed):
    q, k, v = qkv(b, h, n, 5, seed)
    gen = torch.Generator().manual_seed(seed)
    E, F = (linformer_projection(k_proj, n, gen, dtype=torch.float64) for _ in range(2))
    got = linformer_attention(q, k, v, E, F)
    # the same thing written the long way: N x N scores, then projected on the key axis
    ref = torch.softmax((q @ k.transpose(-1, -2)) @ E.T / math.sqrt(5), dim=-1) @ (F @ v)
    assert got.shape == (b, h, n, 5)
    assert (got - ref).abs().max() < 1e-10
    eye = torch.eye(n, dtype=torch.float64)
    assert (linformer_attention(q, k, v, eye, eye) - attention(q, k, v)).abs().max() < 1e-10


@pytest.mark.parametrize(
    "E_shape, F_shape, name", [((4, 9), (4, 10), "E"), ((4, 10), (4, 9), "F"), ((4, 10), (3, 10), "F"), ((10,), (4, 10), "E")]
)
def test_linformer_argument_errors(E_shape, F_shape, name):
    q, k, v = qkv(1, 1, 10, 4, seed=0)
    with pytest.raises(ValueError, match=f"^{name} must have shape"):
        linformer_attention(q, k, v, torch.randn(*E_shape, dtype=torch.float64), torch.randn(*F_shape, dtype=torch.float64))


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 45), m=st.integers(1, 12), causal=st.booleans(),
       chunk=st.integers(1, 50), seed=st.integers(0, 10**6))
def test_linear_attention_equals_its_quadratic_form(b, h, n, m, causal, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    phi_q = torch.rand(b, h, n, m, generator=gen, dtype=torch.float64)
    phi_k = torch.rand(b, h, n, m, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, n, 3, generator=gen, dtype=torch.float64)
    got = linear_attention(phi_q, phi_k, v, causal=causal, chunk_size=chunk)
    assert (got - kernel_attention_dense(phi_q, phi_k, v, causal)).abs().max() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["positive", "hyperbolic"])
def test_performer_stabilisation_cancels_and_gqa(causal, kind):
    q, k, v = qkv(2, 4, 23, 6, seed=4, hkv=2)
    w = random_projection(16, 6, generator=torch.Generator().manual_seed(1))
    got = performer_attention(q, k, v, 16, causal=causal, projection=w, kind=kind, chunk_size=5)
    root = 6 ** -0.25
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    ref = kernel_attention_dense(favor_features(q * root, w, kind), favor_features(kk * root, w, kind), vv, causal)
    assert (got - ref).abs().max() < 1e-10
    if causal:  # the first query sees only the first key: its output is that key's value
        assert (got[:, :, 0] - vv[:, :, 0]).abs().max() < 1e-12


def test_orthogonal_random_matrix_rows():
    w = orthogonal_random_matrix(20, 8, torch.Generator().manual_seed(0))
    assert w.shape == (20, 8)
    for start in (0, 8):  # rows inside one block of d are orthogonal
        gram = w[start : start + 8] @ w[start : start + 8].T
        assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-10
    sq_norms = torch.cat([orthogonal_random_matrix(64, 8, torch.Generator().manual_seed(s)).norm(dim=1) ** 2 for s in range(20)])
    assert abs(float(sq_norms.mean()) - 8) < 0.5  # rows are marginally N(0, I): E|w|^2 = d


@pytest.mark.parametrize("kind", ["positive", "hyperbolic", "trig"])
def test_favor_features_are_unbiased(kind):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, generator=gen, dtype=torch.float64) * 0.5
    est = softmax_kernel_estimates(x, y, num_features=8, n_draws=3000, kind=kind, generator=gen)
    exact = math.exp(float(x @ y))
    stderr = float(est.std()) / math.sqrt(est.numel())
    assert abs(float(est.mean()) - exact) < 4 * stderr, (float(est.mean()), exact, stderr)
    if kind != "trig":
        assert (est > 0).all()


def test_relu_features_do_not_estimate_the_softmax_kernel():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, generator=gen, dtype=torch.float64) * 0.5
    est = softmax_kernel_estimates(x, y, num_features=8, n_draws=3000, kind="relu", generator=gen)
    stderr = float(est.std()) / math.sqrt(est.numel())
    assert abs(float(est.mean()) - math.exp(float(x @ y))) > 10 * stderr


@pytest.mark.parametrize("causal", [False, True])
def test_favor_error_falls_with_features(causal):
    q, k, v = qkv(1, 2, 33, 8, seed=7)
    errors = favor_error(q * 0.5, k * 0.5, v, [4, 32, 256], n_draws=4, causal=causal,
                         generator=torch.Generator().manual_seed(0))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 3, errors


def test_elu_kernel_attention_and_feature_errors():
    q, k, v = qkv(1, 2, 9, 4, seed=1)
    out = linear_attention(elu_features(q), elu_features(k), v, causal=True, chunk_size=4)
    assert (out - kernel_attention_dense(elu_features(q), elu_features(k), v, causal=True)).abs().max() < 1e-10
    with pytest.raises(ValueError, match="kind"):
        favor_features(q, torch.randn(4, 4, dtype=torch.float64), kind="cosine")
    with pytest.raises(ValueError, match="projection"):
        favor_features(q, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_features"):
        performer_attention(q, k, v, 0)


# ------------------------------------------------------------------------------------------------ lsh.py
from dldna.attention.lsh import collision_probability, lsh_attention, lsh_hash, lsh_mask, random_rotations  # noqa: E402


@SETTINGS
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), rep=st.integers(1, 2), n=st.integers(1, 45), n_buckets=st.sampled_from([2, 4, 6]),
    n_hashes=st.integers(1, 3), causal=st.booleans(), shared=st.booleans(), same_bucket=st.booleans(),
    chunk=st.one_of(st.none(), st.integers(1, 12)), seed=st.integers(0, 10**6),
)
def test_lsh_attention_equals_dense_with_its_mask(b, hkv, rep, n, n_buckets, n_hashes, causal, shared, same_bucket, chunk, seed):
    q, k, v = qkv(b, hkv * rep, n, 5, seed, hkv=hkv)
    if shared:
        k, v = None, v.repeat_interleave(rep, dim=1)
    rot = random_rotations(5, n_buckets, n_hashes, torch.Generator().manual_seed(seed))
    kwargs = dict(n_hashes=n_hashes, causal=causal, chunk_size=chunk, shared_qk=shared, rotations=rot,
                  same_bucket_only=same_bucket)
    got = lsh_attention(q, k, v, n_buckets, **kwargs)
    mask = lsh_mask(q, k, n_buckets, **kwargs)
    keys = torch.nn.functional.normalize(q, dim=-1) if shared else k
    ref = attention(q, keys, v, mask=mask)
    assert not torch.isnan(got).any()
    assert (got - ref).abs().max() < 1e-10
    if shared:
        assert mask.any(-1).all(), "with shared QK every token attends somewhere (itself at worst)"


def test_lsh_with_one_chunk_is_full_attention_and_shared_qk_skips_self():
    q, k, v = qkv(2, 2, 19, 4, seed=5)
    full = lsh_attention(q, k, v, 4, chunk_size=19, same_bucket_only=False, causal=True, generator=torch.Generator())
    assert (full - attention(q, k, v, causal=True)).abs().max() < 1e-10
    shared = lsh_attention(q, None, v, 4, chunk_size=19, same_bucket_only=False, causal=True, shared_qk=True)
    no_self = M.causal_mask(19) & ~torch.eye(19, dtype=torch.bool)
    no_self[0, 0] = True  # position 0 has no other key: it attends to itself
    ref = attention(q, torch.nn.functional.normalize(q, dim=-1), v, mask=no_self)
    assert (shared - ref).abs().max() < 1e-10


def test_lsh_buckets_group_similar_vectors_and_more_hashes_reduce_error():
    gen = torch.Generator().manual_seed(0)
    rot = random_rotations(8, 8, 1, gen)
    x = torch.randn(1, 1, 1, 8, generator=gen, dtype=torch.float64)
    near = x + 1e-3 * torch.randn(1, 1, 1, 8, generator=gen, dtype=torch.float64)
    assert lsh_hash(x, rot).item() == lsh_hash(near, rot).item() == lsh_hash(3.0 * x, rot).item()
    assert lsh_hash(x, rot).item() != lsh_hash(-x, rot).item()  # opposite directions never collide
    q, k, v = qkv(1, 2, 64, 8, seed=1)
    exact = attention(q, k, v)
    errors = []
    for n_hashes in (1, 4, 16):
        out = lsh_attention(q, k, v, n_buckets=8, n_hashes=n_hashes, generator=torch.Generator().manual_seed(2))
        errors.append(float((out - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2], errors


def test_collision_probability_matches_hyperplane_theory():
    angles = torch.linspace(0, math.pi, 7)
    measured = collision_probability(angles, d=16, n_buckets=2, n_trials=4000, generator=torch.Generator().manual_seed(0))
    theory = 1 - angles / math.pi
    assert (measured - theory).abs().max() < 0.04, (measured, theory)
    more = collision_probability(angles, d=16, n_buckets=8, n_trials=4000, generator=torch.Generator().manual_seed(0))
    assert more[0] == 1 and (more[1:-1] < measured[1:-1]).all()


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(n_buckets=3), "n_buckets"), (dict(n_buckets=0), "n_buckets"), (dict(n_buckets=4, n_hashes=0), "n_hashes"),
     (dict(n_buckets=4, chunk_size=0), "chunk_size"), (dict(n_buckets=4, shared_qk=True), "k must be None"),
     (dict(n_buckets=4, rotations=torch.randn(1, 4, 2, dtype=torch.float64)), "rotations")],
)
def test_lsh_argument_errors(kwargs, name):
    q, k, v = qkv(1, 1, 10, 5, seed=0)
    with pytest.raises(ValueError, match=name):
        lsh_attention(q, k, v, **kwargs)


# ------------------------------------------------------------------------------------------------ printed-book facade
def test_chapter_09_attention_complexity_examples(capsys):
    import numpy as np

    from dldna.chapter_09 import attention_complexity_examples as ex

    assert ex.calculate_efficiency is ex.calcualte_efficieny
    ex.calcualte_efficieny()
    printed = capsys.readouterr().out
    assert printed.count("Output shape: (2, 8, 4)") == 3
    assert "Block Sparse" in printed and "25.0% of full" in printed
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 10, 4)) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(t)[:, None] for t in (q, k, v))
    out = ex.sliding_window_attention(q, k, v, 4)
    assert isinstance(out, np.ndarray)
    ref = attention(tq, tk, tv, mask=M.sliding_window_mask(10, 4, causal=False))[:, 0].numpy()
    assert np.abs(out - ref).max() < 1e-12
    ref = attention(tq, tk, tv, mask=M.block_sparse_mask(10, 5, torch.eye(2, dtype=torch.bool)))[:, 0].numpy()
    assert np.abs(ex.sparse_block_attention(q, k, v, 5) - ref).max() < 1e-12
    with pytest.raises(ValueError, match="block_size"):
        ex.sparse_block_attention(q, k, v, 3)  # the printed code silently dropped the last token here
    low = ex.low_rank_attention(q, k, v, 3)
    assert low.shape == (2, 10, 4) and np.array_equal(low, ex.low_rank_attention(q, k, v, 3)), "seeded"
    assert ex.calculate_memory(16384, "sparse", 256, 64, 8) == 16384 * 64


# ------------------------------------------------------------------------------------------------ measurements
def test_measure_zoo_and_benchmark_script(tmp_path):
    import importlib.util
    import json

    from dldna.attention.zoo import crossover_n, zoo_errors

    spec = importlib.util.spec_from_file_location("attention_zoo_bench", "benchmarks/attention_zoo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = bench.main(["--device", "cpu", "--sizes", "64", "128", "--repeats", "1", "--heads", "1", "--threads", "1",
                       "--block-size", "32", "--no-memory-bar", "--out-dir", str(tmp_path)])
    stored = json.loads((tmp_path / "attention_zoo_cpu.json").read_text())
    assert stored["data"]["config"]["seq_lengths"] == [64, 128] and stored["command"].startswith("python benchmarks/")
    recs = {(r["method"], r["n"]): r for r in data["records"]}
    assert len(recs) == 2 * 8 and all(r["time_s"] > 0 and r["peak_mb"] > 0 for r in recs.values())
    assert recs[("dense", 128)]["peak_mb"] > 3 * recs[("dense", 64)]["peak_mb"]  # N^2 scores
    assert data["slopes"]["performer"]["memory"] < 1.3  # FAVOR+ memory grows linearly
    fake = {"records": [{"method": "a", "n": n, "time_s": t} for n, t in ((1, 5), (2, 1), (4, 3), (8, 1))]
            + [{"method": "b", "n": n, "time_s": 2} for n in (1, 2, 4, 8)]}
    assert crossover_n(fake, "a", "b") == 8
    errors = zoo_errors(n=67, head_dim=8, window=8, block_size=16, k_proj=16, num_features=32, lsh_chunk=8)
    assert errors["sliding_window"]["vs_own_mask"] < 1e-12 and errors["block_sparse"]["vs_own_mask"] < 1e-12
    assert errors["sliding_window"]["vs_full"] > 1e-3  # it is a different (sparser) attention, not an approximation


def test_value_dim_may_differ_and_v_identity_returns_the_attention_matrix():
    q, k, _ = qkv(1, 2, 12, 4, seed=8)
    eye = torch.eye(12, dtype=torch.float64).expand(1, 2, 12, 12)
    probs = sliding_window_attention(q, k, eye, 5, causal=False)
    assert (probs - attention(q, k, eye, mask=M.sliding_window_mask(12, 5, causal=False))).abs().max() < 1e-12
    assert (probs.sum(-1) - 1).abs().max() < 1e-12
    layout = M.bigbird_block_layout(4, 3, 1, 1, 0)
    blocks = block_sparse_attention(q, k, eye, layout, 3)
    assert (blocks - attention(q, k, eye, mask=M.block_sparse_mask(12, 3, layout))).abs().max() < 1e-12
    lsh = lsh_attention(q, k, eye, 4, 2, generator=torch.Generator().manual_seed(0))
    assert (lsh.sum(-1) - 1).abs().max() < 1e-12
