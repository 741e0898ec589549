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
