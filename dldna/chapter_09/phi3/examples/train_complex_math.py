"""Printed example ``train_complex_math``: a small Phi model learns expressions like ``(12+7)*3=57``.

Every printed name works with its printed signature, but on top of the package: labels come from
``dldna.data.safe_eval`` (never ``eval``), padding is excluded from the loss, and ``generate_text`` decodes with the
KV cache. The printed script measured accuracy on 50 samples drawn from its own *training* data; chapter 11
measures the real thing (exact match on 1,000 held-out expressions) with ``dldna.experiments.arithmetic_lm``.

Running this file (``python -m dldna.chapter_09.phi3.examples.train_complex_math``) follows the printed main block,
with a held-out test set instead of training samples. Used in chapter 11.
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from dldna.chapter_09.phi3.simple_phi3 import PhiMiniConfig, PhiMiniForCausalLM
from dldna.data.arithmetic import ArithmeticTokenizer, complex_expression, safe_eval
from dldna.models.generation import causal_lm_loss
from dldna.training import train as _train_loop

__all__ = [
    "PhiMiniConfig",
    "PhiMiniForCausalLM",
    "ComplexArithmeticDataset",
    "train",
    "create_complex_arithmetic_data",
    "create_tokenizer",
    "create_reverse_tokenizer",
    "tokenize_sample",
    "generate_text",
]


def create_complex_arithmetic_data(num_samples: int, max_value: int) -> list:
    """``num_samples`` strings ``"expr=value<eos>"`` with two operators and optional parentheses (printed recipe).

    Operands are drawn from ``random.randint(1, max_value)`` (the global ``random`` state, as printed, so
    ``random.seed(42)`` makes it reproducible); values from ``safe_eval``. Duplicates are possible, as printed; use
    ``dldna.data.arithmetic_dataset`` for disjoint train/test splits.
    """
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    data = []
    for _ in range(num_samples):
        expr = complex_expression(random, max_operand=max_value, min_operand=1, p_two_operators=1.0)
        data.append(f"{expr}={safe_eval(expr)}<eos>")
    return data


def create_tokenizer() -> dict:
    """The printed vocabulary: digits 0-9, ``+ - * =`` -> 10-13, ``<pad>`` 14, ``<eos>`` 15, ``( )`` 16-17."""
    return dict(ArithmeticTokenizer().vocab)


def create_reverse_tokenizer(tokenizer: dict) -> dict:
    """``id -> token`` for a ``token -> id`` dict."""
    return {v: k for k, v in tokenizer.items()}


def tokenize_sample(sample: str, tokenizer: dict) -> list:
    """Characters of ``sample``, with ``<eos>``/``<pad>`` as single tokens; ``ValueError`` on unknown characters."""
    tokens = ArithmeticTokenizer().tokenize(sample)
    unknown = [t for t in tokens if t not in tokenizer]
    if unknown:
        raise ValueError(f"sample {sample!r}: tokens {unknown} are not in the tokenizer")
    return tokens


class ComplexArithmeticDataset(Dataset):
    """``(input_ids, labels)`` pairs of length ``seq_length`` for causal LM training (the model shifts labels).

    As printed, but padding positions get label ``-100`` so they are not trained (the printed loss learned to
    predict ``<pad>`` after ``<pad>``).
    """

    def __init__(self, data: list, seq_length: int, tokenizer: dict):
        if seq_length < 2:
            raise ValueError(f"seq_length must be at least 2, got {seq_length}")
        self.data, self.seq_length, self.tokenizer = data, seq_length, tokenizer
        self.pad_id = tokenizer["<pad>"]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        ids = [self.tokenizer[t] for t in tokenize_sample(self.data[idx], self.tokenizer)][: self.seq_length]
        n_real = len(ids)
        ids = ids + [self.pad_id] * (self.seq_length - n_real)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.clone()
        labels[n_real:] = -100
        return input_ids, labels


def _lm_loss(logits, labels):  # dldna.training hands loss_fn the logits of model(input_ids)
    return causal_lm_loss(logits, labels)


def train(model, dataloader, optimizer, scheduler, epochs, device):
    """The printed loop: ``epochs`` passes, ``scheduler.step()`` once per epoch, one printed line per epoch.

    Each epoch is one call of ``dldna.training.train`` (gradient clipping at 1.0). Returns the mean losses.
    """
    losses = []
    for epoch in range(epochs):
        hist = _train_loop(model, dataloader, optimizer, epochs=1, loss_fn=_lm_loss, device=device, grad_clip=1.0,
                           progress=False)
        scheduler.step()
        avg = sum(hist["loss"]) / max(1, len(hist["loss"]))
        losses.append(avg)
        print(f"Epoch {epoch + 1}/{epochs}, Avg Loss: {avg:.4f}, LR: {scheduler.get_last_lr()[0]:.6f}")
    return losses


def generate_text(model, start_text, tokenizer, reverse_tokenizer, max_length, device, temperature=0.7):
    """``start_text`` continued to at most ``max_length`` tokens; stops at ``<eos>``/``<pad>`` (not included).

    Samples at ``temperature`` as printed (``temperature=0`` is greedy), with the KV cache.
    """
    ids = [tokenizer[t] for t in tokenize_sample(start_text, tokenizer)]
    budget = max_length - len(ids)
    if budget <= 0:
        return start_text
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    stops = [tokenizer["<eos>"], tokenizer["<pad>"]]
    out = model.generate(input_ids, max_new_tokens=budget, temperature=temperature, eos_token_id=stops,
                         pad_token_id=tokenizer["<pad>"])
    generated = []
    for token_id in out[0, len(ids):].tolist():
        if token_id in stops:
            break
        generated.append(reverse_tokenizer[token_id])
    return start_text + "".join(generated)


def main(num_samples: int = 10000, max_value: int = 20, seq_length: int = 20, batch_size: int = 16, epochs: int = 20,
         learning_rate: float = 1e-3, n_test: int = 50):
    """The printed main block (its hyper-parameters), evaluated on held-out expressions instead of training ones."""
    from torch.utils.data import DataLoader

    from dldna.config import device as pick_device

    random.seed(42)
    torch.manual_seed(42)
    device = pick_device()
    complex_data = create_complex_arithmetic_data(num_samples + 5 * n_test, max_value)
    seen, train_data, test_data = set(), [], []
    for sample in complex_data:  # held-out test: expressions that never occur in training
        expr = sample.split("=")[0]
        (test_data if len(test_data) < n_test and expr not in seen else train_data).append(sample)
        seen.add(expr)
    train_exprs = {s.split("=")[0] for s in train_data}
    test_data = [s for s in test_data if s.split("=")[0] not in train_exprs]
    tokenizer = create_tokenizer()
    reverse_tokenizer = create_reverse_tokenizer(tokenizer)
    dataloader = DataLoader(ComplexArithmeticDataset(train_data, seq_length, tokenizer), batch_size=batch_size,
                            shuffle=True)
    config = PhiMiniConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                           use_cache=True, use_return_dict=True)
    config.pad_token_id = tokenizer["<pad>"]
    config.eos_token_id = tokenizer["<eos>"]
    model = PhiMiniForCausalLM(config).to(device)
    model.lm_head.weight = model.transformer.embed_tokens.weight
    print("Total Trainable Parameters:", model.num_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-5)
    train(model, dataloader, optimizer, scheduler, epochs, device)
    correct = 0
    for sample in test_data:
        prompt = sample.split("=")[0] + "="
        generated = generate_text(model, prompt, tokenizer, reverse_tokenizer, seq_length, device, temperature=0.1)
        correct += generated.split("=")[1] == sample.split("=")[1].replace("<eos>", "")
    print(f"Held-out accuracy: {100 * correct / len(test_data):.2f}% ({correct}/{len(test_data)})")


if __name__ == "__main__":
    main()
