"""Chapter 8 experiments: the encoder on AG News (v1 learned positions / v2 RoPE x BERT / T5 tokenizers).

Protocol (every number says which data it used):

* training data: the local AG News train file (the 12,000-row sample here), split 90/10 into train and a
  held-out validation set (stratified, seed 0); the 7,600-row test split is only ever evaluated, never used
  for training or for any choice (epochs, recipe and ensemble are all chosen on validation);
* optional masked-LM pretraining (Devlin et al. 2019) on the texts of the training file (no labels), as in
  "downstream datasets make surprisingly good pretraining corpora" (Krishna et al. 2023), then fine-tuning
  with AdamW, warmup + cosine, clipping and bf16 autocast on GPU through ``dldna.training.train``; the
  fine-tuning checkpoint with the best validation accuracy is kept;
* the TF-IDF + linear classifier baseline (scikit-learn) on the same rows, its n-gram range / classifier also
  chosen on validation;
* length extrapolation, after training at 128 tokens: (a) test articles of one class concatenated to 256 tokens,
  read at 128 and at 256 tokens; (b) every test article read at positions 128 .. 255 instead of 0 .. 127
  (same content, unseen positions: learned rows that were never trained, RoPE angles it never saw);
* gradient checkpointing on/off: peak memory and step time of one training step.

``python -m dldna.models.encoder_experiments --out DIR`` runs everything and writes ``DIR/encoder_agnews.json``
(``--tiny`` runs the same code at toy sizes on CPU in seconds). Used in chapter 8.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from dldna.config import seed_everything
from dldna.data.agnews import AG_NEWS_CLASSES, BatchLoader, EncodedTexts, encode_texts, load_ag_news, train_val_split
from dldna.data.tokenizers import load_tokenizer, special_ids, vocab_size
from dldna.models.encoder import EncoderClassifier, EncoderConfig, EncoderForMaskedLM, mask_tokens
from dldna.training import cosine_with_warmup, make_adamw, train

VERSIONS = {"v1": "learned", "v2": "rope"}
TOKENIZERS = ("bert-base-uncased", "t5-small")


@dataclass
class Recipe:
    """Training settings for one configuration (model size comes from ``EncoderConfig``)."""

    max_length: int = 128
    mlm_steps: int = 1500            # 0 = no pretraining (1,500 x 256 rows = 32 passes over the 12k texts)
    mlm_batch_size: int = 256
    mlm_lr: float = 1e-3
    mlm_probability: float = 0.15
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.06
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    eval_batch_size: int = 512
    seed: int = 0

    @classmethod
    def tiny(cls) -> "Recipe":
        return cls(max_length=32, mlm_steps=6, mlm_batch_size=16, epochs=2, batch_size=16, eval_batch_size=64)


def model_config(tokenizer_name: str, version: str, size: dict | None = None, **overrides) -> EncoderConfig:
    """The printed encoder config for a tokenizer (vocab 30,522 / 32,100) and version (v1 learned, v2 RoPE).

    Pooling: the BERT tokenizer puts ``[CLS]`` first, but T5 has no CLS token, so first-token pooling would read
    the first word; we mean-pool over real tokens for both, which is right for both tokenizers.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {tuple(VERSIONS)}, got {version!r}")
    ids = special_ids(tokenizer_name)
    base = dict(vocab_size=vocab_size(tokenizer_name), pad_token_id=ids["pad"], position=VERSIONS[version], pooling="mean")
    base.update(size or {})
    base.update(overrides)
    return EncoderConfig(**base)


def mask_token_id(tokenizer_name: str) -> int:
    """``[MASK]`` for BERT; T5 has no mask token, so its first sentinel ``<extra_id_0>`` plays that role."""
    ids = special_ids(tokenizer_name)
    if ids["mask"] is not None:
        return ids["mask"]
    return vocab_size(tokenizer_name) - 1  # <extra_id_0> = 32099, the last id (see dldna.data.tokenizers)


def _special_list(tokenizer_name: str) -> list[int]:
    return [v for v in special_ids(tokenizer_name).values() if v is not None]


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: EncodedTexts, batch_size: int = 512,
                   device: torch.device | str | None = None, amp: bool = True, position_offset: int = 0) -> torch.Tensor:
    """Logits ``(N, num_labels)`` in the order of ``data`` (float32, on CPU).

    ``position_offset`` adds a constant to every position id (the text then sits at positions
    ``offset .. offset + n - 1``), a length-extrapolation probe that keeps the content fixed.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(data), model.config.num_labels)
    order = torch.argsort(data.lengths.cpu())  # similar lengths together: little padding
    for i in range(0, len(data), batch_size):
        idx = order[i : i + batch_size]
        batch = data.batch(idx.to(data.input_ids.device))
        mask = batch["attention_mask"].to(dev)
        positions = None
        if position_offset:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + position_offset
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            logits = model(batch["input_ids"].to(dev), mask, position_ids=positions).logits
        out[idx] = logits.float().cpu()
    model.train(was_training)
    return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int = 4) -> dict:
    """Accuracy (%), per-class accuracy (%) and the confusion matrix (rows = true class)."""
    pred = logits.argmax(-1).cpu()
    labels = labels.cpu()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = (conf.diag().double() / conf.sum(1).clamp(min=1).double() * 100).tolist()
    return {"accuracy": float((pred == labels).double().mean() * 100), "per_class": per_class,
            "confusion": conf.tolist()}


# ----------------------------------------------------------------------------------------- MLM pretraining
class MaskedBatches:
    """Re-iterable loader of dynamically masked batches (a new mask every pass) for ``dldna.training.train``."""

    def __init__(self, data: EncodedTexts, batch_size: int, mask_id: int, vocab_size: int, special: list[int],
                 probability: float, seed: int = 0):
        self.loader = BatchLoader(data, batch_size, shuffle=True, seed=seed, drop_last=True)
        self.mask_id, self.vocab_size, self.special, self.probability = mask_id, vocab_size, special, probability
        self.generator = torch.Generator(device=data.input_ids.device).manual_seed(seed + 1)

    def __iter__(self):
        for batch in self.loader:
            ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.mask_id, self.vocab_size,
                                      self.special, self.probability, self.generator)
            yield {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}

    def __len__(self):
        return len(self.loader)


def pretrain_mlm(data: EncodedTexts, config: EncoderConfig, recipe: Recipe, tokenizer_name: str,
                 device: torch.device, progress: bool = False) -> tuple[dict, dict]:
    """Masked-LM pretraining on ``data``'s texts for ``recipe.mlm_steps`` steps; returns
    ``(encoder_state_dict, summary)``."""
    seed_everything(recipe.seed)
    model = EncoderForMaskedLM(config).to(device)
    loader = MaskedBatches(data.to(device), recipe.mlm_batch_size, mask_token_id(tokenizer_name), config.vocab_size,
                           _special_list(tokenizer_name), recipe.mlm_probability, recipe.seed)
    opt = make_adamw(model, lr=recipe.mlm_lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    steps = recipe.mlm_steps
    sched = cosine_with_warmup(opt, max(1, int(0.06 * steps)), steps, min_lr_ratio=0.1)
    hist = train(model, loader, opt, scheduler=sched, max_steps=steps, grad_clip=recipe.grad_clip,
                 amp_dtype="bf16", progress=progress, desc="mlm", count_tokens=lambda b: int(b["attention_mask"].sum()))
    losses = hist["loss"]
    summary = {"steps": steps, "epochs": steps / max(1, len(loader)),
               "time_s": hist["time_s"], "first_loss": float(np.mean(losses[:10])),
               "last_loss": float(np.mean(losses[-max(1, min(50, len(losses) // 5)):])), "tokens": hist["tokens"],
               "tokens_per_s": hist["tokens"] / hist["time_s"]}
    return copy.deepcopy(model.encoder.state_dict()), summary


# -------------------------------------------------------------------------------------------- fine-tuning
def finetune(train_data: EncodedTexts, val_data: EncodedTexts, config: EncoderConfig, recipe: Recipe,
             device: torch.device, encoder_state: dict | None = None, progress: bool = False,
             gradient_checkpointing: bool = False) -> tuple[EncoderClassifier, dict]:
    """Fine-tune an ``EncoderClassifier`` (from ``encoder_state`` if given); keep the best-validation weights."""
    seed_everything(recipe.seed)
    config = replace(config, label_smoothing=recipe.label_smoothing)
    model = EncoderClassifier(config)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    model.to(device)
    loader = BatchLoader(train_data.to(device), recipe.batch_size, shuffle=True, seed=recipe.seed)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * recipe.epochs
    opt = make_adamw(model, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = cosine_with_warmup(opt, max(1, int(recipe.warmup_frac * total)), total)
    best = {"val_accuracy": -1.0, "epoch": 0, "state": None}
    val_curve, eval_time = [], [0.0]

    def eval_fn(m):
        t0 = time.perf_counter()
        acc = classification_metrics(predict_logits(m, val_data, recipe.eval_batch_size, device), val_data.labels)["accuracy"]
        val_curve.append(acc)
        if acc > best["val_accuracy"]:
            best.update(val_accuracy=acc, epoch=len(val_curve), state=copy.deepcopy(m.state_dict()))
        eval_time[0] += time.perf_counter() - t0
        return {"val_accuracy": acc}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hist = train(model, loader, opt, scheduler=sched, max_steps=total, grad_clip=recipe.grad_clip, amp_dtype="bf16",
                 eval_fn=eval_fn, eval_every=steps_per_epoch, progress=progress, desc="finetune",
                 gradient_checkpointing=gradient_checkpointing, count_tokens=lambda b: int(b["attention_mask"].sum()))
    model.load_state_dict(best["state"])
    train_time = hist["time_s"] - eval_time[0]
    summary = {
        "epochs": recipe.epochs, "steps": total, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
        "val_curve": val_curve, "train_loss_last": float(np.mean(hist["loss"][-20:])), "time_s": hist["time_s"],
        "train_tokens": hist["tokens"], "tokens_per_s": hist["tokens"] / train_time, "eval_time_s": eval_time[0],
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    return model, summary


# ------------------------------------------------------------------------------------ length extrapolation
def concatenated_long_inputs(data: EncodedTexts, tokenizer_name: str, length: int = 256) -> EncodedTexts:
    """Each test row followed by the next rows of the same class, cut to exactly ``length`` tokens.

    BERT rows keep ``[CLS] ... [SEP]`` around the joined bodies; T5 rows end with ``</s>``. Rows shorter than
    ``length`` after using every row of the class are kept shorter. Labels are unchanged.
    """
    ids = special_ids(tokenizer_name)
    lead = [ids["cls"]] if ids["cls"] is not None else []
    tail = [ids["sep"] if ids["sep"] is not None else ids["eos"]]
    bodies = []
    for row, n in zip(data.input_ids.tolist(), data.lengths.tolist()):
        bodies.append(row[len(lead) : n - 1])
    labels = data.labels.tolist()
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    budget = length - len(lead) - len(tail)
    out = torch.full((len(bodies), length), data.pad_id, dtype=torch.long)
    lengths = torch.zeros(len(bodies), dtype=torch.long)
    for y, members in by_class.items():
        for j, i in enumerate(members):
            body, k = list(bodies[i]), 1
            while len(body) < budget and k < len(members):
                body += bodies[members[(j + k) % len(members)]]
                k += 1
            seq = lead + body[:budget] + tail
            out[i, : len(seq)] = torch.tensor(seq)
            lengths[i] = len(seq)
    return EncodedTexts(out, lengths, data.labels.clone(), data.pad_id, tokenizer_name, length)


def truncate(data: EncodedTexts, tokenizer_name: str, length: int) -> EncodedTexts:
    """Rows cut to ``length`` tokens, keeping the closing ``[SEP]``/``</s>`` as the tokenizer's truncation does."""
    ids = special_ids(tokenizer_name)
    end = ids["sep"] if ids["sep"] is not None else ids["eos"]
    new_len = data.lengths.clamp(max=length)
    out = data.input_ids[:, :length].clone()
    cut = data.lengths > length
    out[cut, length - 1] = end
    return EncodedTexts(out, new_len, data.labels.clone(), data.pad_id, tokenizer_name, length)


# ---------------------------------------------------------------------------------- gradient checkpointing
def checkpointing_benchmark(config: EncoderConfig, batch_size: int, seq_len: int, device: torch.device,
                            repeats: int = 5) -> list[dict]:
    """Peak memory (MiB above the model and optimizer state, ``dldna.bench.peak_memory_mb``) and median time (ms)
    of one training step (bf16 autocast on GPU), gradient checkpointing off and on."""
    from dldna.bench import peak_memory_mb, time_fn

    rows = []
    for ckpt in (False, True):
        seed_everything(0)
        model = EncoderClassifier(replace(config, max_position_embeddings=max(seq_len, config.max_position_embeddings)))
        model.to(device).train()
        if ckpt:
            model.gradient_checkpointing_enable()
        opt = make_adamw(model, lr=1e-4)
        ids = torch.randint(1, config.vocab_size, (batch_size, seq_len), device=device)
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        mask[:, seq_len * 3 // 4 :] = False  # a padded tail, as in real batches
        labels = torch.randint(0, config.num_labels, (batch_size,), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(ids, mask, labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # creates the optimizer state, so the peak below is the step's own activations and gradients
        peak = peak_memory_mb(step, device)
        seconds = time_fn(step, warmup=1, repeats=repeats, device=device)
        rows.append({"gradient_checkpointing": ckpt, "batch_size": batch_size, "seq_len": seq_len,
                     "step_ms": seconds * 1e3, "peak_activation_mb": peak})
        del model, opt
    return rows


# ------------------------------------------------------------------------------------------ TF-IDF baseline
def tfidf_baseline(train_texts, train_labels, val_texts, val_labels, test_texts, test_labels,
                   classifiers: tuple[str, ...] = ("LinearSVC", "LogisticRegression")) -> dict:
    """TF-IDF (unigrams or uni+bigrams, sublinear tf) + LinearSVC / LogisticRegression; the variant is chosen
    on validation, then refit on train+validation (the same 12k rows the encoders learn from) and tested."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    def make(ngram, clf_name):
        vec = TfidfVectorizer(ngram_range=ngram, sublinear_tf=True)
        clf = LinearSVC(C=1.0) if clf_name == "LinearSVC" else LogisticRegression(C=10.0, max_iter=2000)
        return vec, clf

    rows = []
    y_tr, y_val, y_te = (np.asarray(y) for y in (train_labels, val_labels, test_labels))
    for ngram in ((1, 1), (1, 2)):
        for clf_name in classifiers:
            vec, clf = make(ngram, clf_name)
            clf.fit(vec.fit_transform(train_texts), y_tr)
            val_acc = float((clf.predict(vec.transform(val_texts)) == y_val).mean() * 100)
            vec, clf = make(ngram, clf_name)  # refit on train + validation (all labelled rows)
            clf.fit(vec.fit_transform(list(train_texts) + list(val_texts)), np.concatenate([y_tr, y_val]))
            pred = clf.predict(vec.transform(test_texts))
            logits = torch.nn.functional.one_hot(torch.as_tensor(pred), 4).float()
            metrics = classification_metrics(logits, torch.as_tensor(y_te))
            rows.append({"model": f"TF-IDF {'uni' if ngram == (1, 1) else 'uni+bi'}gram + {clf_name}",
                         "val_accuracy": val_acc, **metrics})
    best = max(rows, key=lambda r: r["val_accuracy"])
    return {"rows": rows, "selected_on_val": best["model"]}


# ------------------------------------------------------------------------------------------------- driver
def run_all(recipe: Recipe | None = None, size: dict | None = None, device: torch.device | str | None = None,
            limit_train: int | None = None, limit_test: int | None = None, versions=("v1", "v2"),
            tokenizers=TOKENIZERS, extrapolation_length: int = 256, ckpt_bench: tuple[int, int] | None = (64, 512),
            baseline: bool | tuple[str, ...] = True, no_mlm_ablation: tuple[str, ...] = (), progress: bool = False, log=print,
            on_update=None, seeds: tuple[int, ...] | None = None) -> dict:
    """Train and test every configuration; returns a JSON-serialisable dict (see the module docstring).

    ``baseline`` may name the TF-IDF classifiers to fit (e.g. ``("LinearSVC",)``). ``on_update(result)`` is called after every run (to save partial results). ``no_mlm_ablation`` names runs (e.g. ``"v2-bert-base-uncased"``) to fine-tune a second time from a random
    initialisation, to measure what the MLM warm start buys (``result["ablation_no_mlm"]``). ``seeds`` trains every
    configuration once per seed (default: ``recipe.seed`` only); runs after the first seed are named ``...-seedN``
    and the ensemble averages every run.
    """
    recipe = recipe or Recipe()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    train_all = load_ag_news("train", limit=limit_train)
    test = load_ag_news("test", limit=limit_test)
    train_part, val_part = train_val_split(train_all, 0.1, seed=0)
    result = {"train_source": train_all.source, "test_source": test.source, "n_train": len(train_part),
              "n_val": len(val_part), "n_test": len(test), "recipe": asdict(recipe), "size": size or {},
              "classes": list(AG_NEWS_CLASSES), "runs": [], "device": str(dev)}
    if baseline:
        t0 = time.perf_counter()
        classifiers = baseline if isinstance(baseline, tuple) else ("LinearSVC", "LogisticRegression")
        result["baseline"] = tfidf_baseline(train_part.texts, train_part.labels, val_part.texts, val_part.labels,
                                            test.texts, test.labels, classifiers)
        result["baseline"]["time_s"] = time.perf_counter() - t0
        log(f"baseline: {[(r['model'], round(r['accuracy'], 2)) for r in result['baseline']['rows']]}")
    result["ablation_no_mlm"] = []

    all_test_logits, all_val_logits = {}, {}
    for tok_name in tokenizers:
        tok = load_tokenizer(tok_name)
        t0 = time.perf_counter()
        enc_train = encode_texts(train_part.texts, train_part.labels, tok, recipe.max_length, tok_name)
        enc_val = encode_texts(val_part.texts, val_part.labels, tok, recipe.max_length, tok_name)
        enc_test = encode_texts(test.texts, test.labels, tok, recipe.max_length, tok_name)
        enc_test_full = encode_texts(test.texts, test.labels, tok, 512, tok_name)
        enc_mlm = encode_texts(train_all.texts, train_all.labels, tok, recipe.max_length, tok_name)  # texts only
        tokenize_s = time.perf_counter() - t0
        long_test = concatenated_long_inputs(enc_test_full, tok_name, extrapolation_length)
        long_test_128 = truncate(long_test, tok_name, recipe.max_length)
        for version, seed in [(v, s) for v in versions for s in (seeds or (recipe.seed,))]:
            cfg = model_config(tok_name, version, size, max_position_embeddings=max(512, extrapolation_length))
            name = f"{version}-{tok_name}" + (f"-seed{seed}" if seeds and seed != seeds[0] else "")
            run_recipe = replace(recipe, seed=seed)
            run = {"name": name, "version": version, "position": cfg.position, "tokenizer": tok_name,
                   "config": cfg.to_dict(), "tokenize_s": tokenize_s, "seed": seed}
            state = None
            if recipe.mlm_steps > 0:
                state, run["mlm"] = pretrain_mlm(enc_mlm, cfg, run_recipe, tok_name, dev, progress)
            model, run["finetune"] = finetune(enc_train, enc_val, cfg, run_recipe, dev, state, progress)
            test_logits = predict_logits(model, enc_test, recipe.eval_batch_size, dev)
            run["test"] = classification_metrics(test_logits, enc_test.labels)
            run["val_accuracy"] = run["finetune"]["val_accuracy"]
            all_test_logits[name] = test_logits
            all_val_logits[name] = predict_logits(model, enc_val, recipe.eval_batch_size, dev)
            run["extrapolation"] = {
                "length_train": recipe.max_length, "length_long": extrapolation_length,
                "mean_tokens_long": float(long_test.lengths.float().mean()),
                "accuracy_at_train_length": classification_metrics(
                    predict_logits(model, long_test_128, recipe.eval_batch_size, dev), long_test.labels)["accuracy"],
                "accuracy_at_long_length": classification_metrics(
                    predict_logits(model, long_test, recipe.eval_batch_size, dev), long_test.labels)["accuracy"],
                "position_offset": recipe.max_length,
                "accuracy_positions_shifted": classification_metrics(
                    predict_logits(model, enc_test, recipe.eval_batch_size, dev, position_offset=recipe.max_length),
                    enc_test.labels)["accuracy"],
            }
            result["runs"].append(run)
            if name in no_mlm_ablation and recipe.mlm_steps > 0:
                scratch, summary = finetune(enc_train, enc_val, cfg, run_recipe, dev, None, progress)
                result["ablation_no_mlm"].append({"name": name, "finetune": summary, "val_accuracy": summary["val_accuracy"],
                                                  "test": classification_metrics(
                                                      predict_logits(scratch, enc_test, recipe.eval_batch_size, dev),
                                                      enc_test.labels)})
                log(f"{name} without MLM: val {summary['val_accuracy']:.2f} "
                    f"test {result['ablation_no_mlm'][-1]['test']['accuracy']:.2f}")
                del scratch
            if on_update is not None:
                on_update(result)
            log(f"{name}: val {run['val_accuracy']:.2f} test {run['test']['accuracy']:.2f} "
                f"extrap {run['extrapolation']['accuracy_at_train_length']:.2f}->"
                f"{run['extrapolation']['accuracy_at_long_length']:.2f} mlm {run.get('mlm', {}).get('time_s', 0):.1f}s "
                f"ft {run['finetune']['time_s']:.1f}s ({time.perf_counter() - t_start:.0f}s total)")
            del model
    # ensemble of every configuration (mean of softmax), reported beside the single models
    if len(all_test_logits) > 1:
        probs = torch.stack([l.softmax(-1) for l in all_test_logits.values()]).mean(0)
        val_probs = torch.stack([l.softmax(-1) for l in all_val_logits.values()]).mean(0)
        result["ensemble"] = {"members": list(all_test_logits),
                              "val_accuracy": classification_metrics(val_probs, val_part.labels)["accuracy"],
                              "test": classification_metrics(probs, test.labels)}
    if ckpt_bench:
        cfg = model_config(tokenizers[0], "v2", size)
        result["checkpointing"] = checkpointing_benchmark(cfg, ckpt_bench[0], ckpt_bench[1], dev)
    if result["runs"]:
        best = max(result["runs"], key=lambda r: r["val_accuracy"])
        result["selected_on_val"] = {"name": best["name"], "test_accuracy": best["test"]["accuracy"]}
    result["total_time_s"] = time.perf_counter() - t_start
    result["complete"] = True
    return result


def results_table(result: dict) -> list[dict]:
    """Rows for the chapter's table: every encoder run, the ensemble, and the TF-IDF baselines."""
    rows = []
    for r in result["runs"]:
        rows.append({"model": f"encoder {r['version']} ({r['position']}), {r['tokenizer']}",
                     "val_accuracy": r["val_accuracy"], "test_accuracy": r["test"]["accuracy"],
                     **{f"test_{c}": a for c, a in zip(result["classes"], r["test"]["per_class"])}})
    if "ensemble" in result:
        e = result["ensemble"]
        rows.append({"model": f"ensemble of the {len(e['members'])} encoders", "val_accuracy": e["val_accuracy"],
                     "test_accuracy": e["test"]["accuracy"],
                     **{f"test_{c}": a for c, a in zip(result["classes"], e["test"]["per_class"])}})
    for a in result.get("ablation_no_mlm", []):
        rows.append({"model": f"{a['name']} without MLM warm start", "val_accuracy": a["val_accuracy"],
                     "test_accuracy": a["test"]["accuracy"],
                     **{f"test_{c}": x for c, x in zip(result["classes"], a["test"]["per_class"])}})
    for b in result.get("baseline", {}).get("rows", []):
        rows.append({"model": b["model"], "val_accuracy": b["val_accuracy"], "test_accuracy": b["accuracy"],
                     **{f"test_{c}": a for c, a in zip(result["classes"], b["per_class"])}})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="directory for encoder_agnews.json (default: results/)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--mlm-steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline (run it on a CPU)")
    parser.add_argument("--ablate", nargs="*", default=[], help="runs to repeat without MLM, e.g. v2-bert-base-uncased")
    parser.add_argument("--only-baseline", action="store_true", help="only the TF-IDF baseline (CPU)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="train every configuration per seed")
    parser.add_argument("--no-ckpt-bench", action="store_true", help="skip the gradient-checkpointing measurement")
    parser.add_argument("--name", default=None, help="result name (default encoder_agnews)")
    args = parser.parse_args(argv)
    from dldna.results import save_result

    recipe = Recipe.tiny() if args.tiny else Recipe()
    for field_name, value in (("mlm_steps", args.mlm_steps), ("epochs", args.epochs)):
        if value is not None:
            recipe = replace(recipe, **{field_name: value})
    kwargs = dict(baseline=not args.no_baseline, no_mlm_ablation=tuple(args.ablate),
                  seeds=tuple(args.seeds) if args.seeds else None)
    if args.tiny:
        kwargs.update(size=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
                      limit_train=400, limit_test=200, ckpt_bench=(4, 64), extrapolation_length=64)
    if args.no_ckpt_bench:
        kwargs["ckpt_bench"] = None
    if args.only_baseline:
        kwargs.update(versions=(), tokenizers=(), ckpt_bench=None)
    import sys

    name = (args.name or "encoder_agnews") + ("_baseline" if args.only_baseline else "") + ("_tiny" if args.tiny else "")

    def save_partial(partial):
        save_result(name + "_partial", {**partial, "complete": False}, "partial", out_dir=args.out)

    result = run_all(recipe, on_update=save_partial if args.out else None, log=lambda *a: print(*a, flush=True), **kwargs)

    shown = list(argv if argv is not None else sys.argv[1:])
    if "--out" in shown:  # the output folder is not part of what was measured
        i = shown.index("--out")
        del shown[i : i + 2]
    command = "python -m dldna.models.encoder_experiments " + " ".join(shown)
    path = save_result(name, result, command.strip(), out_dir=args.out)
    print(f"wrote {path}")
    for row in results_table(result):
        print(f"{row['model']:<55} val {row['val_accuracy']:6.2f}  test {row['test_accuracy']:6.2f}")


if __name__ == "__main__":
    main()
