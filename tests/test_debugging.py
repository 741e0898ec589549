"""Chapter 16's debugging tools must catch the bugs they are shown catching (and stay silent on correct code)."""
import math

import pytest
import torch

from dldna.attention import attention
from dldna.attention.masks import sliding_window_mask
from dldna.debugging import NonFiniteError, cached_vs_full, causal_leak, detect_non_finite, overfit_one_batch, profile_table
from dldna.models.mistral import MistralConfig, MistralForCausalLM


@pytest.fixture(scope="module")
def tiny_mistral():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def test_causal_leak_zero_for_causal_window_and_positive_for_centred_window():
    x = torch.randn(1, 2, 20, 8, dtype=torch.float64)

    def run(mask):
        return lambda inp: attention(inp, inp, inp, mask=mask).transpose(1, 2)

    causal = run(sliding_window_mask(20, 4, causal=True))
    centred = run(sliding_window_mask(20, 4, causal=False))
    inputs = x.transpose(1, 2)  # (B, N, H, D): the sequence on axis 1
    assert causal_leak(lambda t: causal(t.transpose(1, 2)), inputs, 10) == 0.0
    assert causal_leak(lambda t: centred(t.transpose(1, 2)), inputs, 10) > 1e-3


def test_model_is_causal_and_cache_matches_full_forward(tiny_mistral):
    ids = torch.randint(0, 50, (2, 15), generator=torch.Generator().manual_seed(1))
    assert causal_leak(lambda t: tiny_mistral(t, use_cache=False).logits, ids, 7) == 0.0
    assert cached_vs_full(tiny_mistral, ids, prefix=4) < 1e-5


def test_cache_position_bug_is_caught(tiny_mistral):
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2))
    # the printed bug: decoded queries restart at position 0
    wrong = cached_vs_full(tiny_mistral, ids, prefix=4, position_ids_fn=lambda step, b: torch.zeros(b, 1, dtype=torch.long))
    right = cached_vs_full(tiny_mistral, ids, prefix=4)
    assert right < 1e-5 and wrong > 100 * max(right, 1e-7), (right, wrong)


def test_detect_non_finite_names_the_first_bad_module():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    with detect_non_finite(model), pytest.raises(NonFiniteError, match=r"0 \(Linear\)"):
        model(torch.full((1, 4), 1e10))
    model[0].weight.data.fill_(0.1)
    with detect_non_finite(model):
        assert torch.isfinite(model(torch.ones(1, 4))).all()
    assert not model[0]._forward_hooks  # hooks removed on exit


def test_overfit_one_batch_drives_loss_down(tiny_mistral):
    torch.manual_seed(0)
    model = MistralForCausalLM(tiny_mistral.config)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(3))
    losses = overfit_one_batch(model, {"input_ids": ids, "labels": ids}, steps=60, lr=1e-2)
    assert losses[0] > math.log(50) - 1 and losses[-1] < 0.2, (losses[0], losses[-1])


def test_profile_table_lists_matmuls():
    a = torch.randn(64, 64)
    assert "aten::mm" in profile_table(lambda: a @ a)
