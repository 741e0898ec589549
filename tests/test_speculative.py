"""Speculative decoding (chapter 13): exactness of speculative sampling (chi-square against the known target
distribution, with negative controls that must fail), greedy equality with the target's greedy decoding on real
tiny Mistral models, cache roll-back, and multi-token prediction's self-speculative decoding."""
import copy

import pytest
import torch

from dldna.models import KVCache, MistralConfig, MistralForCausalLM
from dldna.models import speculative as spec
from dldna.models.speculative import (BigramLM, crop_cache, expected_acceptance_rate, expected_tokens_per_call,
                                      speculative_accept, speculative_generate)

stats = pytest.importorskip("scipy.stats")

V = 6


def _tables(peaked_draft=False):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(V, V, generator=g) * 1.5
    draft = torch.randn(V, V, generator=g) * 1.5
    if peaked_draft:  # a draft that over-proposes token 0: a wrong residual then biases the output strongly
        draft[:, 0] += 4.0
    return target, draft


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny ops: one intra-op thread is several times faster than two on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sample_runs(n_runs, k, new_tokens, temperature=1.0, seed=0, peaked_draft=False):
    t_table, d_table = _tables(peaked_draft)
    target, draft = BigramLM(t_table), BigramLM(d_table)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([[0, 3]])
    rows, accepted, drafted = [], 0, 0
    for _ in range(n_runs):
        out = speculative_generate(target, draft, prompt, new_tokens, k=k, temperature=temperature, generator=g)
        rows.append(out.sequences[0, 2:])
        accepted, drafted = accepted + out.num_accepted, drafted + out.num_drafted
    return torch.stack(rows), t_table, d_table, accepted / drafted


def _exact_marginals(t_table, first, steps, temperature=1.0):
    P = (t_table / temperature).softmax(-1).double()
    dist = torch.zeros(V, dtype=torch.float64)
    dist[first] = 1
    out = []
    for _ in range(steps):
        dist = dist @ P
        out.append(dist)
    return out, P


def _chisquare(observed, probs):
    """Pearson chi-square p-value of counts ``observed`` against the probabilities ``probs``."""
    probs = probs.double() / probs.double().sum()
    return stats.chisquare(observed.double().numpy(), (probs * observed.sum()).numpy()).pvalue


def _pvalues(samples, t_table, temperature=1.0):
    n, steps = samples.shape
    marginals, P = _exact_marginals(t_table, 3, steps, temperature)
    pvals = []
    for j in range(steps):
        observed = torch.bincount(samples[:, j], minlength=V).double()
        pvals.append(_chisquare(observed, marginals[j]))
    # joint of the last two positions (36 cells): the dependence between tokens must be right too
    pair = samples[:, -2] * V + samples[:, -1]
    observed = torch.bincount(pair, minlength=V * V).double()
    pvals.append(_chisquare(observed, (marginals[-2][:, None] * P).reshape(-1)))
    return pvals


def test_speculative_sampling_matches_the_target_distribution():
    samples, t_table, d_table, rate = _sample_runs(1500, k=3, new_tokens=4)
    pvals = _pvalues(samples, t_table)
    assert min(pvals) > 1e-3, pvals
    # the draft is poor but not useless: the measured acceptance rate is close to E[sum_x min(p, q)]
    assert 0.2 < rate < 0.9


def test_the_chi_square_test_detects_a_wrong_residual(monkeypatch):
    """Negative control: resampling from the target after a rejection (instead of the residual) is biased."""
    monkeypatch.setattr(spec, "_residual", lambda p, q: p)
    samples, t_table, _, _ = _sample_runs(600, k=3, new_tokens=4, peaked_draft=True)
    assert min(_pvalues(samples, t_table)) < 1e-6


def test_temperature_is_applied_to_the_target():
    samples, t_table, _, _ = _sample_runs(800, k=2, new_tokens=3, temperature=0.6, seed=1, peaked_draft=True)
    assert min(_pvalues(samples, t_table, 0.6)) > 1e-3
    assert min(_pvalues(samples, t_table, 1.0)) < 1e-6  # and it is not the temperature-1 distribution


def test_accept_step_first_token_and_acceptance_probability():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.1, 0.1], [0.2] * 5])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.2] * 5])
    n_trials = 6000
    first, n_acc = torch.zeros(5), 0
    for _ in range(n_trials):
        d = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(2)])
        n, nxt = speculative_accept(p, q, d, g)
        first[int(d[0]) if n > 0 else nxt] += 1
        n_acc += n > 0
    assert _chisquare(first, p[0]) > 1e-3
    alpha = expected_acceptance_rate(p[0], q[0]).item()  # 0.1+0.1+0.1+0.1+0.1 = 0.5
    assert alpha == pytest.approx(0.5)
    assert abs(n_acc / n_trials - alpha) < 4 * (alpha * (1 - alpha) / n_trials) ** 0.5


def test_identical_draft_is_always_accepted():
    t_table, _ = _tables()
    model = BigramLM(t_table)
    out = speculative_generate(model, copy.deepcopy(model), torch.tensor([[1]]), 13, k=4,
                               generator=torch.Generator().manual_seed(0))
    assert out.acceptance_rate == 1.0 and out.per_token_acceptance == 1.0 and out.sequences.shape == (1, 14)
    # guesses after a rejection are drafted but never tested
    stats = spec.SpeculativeOutput(torch.zeros(1, 1), accepted_per_round=[2, 4, 0], drafted_per_round=[4, 4, 4])
    assert (stats.num_tested, stats.acceptance_rate, stats.per_token_acceptance) == (8, 0.5, 0.75)
    assert out.target_calls == 3  # 5 + 5 + 3 tokens
    assert expected_tokens_per_call(1.0, 4) == 5 and expected_tokens_per_call(0.0, 4) == 1


def _mistrals():
    torch.manual_seed(0)
    target = MistralForCausalLM(MistralConfig.tiny(initializer_range=0.2)).double()
    torch.manual_seed(1)
    draft = MistralForCausalLM(MistralConfig.tiny(num_hidden_layers=1, initializer_range=0.2)).double()
    return target, draft


@pytest.mark.parametrize("k,new", [(1, 7), (4, 21)])
def test_greedy_speculative_equals_target_greedy(k, new):
    target, draft = _mistrals()  # window 8 < generated length: masks still apply the window on the full cache
    prompt = torch.tensor([[5, 17, 99, 42, 7]])
    expected = target.generate(prompt, max_new_tokens=new, temperature=0, eos_token_id=None)
    out = speculative_generate(target, draft, prompt, new, k=k, temperature=0)
    assert torch.equal(out.sequences, expected)
    assert out.num_drafted > 0 and 0 <= out.num_accepted < out.num_drafted  # some drafts were rejected
    # with the target as its own draft every token is accepted
    own = speculative_generate(target, copy.deepcopy(target), prompt, new, k=k, temperature=0)
    assert torch.equal(own.sequences, expected) and own.acceptance_rate == 1.0


def test_greedy_speculative_stops_at_eos_like_generate():
    target, draft = _mistrals()
    prompt = torch.tensor([[5, 17, 99, 42, 7]])
    free = target.generate(prompt, max_new_tokens=20, temperature=0, eos_token_id=None)
    eos = int(free[0, 9])  # a token the greedy continuation emits: make it the eos
    expected = target.generate(prompt, max_new_tokens=20, temperature=0, eos_token_id=eos)
    out = speculative_generate(target, draft, prompt, 20, k=3, temperature=0, eos_token_id=eos)
    assert torch.equal(out.sequences, expected) and int(out.sequences[0, -1]) == eos


def test_crop_cache_equals_a_fresh_prefix():
    target, _ = _mistrals()
    ids = torch.randint(3, 128, (1, 12))
    cache = spec._full_cache(target)
    target(ids, past_key_values=cache, use_cache=True)
    crop_cache(cache, 7)
    assert cache.get_seq_length() == 7 and cache.keys[0].shape[-2] == 7
    a = target(ids[:, 7:9], past_key_values=cache, use_cache=True).logits
    b = target(ids[:, :9], use_cache=False).logits[:, 7:9]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):  # a rolling buffer cannot be rolled back
        crop_cache(KVCache(2, sliding_window=8), 0)


def test_argument_validation():
    target, draft = _mistrals()
    with pytest.raises(ValueError):
        speculative_generate(target, draft, torch.tensor([[1, 2], [3, 4]]), 3)
    with pytest.raises(ValueError):
        speculative_generate(target, draft, torch.tensor([[1, 2]]), 3, k=-1)
    with pytest.raises(ValueError):
        speculative_generate(target, BigramLM(torch.zeros(5, 5)), torch.tensor([[1, 2]]), 3, temperature=0)


# ---------------------------------------------------------------- multi-token prediction (self-speculative)
from dldna.models.generation import generate  # noqa: E402
from dldna.models.mtp import MultiTokenPredictionLM, mtp_generate  # noqa: E402


def test_mtp_loss_is_the_mean_of_shifted_head_losses():
    torch.manual_seed(0)
    model = MultiTokenPredictionLM(MistralConfig.tiny(), n_future=3)
    ids = torch.randint(3, 128, (2, 9))
    out = model(ids, labels=ids)
    expected = [torch.nn.functional.cross_entropy(out.head_logits[i, :, :9 - 1 - i].reshape(-1, 128),
                                                  ids[:, 1 + i:].reshape(-1)) for i in range(3)]
    torch.testing.assert_close(out.head_losses, torch.stack(expected))
    torch.testing.assert_close(out.loss, torch.stack(expected).mean())
    torch.testing.assert_close(out.logits, model(ids).logits)  # head 1 is the model's next-token output


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_mtp_self_speculative_equals_greedy_on_a_random_model(heads):
    torch.manual_seed(0)
    model = MultiTokenPredictionLM(MistralConfig.tiny(initializer_range=0.2), n_future=3).double()
    ids = torch.randint(3, 128, (1, 5))
    out = mtp_generate(model, ids, 17, draft_heads=heads)
    assert torch.equal(out.sequences, generate(model, ids, 17, temperature=0))


def test_mtp_trained_on_counting_emits_several_tokens_per_forward():
    torch.manual_seed(0)
    vocab = 32
    model = MultiTokenPredictionLM(MistralConfig.tiny(vocab_size=vocab, sliding_window=None), n_future=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        ids = (torch.randint(0, vocab, (16, 1)) + torch.arange(10)) % vocab
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.double()
    prompt = torch.tensor([[3, 4, 5]])
    out = mtp_generate(model, prompt, 12)
    assert torch.equal(out.sequences, generate(model, prompt, 12, temperature=0))
    assert out.sequences[0].tolist() == list(range(3, 18))  # it learned to count
    assert out.tokens_per_target_call > 2.5  # 3 heads: up to 3 tokens per forward
