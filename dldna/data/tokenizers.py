"""The bert-base-uncased and t5-small tokenizers, built offline from their vocabulary files.

The Hugging Face hub ships these tokenizers as ``tokenizer.json`` files; here we rebuild the same pipelines
with the `tokenizers` library (the fast Rust tokenizer) from the two original vocabulary files alone, so
nothing is downloaded:

* ``bert-base-uncased``: WordPiece (Wu et al. 2016; Devlin et al. 2019) over ``vocab.txt`` (30,522 lines,
  id = line number - 1). Pipeline: ``BertNormalizer`` (clean control characters, space around CJK
  characters, lowercase, strip accents) -> ``BertPreTokenizer`` (split on whitespace and punctuation) ->
  greedy longest-match-first WordPiece with ``##`` continuations and ``[UNK]`` for words over 100 characters
  or with no match -> ``[CLS] A [SEP]``.
* ``t5-small``: SentencePiece unigram (Kudo 2018; Raffel et al. 2020) over ``spiece.model`` (32,000
  pieces) plus the 100 sentinels ``<extra_id_99>`` .. ``<extra_id_0>`` at ids 32000 .. 32099. Pipeline: the
  model's own precompiled NFKC character map -> split on whitespace, prefix every word with ``▁`` -> Viterbi
  segmentation with the piece log-probabilities -> ``A </s>``. T5 has no BOS/CLS token.

Both equal the hub tokenizers id for id: ``tests/test_encoder.py`` checks them against a fixed sentence list
whose ids come from the reference slow implementations (Google's WordPiece algorithm as in
``BertTokenizerLegacy`` and the ``sentencepiece`` library), and against those implementations on every AG News
test text. Used in chapters 8 and 10.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: F401
from tokenizers import AddedToken

from dldna.config import data_dir

TOKENIZER_NAMES = ("bert-base-uncased", "t5-small")
T5_EXTRA_IDS = 100


def _local_file(name: str, filename: str, path: str | Path | None) -> Path | None:
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path {str(path)!r} is not a file")
        return path
    root = data_dir()
    candidate = None if root is None else root / "tokenizers" / name / filename
    return candidate if candidate is not None and candidate.is_file() else None


# --------------------------------------------------------------------------------------------- BERT WordPiece
def bert_tokenizer(vocab_file: str | Path | None = None) -> Tokenizer:
    """bert-base-uncased as a fast ``tokenizers.Tokenizer`` built from ``vocab.txt``.

    ``vocab_file`` defaults to ``<data_dir>/tokenizers/bert-base-uncased/vocab.txt``; without a local file the
    hub ``tokenizer.json`` is fetched (online readers only). Special ids: ``[PAD]``=0, ``[UNK]``=100,
    ``[CLS]``=101, ``[SEP]``=102, ``[MASK]``=103. Each call returns a new object (padding/truncation settings
    are per object).
    """
    path = _local_file("bert-base-uncased", "vocab.txt", vocab_file)
    if path is None:
        return Tokenizer.from_pretrained("bert-base-uncased")  # online fallback, never used in tests
    return Tokenizer.from_str(_bert_json(str(path.resolve())))


@lru_cache(maxsize=4)
def _bert_json(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"vocab_file {path!r} has duplicate lines")
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        if special not in vocab:
            raise ValueError(f"vocab_file {path!r} lacks {special}")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")])
    return tok.to_str()


# ---------------------------------------------------------------------------------------- T5 SentencePiece
def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _protobuf_fields(buf: bytes):
    """Yield ``(field_number, wire_type, value)`` of a serialised protobuf message (wire format only)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def read_sentencepiece_model(path: str | Path) -> tuple[list[tuple[str, float, int]], bytes]:
    """Read a SentencePiece ``.model`` file: ``[(piece, score, type), ...]`` and the precompiled charsmap.

    Parses the ``ModelProto`` wire format directly (pieces = field 1 with piece/score/type = 1/2/3;
    normalizer_spec = field 3 with precompiled_charsmap = field 2), so neither ``protobuf`` nor
    ``sentencepiece`` is needed. Types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    """
    buf = Path(path).read_bytes()
    pieces, charsmap = [], b""
    for field, wire, value in _protobuf_fields(buf):
        if field == 1 and wire == 2:
            piece, score, kind = "", 0.0, 1
            for f, w, v in _protobuf_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif field == 3 and wire == 2:
            for f, w, v in _protobuf_fields(value):
                if f == 2 and w == 2:
                    charsmap = v
    if not pieces:
        raise ValueError(f"{str(path)!r} holds no SentencePiece pieces")
    return pieces, charsmap


def t5_tokenizer(spiece_file: str | Path | None = None, extra_ids: int = T5_EXTRA_IDS) -> Tokenizer:
    """t5-small as a fast ``tokenizers.Tokenizer`` built from ``spiece.model`` (no ``sentencepiece`` needed).

    ``spiece_file`` defaults to ``<data_dir>/tokenizers/t5-small/spiece.model``; without a local file the hub
    ``tokenizer.json`` is fetched (online readers only). Ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2,
    ``<extra_id_i>`` = 32099 - i; vocabulary size 32,100. Each call returns a new object.
    """
    if not isinstance(extra_ids, int) or extra_ids < 0:
        raise ValueError(f"extra_ids must be a non-negative int, got {extra_ids!r}")
    path = _local_file("t5-small", "spiece.model", spiece_file)
    if path is None:
        return Tokenizer.from_pretrained("t5-small")  # online fallback, never used in tests
    return Tokenizer.from_str(_t5_json(str(path.resolve()), extra_ids))


@lru_cache(maxsize=4)
def _t5_json(path: str, extra_ids: int) -> str:
    pieces, charsmap = read_sentencepiece_model(path)
    unk_ids = [i for i, (_, _, kind) in enumerate(pieces) if kind == 2]
    if len(unk_ids) != 1:
        raise ValueError(f"{path!r} must hold exactly one unknown piece, found {len(unk_ids)}")
    vocab = [(piece, score) for piece, score, _ in pieces]
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
    vocab += [(s, 0.0) for s in sentinels]
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_ids[0], byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    eos_id = next(i for i, (piece, _, _) in enumerate(pieces) if piece == "</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 </s>:0", pair="$A:0 </s>:0 $B:1 </s>:1", special_tokens=[("</s>", eos_id)]
    )
    control = [piece for piece, _, kind in pieces if kind in (2, 3)]  # <unk>, <pad>, </s>
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + sentinels])
    return tok.to_str()


# --------------------------------------------------------------------------------------------- common entry
def load_tokenizer(name: str) -> Tokenizer:
    """``"bert-base-uncased"`` or ``"t5-small"`` (also ``"bert"``/``"t5"``) as a fast ``tokenizers.Tokenizer``."""
    key = {"bert": "bert-base-uncased", "t5": "t5-small"}.get(name, name)
    if key == "bert-base-uncased":
        return bert_tokenizer()
    if key == "t5-small":
        return t5_tokenizer()
    raise ValueError(f"name must be one of {TOKENIZER_NAMES} (or 'bert'/'t5'), got {name!r}")


def load_hf_tokenizer(name: str):
    """The same tokenizer wrapped as ``transformers.PreTrainedTokenizerFast`` (``tok(texts, padding=True, ...)``).

    Special tokens are set as in the hub configs, so ``pad_token_id``, ``eos_token_id`` etc. work.
    """
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(name)
    if name in ("bert", "bert-base-uncased"):
        specials = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    else:
        specials = dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def special_ids(name: str) -> dict[str, int | None]:
    """``{"pad", "unk", "cls", "sep", "eos", "mask"}`` -> id (None where the tokenizer has no such token)."""
    return dict(_special_ids(name))


def vocab_size(name: str) -> int:
    """Number of ids of tokenizer ``name`` (30,522 for bert-base-uncased, 32,100 for t5-small)."""
    return _vocab_size(name)


@lru_cache(maxsize=8)
def _vocab_size(name: str) -> int:
    return load_tokenizer(name).get_vocab_size()


@lru_cache(maxsize=8)
def _special_ids(name: str) -> tuple:
    tok = load_tokenizer(name)
    names = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]",), "sep": ("[SEP]",),
             "eos": ("</s>",), "mask": ("[MASK]",)}
    out = {}
    for key, candidates in names.items():
        ids = [tok.token_to_id(c) for c in candidates if tok.token_to_id(c) is not None]
        out[key] = ids[0] if ids else None
    return tuple(out.items())
