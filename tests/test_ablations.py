"""Tests for the ablation model (dldna.models.tiny_lm) and the chapter 7/15 experiment helpers."""
import pytest
import torch

from dldna.ablations import (ByteCorpus, RandomWindows, RunConfig, decoupled_decay_toy, eval_windows,
                             loss_by_position, model_config, train_lm)
from dldna.config import seed_everything
from dldna.models.tiny_lm import POSITIONS, TinyLM, TinyLMConfig


def _corpus(n=4000):
    gen = torch.Generator().manual_seed(0)
    # a learnable stream: a repeating phrase with random noise bytes
    phrase = torch.tensor(list(b"the cat sat on the mat. "))
    ids = phrase.repeat(n // len(phrase) + 1)[:n].clone()
    noise = torch.rand(n, generator=gen) < 0.05
    ids[noise] = torch.randint(0, 256, (int(noise.sum()),), generator=gen)
    return ByteCorpus(ids[: int(0.9 * n)], ids[int(0.9 * n):], "synthetic")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_tiny_lm_is_causal_for_every_position_scheme(position, norm_position):
    seed_everything(0)
    model = TinyLM(model_config(position=position, norm_position=norm_position, hidden_size=32,
                                max_position_embeddings=16)).double()
    x = torch.randint(0, 256, (2, 12))
    x2 = x.clone()
    x2[:, 7] = (x2[:, 7] + 1) % 256
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gated_and_plain_ffn_parameter_counts_match():
    counts = {}
    for ffn in ("gelu", "swiglu", "geglu"):
        model = TinyLM(TinyLMConfig(hidden_size=96, ffn=ffn))
        counts[ffn] = sum(p.numel() for p in model.layers[0].mlp.parameters())
    assert counts["gelu"] == counts["swiglu"] == counts["geglu"] == 8 * 96 * 96  # 8d/3 = 256 exactly for d=96
    assert TinyLMConfig(hidden_size=64, ffn="swiglu").intermediate_size == 171


def test_config_validation():
    with pytest.raises(ValueError, match="position"):
        TinyLMConfig(position="xpos")
    with pytest.raises(ValueError, match="divisible"):
        TinyLMConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="norm_position"):
        TinyLMConfig(norm_position="sandwich")


def test_learned_positions_model_refuses_long_inputs():
    model = TinyLM(model_config(position="learned", max_position_embeddings=16, hidden_size=32))
    with pytest.raises(ValueError, match="extrapolate"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_by_position_prefix_equals_short_windows():
    seed_everything(0)
    corpus = _corpus()
    model = TinyLM(model_config(position="alibi", hidden_size=32))
    x, y = eval_windows(corpus.val, 40, 6)
    long = loss_by_position(model, x, y)
    short = loss_by_position(model, x[:, :10], y[:, :10])
    torch.testing.assert_close(long[:10], short, rtol=1e-5, atol=1e-5)
    manual = torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(0)
    torch.testing.assert_close(long, manual, rtol=1e-5, atol=1e-5)


def test_random_windows_are_seeded_and_shifted():
    ids = torch.arange(1000)
    stream = RandomWindows(ids, 16, 4, seed=3)
    (x1, y1), (x2, _) = next(iter(stream)), next(iter(stream))
    assert torch.equal(x1, x2) and torch.equal(y1, x1 + 1)


def test_train_lm_learns_the_synthetic_stream():
    corpus = _corpus()
    run = RunConfig(steps=60, batch_size=8, seq_len=24, lr=1e-2, warmup_steps=5, eval_every=30, eval_windows=8)
    _, hist = train_lm(model_config(hidden_size=32), corpus, run)
    assert hist["eval_step"] == [30, 60]
    assert hist["eval_loss"][-1] < 0.6 * hist["loss"][0]  # from ln(256) = 5.5 towards the phrase's entropy


def test_decoupled_decay_toy_shows_the_difference():
    res = decoupled_decay_toy(steps=400, lr=2e-2, weight_decay=0.5, n_features=8, n_samples=256)
    none, adamw, l2 = (torch.tensor(res[k]["weights"]) for k in ("none", "adamw", "adam_l2"))
    # AdamW: a weight with no loss gradient decays geometrically, (1 - lr * wd)^t
    assert res["adamw"]["idle_weight"][-1] == pytest.approx((1 - 2e-2 * 0.5) ** 400, rel=1e-3)
    # Adam + L2: the decay gradient is normalised by sqrt(v), so the idle weight moves ~lr per step: gone
    assert abs(res["adam_l2"]["idle_weight"][-1]) < 0.05
    # frequent features (large gradients) shrink less under Adam + L2 than rare ones, relative to no decay
    seen = none.abs() > 0.5  # features that occur in the sample at all
    ratio_l2, ratio_w = l2[seen] / none[seen], adamw[seen] / none[seen]
    assert ratio_l2[0] > ratio_l2[-1] + 0.3
    # AdamW shrinks every used weight by the same factor
    assert float(ratio_w.max() - ratio_w.min()) < 0.02 and 0.5 < float(ratio_w.mean()) < 0.99


def test_spike_summary_measures_rise_after_corrupted_batches():
    from dldna.ablations import spike_summary

    loss = [2.0] * 30
    loss[9] = 9.0  # corrupted batch at step 10
    for i in range(10, 15):
        loss[i] = 2.5  # the five steps after it
    hist = {"loss": loss, "grad_norm": [0.2] * 9 + [5.0] + [0.2] * 20, "eval_loss": [2.1]}
    out = spike_summary({"bad_steps": [10], "runs": {"no clipping": hist, "clip 1": hist}})
    assert out["no clipping"]["loss on corrupted batches"] == 9.0
    assert out["no clipping"]["rise after them (5 steps)"] == pytest.approx(0.5)
    assert out["clip 1"]["fraction of steps clipped"] == pytest.approx(1 / 30)
    assert out["no clipping"]["fraction of steps clipped"] == 0.0
