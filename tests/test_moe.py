"""Sparse MoE (chapter 12): equality with HF Mixtral, routing invariants, sorted dispatch vs a per-token loop,
capacity dropping, the auxiliary losses against their formulas, and parameter counts."""
import math

import pytest
import torch

from dldna.models.moe import (MoEConfig, MoEForCausalLM, SparseMoeBlock, dense_moe_reference, expert_capacity,
                              load_balancing_loss, moe_parameter_counts, route_top_k, router_z_loss)


def _block(dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=24, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2,
                  num_attention_heads=4, num_key_value_heads=2)
    cfg = MoEConfig.tiny(**{**kwargs, **overrides})
    block = SparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():  # O(1) outputs, so that 1e-5 is a meaningful tolerance
        for p in block.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return cfg, block


def test_block_equals_hf_mixtral_both_ways():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg, ours = _block()
    hf = MixtralSparseMoeBlock(transformers.MixtralConfig(**cfg.to_hf_kwargs()))
    assert set(hf.state_dict()) == set(ours.state_dict())
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(3, 13, cfg.hidden_size)
    expected = hf(x)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    # and the other way: fresh HF weights into ours
    _, ours2 = _block(seed=1)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours2.load_state_dict(hf.state_dict())
    torch.testing.assert_close(ours2(x), hf(x), atol=1e-5, rtol=1e-5)


def test_causal_lm_equals_hf_mixtral_logits_and_aux_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = MoEConfig.tiny(router_aux_loss_coef=0.02)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg.to_hf_kwargs())).eval()
    ours = MoEForCausalLM(cfg).eval()
    assert set(hf.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(3, cfg.vocab_size, (2, 11))
    h = hf(ids, labels=ids, output_router_logits=True)
    o = ours(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(o.logits, h.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.aux_loss, h.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(o.loss, h.loss, atol=1e-5, rtol=1e-5)
    hf.load_state_dict(ours.state_dict())  # and back


def test_every_token_gets_exactly_k_experts_with_weights_summing_to_one():
    cfg, block = _block()
    x = torch.randn(2, 17, cfg.hidden_size)
    block(x)
    r = block.routing
    assert r.selected_experts.shape == (34, cfg.num_experts_per_tok)
    sorted_sel = r.selected_experts.sort(-1).values
    assert bool((sorted_sel[:, 1:] != sorted_sel[:, :-1]).all())  # k distinct experts per token
    torch.testing.assert_close(r.routing_weights.sum(-1), torch.ones(34))
    assert bool((r.routing_weights > 0).all())
    # the chosen experts are those with the k largest logits, the weights the softmax of those logits
    top = r.router_logits.topk(cfg.num_experts_per_tok, -1)
    assert torch.equal(r.selected_experts, top.indices)
    torch.testing.assert_close(r.routing_weights, top.values.softmax(-1))
    assert r.expert_counts.sum() == 34 * cfg.num_experts_per_tok and bool(r.kept.all())


def test_route_top_k_equals_full_softmax_then_renormalise():
    logits = torch.randn(50, 8, dtype=torch.float64)
    w, e = route_top_k(logits, 3)
    full = logits.softmax(-1).gather(-1, e)
    torch.testing.assert_close(w.double(), full / full.sum(-1, keepdim=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k,experts,tokens", [(1, 4, 1), (2, 5, 37), (3, 7, 29)])
def test_sorted_dispatch_equals_per_token_loop(k, experts, tokens):
    cfg, block = _block(torch.float64, num_local_experts=experts, num_experts_per_tok=k)
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(block(x), dense_moe_reference(block, x), atol=1e-12, rtol=1e-12)


def test_gradients_match_the_per_token_loop():
    cfg, block = _block(torch.float64)
    x = torch.randn(1, 9, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(block(x).square().sum(), [x, block.gate.weight, block.experts.down_proj])
    g2 = torch.autograd.grad(dense_moe_reference(block, x).square().sum(), [x, block.gate.weight,
                                                                            block.experts.down_proj])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert g1[1].abs().sum() > 0  # the router learns through the mixing weights


def test_capacity_drops_lowest_priority_assignments():
    cfg, block = _block(torch.float64, capacity_factor=0.5)
    t = 40
    x = torch.randn(1, t, cfg.hidden_size, dtype=torch.float64)
    y = block(x)
    r = block.routing
    cap = expert_capacity(t, cfg.num_local_experts, cfg.num_experts_per_tok, 0.5)
    assert r.capacity == cap == math.ceil(0.5 * t * 2 / 5)
    # reference priority: all first choices in token order, then all second choices
    used = [0] * cfg.num_local_experts
    kept = torch.zeros(t, 2, dtype=torch.bool)
    for j in range(2):
        for i in range(t):
            e = int(r.selected_experts[i, j])
            if used[e] < cap:
                used[e] += 1
                kept[i, j] = True
    assert torch.equal(r.kept, kept) and not bool(kept.all())
    assert r.dropped_fraction == pytest.approx(1 - kept.double().mean().item())
    expected = torch.stack([sum(r.routing_weights[i, j].double() * block.experts.expert_forward(
        int(r.selected_experts[i, j]), x[0, i:i + 1])[0] for j in range(2) if kept[i, j])
        if kept[i].any() else torch.zeros(cfg.hidden_size, dtype=torch.float64) for i in range(t)])
    torch.testing.assert_close(y[0], expected, atol=1e-12, rtol=1e-12)
    # a generous capacity drops nothing and equals the uncapped block
    block.capacity_factor = float(cfg.num_local_experts)
    torch.testing.assert_close(block(x), dense_moe_reference(block, x), atol=1e-12, rtol=1e-12)
    assert bool(block.routing.kept.all())


def test_load_balancing_loss_equals_formula_and_hf():
    torch.manual_seed(0)
    layers = [torch.randn(30, 6) for _ in range(3)]
    k = 2
    # the formula written out: E * sum_e (assignments to e / T) * (mean router probability of e)
    logits = torch.cat(layers)
    probs = logits.softmax(-1)
    top = probs.topk(k, -1).indices
    f = torch.tensor([(top == e).sum().item() / logits.shape[0] for e in range(6)])
    p = probs.mean(0)
    expected = 6 * (f * p).sum()
    torch.testing.assert_close(load_balancing_loss(layers, k), expected)
    torch.testing.assert_close(load_balancing_loss(logits, k), expected)
    # masked tokens are excluded
    mask = torch.ones(2, 15)
    mask[0, :4] = 0
    keep = mask.reshape(-1).bool().repeat(3)
    torch.testing.assert_close(load_balancing_loss(layers, k, mask), load_balancing_loss(logits[keep], k))
    # a router that sends everything to expert 0 with probability ~1 scores E (k=1); uniform routing scores 1
    assert load_balancing_loss(torch.tensor([[20.0, 0, 0, 0]]).repeat(8, 1), 1).item() == pytest.approx(4, rel=1e-6)
    balanced = torch.eye(4).repeat(2, 1) * 1e-3  # each expert chosen twice, probabilities ~1/4
    assert load_balancing_loss(balanced, 1).item() == pytest.approx(1.0, rel=1e-3)
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.testing.assert_close(load_balancing_loss(layers, k), load_balancing_loss_func(tuple(layers), 6, k))
    torch.testing.assert_close(load_balancing_loss(layers, k, mask),
                               load_balancing_loss_func(tuple(layers), 6, k, mask))


def test_router_z_loss_formula():
    logits = torch.randn(7, 4)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    assert router_z_loss([logits[:3], logits[3:]]).item() == pytest.approx(expected, rel=1e-5)


def test_losses_are_added_with_their_coefficients():
    torch.manual_seed(0)
    cfg = MoEConfig.tiny(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    model = MoEForCausalLM(cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 9))
    plain = model(ids, labels=ids, output_router_logits=False)
    full = model(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and len(full.router_logits) == cfg.num_hidden_layers
    torch.testing.assert_close(full.loss, plain.loss + 0.1 * full.aux_loss + 0.01 * full.z_loss)
    full.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_parameter_counts_match_the_model_and_mixtral():
    for cfg in (MoEConfig.tiny(), MoEConfig.tiny(moe_layers=[1], tie_word_embeddings=True, num_hidden_layers=3)):
        model = MoEForCausalLM(cfg)
        counts = moe_parameter_counts(cfg)
        assert counts["total"] == model.num_parameters() == sum(p.numel() for p in set(model.parameters()))
        assert counts["active"] == model.num_active_parameters()
    mixtral = moe_parameter_counts(MoEConfig.mixtral_8x7b())
    assert round(mixtral["total"] / 1e9, 1) == 46.7  # Jiang et al. 2024: 46.7B total
    assert round(mixtral["active"] / 1e9, 1) == 12.9  # 12.9B active per token


def test_moe_generation_cached_equals_uncached():
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig.tiny()).double()
    ids = torch.randint(3, 128, (1, 5))
    a = model.generate(ids, max_new_tokens=8, temperature=0, eos_token_id=None)
    b = model.generate(ids, max_new_tokens=8, temperature=0, eos_token_id=None, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [dict(num_experts_per_tok=5), dict(num_local_experts=0), dict(capacity_factor=0.0),
                                 dict(moe_layers=[7]), dict(router_aux_loss_coef=-1.0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        MoEConfig.tiny(**bad)


def test_toy_languages_are_seeded_and_follow_their_lexicons():
    from dldna.data.toy_languages import ToyLanguages, toy_language_batches

    a, b = ToyLanguages(seed=3), ToyLanguages(seed=3)
    ids_a, lang_a = a.sample(6, 80, torch.Generator().manual_seed(1))
    ids_b, lang_b = b.sample(6, 80, torch.Generator().manual_seed(1))
    assert torch.equal(ids_a, ids_b) and torch.equal(lang_a, lang_b)
    assert ids_a.min() >= 0 and ids_a.max() < a.vocab_size
    for row, lang in zip(ids_a, lang_a):
        words = a.decode(row).split(" ")[:-1]  # the last word may be cut
        lexicon = {a.decode(w) for w in a.lexicons[int(lang)]}
        assert words and all(w in lexicon for w in words)
        # consecutive words follow the language's transition table
        index = {a.decode(w): i for i, w in enumerate(a.lexicons[int(lang)])}
        for w1, w2 in zip(words, words[1:]):
            assert index[w2] in a.successors[int(lang), index[w1]].tolist()
    torch.testing.assert_close(a.successor_probs.sum(-1), torch.ones(4, 64))
    batch = next(toy_language_batches(a, 3, 20, with_language=True))
    assert torch.equal(batch["input_ids"], batch["labels"]) and batch["language"].shape == (3,)
    assert a.decode(a.encode("ab c")) == "ab c"
