"""Printed example ``train_math``: a 3-layer Mistral learns ``a op b`` with ``+ - *`` (chapter 10).

Printed names and signatures: ``create_arithmetic_data(num_samples, max_value)``, ``create_tokenizer()``,
``create_reverse_tokenizer(tokenizer)``, ``ArithmeticDataset(data, seq_length, tokenizer)``,
``train(model, dataloader, optimizer, scheduler, epochs, device)`` and
``generate_text(model, prompt, tokenizer, reverse_tokenizer, max_length, device)`` (returns prompt + answer).
Labels come from ``dldna.data.safe_eval`` (never ``eval``) and padding is not trained. The printed cell scored
samples of its own training data; ``python -m dldna.chapter_09.mistral.examples.train_math`` runs
``dldna.examples.mistral_tasks.run_arithmetic_task``, which holds expressions out.
"""
from __future__ import annotations

import random

from dldna.chapter_09.phi3.examples.train_complex_math import ComplexArithmeticDataset as ArithmeticDataset
from dldna.chapter_09.phi3.examples.train_complex_math import create_reverse_tokenizer, create_tokenizer, tokenize_sample
from dldna.chapter_09.phi3.examples.train_complex_math import generate_text as _generate_text
from dldna.data.arithmetic import safe_eval, simple_expression
from dldna.examples.mistral_tasks import train_epochs
from dldna.models.mistral import MistralConfig, MistralForCausalLM

__all__ = ["MistralConfig", "MistralForCausalLM", "create_arithmetic_data", "create_tokenizer",
           "create_reverse_tokenizer", "tokenize_sample", "ArithmeticDataset", "train", "generate_text"]


def create_arithmetic_data(num_samples: int, max_value: int) -> list[str]:
    """``num_samples`` strings ``"a op b=value<eos>"``, operands in ``[1, max_value]``, ops ``+ - *`` (printed recipe).

    Draws from the global ``random`` state as printed (``random.seed(42)`` reproduces); duplicates are possible.
    Use ``dldna.data.arithmetic_dataset`` for train/test splits that share no expression.
    """
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    exprs = [simple_expression(random, max_operand=max_value, min_operand=1) for _ in range(num_samples)]
    return [f"{e}={safe_eval(e)}<eos>" for e in exprs]


def train(model, dataloader, optimizer, scheduler, epochs, device):
    """Printed loop; a ``CosineAnnealingLR(T_max=epochs)`` steps per epoch, a warmup schedule per step."""
    return train_epochs(model, dataloader, optimizer, scheduler, epochs, device)


def generate_text(model, prompt, tokenizer, reverse_tokenizer, max_length, device, temperature=0.0):
    """``prompt`` + the model's answer (stops at ``<eos>``/``<pad>``); greedy unless ``temperature > 0``."""
    return _generate_text(model, prompt, tokenizer, reverse_tokenizer, max_length, device, temperature=temperature)


if __name__ == "__main__":
    from dldna.examples.mistral_tasks import main

    main(["math"])
