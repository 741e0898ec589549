"""dldna.models.phi3: parity with Hugging Face Phi3ForCausalLM, cache equivalence, config validation."""
import pytest
import torch

from dldna.models.cache import KVCache
from dldna.models.phi3 import Phi3Config, Phi3ForCausalLM, masked_attention

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_partial_rotary": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48, partial_rotary_factor=0.5),
    "sliding_window_tied": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=4, tie_word_embeddings=True),
    "gelu_odd_sizes": dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=3, intermediate_size=50,
                           hidden_act="gelu_pytorch_tanh", rope_theta=500.0),
}


def make_config(**overrides):
    base = dict(vocab_size=29, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                pad_token_id=0)
    base.update(overrides)
    return Phi3Config(**base)


def make_pair(config, seed=0):
    """An HF model with random weights and ours loaded from its state dict (fp32, eval mode)."""
    torch.manual_seed(seed)
    hf_config = transformers.Phi3Config(**config.to_hf_kwargs())
    hf_config._attn_implementation = "eager"
    hf = transformers.Phi3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises norms to ones: perturb them so a swapped norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = Phi3ForCausalLM(config).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(name):
    config = make_config(**CONFIGS[name])
    hf, ours = make_pair(config)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids = torch.randint(1, config.vocab_size, (3, 11))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids).logits
    assert got.shape == (3, 11, config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_hf_on_real_tokens():
    config = make_config(**CONFIGS["gqa_partial_rotary"])
    hf, ours = make_pair(config, seed=1)
    ids = torch.randint(1, config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = config.pad_token_id
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask).logits  # positions derived from the mask
        alone = ours(ids[1:, 3:]).logits  # the padded row without its padding
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


def test_loss_and_attentions_match_hf():
    config = make_config(**CONFIGS["sliding_window_tied"])
    hf, ours = make_pair(config, seed=2)
    ids = torch.randint(1, config.vocab_size, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        expected = hf(ids, labels=labels, output_attentions=True)
        got = ours(ids, labels=labels, output_attentions=True)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert len(got.attentions) == config.num_hidden_layers
    for a, b in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # window 4: query 9 sees keys 6..9 only
    assert got.attentions[0][0, 0, 9, :6].abs().max() == 0 and got.attentions[0][0, 0, 9, 6:].sum() > 0.99


def test_hf_loads_our_state_dict():
    config = make_config(**CONFIGS["mha"])
    torch.manual_seed(3)
    ours = Phi3ForCausalLM(config).eval()
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**config.to_hf_kwargs())).eval()
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, config.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa_partial_rotary", "sliding_window_tied"])
def test_greedy_cached_generation_equals_hf(name):
    config = make_config(**CONFIGS[name], eos_token_id=None)
    hf, ours = make_pair(config, seed=4)
    # Scale the head so greedy choices are not near-ties (a tie could flip on 1e-7 differences).
    with torch.no_grad():
        for m in (hf, ours):
            m.lm_head.weight.mul_(5.0)
    prompt = torch.randint(1, config.vocab_size, (2, 5))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=12, temperature=0.0)
    uncached = ours.generate(prompt, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert torch.equal(got, expected)
    assert torch.equal(uncached, got)


def test_cached_logits_equal_uncached_beyond_the_window():
    config = make_config(**CONFIGS["sliding_window_tied"])  # window 4, sequence 12
    torch.manual_seed(5)
    model = Phi3ForCausalLM(config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        cache = out.past_key_values
        steps = [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert isinstance(cache, KVCache) and len(cache) == 4  # the rolling buffer keeps only the window
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_count_once():
    tied = Phi3ForCausalLM(Phi3Config.tiny())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = Phi3ForCausalLM(Phi3Config.tiny(tie_word_embeddings=False))
    assert untied.num_parameters() - tied.num_parameters() == 18 * 64
    assert 120_000 < tied.num_parameters() < 130_000


def test_masked_attention_zeroes_rows_without_keys():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])[None, None]
    out, _ = masked_attention(q, k, v, mask)
    out_w, w = masked_attention(q, k, v, mask, return_weights=True)
    assert torch.isfinite(out).all() and out[0, :, 0].abs().max() == 0
    torch.testing.assert_close(out[0, :, 1], v[0, :, 0].expand(2, 4))
    torch.testing.assert_close(out, out_w)
    torch.testing.assert_close(w.sum(-1)[0, :, 1:], torch.ones(2, 2))


@pytest.mark.parametrize(
    "overrides",
    [dict(hidden_size=30), dict(num_key_value_heads=3), dict(pad_token_id=-1), dict(pad_token_id=29),
     dict(partial_rotary_factor=0.0), dict(hidden_act="swish"), dict(sliding_window=0), dict(resid_pdrop=1.0),
     dict(rope_scaling={"type": "longrope"}), dict(rope_parameters={"rope_type": "yarn"}), dict(num_hidden_layers=0)],
)
def test_config_rejects_bad_values(overrides):
    with pytest.raises(ValueError):
        make_config(**overrides)


def test_rope_parameters_dict_is_folded_in():
    config = make_config(rope_parameters={"rope_type": "default", "rope_theta": 123.0, "partial_rotary_factor": 0.5})
    assert config.rope_theta == 123.0 and config.rotary_dim == 4


def test_printed_train_complex_math_cell_runs_as_printed(tmp_path, capsys):
    import random

    from torch.utils.data import DataLoader

    from dldna.chapter_09.phi3.examples.train_complex_math import (
        ComplexArithmeticDataset,
        PhiMiniConfig,
        PhiMiniForCausalLM,
        create_complex_arithmetic_data,
        create_reverse_tokenizer,
        create_tokenizer,
        generate_text,
        train,
    )
    from dldna.data import safe_eval

    random.seed(42)
    torch.manual_seed(42)
    data = create_complex_arithmetic_data(64, 20)
    for sample in data:
        expr, rest = sample.split("=")
        assert rest.endswith("<eos>") and safe_eval(expr) == int(rest[:-5]) and sum(c in "+-*" for c in expr) >= 2
    tokenizer = create_tokenizer()
    reverse_tokenizer = create_reverse_tokenizer(tokenizer)
    dataset = ComplexArithmeticDataset(data, 20, tokenizer)
    input_ids, labels = dataset[0]
    assert input_ids.shape == (20,) and (labels[input_ids == tokenizer["<pad>"]] == -100).all()
    config = PhiMiniConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, use_cache=True,
                           use_return_dict=True)
    config.pad_token_id = tokenizer["<pad>"]
    config.eos_token_id = tokenizer["<eos>"]
    model = PhiMiniForCausalLM(config)
    model.lm_head.weight = model.transformer.embed_tokens.weight
    assert model.lm_head.weight is model.model.embed_tokens.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2, eta_min=1e-5)
    losses = train(model, DataLoader(dataset, batch_size=16, shuffle=True), optimizer, scheduler, 2, "cpu")
    assert "Epoch 2/2, Avg Loss:" in capsys.readouterr().out and losses[1] < losses[0]
    out = model(input_ids=input_ids[None], labels=labels[None], return_dict=True)
    assert out["loss"].ndim == 0 and out["logits"].shape == (1, 20, len(tokenizer))
    path = tmp_path / "phimini_complex_math.pt"
    torch.save(model.state_dict(), path)
    loaded = PhiMiniForCausalLM(config)
    loaded.load_state_dict(torch.load(path, map_location="cpu"))
    loaded.eval()
    prompt = data[0].split("=")[0] + "="
    generated = generate_text(loaded, prompt, tokenizer, reverse_tokenizer, 20, "cpu", temperature=0.1)
    assert generated.startswith(prompt) and isinstance(generated.split("=")[1], str)
    greedy = generate_text(loaded, prompt, tokenizer, reverse_tokenizer, 20, "cpu", temperature=0)
    assert greedy == generate_text(model.eval(), prompt, tokenizer, reverse_tokenizer, 20, "cpu", temperature=0)
