"""dldna.models.generation: sampling processors against HF's, the decoding loop's contract (cache, padding, eos),
and the sampled distribution. A tiny table-driven model keeps every check exact and fast."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dldna.models.cache import KVCache
from dldna.models.generation import (CausalLMOutput, apply_repetition_penalty, causal_lm_loss, generate,
                                     next_token_scores, top_k_filter, top_p_filter)

VOCAB = 7


class BigramLM(nn.Module):
    """logits(next) = table[last token] + 0.1 * position: the position term makes wrong positions visible.

    Follows the generate() contract; it records every call so tests can check what the loop passed.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        self.calls.append((input_ids.shape[1], None if position_ids is None else position_ids.clone(), use_cache))
        if use_cache and past_key_values is None:
            past_key_values = KVCache(1)
        if past_key_values is not None:
            step = past_key_values.begin(torch.ones_like(input_ids, dtype=torch.bool))
            del step
        logits = self.table[input_ids] + 0.1 * position_ids[..., None].float()
        return CausalLMOutput(logits=logits, past_key_values=past_key_values if use_cache else None)


def reference_greedy(model, ids, mask, n):
    """Step-by-step greedy with explicit positions, written independently of generate()."""
    ids, mask = ids.clone(), mask.clone()
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model.table[ids[:, -1]] + 0.1 * pos[:, -1:].float()
        nxt = logits.argmax(-1)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def test_processors_equal_hf_logits_processors():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 9), generator=g)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores, ids, 1.3), theirs)
    for k in [1, 5, 50]:
        torch.testing.assert_close(top_k_filter(scores, k), transformers.TopKLogitsWarper(k)(ids, scores.clone()))
    for p in [0.05, 0.5, 0.9, 0.999]:
        torch.testing.assert_close(top_p_filter(scores, p), transformers.TopPLogitsWarper(p)(ids, scores.clone()))
    chain = transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(1.3),
                                              transformers.TemperatureLogitsWarper(0.7),
                                              transformers.TopKLogitsWarper(10), transformers.TopPLogitsWarper(0.8)])
    ours = next_token_scores(scores, ids, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    torch.testing.assert_close(ours, chain(ids, scores.clone()))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(top_p_filter(logits, 0.01))[0].tolist() == [True, False, False, False]


def test_greedy_with_cache_left_padding_and_positions():
    model = BigramLM()
    ids = torch.tensor([[0, 0, 3, 4], [5, 1, 2, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = generate(model, ids, max_new_tokens=6, do_sample=False, attention_mask=mask)
    assert torch.equal(out, reference_greedy(model, ids, mask, 6))
    n_new, first_pos, cached = model.calls[0]
    assert n_new == 4 and cached and first_pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert all(c[0] == 1 for c in model.calls[1:]) and model.calls[1][1].tolist() == [[2], [4]]
    model.calls.clear()
    assert torch.equal(generate(model, ids, 6, do_sample=False, attention_mask=mask, use_cache=False), out)
    assert [c[0] for c in model.calls] == [4, 5, 6, 7, 8, 9]  # the whole prefix every step


def test_eos_stops_rows_and_pads_finished_ones():
    model = BigramLM()
    with torch.no_grad():
        model.table.zero_()
        model.table[1, 2] = model.table[2, 3] = model.table[3, 6] = model.table[5, 6] = 10.0
    ids = torch.tensor([[1], [5]])
    out = generate(model, ids, max_new_tokens=8, do_sample=False, eos_token_id=6, pad_token_id=0)
    assert out.tolist() == [[1, 2, 3, 6], [5, 6, 0, 0]]  # row 2 finishes first and is padded; stop when all done
    out = generate(model, ids, max_new_tokens=8, do_sample=False, eos_token_id=[3, 6], pad_token_id=0)
    assert out.tolist() == [[1, 2, 3], [5, 6, 0]]


def test_sampling_follows_the_processed_distribution():
    model = BigramLM(seed=3)
    ids = torch.full((4000, 1), 2, dtype=torch.long)
    out = generate(model, ids, max_new_tokens=1, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out[:, 1], minlength=VOCAB).float() / 4000
    expected = next_token_scores(model.table[2][None] + 0.1 * 0, ids[:1], temperature=0.8, top_k=4).softmax(-1)[0]
    assert (counts[expected == 0] == 0).all()  # never a token outside the top 4
    assert (counts - expected).abs().max() < 0.03
    again = generate(model, ids[:50], max_new_tokens=3, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, generate(model, ids[:50], max_new_tokens=3, temperature=0.8,
                                       generator=torch.Generator().manual_seed(1)))


def test_temperature_zero_is_greedy_and_arguments_are_validated():
    model = BigramLM()
    ids = torch.tensor([[3, 1]])
    assert torch.equal(generate(model, ids, 5, temperature=0.0), generate(model, ids, 5, do_sample=False))
    assert generate(model, ids, 0).shape == (1, 2)
    for kwargs, name in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                         (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                         (dict(repetition_penalty=0.0), "repetition_penalty"),
                         (dict(attention_mask=torch.ones(1, 3)), "attention_mask")]:
        with pytest.raises(ValueError, match=name):
            generate(model, ids, **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids.float(), 2)
    assert model.training  # generate restores the training flag


def test_causal_lm_loss_shifts_and_ignores():
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.tensor([[-100, 1, 2, -100, 4], [0, 0, 0, 0, -100]])
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits, labels), manual)
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(logits, labels[:, :3])
