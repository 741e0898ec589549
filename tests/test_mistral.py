"""Simple Mistral (chapter 9): exact parity with HF transformers, the rolling KV cache, GQA, masks, precision,
and the printed test list (RoPE, RMSNorm, attention head configs, mask, decoder layer, cache, dtypes, long
sequence, single token, batch sizes) with value assertions; plus the chapter 10 tasks' data and facades."""
from __future__ import annotations

import pytest
import torch

from dldna.attention import attention
from dldna.attention.masks import sliding_window_mask
from dldna.models.cache import KVCache, attention_mask_from_step, uncached_step
from dldna.models.mistral import MistralConfig, MistralForCausalLM, sdpa_attention


def tiny(**kw) -> MistralConfig:
    base = dict(sliding_window=5, initializer_range=0.2)  # large init: peaked logits, so errors show
    base.update(kw)
    return MistralConfig.tiny(**base)


def ours_and_hf(cfg: MistralConfig, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hcfg = transformers.MistralConfig(**cfg.to_hf_kwargs())
    hcfg._attn_implementation = "eager"
    hf = transformers.MistralForCausalLM(hcfg).eval()
    ours = MistralForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def left_padded(batch=3, n=19, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 3 * row] = 0
        ids[row, : 3 * row] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------- config
def test_config_validates_and_tiny_preset():
    cfg = MistralConfig.tiny()
    assert (cfg.head_dim, cfg.sliding_window, cfg.num_key_value_heads) == (16, 8, 2)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MistralConfig.tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="pad_token_id"):
        MistralConfig.tiny(pad_token_id=-1)
    with pytest.raises(ValueError, match="sliding_window"):
        MistralConfig.tiny(sliding_window=0)
    with pytest.raises(ValueError, match="hidden_act"):
        MistralConfig.tiny(hidden_act="relu6")
    with pytest.raises(TypeError):
        MistralForCausalLM(dict(vocab_size=8))


# ------------------------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_logits_equal_hf_beyond_the_window(heads, kv_heads):
    cfg = tiny(num_attention_heads=heads, num_key_value_heads=kv_heads)
    ours, hf = ours_and_hf(cfg)
    assert list(ours.state_dict()) == list(hf.state_dict())
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(0))  # 23 > window 5
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert b.std() > 0.5
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_logits_equal_hf_with_left_padding():
    ours, hf = ours_and_hf(tiny())
    ids, mask = left_padded()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # what HF generate passes; ours derives it from the mask
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)
    assert torch.isfinite(a).all()


def test_greedy_generate_with_cache_equals_hf():
    ours, hf = ours_and_hf(tiny())
    ids, mask = left_padded()
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    mine = ours.generate(ids, attention_mask=mask, **kw)
    theirs = hf.generate(ids, attention_mask=mask, pad_token_id=0, **kw)
    assert torch.equal(mine, theirs)
    assert mine.shape == (3, 19 + 12)
    assert torch.equal(ours.generate(ids, attention_mask=mask, use_cache=False, **kw), mine)


def test_single_token_and_hf_cache_continuation():
    ours, hf = ours_and_hf(tiny())
    ids = torch.tensor([[7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
        # prefill 9 tokens, then one token at a time past the window: same logits as HF's own cache
        seq = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(3))
        o, h = ours(seq[:, :9], use_cache=True), hf(seq[:, :9], use_cache=True)
        for t in range(9, 16):
            o = ours(seq[:, t : t + 1], past_key_values=o.past_key_values, use_cache=True)
            h = hf(seq[:, t : t + 1], past_key_values=h.past_key_values, use_cache=True)
            torch.testing.assert_close(o.logits, h.logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- KV cache
def test_cached_chunks_equal_uncached_and_memory_stays_bounded():
    cfg = tiny(sliding_window=6)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (2, 61), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, parts, start, sizes = None, [], 0, []
        for chunk in [5, 1, 9, 1, 1, 20, 1, 23]:
            out = model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, start + chunk
            parts.append(out.logits)
            sizes.append(cache.memory_bytes())
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    assert len(cache) == 6 and cache.get_seq_length() == 61
    per_slot = 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K+V, batch 2, fp32
    assert sizes[-1] == 6 * per_slot and max(sizes) == 6 * per_slot


def test_cache_positions_continue_with_left_padding():
    cache = KVCache(num_layers=1, sliding_window=3)
    step = cache.begin(torch.tensor([[False, True, True], [True, True, True]]))
    assert step.position_ids.tolist() == [[0, 0, 1], [0, 1, 2]]
    k = torch.randn(2, 1, 3, 4)
    cache.update(k, k, 0)
    step = cache.begin(torch.ones(2, 1, dtype=torch.bool))
    assert step.position_ids.tolist() == [[2], [3]]
    assert step.key_index.tolist() == [0, 1, 2, 3]
    mask = attention_mask_from_step(step, 3)[:, 0, 0]
    assert mask.tolist() == [[False, True, True, True], [False, True, True, True]]
    keys, _ = cache.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4), 0)
    assert keys.shape[2] == 4 and len(cache) == 3 and torch.equal(keys[:, :, 1:3], k[:, :, 1:3])
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update(k, k, 1)
    with pytest.raises(ValueError, match="batch"):
        cache.begin(torch.ones(3, 1, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- attention
def test_sliding_window_mask_uses_the_hf_convention():
    n, w = 11, 4
    mask = attention_mask_from_step(uncached_step(torch.ones(1, n, dtype=torch.bool)), w)[0, 0]
    assert torch.equal(mask, sliding_window_mask(n, w, causal=True))
    assert mask[10].nonzero().flatten().tolist() == [7, 8, 9, 10]  # W keys including the query itself


@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 3), (6, 1)])
def test_sdpa_attention_equals_reference_in_float64(heads, kv_heads):
    g = torch.Generator().manual_seed(heads + kv_heads)
    q = torch.randn(2, heads, 7, 8, dtype=torch.float64, generator=g)
    k = torch.randn(2, kv_heads, 9, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, kv_heads, 9, 8, dtype=torch.float64, generator=g)
    mask = torch.rand(2, 1, 7, 9, generator=g) > 0.4
    mask[1, 0, 3] = False  # a query with nothing to attend to
    out = sdpa_attention(q, k, v, mask)
    torch.testing.assert_close(out, attention(q, k, v, mask=mask), rtol=1e-10, atol=1e-10)
    assert torch.equal(out[1, :, 3], torch.zeros_like(out[1, :, 3]))
    with pytest.raises(ValueError, match="is_causal"):
        sdpa_attention(q, k, v, mask, is_causal=True)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_cfg = tiny(num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    gqa = MistralForCausalLM(gqa_cfg).eval()
    mha = MistralForCausalLM(tiny(num_attention_heads=4, num_key_value_heads=4)).eval()
    state = gqa.state_dict()
    d = gqa_cfg.head_dim
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = tensor.view(2, d, -1)
            state[name] = heads.repeat_interleave(2, dim=0).reshape(4 * d, -1)
    mha.load_state_dict(state)
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=0, atol=1e-5)


def test_decoder_layer_is_identity_when_its_output_projections_are_zero():
    from dldna.chapter_09.mistral.simple_mistral import MistralDecoderLayer, MistralRotaryEmbedding

    cfg = tiny()
    layer = MistralDecoderLayer(cfg, 0)
    x = torch.randn(2, 6, cfg.hidden_size)
    pos = MistralRotaryEmbedding(cfg.head_dim)(x, torch.arange(6))
    y = layer(x, pos, None, is_causal=True)
    assert (y - x).abs().max() > 1e-3
    torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    torch.testing.assert_close(layer(x, pos, None, is_causal=True), x, rtol=0, atol=0)


def test_printed_rope_and_rmsnorm_names():
    from dldna.chapter_09.mistral.simple_mistral import (MistralRMSNorm, MistralRotaryEmbedding,
                                                         apply_rotary_pos_emb)

    rope = MistralRotaryEmbedding(16, max_position_embeddings=64, base=10000)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i, j):
        cq, sq = rope(q, torch.tensor([[i]]))
        ck, sk = rope(k, torch.tensor([[j]]))
        return (apply_rotary_pos_emb(q, q, cq, sq)[0] * apply_rotary_pos_emb(k, k, ck, sk)[0]).sum()

    torch.testing.assert_close(score(9, 4), score(25, 20))  # only i - j matters
    assert not torch.allclose(score(9, 4), score(9, 5))
    norm, x = MistralRMSNorm(16, eps=1e-6), torch.randn(3, 16)
    torch.testing.assert_close(norm(x), torch.nn.RMSNorm(16, eps=1e-6)(x))


# ------------------------------------------------------------------------------------------- precision, sizes
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.25), (torch.float16, 0.05)])
def test_mixed_precision_logits_track_float32(dtype, atol):
    torch.manual_seed(0)
    model = MistralForCausalLM(tiny()).eval()
    ids = torch.randint(3, 128, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model.double()(ids).logits
        low = model.to(dtype)(ids).logits
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.double(), ref, rtol=0, atol=atol)
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.9


def test_long_sequence_decoding_keeps_window_memory():
    torch.manual_seed(0)
    model = MistralForCausalLM(tiny(sliding_window=8)).eval()
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(7))
    out = model.generate(prompt, max_new_tokens=80, do_sample=False, eos_token_id=None)
    ref = model.generate(prompt, max_new_tokens=80, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(out, ref) and out.shape == (1, 84)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_batched_rows_equal_single_rows(batch):
    torch.manual_seed(0)
    model = MistralForCausalLM(tiny()).eval()
    ids = torch.randint(3, 128, (batch, 12), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i : i + 1]).logits for i in range(batch)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_loss_ignores_minus_100_and_matches_manual_cross_entropy():
    torch.manual_seed(0)
    model = MistralForCausalLM(tiny())
    ids = torch.randint(3, 128, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, 4 - 1 : -1].reshape(-1, 128), ids[:, 4:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_tied_embeddings_share_one_tensor():
    model = MistralForCausalLM(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = MistralForCausalLM(tiny())
    assert model.num_parameters() == untied.num_parameters() - 128 * 64


# ------------------------------------------------------------------------------------------- chapter 10 data
def test_counting_data_and_printed_generate_text():
    from dldna.chapter_09.mistral.examples.train_seq_num import SimpleDataset, create_simple_data, generate_text
    from dldna.data.sequences import expected_continuation

    data = create_simple_data(51, 5, 4, exclude_starts=[1])
    assert data[:3] == [[0, 1, 2, 3], [2, 3, 4, 5], [3, 4, 5, 6]]
    assert create_simple_data(51, 48, 4)[-1] == [47, 48, 49, 50]  # the last window ends with eos (50)
    x, y = SimpleDataset(data, 4)[1]
    assert x.tolist() == y.tolist() == [2, 3, 4, 5]
    assert expected_continuation([45, 46], 51, 20) == [45, 46, 47, 48, 49]
    with pytest.raises(ValueError, match="seq_length"):
        SimpleDataset(data, 5)
    model = MistralForCausalLM(MistralConfig.tiny(vocab_size=51, eos_token_id=50, pad_token_id=None))
    vocab = {str(i): i for i in range(50)} | {"<eos>": 50}
    tokens = generate_text(model, ["1", "2", "3"], vocab, max_length=9)
    assert tokens[:3] == ["1", "2", "3"] and len(tokens) <= 9 and "<eos>" not in tokens


def test_sequence_task_learns_to_count_from_held_out_starts():
    from dldna.examples.mistral_tasks import run_sequence_task

    result = run_sequence_task(num_examples=300, epochs=2, held_out_starts=(17,), progress=False)
    assert result["epoch_loss"][-1] < 0.5 * result["epoch_loss"][0]
    assert result["results"][0]["generated"] == list(range(17, 37)), result["results"]  # 20 tokens, past window 10
    assert result["exact"] == 1.0


def test_printed_train_steps_schedulers_in_their_own_unit():
    from dldna.examples.mistral_tasks import train_epochs
    from dldna.data.sequences import SimpleDataset, create_simple_data

    loader = torch.utils.data.DataLoader(SimpleDataset(create_simple_data(20, 12, 5), 5), batch_size=4)
    model = MistralForCausalLM(MistralConfig.tiny(vocab_size=20, eos_token_id=19, pad_token_id=None))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_epoch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    losses = train_epochs(model, loader, opt, per_epoch, 2, "cpu", verbose=False)
    assert len(losses) == 2 and per_epoch.last_epoch == 2
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_step = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    train_epochs(model, loader, opt2, per_step, 2, "cpu", verbose=False)
    assert per_step.last_epoch == 2 * len(loader)


def test_printed_math_names_use_safe_labels():
    import random

    from dldna.chapter_09.mistral.examples.train_math import (ArithmeticDataset, create_arithmetic_data,
                                                              create_reverse_tokenizer, create_tokenizer, generate_text)
    from dldna.data.arithmetic import safe_eval

    random.seed(0)
    data = create_arithmetic_data(50, 20)
    for sample in data:
        expr, value = sample.removesuffix("<eos>").split("=")
        a, b = (int(t) for t in expr.replace("+", " ").replace("*", " ").replace("-", " ").split())
        assert 1 <= a <= 20 and 1 <= b <= 20 and int(value) == safe_eval(expr)
    tok = create_tokenizer()
    x, y = ArithmeticDataset(data, 12, tok)[0]
    assert x.shape == (12,) and (y == -100).sum() == (x == tok["<pad>"]).sum()
    model = MistralForCausalLM(MistralConfig.tiny(vocab_size=len(tok), pad_token_id=tok["<pad>"],
                                                  eos_token_id=tok["<eos>"]))
    out = generate_text(model, "3+4=", tok, create_reverse_tokenizer(tok), 12, "cpu")
    assert out.startswith("3+4=") and len(out) <= 12 + 1


def test_wider_range_training_data_never_contains_an_evaluated_expression():
    from dldna.data.arithmetic import safe_eval
    from dldna.examples.mistral_tasks import wider_range_expressions

    extra = wider_range_expressions(20, 30)
    assert len(extra) == len({p.expression for p in extra}) == 3 * (31 ** 2 - 21 ** 2)
    evaluated = {f"{a}{op}{b}" for a in range(21) for b in range(21) for op in "+-*"}
    assert not evaluated & {p.expression for p in extra}
    assert all(p.answer == safe_eval(p.expression) for p in extra[::97])
    with pytest.raises(ValueError, match="train_max_operand"):
        wider_range_expressions(20, 20)


def test_arithmetic_time_budget_cuts_steps_without_changing_the_run():
    from dldna.examples.mistral_tasks import run_arithmetic_task

    small = dict(n_test=12, n_val=6, max_operand=4, batch_size=16, progress=False, device="cpu")
    plain = run_arithmetic_task(steps=12, **small)
    roomy = run_arithmetic_task(steps=12, time_budget_s=1e6, **small)
    assert roomy["steps"] == roomy["steps_planned"] == 12 and roomy["probe_step_s"] > 0
    assert roomy["loss"] == plain["loss"]  # the probe model leaves the random state untouched
    tight = run_arithmetic_task(steps=400, time_budget_s=1e-9, **small)
    assert tight["steps"] == 10 and tight["steps_planned"] == 400 and len(tight["loss"]) == 10


# ------------------------------------------------------------------------------------------- WikiSQL
ROW = {"question": "How many schools did player number 3 play at after Butler CC (KS)?",
       "sql": {"sel": 5, "agg": 3, "conds": [[1, 0, 3], [4, 1, "butler cc (ks)"]]}}


def test_logical_form_roundtrip_and_wikisql_matching():
    from dldna.data.wikisql import lf_metrics, logical_form, parse_logical_form

    text = logical_form(ROW["sql"], ROW["question"])
    assert text == "SELECT COUNT col5 WHERE col1 EQ 3 AND col4 GT Butler CC (KS)"
    assert parse_logical_form(text) == {"sel": 5, "agg": 3, "conds": [[1, 0, "3"], [4, 1, "Butler CC (KS)"]]}
    swapped = "SELECT COUNT col5 WHERE col4 GT butler cc (ks) AND col1 EQ 3"  # order and case do not matter
    wrong_col = "SELECT COUNT col2 WHERE col1 EQ 3 AND col4 GT Butler CC (KS)"
    m = lf_metrics([text, swapped, wrong_col, "SELECT nonsense"], [ROW] * 4)
    assert m["lf_exact"] == 0.5 and m["sel"] == 0.5 and m["lf_without_columns"] == 0.75 and m["parsed"] == 0.75
    assert parse_logical_form("SELECT col1 WHERE col2 ~ x") is None
    drop_accents = lambda text: text.replace("č", "")  # noqa: E731  (a tokenizer that cannot write "č")
    accented = {"question": "who is wičháša?", "sql": {"sel": 0, "agg": 0, "conds": [[1, 0, "wičháša"]]}}
    assert lf_metrics(["SELECT col0 WHERE col1 EQ wiháša"], [accented])["lf_exact"] == 0.0
    assert lf_metrics(["SELECT col0 WHERE col1 EQ wiháša"], [accented], normalize=drop_accents)["lf_exact"] == 1.0


def test_local_wikisql_dev_split_and_printed_dataset():
    from dldna.data.wikisql import load_wikisql

    try:
        rows = load_wikisql("dev")
    except FileNotFoundError:
        pytest.skip("WikiSQL dev split not available locally")
    assert len(rows) == 8421 and rows[0]["sql"] == {"sel": 3, "conds": [[5, 0, "Butler CC (KS)"]], "agg": 0}
    from dldna.chapter_09.mistral.examples.train_sql import WikiSQLDataset, generate_sql
    from dldna.data.tokenizers import t5_tokenizer

    tok = t5_tokenizer()
    ds = WikiSQLDataset("validation", tok, max_length=64)
    ids, labels = ds[0]
    target = labels[labels != -100].tolist()
    assert ids.shape == (64,) and target[-1] == 1  # </s>
    assert tok.decode(target, skip_special_tokens=True) == "SELECT col3 WHERE col5 EQ butler cc (ks)"
    model = MistralForCausalLM(MistralConfig.tiny(vocab_size=tok.get_vocab_size(), eos_token_id=1, pad_token_id=0))
    assert isinstance(generate_sql(model, tok, rows[0]["question"], 40, "cpu", temperature=0), str)
