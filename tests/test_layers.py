"""Tests for dldna.models.layers: RoPE and RMSNorm against HF/torch, positions, ALiBi, gated MLPs."""
import math

import pytest
import torch
from torch import nn

from dldna.attention import attention
from dldna.config import seed_everything
from dldna.models.layers import (GatedMLP, GeGLU, LearnedPositionalEmbedding, RMSNorm, RotaryEmbedding,
                                 SinusoidalPositionalEmbedding, SwiGLU, alibi_bias, alibi_slopes,
                                 apply_rotary_pos_emb, rotate_half, sinusoidal_position_encoding)


@pytest.mark.parametrize("head_dim,base", [(16, 10000.0), (64, 1e6), (10, 500.0)])
def test_rotary_equals_hf_mistral(head_dim, base):
    hf = pytest.importorskip("transformers.models.mistral.modeling_mistral")
    from transformers import MistralConfig

    seed_everything(0)
    heads = 3
    cfg = MistralConfig(hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=heads,
                        head_dim=head_dim, rope_theta=base, max_position_embeddings=4096)
    theirs = hf.MistralRotaryEmbedding(cfg)
    ours = RotaryEmbedding(head_dim, base=base)
    q = torch.randn(2, heads, 7, head_dim)
    k = torch.randn(2, heads, 7, head_dim)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 17, 18, 100, 2047, 3000, 5]])  # any ids, past the max
    cos, sin = ours(q, position_ids)
    cos_hf, sin_hf = theirs(q, position_ids)
    torch.testing.assert_close(cos, cos_hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf, rtol=0, atol=1e-6)
    ours_q, ours_k = apply_rotary_pos_emb(q, k, cos, sin)
    hf_q, hf_k = hf.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(ours_q, hf_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_k, hf_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(rotate_half(q), hf.rotate_half(q))


def test_rotary_bf16_angles_computed_in_float32():
    ours = RotaryEmbedding(32)
    pos = torch.arange(4000)[None]
    cos16, _ = ours(torch.zeros(1, dtype=torch.bfloat16), pos)
    cos32, _ = ours(torch.zeros(1), pos)
    assert cos16.dtype == torch.bfloat16
    # only the final cast is bf16: error within bf16 rounding of a value in [-1, 1]
    assert (cos16.float() - cos32).abs().max() <= 2 ** -8


def test_rotary_table_lookup_equals_direct_angles_for_int_negative_and_fractional_positions():
    rope = RotaryEmbedding(16, base=500.0, max_position_embeddings=8)
    x = torch.zeros(1)
    for pos in (torch.arange(37)[None], torch.tensor([[-3, -1, 0, 5]]), torch.arange(37)[None] / 4.0):
        cos, sin = rope(x, pos)
        angles = pos.double()[..., None] * (1.0 / 500.0 ** (torch.arange(0, 16, 2).double() / 16))
        angles = torch.cat((angles, angles), dim=-1)
        torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-5)
        torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-5)
    assert rope.cos_cached.shape[0] == 64  # the table grew (by doubling) to cover position 36


def test_rope_scores_depend_only_on_relative_position():
    seed_everything(0)
    dim = 32
    rope = RotaryEmbedding(dim, base=100.0)
    q = torch.randn(1, 1, 1, dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, dim, dtype=torch.float64)

    def score(m, n):
        cos_m, sin_m = rope(q, torch.tensor([[m]]))
        cos_n, sin_n = rope(q, torch.tensor([[n]]))
        qm, _ = apply_rotary_pos_emb(q, q, cos_m.double(), sin_m.double())
        kn, _ = apply_rotary_pos_emb(k, k, cos_n.double(), sin_n.double())
        return float((qm * kn).sum())

    for offset in (0, 3, -5, 40):
        values = [score(m, m - offset) for m in (50, 77, 200, 1000)]
        # angles are float32 (as in HF): at position 1000 each carries up to ~6e-5 rad of rounding
        assert max(values) - min(values) < 1e-4 * float(q.norm() * k.norm())
    assert abs(score(10, 0) - score(10, 3)) > 0.1  # and it does depend on the offset
    # norms are preserved: rotations
    cos, sin = rope(q, torch.tensor([[123]]))
    qr, _ = apply_rotary_pos_emb(q, q, cos.double(), sin.double())
    assert float(qr.norm()) == pytest.approx(float(q.norm()), rel=1e-7)  # cos^2 + sin^2 = 1 up to float32


def test_partial_rotary_leaves_the_rest_untouched():
    seed_everything(0)
    q, k = torch.randn(2, 2, 5, 12), torch.randn(2, 2, 5, 12)
    cos, sin = RotaryEmbedding(8)(q, torch.arange(5))
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(qr[..., 8:], q[..., 8:]) and torch.equal(kr[..., 8:], k[..., 8:])
    assert not torch.allclose(qr[..., 1:, :8], q[..., 1:, :8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_equals_torch(dtype):
    seed_everything(0)
    ours = RMSNorm(24, eps=1e-5).to(dtype)
    theirs = nn.RMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 24, dtype=dtype) * 3 + 1
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours(x).to(dtype), theirs(x), **tol)


def test_rmsnorm_equals_layernorm_on_zero_mean_inputs():
    seed_everything(0)
    x = torch.randn(4, 33, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    ln = nn.LayerNorm(33, eps=1e-6, elementwise_affine=False, dtype=torch.float64)
    torch.testing.assert_close(RMSNorm(33, eps=1e-6).double()(x), ln(x))
    y = x + 2.0  # with a mean the two differ
    assert not torch.allclose(RMSNorm(33, eps=1e-6).double()(y), ln(y))


def test_sinusoidal_positions_match_the_paper_formula():
    pe = sinusoidal_position_encoding(torch.arange(50), 16)
    p, i = 37, 3
    assert float(pe[p, 2 * i]) == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert float(pe[p, 2 * i + 1]) == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert torch.equal(SinusoidalPositionalEmbedding(16)(torch.arange(50)), pe)
    # PE[p + k] is a fixed linear map (a rotation per pair) of PE[p]: the property Vaswani et al. mention
    k = 5
    theta = 1 / 10000 ** (2 * torch.arange(8, dtype=torch.float64) / 16)
    c, s = torch.cos(k * theta), torch.sin(k * theta)
    pe64 = sinusoidal_position_encoding(torch.arange(60), 16).double()
    sin_p, cos_p = pe64[:-k, 0::2], pe64[:-k, 1::2]
    torch.testing.assert_close(sin_p * c + cos_p * s, pe64[k:, 0::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(cos_p * c - sin_p * s, pe64[k:, 1::2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_position_encoding(torch.arange(3), 7)
    with pytest.raises(ValueError, match="position_ids"):
        sinusoidal_position_encoding(torch.arange(3.0), 8)


def test_learned_positions_refuse_to_extrapolate():
    seed_everything(0)
    emb = LearnedPositionalEmbedding(64, 8)
    out = emb(torch.arange(64)[None])
    assert out.shape == (1, 64, 8) and torch.equal(out[0], emb.weight)
    assert 0.01 < float(emb.weight.detach().std()) < 0.03
    with pytest.raises(ValueError, match="extrapolate"):
        emb(torch.arange(65))


def test_alibi_slopes_match_the_paper_and_bloom():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for heads in (1, 6, 12, 16, 24):
        mask = torch.ones(1, 5)
        # BLOOM's tensor is slope_h * j; recover the slopes from position j = 1
        theirs = bloom.build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]
        torch.testing.assert_close(alibi_slopes(heads), theirs)


def test_alibi_bias_values_and_softmax_equivalence_with_bloom():
    heads, n = 6, 9
    bias = alibi_bias(heads, n)
    slopes = alibi_slopes(heads)
    assert bias.shape == (heads, n, n)
    assert float(bias[2, 7, 3]) == pytest.approx(-float(slopes[2]) * 4)
    assert torch.equal(bias, bias.transpose(-1, -2)) and torch.all(bias.diagonal(dim1=-2, dim2=-1) == 0)
    # decoding: the last 2 query rows of the full bias
    assert torch.equal(alibi_bias(heads, 2, n), bias[:, -2:])
    # causal softmax equals BLOOM's "slope * j" form (softmax is shift-invariant per row)
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    seed_everything(0)
    scores = torch.randn(heads, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    ours = torch.softmax((scores + bias).masked_fill(~causal, float("-inf")), -1)
    theirs_bias = bloom.build_alibi_tensor(torch.ones(1, n), heads, torch.float32).view(heads, 1, n)
    theirs = torch.softmax((scores + theirs_bias).masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="q_len"):
        alibi_bias(2, 5, 3)
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


def test_alibi_attention_penalises_distance():
    # with identical keys, ALiBi attention weights decay geometrically with distance: ratio exp(-slope)
    heads, n = 4, 6
    q = torch.zeros(1, heads, n, 8, dtype=torch.float64)
    k = torch.zeros(1, heads, n, 8, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64)[None, None].expand(1, heads, n, n)
    scores = alibi_bias(heads, n).double()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    weights = torch.softmax((q @ k.transpose(-1, -2) + scores).masked_fill(~causal, float("-inf")), -1) @ v
    slopes = alibi_slopes(heads).double()
    ratio = weights[0, :, -1, -2] / weights[0, :, -1, -1]
    torch.testing.assert_close(ratio, torch.exp(-slopes))
    # no bias and no positions: uniform over the causal prefix, as the dense reference gives
    ref = attention(q, k, v, causal=True)
    torch.testing.assert_close(ref[0, 0, -1], torch.full((n,), 1 / n, dtype=torch.float64))


def test_gated_mlps():
    seed_everything(0)
    x = torch.randn(2, 3, 8)
    swi, geg = SwiGLU(8, 12), GeGLU(8, 12)
    expect = swi.down_proj(nn.functional.silu(swi.gate_proj(x)) * swi.up_proj(x))
    torch.testing.assert_close(swi(x), expect)
    expect = geg.down_proj(nn.functional.gelu(geg.gate_proj(x)) * geg.up_proj(x))
    torch.testing.assert_close(geg(x), expect)
    assert sum(p.numel() for p in swi.parameters()) == 3 * 8 * 12
    with pytest.raises(ValueError, match="act"):
        GatedMLP(8, 12, act="tanh")


def test_rotary_table_is_cached_extended_on_demand_and_exact():
    import torch

    from dldna.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(16, base=500.0, max_position_embeddings=8)
    x = torch.zeros(1)
    cos, sin = rope(x, torch.arange(5))
    assert rope.cos_cached.shape == (8, 16)  # the initial table
    cos_far, _ = rope(x, torch.tensor([[3, 100]]))
    assert rope.cos_cached.shape[0] == 128  # extended to the next power of two
    direct = torch.cat([torch.tensor([3.0, 100.0])[:, None] * rope.inv_freq] * 2, -1).cos()
    assert torch.equal(cos_far[0], direct)  # table lookup gives exactly the directly computed angles
    neg, _ = rope(x, torch.tensor([[-1, 0]]))
    assert torch.equal(neg[0, 0], torch.cat([-rope.inv_freq] * 2).cos())
    assert "cos_cached" not in rope.state_dict()  # derived, never saved
