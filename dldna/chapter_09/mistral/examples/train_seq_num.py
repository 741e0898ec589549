"""Printed example ``train_seq_num``: a 2-layer Mistral learns to count (chapter 10).

Printed names and signatures: ``create_simple_data(vocab_size, num_examples, seq_length)``,
``SimpleDataset(data, seq_length)``, ``train(model, dataloader, optimizer, epochs, device)`` and
``generate_text(model, start_tokens, vocab, max_length, device)`` (returns the token strings). Generation uses the
KV cache; ``python -m dldna.chapter_09.mistral.examples.train_seq_num`` runs the held-out evaluation of
``dldna.examples.mistral_tasks.run_sequence_task``.
"""
from __future__ import annotations

import torch

from dldna.data.sequences import SimpleDataset, create_simple_data
from dldna.examples.mistral_tasks import train_epochs
from dldna.models.mistral import MistralConfig, MistralForCausalLM

__all__ = ["MistralConfig", "MistralForCausalLM", "SimpleDataset", "create_simple_data", "train", "generate_text"]


def train(model, dataloader, optimizer, epochs, device):
    """``epochs`` passes of next-token training; prints and returns the mean loss of each epoch."""
    return train_epochs(model, dataloader, optimizer, None, epochs, device)


@torch.no_grad()
def generate_text(model, start_tokens, vocab, max_length=20, device="cpu"):
    """Greedy continuation of the token strings ``start_tokens`` up to ``max_length`` tokens in total.

    ``vocab`` maps token string -> id; generation stops at ``model.config.eos_token_id`` (not returned).
    Returns the list of token strings, prompt included.
    """
    if not start_tokens:
        raise ValueError("start_tokens must not be empty")
    unknown = [t for t in start_tokens if t not in vocab]
    if unknown:
        raise ValueError(f"start_tokens {unknown} are not in vocab")
    inverse = {i: t for t, i in vocab.items()}
    ids = torch.tensor([[vocab[t] for t in start_tokens]], dtype=torch.long, device=device)
    budget = max(0, max_length - ids.shape[1])
    eos = model.config.eos_token_id
    out = model.generate(ids, max_new_tokens=budget, do_sample=False, eos_token_id=eos)[0].tolist()
    tokens = []
    for i in out:
        if i == eos:
            break
        tokens.append(inverse.get(i, "<unk>"))
    return tokens


if __name__ == "__main__":
    from dldna.examples.mistral_tasks import main

    main(["seq"])
