"""Tests for chapter 8: the offline tokenizers, the AG News loader and the encoder (learned positions / RoPE)."""
from __future__ import annotations

import csv
import gzip

import pytest
import torch

from dldna.config import data_dir
from dldna.data.tokenizers import bert_tokenizer, load_tokenizer, read_sentencepiece_model, special_ids, t5_tokenizer


def _have(*parts):
    root = data_dir()
    return root is not None and (root.joinpath(*parts)).is_file()


needs_bert = pytest.mark.skipif(not _have("tokenizers", "bert-base-uncased", "vocab.txt"), reason="no local bert vocab.txt")
needs_t5 = pytest.mark.skipif(not _have("tokenizers", "t5-small", "spiece.model"), reason="no local t5 spiece.model")
needs_agnews = pytest.mark.skipif(not _have("ag_news", "test.csv.gz"), reason="no local AG News test.csv.gz")

# Fixed sentence list with the ids of the hub tokenizers. How they were established: the BERT ids come from
# Google's WordPiece algorithm (BasicTokenizer + greedy longest-match WordPiece, i.e. transformers'
# pure-Python BertTokenizerLegacy over the same vocab.txt), the T5 ids from the `sentencepiece` library over
# spiece.model plus </s>=1 (what the slow T5Tokenizer does); both agree with published ids where those exist
# ("Hello world" -> 101 7592 2088 102 / 8774 296 1; the T5 paper's "translate English to German: ..." example;
# the HF sentinel example with <extra_id_0>=32099, <extra_id_1>=32098).
TOKENIZER_CASES = [
    ("Hello world", [101, 7592, 2088, 102], [8774, 296, 1]),
    ("translate English to German: The house is wonderful.",
     [101, 17637, 2394, 2000, 2446, 1024, 1996, 2160, 2003, 6919, 1012, 102],
     [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]),
    ("Café déjà vu: naïve résumé of Zürich's Ångström façade",
     [101, 7668, 2139, 3900, 24728, 1024, 15743, 13746, 1997, 10204, 1005, 1055, 17076, 15687, 8508, 102],
     [18131, 4315, 9056, 10, 3, 29, 9, 2, 162, 1417, 4078, 154, 13, 25749, 31, 7, 3, 2, 1725, 30476, 24369, 1]),
    ("UNAFFABLE unaffable supercalifragilisticexpialidocious",
     [101, 14477, 20961, 3468, 14477, 20961, 3468, 3565, 9289, 10128, 29181, 24411, 4588, 10288, 19312, 21273,
      10085, 6313, 102],
     [4417, 188, 9089, 17098, 73, 4127, 179, 1355, 15534, 20791, 173, 3040, 994, 102, 23, 4288, 7171, 2936, 1]),
    ("Prices rose 3.5% to $1,234.56 on 2004-08-23 &lt;b&gt;today&lt;/b&gt; #36;",
     [101, 7597, 3123, 1017, 1012, 1019, 1003, 2000, 1002, 1015, 1010, 22018, 1012, 5179, 2006, 2432, 1011, 5511,
      1011, 2603, 1004, 8318, 1025, 1038, 1004, 14181, 1025, 2651, 1004, 8318, 1025, 1013, 1038, 1004, 14181, 1025,
      1001, 4029, 1025, 102],
     [16511, 4659, 1877, 2712, 12, 1970, 6, 2773, 12451, 948, 30, 4406, 18, 4018, 18, 2773, 3, 184, 40, 17, 117,
      115, 184, 122, 17, 117, 235, 1135, 184, 40, 17, 117, 87, 115, 184, 122, 17, 117, 1713, 3420, 117, 1]),
    ("  multiple   spaces\tand\ttabs\nand newlines  ",
     [101, 3674, 7258, 1998, 21628, 2015, 1998, 2047, 12735, 102],
     [1317, 4856, 11, 3808, 7, 11, 126, 6972, 1]),
    ("东京 and 北京 are cities; 日本語のテキスト",
     [101, 100, 1755, 1998, 1781, 1755, 2024, 3655, 1025, 1864, 1876, 1950, 1671, 30239, 30227, 30233, 30240, 102],
     [3, 2, 11, 3, 2, 33, 3119, 117, 3, 2, 1]),
    ("emoji 🙂 and ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ ①②③",
     [101, 7861, 29147, 2072, 100, 1998, 100, 100, 100, 102],
     [3, 15, 51, 21892, 3, 2, 11, 27645, 518, 4309, 4611, 1499, 3, 14574, 1]),
    ("x" * 120, [101, 100, 102], [3] + [19230] * 60 + [1]),
    ("don't won't can't it's o'clock e-mail U.S.A.",
     [101, 2123, 1005, 1056, 2180, 1005, 1056, 2064, 1005, 1056, 2009, 1005, 1055, 1051, 1005, 5119, 1041, 1011,
      5653, 1057, 1012, 1055, 1012, 1037, 1012, 102],
     [278, 31, 17, 751, 31, 17, 54, 31, 17, 34, 31, 7, 3, 32, 31, 17407, 3, 15, 18, 1963, 412, 5, 134, 5, 188, 5, 1]),
    ("", [101, 102], [1]),
]


@needs_bert
@pytest.mark.parametrize("text,bert_ids,t5_ids", TOKENIZER_CASES)
def test_bert_ids_fixed_sentences(text, bert_ids, t5_ids):
    assert bert_tokenizer().encode(text).ids == bert_ids


@needs_t5
@pytest.mark.parametrize("text,bert_ids,t5_ids", TOKENIZER_CASES)
def test_t5_ids_fixed_sentences(text, bert_ids, t5_ids):
    assert t5_tokenizer().encode(text).ids == t5_ids


@needs_t5
def test_t5_sentinels_and_specials():
    tok = t5_tokenizer()
    assert tok.get_vocab_size() == 32100
    assert [tok.token_to_id(f"<extra_id_{i}>") for i in (0, 1, 99)] == [32099, 32098, 32000]
    # the sentinel example of the HF T5 docs: sentinels are matched before SentencePiece runs
    text = "Today is a fine <extra_id_0> on which to walk my <extra_id_1> in the park."
    assert tok.encode(text).ids == [1960, 19, 3, 9, 1399, 32099, 30, 84, 12, 1482, 82, 32098, 16, 8, 2447, 5, 1]
    assert special_ids("t5") == {"pad": 0, "unk": 2, "cls": None, "sep": None, "eos": 1, "mask": None}
    pieces, charsmap = read_sentencepiece_model(data_dir() / "tokenizers" / "t5-small" / "spiece.model")
    assert len(pieces) == 32000 and pieces[:3] == [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)]
    assert len(charsmap) > 1000  # the nmt_nfkc map


@needs_bert
def test_bert_specials_and_decode():
    tok = bert_tokenizer()
    assert special_ids("bert-base-uncased") == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "eos": None, "mask": 103}
    assert tok.get_vocab_size() == 30522
    assert tok.decode(tok.encode("The Quick brown fox!").ids) == "the quick brown fox!"
    with pytest.raises(ValueError, match="name"):
        load_tokenizer("gpt2")


def _agnews_texts(n):
    with gzip.open(data_dir() / "ag_news" / "test.csv.gz", "rt", encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(n), csv.reader(f))]
    return [(title + " " + desc).replace("\\n", "\n") for _, title, desc in rows]


@needs_t5
@needs_agnews
def test_t5_matches_sentencepiece_on_agnews():
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(data_dir() / "tokenizers" / "t5-small" / "spiece.model"))
    texts = _agnews_texts(2000)
    fast = [e.ids for e in t5_tokenizer().encode_batch(texts)]
    assert fast == [ids + [1] for ids in sp.encode(texts)]


@needs_bert
@needs_agnews
def test_bert_matches_reference_wordpiece_on_agnews():
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    slow = legacy.BertTokenizerLegacy(vocab_file=str(data_dir() / "tokenizers" / "bert-base-uncased" / "vocab.txt"))
    texts = _agnews_texts(500)
    fast = [e.ids for e in bert_tokenizer().encode_batch(texts)]
    assert fast == [slow(t)["input_ids"] for t in texts]


# ------------------------------------------------------------------------------------------------ AG News data
from dldna.data.agnews import AG_NEWS_CLASSES, BatchLoader, encode_texts, load_ag_news, train_val_split  # noqa: E402


@needs_agnews
def test_load_ag_news_local_files():
    test = load_ag_news("test")
    assert len(test) == 7600 and "test.csv" in test.source
    assert torch.bincount(test.labels).tolist() == [1900] * 4
    assert test.texts[0].startswith("Fears for T N pension after talks")
    train = load_ag_news("train", limit=50)
    assert len(train) == 50 and "first 50" in train.source
    assert set(train.labels.tolist()) <= {0, 1, 2, 3} and len(AG_NEWS_CLASSES) == 4
    with pytest.raises(ValueError, match="split"):
        load_ag_news("validation")


@needs_agnews
def test_train_val_split_is_stratified_and_disjoint():
    data = load_ag_news("test", limit=400)
    tr, val = train_val_split(data, 0.25, seed=1)
    assert len(tr) + len(val) == 400
    assert not set(tr.texts) & set(val.texts)
    for c in range(4):
        n_c = int((data.labels == c).sum())
        assert abs(int((val.labels == c).sum()) - round(0.25 * n_c)) <= 1


@needs_bert
def test_encode_texts_and_bucketed_batches_cover_every_row_once():
    texts = ["a b c d e f g", "hello", "the quick brown fox jumps", "x y", "one two three"] * 3
    labels = torch.arange(len(texts)) % 4
    enc = encode_texts(texts, labels, bert_tokenizer(), max_length=6)
    assert enc.lengths.max() == 6 and enc.input_ids[0, :6].tolist()[0] == 101 and enc.input_ids[0, 5] == 102
    seen = []
    for batch in BatchLoader(enc, batch_size=4, shuffle=True, seed=0):
        width = batch["input_ids"].shape[1]
        assert width == int(batch["attention_mask"].sum(1).max())
        assert (batch["input_ids"][~batch["attention_mask"]] == enc.pad_id).all()
        seen += batch["labels"].tolist()
    assert sorted(seen) == sorted(labels.tolist())
    assert len(BatchLoader(enc, 4)) == 4


# ----------------------------------------------------------------------------------------------------- encoder
from dldna.attention import attention  # noqa: E402
from dldna.models.encoder import (  # noqa: E402
    Encoder, EncoderClassifier, EncoderConfig, EncoderForMaskedLM, key_padding_mask, mask_tokens, pool)


def _model(position, pooling="mean", **kw):
    torch.manual_seed(0)
    return EncoderClassifier(EncoderConfig.tiny(position=position, pooling=pooling, **kw)).double().eval()


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_shapes_and_printed_defaults(position):
    cfg = EncoderConfig(position=position)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.hidden_dropout_prob, cfg.max_position_embeddings, cfg.layer_norm_eps) == (30522, 256, 4, 8, 512, 0.1, 512, 1e-12)
    model = _model(position)
    ids = torch.randint(1, 128, (3, 11))
    out = model(ids, torch.ones(3, 11, dtype=torch.bool), labels=torch.tensor([0, 1, 3]))
    assert out.logits.shape == (3, 4) and out.pooled.shape == (3, 32) and out.loss.ndim == 0
    assert model.encoder(ids).shape == (3, 11, 32)
    assert hasattr(model.encoder.layers[0].attention, "o_proj")


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_padding_does_not_change_pooled_output(position, pooling):
    model = _model(position, pooling)
    ids = torch.randint(1, 128, (2, 9))
    ref = model(ids, torch.ones(2, 9, dtype=torch.bool)).pooled
    pad = torch.zeros(2, 6, dtype=torch.long)
    right = model(torch.cat([ids, pad], 1), torch.cat([torch.ones(2, 9), torch.zeros(2, 6)], 1).bool()).pooled
    torch.testing.assert_close(right, ref, rtol=0, atol=1e-12)
    # garbage in padded slots must not matter either
    noisy = torch.cat([ids, torch.randint(1, 128, (2, 6))], 1)
    torch.testing.assert_close(model(noisy, torch.cat([torch.ones(2, 9), torch.zeros(2, 6)], 1).bool()).pooled, ref,
                               rtol=0, atol=1e-12)
    if pooling == "mean":  # left padding too: position ids count real tokens
        left = model(torch.cat([pad, ids], 1), torch.cat([torch.zeros(2, 6), torch.ones(2, 9)], 1).bool()).pooled
        torch.testing.assert_close(left, ref, rtol=0, atol=1e-12)
    # and without the mask, padding does change the result (the test can fail)
    assert (model(torch.cat([ids, pad], 1)).pooled - ref).abs().max() > 1e-4


def test_attention_matches_reference_with_mask():
    torch.manual_seed(1)
    cfg = EncoderConfig.tiny(position="rope")
    enc = Encoder(cfg).double().eval()
    layer = enc.layers[0].attention
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = enc.rotary_emb(x, pos)
    out = layer(x, key_padding_mask(mask), (cos, sin))
    from dldna.models.layers import apply_rotary_pos_emb
    q, k, v = (p(x).view(2, 7, 4, 8).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    ref = layer.o_proj(attention(q, k, v, mask=mask[:, None, None, :]).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(out, ref)


def test_rope_is_relative_and_learned_is_not():
    ids = torch.randint(1, 128, (1, 8))
    shifted = torch.arange(20, 28)[None]
    for position, same in (("rope", True), ("learned", False)):
        model = _model(position)
        a = model(ids).pooled
        b = model(ids, position_ids=shifted).pooled
        assert torch.allclose(a, b, atol=1e-10) == same


def test_learned_positions_beyond_table_raise_and_bad_config():
    model = _model("learned")
    with pytest.raises(ValueError, match="positions"):
        model(torch.randint(1, 128, (1, 65)))
    with pytest.raises(ValueError, match="position"):
        EncoderConfig(position="alibi")
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(hidden_size=30, num_attention_heads=8)
    with pytest.raises(ValueError, match="real token"):
        model(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]).bool())


def test_xavier_init_and_pooling():
    model = EncoderClassifier(EncoderConfig.tiny())
    w = model.encoder.layers[0].mlp.fc1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert model.encoder.word_embeddings.weight[0].abs().sum() == 0  # padding row
    h = torch.arange(12.0).view(1, 4, 3)
    assert pool(h, torch.tensor([[1, 1, 0, 0]]).bool(), "mean").tolist() == [[1.5, 2.5, 3.5]]
    assert pool(h, None, "first").tolist() == [[0.0, 1.0, 2.0]]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_gradient_checkpointing_gives_same_gradients(position):
    torch.manual_seed(0)
    cfg = EncoderConfig.tiny(position=position, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             classifier_dropout=0.0)
    model = EncoderClassifier(cfg).double().train()
    ids, labels = torch.randint(1, 128, (3, 10)), torch.tensor([0, 2, 3])
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    model(ids, mask, labels).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, mask, labels).loss.backward()
    for g, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_mask_tokens_and_mlm_loss():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (64, 50))
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[:, 40:] = False
    ids[:, 0] = 1  # a special token that must never be masked
    masked, labels = mask_tokens(ids, attn, mask_token_id=3, vocab_size=100, special_ids=[1], generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()
    frac = chosen.sum().item() / (64 * 39)
    assert 0.12 < frac < 0.18
    assert (labels[chosen] == ids[chosen]).all()
    share_mask = (masked[chosen] == 3).float().mean().item()
    assert 0.72 < share_mask < 0.88
    assert (masked[~chosen] == ids[~chosen]).all()
    torch.manual_seed(0)
    mlm = EncoderForMaskedLM(EncoderConfig.tiny())
    out = mlm(masked, attn, labels)
    assert out.logits.shape == (int(chosen.sum()), 128)
    assert abs(out.loss.item() - torch.log(torch.tensor(128.0)).item()) < 1.0  # near-uniform at init


# ---------------------------------------------------------------------------------------- printed-book facade
def test_printed_facade_names_and_checkpoint_roundtrip(tmp_path):
    from dldna.chapter_09.encoder import train_ag_news as printed
    from dldna.chapter_09.encoder.efficient_encoder import TransformerEncoder as V1
    from dldna.chapter_09.encoder.efficient_encoder_rope import TransformerConfig, TransformerEncoder as V2

    assert callable(printed.train_and_test_all_versions) and printed.MAX_LENGTH == 128
    cfg = TransformerConfig(**{k: v for k, v in EncoderConfig.tiny().to_dict().items() if k != "position"})
    assert V1(cfg).config.position == "learned" and V2(cfg).config.position == "rope"
    torch.manual_seed(0)
    model = printed.EncoderClassifier(cfg, version="v1").eval()
    ids = torch.randint(1, 128, (2, 7))
    mask2d = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    logits = model(ids, attention_mask=mask2d[:, None, None, :].bool())  # the printed (B, 1, 1, T) mask
    torch.testing.assert_close(logits, model(ids, mask2d.bool()))
    assert logits.shape == (2, 4)
    printed.save_model(model, model.config, "bert-base-uncased", "v1", path=str(tmp_path))
    loaded, loaded_cfg = printed.load_model("bert-base-uncased", "v1", path=str(tmp_path))
    assert loaded_cfg.position == "learned"
    torch.testing.assert_close(loaded.eval()(ids, mask2d.bool()), logits)
    with pytest.raises(ValueError, match="version"):
        printed.EncoderClassifier(cfg, version="v3")


@needs_bert
def test_predict_news_returns_a_class():
    from dldna.chapter_09.encoder import train_ag_news as printed

    torch.manual_seed(0)
    model = printed.EncoderClassifier(EncoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    intermediate_size=64), version="v2")
    out = printed.predict_news("Oil prices surge as OPEC cuts output", model, tokenizer_name="bert-base-uncased")
    assert out["predicted_class"] in AG_NEWS_CLASSES and 0.25 <= out["confidence"] <= 1.0


def test_concatenated_long_inputs_and_truncate():
    from dldna.data.agnews import EncodedTexts
    from dldna.models.encoder_experiments import concatenated_long_inputs, truncate

    pytest.importorskip("tokenizers")
    if not _have("tokenizers", "bert-base-uncased", "vocab.txt"):
        pytest.skip("no local bert vocab")
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 8, 9, 102], [101, 10, 102, 0, 0]])
    data = EncodedTexts(ids, torch.tensor([4, 5, 3]), torch.tensor([0, 1, 0]), 0, "bert-base-uncased", 5)
    long = concatenated_long_inputs(data, "bert-base-uncased", length=6)
    # row 0 + the other class-0 row (each row used once), row 1 alone in its class
    assert long.input_ids[0].tolist() == [101, 5, 6, 10, 102, 0] and long.input_ids[2].tolist()[:5] == [101, 10, 5, 6, 102]
    assert long.input_ids[1].tolist() == [101, 7, 8, 9, 102, 0] and long.lengths.tolist() == [5, 5, 5]
    short = truncate(long, "bert-base-uncased", 4)
    assert short.input_ids.tolist() == [[101, 5, 6, 102], [101, 7, 8, 102], [101, 10, 5, 102]]
    assert short.lengths.tolist() == [4, 4, 4]


@needs_bert
@needs_agnews
def test_run_all_trains_once_per_seed_and_ensembles_every_run():
    from dldna.models.encoder_experiments import Recipe, run_all

    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    result = run_all(Recipe.tiny(), size=size, device="cpu", limit_train=200, limit_test=100, versions=("v2",),
                     tokenizers=("bert-base-uncased",), ckpt_bench=None, baseline=False, extrapolation_length=64,
                     seeds=(0, 1), log=lambda *args: None)
    runs = result["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [("v2-bert-base-uncased", 0), ("v2-bert-base-uncased-seed1", 1)]
    assert runs[0]["finetune"]["val_curve"] != runs[1]["finetune"]["val_curve"] or \
        runs[0]["test"] != runs[1]["test"]  # a different seed is a different model
    assert len(result["ensemble"]["members"]) == 2
