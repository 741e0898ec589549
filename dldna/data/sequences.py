"""Counting sequences: the smallest language-modelling task (chapter 10, the printed ``train_seq_num`` example).

The "corpus" is one stream ``0 1 2 ... (vocab_size - 2) <eos>`` with ``<eos> = vocab_size - 1``; a training
example is a window of ``seq_length`` consecutive tokens of it. The model must learn "next = previous + 1"
and "stop after the largest number". Start numbers can be held out: a held-out start never begins a training
window, so generating from it tests generalisation rather than recall.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset


def number_stream(vocab_size: int) -> list[int]:
    """``[0, 1, ..., vocab_size - 2, eos]`` with ``eos = vocab_size - 1``."""
    if not isinstance(vocab_size, int) or vocab_size < 3:
        raise ValueError(f"vocab_size must be an int >= 3, got {vocab_size!r}")
    return list(range(vocab_size))


def valid_starts(vocab_size: int, seq_length: int) -> list[int]:
    """Start numbers whose window of ``seq_length`` tokens fits in the stream (the last one ends with eos)."""
    if not isinstance(seq_length, int) or not 1 <= seq_length <= vocab_size:
        raise ValueError(f"seq_length must be an int in [1, vocab_size={vocab_size}], got {seq_length!r}")
    return list(range(vocab_size - seq_length + 1))


def create_simple_data(vocab_size: int, num_examples: int, seq_length: int,
                       exclude_starts: Iterable[int] = ()) -> list[list[int]]:
    """``num_examples`` windows of the number stream, cycling over the allowed start numbers in order.

    Printed signature; ``exclude_starts`` (new) keeps those start numbers out of the data.
    Example: ``create_simple_data(51, 3, 4)`` -> ``[[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]``.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    stream = number_stream(vocab_size)
    excluded = set(exclude_starts)
    starts = [s for s in valid_starts(vocab_size, seq_length) if s not in excluded]
    if not starts:
        raise ValueError("exclude_starts removes every start number")
    return [stream[s : s + seq_length] for s in (starts[i % len(starts)] for i in range(num_examples))]


class SimpleDataset(Dataset):
    """``(input_ids, labels)`` pairs of equal ``(seq_length,)`` long tensors (the model shifts labels inside)."""

    def __init__(self, data: Sequence[Sequence[int]], seq_length: int):
        if not data:
            raise ValueError("data is empty")
        bad = [len(x) for x in data if len(x) != seq_length]
        if bad:
            raise ValueError(f"every sequence must have seq_length={seq_length} tokens, found length {bad[0]}")
        self.data = torch.tensor([list(x) for x in data], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[idx], self.data[idx].clone()


def expected_continuation(start_tokens: Sequence[int], vocab_size: int, max_length: int) -> list[int]:
    """The correct output of generating from ``start_tokens`` up to ``max_length`` tokens (eos not included).

    Counting continues from the last start token and stops after ``vocab_size - 2`` (the model should then
    emit eos) or at ``max_length`` tokens.
    """
    out = list(start_tokens)
    while len(out) < max_length and out[-1] + 1 <= vocab_size - 2:
        out.append(out[-1] + 1)
    return out
