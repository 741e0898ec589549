"""Three small jobs for simple Mistral (chapter 10): counting, two-operand arithmetic and WikiSQL logical forms.

Each ``run_*`` function builds the data, trains ``MistralForCausalLM`` with ``dldna.training.train`` and
evaluates on held-out data with batched greedy ``generate`` (KV cache, left padding), returning a JSON-ready
dict (config, loss curve, metrics, examples, run time). Run from a shell::

    python -m dldna.examples.mistral_tasks seq          # sequence continuation
    python -m dldna.examples.mistral_tasks math         # arithmetic, split by expression
    python -m dldna.examples.mistral_tasks sql --save   # WikiSQL (GPU-sized), writes results/mistral_wikisql.json

``DLDNA_FAST=1`` shrinks every job to seconds on a CPU.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from dldna.config import device as default_device
from dldna.config import fast, seed_everything
from dldna.data.arithmetic import (ArithmeticDataset, ArithmeticTokenizer, Problem, arithmetic_dataset, pad_batch,
                                   parse_answer, safe_eval)
from dldna.data.sequences import SimpleDataset, create_simple_data, expected_continuation, valid_starts
from dldna.models.generation import causal_lm_loss
from dldna.models.mistral import MistralConfig, MistralForCausalLM
from dldna.training import cosine_with_warmup, make_adamw, train


def lm_loss(logits, labels: torch.Tensor) -> torch.Tensor:
    """Loss for ``(input_ids, labels)`` batches with ``dldna.training.train``: next-token cross-entropy.

    ``logits`` ``(B, N, V)`` (or a model output with ``.logits``); ``labels`` ``(B, N)``, shifted inside.
    """
    return causal_lm_loss(getattr(logits, "logits", logits), labels)


@torch.no_grad()
def greedy_complete(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int, batch_size: int = 256, device=None) -> list[list[int]]:
    """Greedy continuations (eos and anything after it removed) of token-id ``prompts``, left-padded in batches."""
    device = device or next(model.parameters()).device
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids, mask = pad_batch(chunk, pad_token_id, side="left")
        gen = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        for row in gen[:, ids.shape[1] :].tolist():
            out.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return out


def train_epochs(model, loader, optimizer, scheduler=None, epochs: int = 1, device=None,
                 scheduler_unit: str = "auto", grad_clip: float | None = 1.0, verbose: bool = True) -> list[float]:
    """The printed examples' loop: ``epochs`` passes of ``dldna.training.train``, one printed line per epoch.

    ``scheduler_unit``: ``"epoch"`` steps the scheduler once per epoch, ``"step"`` after every optimizer step;
    ``"auto"`` picks ``"epoch"`` for a scheduler whose ``T_max`` equals ``epochs`` (the printed arithmetic cell's
    ``CosineAnnealingLR``) and ``"step"`` otherwise (the printed SQL cell's warmup schedule counts optimizer
    steps; stepping it per epoch was why the printed run never left its warmup). Returns mean loss per epoch.
    """
    if scheduler_unit not in ("auto", "epoch", "step"):
        raise ValueError(f"scheduler_unit must be 'auto', 'epoch' or 'step', got {scheduler_unit!r}")
    if scheduler_unit == "auto":
        scheduler_unit = "epoch" if getattr(scheduler, "T_max", None) == epochs else "step"
    means = []
    for epoch in range(epochs):
        hist = train(model, loader, optimizer, scheduler=scheduler if scheduler_unit == "step" else None, epochs=1,
                     loss_fn=lm_loss, device=device, grad_clip=grad_clip, progress=False)
        if scheduler is not None and scheduler_unit == "epoch":
            scheduler.step()
        means.append(sum(hist["loss"]) / max(1, len(hist["loss"])))
        if verbose:
            lr = f", LR: {optimizer.param_groups[0]['lr']:.6f}" if scheduler is not None else ""
            print(f"Epoch {epoch + 1}/{epochs}, Average Loss: {means[-1]:.4f}{lr}")
    return means


def _epoch_means(hist: dict, steps_per_epoch: int) -> list[float]:
    losses = hist["loss"]
    return [sum(losses[i : i + steps_per_epoch]) / len(losses[i : i + steps_per_epoch])
            for i in range(0, len(losses), steps_per_epoch)]


# ---------------------------------------------------------------------------------------------- 1. counting
def sequence_config(vocab_size: int = 51, seq_length: int = 10, **overrides) -> MistralConfig:
    """The printed model for counting: 2 layers, width 32, GQA 4:2, window = training length, tied embeddings."""
    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=seq_length,
                use_cache=False, pad_token_id=None, bos_token_id=None, eos_token_id=vocab_size - 1,
                tie_word_embeddings=True)
    base.update(overrides)
    return MistralConfig(**base)


def run_sequence_task(vocab_size: int = 51, seq_length: int = 10, num_examples: int = 1000,
                      held_out_starts: Sequence[int] = (3, 17, 29, 38), epochs: int = 5, batch_size: int = 8,
                      lr: float = 5e-3, max_length: int = 20, seed: int = 0, device=None,
                      progress: bool = True, return_model: bool = False) -> dict[str, Any]:
    """Train on counting windows that never start at ``held_out_starts``; generate from each held-out start.

    Prompts are the first 3 numbers of each held-out start; a continuation is exact when it equals
    ``expected_continuation`` (counting up to ``max_length`` tokens, eos after the largest number). Generation
    runs to ``max_length = 2 * seq_length`` tokens, beyond the window and the training length: the rolling
    cache and relative RoPE make positions never seen in training harmless. ``return_model`` adds the trained
    model under ``"model"`` (the rest of the dict is JSON-ready).
    """
    device = torch.device(device) if device is not None else default_device()
    seed_everything(seed)
    held = sorted(set(held_out_starts))
    bad = [s for s in held if s not in valid_starts(vocab_size, seq_length)]
    if bad:
        raise ValueError(f"held_out_starts {bad} are not valid start numbers")
    data = create_simple_data(vocab_size, num_examples, seq_length, exclude_starts=held)
    loader = DataLoader(SimpleDataset(data, seq_length), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model = MistralForCausalLM(sequence_config(vocab_size, seq_length)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    hist = train(model, loader, optimizer, epochs=epochs, loss_fn=lm_loss, device=device, progress=progress,
                 desc="counting")
    train_s = time.perf_counter() - t0
    eos = vocab_size - 1
    prompts = [list(range(s, s + 3)) for s in held]
    outs = greedy_complete(model, prompts, max_length - 3, eos, eos, device=device)
    rows = []
    for s, p, o in zip(held, prompts, outs):
        full = (p + o)[:max_length]
        rows.append({"start": s, "generated": full, "exact": full == expected_continuation(p, vocab_size, max_length)})
    result = {"task": "sequence", "held_out_starts": held, "epoch_loss": _epoch_means(hist, len(loader)),
              "loss": hist["loss"], "results": rows, "exact": sum(r["exact"] for r in rows) / len(rows),
              "train_s": train_s, "config": model.config.to_dict()}
    if return_model:
        result["model"] = model
    return result


# -------------------------------------------------------------------------------------------- 2. arithmetic
def task_config(vocab_size: int, pad_id: int, eos_id: int, width: int, window: int, **overrides) -> MistralConfig:
    """4 layers, GQA 8:4, ``hidden_size = width``, ``intermediate_size = 4 * width``, ``sliding_window = window``
    (= max positions); ``overrides`` replace any field."""
    base = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=window,
                sliding_window=window, use_cache=False, pad_token_id=pad_id, bos_token_id=None, eos_token_id=eos_id)
    base.update(overrides)
    return MistralConfig(**base)


def arithmetic_config(vocab_size: int, pad_id: int, eos_id: int, **overrides) -> MistralConfig:
    """Arithmetic model: width 128 (window 32, longer than any example)."""
    return task_config(vocab_size, pad_id, eos_id, 128, 32, **overrides)


def evaluate_arithmetic(model, problems, tokenizer: ArithmeticTokenizer, reverse_answer: bool = False,
                        device=None) -> tuple[float, list[dict]]:
    """Exact-match accuracy of greedy answers to ``problems`` and the per-problem records."""
    prompts = [tokenizer.encode(p.prompt()) for p in problems]
    outs = greedy_complete(model, prompts, 8, tokenizer.eos_id, tokenizer.pad_id, device=device)
    records = []
    for p, o in zip(problems, outs):
        text = tokenizer.decode(o)
        records.append({"expression": p.expression, "answer": p.answer, "output": text,
                        "correct": parse_answer(text, reverse_answer) == p.answer})
    return sum(r["correct"] for r in records) / len(records), records


ARITHMETIC_VARIANTS = {
    "base": dict(),
    "reversed": dict(reverse_answer=True),
    "wide": dict(hidden_size=256, intermediate_size=1024),
    "long_wd1": dict(steps=8000, weight_decay=1.0),
    "long_wd1_reversed": dict(steps=8000, weight_decay=1.0, reverse_answer=True),
    "range50_reversed": dict(steps=8000, reverse_answer=True, train_max_operand=50),
    "range99_reversed": dict(steps=8000, reverse_answer=True, train_max_operand=99),
    "range99_reversed_long": dict(steps=16000, reverse_answer=True, train_max_operand=99),
    "range50_reversed_long_wd1": dict(steps=16000, weight_decay=1.0, reverse_answer=True, train_max_operand=50),
    "range99_reversed_xl": dict(steps=32000, reverse_answer=True, train_max_operand=99),
    "range99_reversed_xl_wd1": dict(steps=32000, weight_decay=1.0, reverse_answer=True, train_max_operand=99),
    # GPU runs at batch 256: four times the examples per step of the CPU runs above
    "range99_reversed_b256_wd1": dict(steps=10000, batch_size=256, weight_decay=1.0, reverse_answer=True,
                                      train_max_operand=99),
    "range99_reversed_wide_b256_wd1": dict(steps=8000, batch_size=256, weight_decay=1.0, reverse_answer=True,
                                           train_max_operand=99, hidden_size=256, intermediate_size=1024),
}
"""Settings compared on the validation expressions in chapter 10 (the test expressions decide nothing)."""


def wider_range_expressions(max_operand: int, train_max_operand: int) -> list[Problem]:
    """Every two-operand ``+ - *`` expression with operands in ``[0, train_max_operand]`` and at least one
    operand above ``max_operand``: extra training data that cannot contain an expression of the evaluated range."""
    if train_max_operand <= max_operand:
        raise ValueError(f"train_max_operand must exceed max_operand={max_operand}, got {train_max_operand}")
    return [Problem(f"{a}{op}{b}", safe_eval(f"{a}{op}{b}"))
            for a in range(train_max_operand + 1) for b in range(train_max_operand + 1) for op in "+-*"
            if max(a, b) > max_operand]


def steps_within_budget(build, make_loader, budget_s: float, lr: float, weight_decay: float, device,
                        amp_dtype, warmup_steps: int = 10, probe_steps: int = 20) -> tuple[int, float]:
    """How many optimizer steps fit in ``budget_s`` seconds, and the measured seconds per step.

    A throwaway model from ``build()`` trains ``warmup_steps`` (CUDA context, kernels, allocator), then
    ``probe_steps`` timed steps. A concurrent job on the same GPU makes the probe pessimistic, never optimistic.
    """
    probe = build()
    opt = make_adamw(probe, lr=lr, weight_decay=weight_decay)
    train(probe, make_loader(), opt, max_steps=warmup_steps, device=device, amp_dtype=amp_dtype, progress=False)
    t0 = time.perf_counter()
    train(probe, make_loader(), opt, max_steps=probe_steps, device=device, amp_dtype=amp_dtype, progress=False)
    per_step = (time.perf_counter() - t0) / probe_steps
    return max(10, int(budget_s / per_step)), per_step


def run_arithmetic_task(n_test: int = 132, n_val: int = 0, max_operand: int = 20, steps: int = 6000,
                        batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.1,
                        reverse_answer: bool = False, seed: int = 0, device=None, progress: bool = True,
                        eval_every: int | None = None, train_max_operand: int | None = None,
                        time_budget_s: float | None = None, **config_overrides) -> dict[str, Any]:
    """Two-operand ``+ - *`` with operands in ``[0, max_operand]``; ``n_val`` + ``n_test`` expressions held out.

    All ``3 * (max_operand + 1)^2`` distinct expressions are split by expression string
    (``dldna.data.arithmetic_dataset``): validation and test expressions never appear in training (their
    commuted twins ``b op a`` may). With ``train_max_operand`` the training set also gets every expression with
    an operand in ``(max_operand, train_max_operand]`` (:func:`wider_range_expressions`), so the model sees the
    rule on many more examples; evaluation stays on the held-out expressions of the ``[0, max_operand]`` range.
    The loss covers the answer and ``<eos>`` only. With ``time_budget_s`` the run is cut to the steps that fit
    (:func:`steps_within_budget`; the cosine schedule spans the steps actually run, ``steps_planned`` keeps the
    request). Returns loss curve and the exact-match accuracy on train, validation (if any) and test expressions.
    """
    device = torch.device(device) if device is not None else default_device()
    seed_everything(seed)
    total = 3 * (max_operand + 1) ** 2
    split = arithmetic_dataset("simple", n_train=total - n_test - n_val, n_val=n_val, n_test=n_test, seed=seed,
                               max_operand=max_operand)
    if train_max_operand is not None:
        split["train"] = split["train"] + wider_range_expressions(max_operand, train_max_operand)
    tok = ArithmeticTokenizer()
    train_ds = ArithmeticDataset(split["train"], tok, reverse_answer=reverse_answer)
    amp = "bf16" if device.type == "cuda" else None

    def make_loader():
        return DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))

    def build():
        config = arithmetic_config(tok.vocab_size, tok.pad_id, tok.eos_id, **config_overrides)
        return MistralForCausalLM(config).to(device)

    steps_planned, probe_s = steps, None
    if time_budget_s is not None:  # the probe leaves the random state as it found it: same weights as without
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            fit, probe_s = steps_within_budget(build, make_loader, time_budget_s, lr, weight_decay, device, amp)
        steps = min(steps, fit)
    loader = make_loader()
    model = build()
    optimizer = make_adamw(model, lr=lr, weight_decay=weight_decay)
    scheduler = cosine_with_warmup(optimizer, warmup_steps=min(200, steps // 10), total_steps=steps)
    eval_fn = None
    if eval_every:
        eval_fn = lambda m: {"train_acc": evaluate_arithmetic(m, split["train"][:256], tok, reverse_answer, device)[0]}  # noqa: E731
    t0 = time.perf_counter()
    hist = train(model, loader, optimizer, scheduler=scheduler, max_steps=steps, grad_clip=1.0, device=device,
                 amp_dtype=amp, progress=progress, desc="arithmetic",
                 eval_fn=eval_fn, eval_every=eval_every)
    train_s = time.perf_counter() - t0
    test_acc, records = evaluate_arithmetic(model, split["test"], tok, reverse_answer, device)
    train_acc, _ = evaluate_arithmetic(model, split["train"], tok, reverse_answer, device)
    val_acc = evaluate_arithmetic(model, split["val"], tok, reverse_answer, device)[0] if split["val"] else None
    return {"task": "arithmetic", "n_train": len(split["train"]), "n_val": len(split["val"]),
            "n_test": len(split["test"]), "max_operand": max_operand, "steps": steps, "steps_planned": steps_planned,
            "time_budget_s": time_budget_s, "probe_step_s": probe_s, "lr": lr,
            "weight_decay": weight_decay, "reverse_answer": reverse_answer, "batch_size": batch_size,
            "train_max_operand": train_max_operand,
            "loss": hist["loss"], "train_acc": train_acc, "val_acc": val_acc, "test_acc": test_acc, "test_errors": [r for r in records if not r["correct"]],
            "examples": records[:10], "train_s": train_s, "config": model.config.to_dict(),
            "eval_step": hist.get("eval_step", []), "eval_train_acc": hist.get("eval_train_acc", [])}


# ---------------------------------------------------------------------------------------------- 3. WikiSQL
SQL_SEPARATOR = "<extra_id_0>"  # a single T5 sentinel token between question and logical form


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens, for a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=False).ids


def _token_id(tokenizer, token: str) -> int:
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return tokenizer.convert_tokens_to_ids(token)
    return tokenizer.token_to_id(token)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


class SQLExamples(Dataset):
    """WikiSQL rows as ``question <sep> logical form </s>`` token ids; labels cover the logical form and ``</s>``.

    Items are dicts of 1-D tensors ``input_ids``, ``labels`` (``-100`` on the question); batch them with
    ``collate`` (right padding). ``prompts`` holds each question's ids up to and including the separator.
    """

    def __init__(self, rows: Sequence[dict], tokenizer, max_length: int = 128):
        from dldna.data.wikisql import logical_form

        self.rows, self.tokenizer, self.max_length = list(rows), tokenizer, max_length
        self.sep_id, self.eos_id = _token_id(tokenizer, SQL_SEPARATOR), _token_id(tokenizer, "</s>")
        self.pad_id = _token_id(tokenizer, "<pad>")
        self.prompts, self.targets = [], []
        for r in self.rows:
            q = _encode(tokenizer, r["question"])[: max_length // 2] + [self.sep_id]
            t = _encode(tokenizer, logical_form(r["sql"], r["question"])) + [self.eos_id]
            self.prompts.append(q)
            self.targets.append(t[: max_length - len(q)])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        q, t = self.prompts[idx], self.targets[idx]
        return {"input_ids": torch.tensor(q + t), "labels": torch.tensor([-100] * len(q) + t)}

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        n = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), n), -100, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, x in enumerate(items):
            k = len(x["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = x["input_ids"], x["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sql_config(vocab_size: int, pad_id: int, eos_id: int, **overrides) -> MistralConfig:
    """The printed WikiSQL model: width 512, window 128, T5 vocabulary."""
    return task_config(vocab_size, pad_id, eos_id, 512, 128, **overrides)


def evaluate_sql(model, data: SQLExamples, batch_size: int = 256, device=None) -> tuple[dict, list[str]]:
    """Greedy logical forms for every row of ``data`` and their ``lf_metrics``.

    Values are compared modulo the tokenizer round trip (``normalize``): a character T5 cannot write is not
    counted as the model's error.
    """
    from dldna.data.wikisql import lf_metrics

    order = sorted(range(len(data)), key=lambda i: len(data.prompts[i]))  # similar lengths share a batch
    outs = greedy_complete(model, [data.prompts[i] for i in order], 64, data.eos_id, data.pad_id,
                           batch_size=batch_size, device=device)
    preds = [""] * len(data)
    for i, o in zip(order, outs):
        preds[i] = _decode(data.tokenizer, o)
    return lf_metrics(preds, data.rows, normalize=lambda text: _roundtrip(data.tokenizer, text)), preds


def _roundtrip(tokenizer, text: str) -> str:
    return _decode(tokenizer, _encode(tokenizer, text))


def run_wikisql_task(train_split: str = "test", eval_split: str = "dev", time_budget_s: float = 60.0,
                     max_steps: int | None = None, batch_size: int = 128, lr: float = 5e-4,
                     weight_decay: float = 0.1, max_length: int = 128, train_limit: int | None = None,
                     eval_limit: int | None = None, seed: int = 0, device=None, progress: bool = True,
                     **config_overrides) -> dict[str, Any]:
    """Train on ``train_split`` and report logical-form metrics on ``eval_split``.

    The local data has no WikiSQL train split, so by default the model trains on the 15,878 *test* questions
    and is evaluated on the 8,421 *dev* questions (disjoint tables); numbers are therefore not comparable with
    published WikiSQL results. ``max_steps`` defaults to what fits in ``time_budget_s`` (measured on 20 probe
    steps after 10 warm-up steps: run it alone on the device, as a concurrent job makes the probe pessimistic);
    the cosine schedule spans exactly those steps.
    """
    from dldna.data.tokenizers import t5_tokenizer
    from dldna.data.wikisql import lf_metrics, load_wikisql, logical_form, majority_baseline

    device = torch.device(device) if device is not None else default_device()
    tok = t5_tokenizer()
    train_rows, eval_rows = load_wikisql(train_split), load_wikisql(eval_split)
    if train_limit:
        train_rows = random.Random(seed).sample(train_rows, min(train_limit, len(train_rows)))
    if eval_limit:
        eval_rows = eval_rows[:eval_limit]
    train_ds, eval_ds = SQLExamples(train_rows, tok, max_length), SQLExamples(eval_rows, tok, max_length)
    # best achievable scores: the gold targets decoded back from their token ids, scored like predictions
    ceiling = lf_metrics([_decode(tok, t[:-1]) for t in eval_ds.targets], eval_ds.rows,
                         normalize=lambda text: _roundtrip(tok, text))["lf_exact"]
    amp = "bf16" if device.type == "cuda" else None

    def build():
        seed_everything(seed)
        m = MistralForCausalLM(sql_config(tok.get_vocab_size(), train_ds.pad_id, train_ds.eos_id, **config_overrides))
        return m.to(device)

    def loader():
        return DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=train_ds.collate,
                          generator=torch.Generator().manual_seed(seed))

    probe_s = None
    if max_steps is None:  # measure the step time, then size the run to the budget
        max_steps, probe_s = steps_within_budget(build, loader, time_budget_s, lr, weight_decay, device, amp)
    model = build()
    optimizer = make_adamw(model, lr=lr, weight_decay=weight_decay)
    scheduler = cosine_with_warmup(optimizer, warmup_steps=min(300, max_steps // 10), total_steps=max_steps,
                                   min_lr_ratio=0.05)
    t0 = time.perf_counter()
    hist = train(model, loader(), optimizer, scheduler=scheduler, max_steps=max_steps, grad_clip=1.0, device=device,
                 amp_dtype=amp, progress=progress, desc="wikisql", log_every=max(1, max_steps // 200))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics, preds = evaluate_sql(model, eval_ds, device=device)
    eval_s = time.perf_counter() - t0
    examples = [{"question": r["question"], "target": logical_form(r["sql"], r["question"]), "generated": p}
                for r, p in zip(eval_rows[:12], preds[:12])]
    return {"task": "wikisql", "train_split": train_split, "eval_split": eval_split, "n_train": len(train_rows),
            "n_eval": len(eval_rows), "steps": max_steps, "epochs": max_steps * batch_size / len(train_rows),
            "batch_size": batch_size, "lr": lr, "probe_step_s": probe_s, "train_s": train_s, "eval_s": eval_s,
            "metrics": metrics, "majority_baseline": majority_baseline(train_rows, eval_rows),
            "tokenizer_ceiling": ceiling, "loss_step": hist["step"], "loss": hist["loss"], "examples": examples,
            "parameters": model.num_parameters(), "config": model.config.to_dict()}


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["seq", "math", "sql"])
    parser.add_argument("--save", action="store_true", help="write results/mistral_<task>.json")
    parser.add_argument("--out-dir", default=None, help="folder for the result file (default results/)")
    parser.add_argument("--budget", type=float, default=None,
                        help="training seconds (sql: sizes the run; math: cuts the variant's steps to fit)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (math, sql)")
    parser.add_argument("--variant", default="base", choices=sorted(ARITHMETIC_VARIANTS), help="math settings")
    parser.add_argument("--n-val", type=int, default=0, help="math: validation expressions")
    args = parser.parse_args(argv)
    if args.task == "seq":
        result = run_sequence_task(epochs=fast(5, 2), num_examples=fast(1000, 300))
        summary = f"held-out exact: {result['exact']:.2f}"
    elif args.task == "math":
        settings = dict(ARITHMETIC_VARIANTS[args.variant])
        settings["steps"] = args.steps or fast(settings.get("steps", 6000), 60)
        result = run_arithmetic_task(n_val=args.n_val, progress=False, time_budget_s=args.budget, **settings)
        result["variant"] = args.variant
        summary = (f"{args.variant}: test exact match {result['test_acc']:.4f}, val {result['val_acc']}, "
                   f"train {result['train_acc']:.4f}, {result['train_s']:.0f} s")
    else:
        result = run_wikisql_task(time_budget_s=args.budget or fast(60.0, 5.0), max_steps=args.steps,
                                  train_limit=fast(None, 256), eval_limit=fast(None, 64))
        summary = f"dev metrics: {result['metrics']}"
    print(summary)
    if args.save:
        from dldna.results import command_line, save_result

        name = {"seq": "mistral_sequence", "math": f"mistral_arithmetic_{args.variant}", "sql": "mistral_wikisql"}[args.task]
        path = save_result(name, result, command_line("python -m dldna.examples.mistral_tasks", argv),
                           out_dir=args.out_dir)
        print("saved", path)
    return result


if __name__ == "__main__":
    main()
