"""AG News (Zhang, Zhao & LeCun 2015): loading, a held-out validation split, and a tokenise-once dataset.

``load_ag_news(split)`` reads the local CSVs under ``dldna.config.data_dir()/ag_news`` (the char-CNN release:
no header, columns class 1-4, title, description) and, for readers who are online and have no local copy, the
Hugging Face ``ag_news`` dataset. The full 120,000-row train split is used when a local ``train.csv(.gz)``
exists; otherwise the real random 12,000-row sample ``train_sample_12k.csv.gz``. Every result says which one
it used (``AGNews.source``). The text of an example is ``title + " " + description``, as in the HF dataset.

``EncodedTexts`` holds a whole split tokenised once with a fast tokenizer's batch API, as one padded id
matrix plus lengths, and yields length-bucketed, dynamically trimmed batches (no per-item Python work, no
``DataLoader`` workers). Used in chapter 8.
"""
from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dldna.config import data_dir

AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
SPLITS = ("train", "test")


@dataclass
class AGNews:
    """One split: ``texts`` (list of str), ``labels`` (int64 tensor of 0..3), ``source`` (where it came from)."""

    texts: list[str]
    labels: torch.Tensor
    source: str
    classes: tuple[str, ...] = AG_NEWS_CLASSES

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> "AGNews":
        """Rows ``index`` (a sequence / tensor of ints) as a new ``AGNews``."""
        index = torch.as_tensor(index, dtype=torch.long)
        return AGNews([self.texts[i] for i in index.tolist()], self.labels[index].clone(), self.source, self.classes)


def _read_csv(path: Path) -> tuple[list[str], list[int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        texts, labels = [], []
        for row in reader:
            if len(row) != 3:
                raise ValueError(f"{path}: expected 3 columns (class, title, description), got {len(row)}")
            label, title, description = row
            labels.append(int(label) - 1)
            texts.append(f"{title} {description}")
    return texts, labels


def local_ag_news_file(split: str) -> Path | None:
    """The local CSV ``load_ag_news(split)`` would read, or None (full ``train.csv(.gz)`` before the 12k sample)."""
    root = data_dir()
    if root is None:
        return None
    names = {"train": ("train.csv.gz", "train.csv", "train_sample_12k.csv.gz"), "test": ("test.csv.gz", "test.csv")}
    for name in names[split]:
        path = root / "ag_news" / name
        if path.is_file():
            return path
    return None


def load_ag_news(split: str = "train", *, allow_download: bool = True, limit: int | None = None) -> AGNews:
    """The ``"train"`` or ``"test"`` split of AG News as ``AGNews(texts, labels, source)``.

    Local files first (``DLDNA_DATA_DIR``/``ag_news``): ``train.csv(.gz)`` if present, else the 12,000-row
    ``train_sample_12k.csv.gz``; ``test.csv(.gz)`` (7,600 rows). Without local files and with
    ``allow_download``, the Hugging Face ``ag_news`` dataset (needs ``datasets`` and a connection).
    ``limit`` keeps the first ``limit`` rows (fast mode). Labels are 0..3 = World, Sports, Business, Sci/Tech.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    path = local_ag_news_file(split)
    if path is not None:
        texts, labels = _read_csv(path)
        source = f"local {path.name} ({len(texts):,} rows)"
    elif allow_download:
        try:
            from datasets import load_dataset
        except ImportError as exc:  # pragma: no cover - online readers only
            raise FileNotFoundError("no local AG News files (set DLDNA_DATA_DIR) and `datasets` is not installed") from exc
        ds = load_dataset("ag_news", split=split)  # pragma: no cover - online readers only
        texts, labels = list(ds["text"]), list(ds["label"])  # pragma: no cover
        source = f"Hugging Face ag_news/{split} ({len(texts):,} rows)"  # pragma: no cover
    else:
        raise FileNotFoundError(f"no local AG News {split} file under DLDNA_DATA_DIR and allow_download=False")
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
        source += f", first {len(texts):,}"
    return AGNews(texts, torch.tensor(labels, dtype=torch.long), source)


def train_val_split(data: AGNews, val_fraction: float = 0.1, seed: int = 0) -> tuple[AGNews, AGNews]:
    """Stratified random split into (train, validation): ``val_fraction`` of every class is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    val_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, int(round(val_fraction * len(idx))))].tolist())
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[val_idx] = True
    return data.subset(np.flatnonzero(~val_mask)), data.subset(np.flatnonzero(val_mask))


@dataclass
class EncodedTexts:
    """A split tokenised once: ``input_ids`` ``(N, L)`` padded with ``pad_id``, ``lengths`` ``(N,)``, ``labels``.

    ``batches(...)`` yields dicts ``{"input_ids": (B, T), "attention_mask": (B, T) bool, "labels": (B,)}`` with
    ``T`` the longest row of the batch; with ``bucket=True`` rows of similar length are batched together
    (shuffled within and across buckets), which removes most padding.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    pad_id: int
    tokenizer_name: str = ""
    max_length: int = 0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "EncodedTexts":
        return EncodedTexts(self.input_ids.to(device), self.lengths.to(device), self.labels.to(device), self.pad_id,
                            self.tokenizer_name, self.max_length, dict(self.extra))

    def subset(self, index) -> "EncodedTexts":
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return EncodedTexts(self.input_ids[index], self.lengths[index], self.labels[index], self.pad_id,
                            self.tokenizer_name, self.max_length, dict(self.extra))

    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``index`` trimmed to their longest length, with the bool attention mask (True = real token)."""
        lengths = self.lengths[index]
        width = int(lengths.max())
        ids = self.input_ids[index, :width]
        mask = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[index]}

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                bucket: bool = True, drop_last: bool = False):
        """Yield batch dicts; see the class docstring. ``generator`` seeds the shuffle (CPU generator)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        lengths = self.lengths.cpu()
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if bucket:  # sort by length inside chunks of 50 batches, then shuffle the batches
            chunk = batch_size * 50
            pieces = [order[i : i + chunk] for i in range(0, n, chunk)]
            order = torch.cat([p[torch.argsort(lengths[p], stable=True)] for p in pieces])
        groups = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if drop_last and groups and len(groups[-1]) < batch_size:
            groups = groups[:-1]
        if shuffle and bucket:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        for g in groups:
            yield self.batch(g.to(self.input_ids.device))


class BatchLoader:
    """Re-iterable loader over ``EncodedTexts.batches`` (a new shuffle each pass) for ``dldna.training.train``."""

    def __init__(self, data: EncodedTexts, batch_size: int, shuffle: bool = True, seed: int = 0, bucket: bool = True,
                 drop_last: bool = False):
        self.data, self.batch_size, self.shuffle, self.bucket, self.drop_last = data, batch_size, shuffle, bucket, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self.data.batches(self.batch_size, self.shuffle, self.generator, self.bucket, self.drop_last)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


_ENCODE_CACHE: dict = {}


def encode_texts(texts: list[str], labels: torch.Tensor, tokenizer, max_length: int = 128,
                 tokenizer_name: str = "", cache_key: str | None = None) -> EncodedTexts:
    """Tokenise ``texts`` once with ``tokenizer.encode_batch`` (a ``tokenizers.Tokenizer``), truncating to
    ``max_length`` tokens (special tokens included: ``[CLS] ... [SEP]`` / ``... </s>`` keep their end token).

    With ``cache_key`` the result is kept in memory and returned again for the same key and settings.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if len(texts) != len(labels):
        raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) differ in length")
    key = None if cache_key is None else (cache_key, tokenizer_name, max_length, len(texts))
    if key is not None and key in _ENCODE_CACHE:
        return _ENCODE_CACHE[key]
    pad_token = next((t for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), None)
    if pad_token is None:
        raise ValueError("tokenizer has neither [PAD] nor <pad>")
    pad_id = tokenizer.token_to_id(pad_token)
    if len(texts) == 0:
        raise ValueError("texts is empty")
    saved_truncation, saved_padding = tokenizer.truncation, tokenizer.padding
    try:
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, direction="right")  # to the longest row
        encodings = tokenizer.encode_batch(list(texts))
    finally:  # leave the caller's tokenizer as it was
        if saved_truncation is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**{k: v for k, v in saved_truncation.items() if k in ("max_length", "stride", "strategy", "direction")})
        if saved_padding is None:
            tokenizer.no_padding()
        else:
            tokenizer.enable_padding(**{k: v for k, v in saved_padding.items() if k in ("direction", "pad_id", "pad_type_id", "pad_token", "length", "pad_to_multiple_of")})
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    lengths = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long).sum(1)
    out = EncodedTexts(ids, lengths, torch.as_tensor(labels, dtype=torch.long).clone(), pad_id, tokenizer_name, max_length)
    if key is not None:
        _ENCODE_CACHE[key] = out
    return out


def encode_ag_news(split: str, tokenizer_name: str, max_length: int = 128, limit: int | None = None) -> EncodedTexts:
    """``load_ag_news(split)`` tokenised once with ``dldna.data.tokenizers.load_tokenizer(tokenizer_name)``
    (cached in memory per split, tokenizer, length and limit)."""
    from dldna.data.tokenizers import load_tokenizer

    data = load_ag_news(split, limit=limit)
    enc = encode_texts(data.texts, data.labels, load_tokenizer(tokenizer_name), max_length, tokenizer_name,
                       cache_key=f"ag_news/{split}/{data.source}")
    enc.extra["source"] = data.source
    return enc
