"""Printed-book entry points for training the encoder on AG News (``train_and_test_all_versions`` and friends).

Same names and signatures as the printed ``train_ag_news.py``, rebuilt on ``dldna``: data and tokenizers are
local (no download), the tokenizer is built once, training never silently skips (the printed code reused any
``saved_models/*.pth`` it found), checkpoints load with ``weights_only=True``, seeds are fixed, and pooling is
the mean over real tokens (right for T5, which has no CLS token). Fast mode (``DLDNA_FAST=1``) shrinks the data,
the model and the schedule so that the four runs finish in seconds on a CPU. Used in chapter 8.
"""
from __future__ import annotations

import os
from dataclasses import replace
from functools import lru_cache

import torch
from torch.utils.data import Dataset

from dldna.config import device as default_device
from dldna.config import fast, is_fast
from dldna.data.agnews import AG_NEWS_CLASSES, encode_ag_news, load_ag_news, train_val_split, encode_texts
from dldna.data.tokenizers import load_tokenizer
from dldna.models import encoder as _enc
from dldna.models.encoder_experiments import (TOKENIZERS, VERSIONS, Recipe, classification_metrics, finetune,
                                              model_config, predict_logits, pretrain_mlm, results_table, run_all)

MODEL_PATH = "saved_models"
MODEL_FILE_BASE = "efficient_transformer_agnews_encoder"
MAX_LENGTH = 128
BATCH_SIZE = 64
TransformerConfig = _enc.EncoderConfig

FAST_SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def fast_recipe() -> Recipe:
    """The shrunken schedule of fast mode (a few hundred rows, one epoch, a 5-step MLM warm start)."""
    return Recipe(max_length=64, mlm_steps=5, mlm_batch_size=32, epochs=1, batch_size=32, eval_batch_size=128,
                  lr=1e-3)


class AGNewsDataset(Dataset):
    """Printed ``AGNewsDataset(split, tokenizer_name)``: items ``{"input_ids", "attention_mask", "label"}`` padded
    to ``MAX_LENGTH``, tokenised once for the whole split from the local files."""

    def __init__(self, split: str = "train", tokenizer_name: str = "bert-base-uncased", limit: int | None = None):
        self.encoded = encode_ag_news(split, tokenizer_name, MAX_LENGTH, limit=limit)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, idx):
        n = int(self.encoded.lengths[idx])
        ids = torch.full((MAX_LENGTH,), self.encoded.pad_id, dtype=torch.long)
        ids[:n] = self.encoded.input_ids[idx, :n]
        return {"input_ids": ids, "attention_mask": (torch.arange(MAX_LENGTH) < n).long(),
                "label": self.encoded.labels[idx]}


class EncoderClassifier(_enc.EncoderClassifier):
    """Printed ``EncoderClassifier(config, version)``: ``forward`` returns the logits ``(B, 4)`` and accepts the
    printed ``(B, 1, 1, T)`` masks as well as ``(B, T)`` ones."""

    def __init__(self, config: _enc.EncoderConfig, version: str = "v2"):
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {tuple(VERSIONS)}, got {version!r}")
        super().__init__(replace(config, position=VERSIONS[version]))
        self.version = version

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, 0, 0, :]
        return super().forward(input_ids, attention_mask, labels, position_ids).logits


def _file(tokenizer_name: str, version: str, path: str) -> str:
    return os.path.join(path, f"{MODEL_FILE_BASE}_{tokenizer_name}_{version}.pth")


def save_model(model, config, tokenizer_name: str, version: str, path: str = MODEL_PATH) -> str:
    """Save weights and config (plain types only, loadable with ``weights_only=True``)."""
    os.makedirs(path, exist_ok=True)
    target = _file(tokenizer_name, version, path)
    torch.save({"model_state_dict": model.state_dict(), "config": config.to_dict(), "tokenizer_name": tokenizer_name,
                "version": version}, target)
    return target


def load_model(tokenizer_name: str, version: str, path: str = MODEL_PATH):
    """Load ``save_model``'s file onto the CPU; returns ``(model, config)``."""
    saved = torch.load(_file(tokenizer_name, version, path), map_location="cpu", weights_only=True)
    config = _enc.EncoderConfig.from_dict(saved["config"])
    model = EncoderClassifier(config, version=saved["version"])
    model.load_state_dict(saved["model_state_dict"])
    return model, config


def _splits(limit_train=None):
    data = load_ag_news("train", limit=limit_train)
    return train_val_split(data, 0.1, seed=0), data


def train_agnews(config=None, tokenizer_name: str = "bert-base-uncased", version: str = "v2", verbose: bool = True,
                 recipe: Recipe | None = None, limit_train: int | None = None):
    """Train one configuration (MLM warm start on the training texts, then fine-tuning; best validation
    epoch kept) on the local training file; returns the ``EncoderClassifier``."""
    recipe = recipe or (fast_recipe() if is_fast() else Recipe())
    limit_train = limit_train if limit_train is not None else fast(None, 400)
    (train_part, val_part), all_rows = _splits(limit_train)
    tok = load_tokenizer(tokenizer_name)
    enc = [encode_texts(d.texts, d.labels, tok, recipe.max_length, tokenizer_name) for d in (train_part, val_part, all_rows)]
    if config is None:
        config = model_config(tokenizer_name, version, FAST_SIZE if is_fast() else None)
    config = replace(config, position=VERSIONS[version])
    dev = default_device()
    state = pretrain_mlm(enc[2], config, recipe, tokenizer_name, dev, progress=verbose)[0] if recipe.mlm_steps else None
    inner, summary = finetune(enc[0], enc[1], config, recipe, dev, state, progress=verbose)
    if verbose:
        print(f"{version}/{tokenizer_name}: best validation accuracy {summary['val_accuracy']:.2f}% "
              f"(epoch {summary['best_epoch']}, {all_rows.source})")
    model = EncoderClassifier(inner.config, version)
    model.load_state_dict(inner.state_dict())
    return model


def test_agnews(tokenizer_name: str = "bert-base-uncased", version: str = "v2", model=None,
                limit: int | None = None) -> float:
    """Test accuracy (%) on the local AG News test split (7,600 rows); loads the saved model if none is given."""
    if model is None:
        model, _ = load_model(tokenizer_name, version)
    data = encode_ag_news("test", tokenizer_name, MAX_LENGTH, limit=limit if limit is not None else fast(None, 200))
    inner = _enc.EncoderClassifier(model.config)
    inner.load_state_dict(model.state_dict())
    inner.to(next(model.parameters()).device)
    return classification_metrics(predict_logits(inner, data), data.labels)["accuracy"]


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_name: str):
    tok = load_tokenizer(tokenizer_name)
    tok.enable_truncation(max_length=MAX_LENGTH)
    return tok


def predict_news(text: str, model, config=None, device=None, tokenizer_name: str = "bert-base-uncased") -> dict:
    """Class and confidence for one news text (the tokenizer is built once and cached)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ids = torch.tensor([_tokenizer(tokenizer_name).encode(text).ids], device=dev)
    model.eval()
    with torch.no_grad():
        probs = model(ids, torch.ones_like(ids, dtype=torch.bool)).float().softmax(-1)[0]
    k = int(probs.argmax())
    return {"text": text, "predicted_class": AG_NEWS_CLASSES[k], "confidence": float(probs[k])}


DEMO_NEWS = [
    "Oil prices surge as OPEC announces production cuts, impacting global markets",
    "Manchester United defeats Liverpool in dramatic Premier League clash",
    "SpaceX successfully launches new satellite constellation for global internet coverage",
    "New study shows promising results for Alzheimer's treatment",
    "Stock market hits all-time high amid positive economic indicators",
]


def demo_news_classification(tokenizer_name: str = "bert-base-uncased", version: str = "v2", model=None) -> list[dict]:
    """Print and return the predictions for the printed book's five example headlines."""
    if model is None:
        model, _ = load_model(tokenizer_name, version)
    results = [predict_news(news, model, tokenizer_name=tokenizer_name) for news in DEMO_NEWS]
    print(f"\n=== News Classification Demo ({tokenizer_name}, {version}) ===")
    for r in results:
        print(f"{r['predicted_class']:<9} {r['confidence']:.3f}  {r['text']}")
    return results


def train_and_test_all_versions(verbose: bool = False) -> dict:
    """Train and test v1 (learned positions) and v2 (RoPE) with the BERT and T5 tokenizers; print the table.

    Full size (GPU): the chapter's recipe (``Recipe()``: MLM warm start on the 12k training texts, fine-tuning
    on 90 % of them, best validation epoch). Fast mode: 400 training rows, 200 test rows, a 2-layer 32-wide
    model, one epoch, only the LinearSVC baselines. Returns the result dict of ``dldna.models.encoder_experiments.run_all``.
    """
    if is_fast():
        result = run_all(fast_recipe(), size=FAST_SIZE, limit_train=400, limit_test=200, ckpt_bench=None,
                         extrapolation_length=96, baseline=("LinearSVC",), progress=verbose,
                         log=print if verbose else (lambda *_: None))
    else:
        result = run_all(Recipe(), progress=verbose, log=print if verbose else (lambda *_: None))
    print(f"\n=== Results (trained on {result['train_source']}, tested on {result['test_source']}) ===")
    print("| Model Version | Tokenizer          | Test Accuracy |")
    print("|---------------|--------------------|---------------|")
    for r in result["runs"]:
        print(f"| {r['version']}            | {r['tokenizer']:<18} | {r['test']['accuracy']:.2f}%        |")
    for row in results_table(result)[len(result["runs"]):]:
        print(f"| {row['model']:<33} | {row['test_accuracy']:.2f}%        |")
    return result


def main():
    train_and_test_all_versions(verbose=True)


__all__ = ["AGNewsDataset", "BATCH_SIZE", "DEMO_NEWS", "EncoderClassifier", "MAX_LENGTH", "MODEL_FILE_BASE",
           "MODEL_PATH", "TOKENIZERS", "TransformerConfig", "demo_news_classification", "load_model", "main",
           "predict_news", "save_model", "test_agnews", "train_agnews", "train_and_test_all_versions"]

if __name__ == "__main__":
    main()
