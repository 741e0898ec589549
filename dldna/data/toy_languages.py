"""A synthetic multi-language character corpus, generated in-package from a seed (no download).

Each of ``num_languages`` languages has its own alphabet (a random subset of a-z), its own lexicon of random
words and its own word-level Markov chain (every word is followed by one of ``branching`` words, with Dirichlet
probabilities). A text is a run of words of one language separated by spaces, at character level.

Why this corpus: inside a word the next characters are almost determined (good for multi-token prediction and
for speculative decoding: a small draft guesses them), the next *word* is a genuine random choice (the entropy a
model cannot remove), and the languages share nothing but the space, so a Mixture-of-Experts layer can specialise
experts per language (chapter 12 measures whether it does). Used in chapters 12 and 13.

Example::

    langs = ToyLanguages(num_languages=4, seed=0)
    ids, lang = langs.sample(8, 64, torch.Generator().manual_seed(1))   # (8, 64) char ids, (8,) language ids
    langs.decode(ids[0])
"""
from __future__ import annotations

import bisect
import random
import string
from typing import Iterator

import torch

__all__ = ["ToyLanguages", "toy_language_batches"]


class ToyLanguages:
    """The languages (alphabets, lexicons, word transition tables); token ids: 0 = space, 1..26 = a..z.

    ``num_languages`` languages of ``words_per_language`` words each, word lengths uniform in
    ``[min_word_len, max_word_len]``, alphabets of ``letters_per_language`` letters, ``branching`` successors per word.
    """

    alphabet = " " + string.ascii_lowercase
    vocab_size = len(alphabet)

    def __init__(self, num_languages: int = 4, words_per_language: int = 64, letters_per_language: int = 10,
                 min_word_len: int = 2, max_word_len: int = 7, branching: int = 4, seed: int = 0):
        for name, value in (("num_languages", num_languages), ("words_per_language", words_per_language),
                            ("branching", branching), ("min_word_len", min_word_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 1 <= letters_per_language <= 26:
            raise ValueError(f"letters_per_language must be in [1, 26], got {letters_per_language}")
        if max_word_len < min_word_len:
            raise ValueError(f"max_word_len ({max_word_len}) must be >= min_word_len ({min_word_len})")
        if branching > words_per_language:
            raise ValueError(f"branching ({branching}) must be <= words_per_language ({words_per_language})")
        g = torch.Generator().manual_seed(seed)
        self.num_languages, self.words_per_language, self.branching = num_languages, words_per_language, branching
        self.lexicons: list[list[list[int]]] = []  # [language][word] -> char ids
        for _ in range(num_languages):
            letters = (torch.randperm(26, generator=g)[:letters_per_language] + 1).tolist()
            words: set[tuple[int, ...]] = set()
            while len(words) < words_per_language:
                n = int(torch.randint(min_word_len, max_word_len + 1, (1,), generator=g))
                words.add(tuple(letters[i] for i in torch.randint(len(letters), (n,), generator=g).tolist()))
            self.lexicons.append([list(w) for w in sorted(words)])
        # successors[l, w] (branching,) word ids and their probabilities
        self.successors = torch.stack([torch.stack([torch.randperm(words_per_language, generator=g)[:branching]
                                                    for _ in range(words_per_language)])
                                       for _ in range(num_languages)])
        # Dirichlet(1, ..., 1) = normalised Exponential(1) draws, and -log(U) is Exponential(1)
        draws = -torch.rand(num_languages, words_per_language, branching, generator=g).clamp_min(1e-12).log()
        self.successor_probs = draws / draws.sum(-1, keepdim=True)

    def sample(self, batch: int, seq_len: int, generator: torch.Generator | None = None,
               languages: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (batch, seq_len) long, language (batch,) long)``: texts starting at a random word."""
        if batch < 1 or seq_len < 1:
            raise ValueError(f"batch and seq_len must be positive, got {batch}, {seq_len}")
        if languages is None:
            languages = torch.randint(self.num_languages, (batch,), generator=generator)
        # the word walk runs in plain Python (fast for scalar draws), seeded from ``generator``
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        succ, cum = self.successors.tolist(), self.successor_probs.cumsum(-1).tolist()
        rows = []
        for lang in languages.tolist():
            word = rng.randrange(self.words_per_language)
            out: list[int] = []
            while len(out) < seq_len:
                out += self.lexicons[lang][word] + [0]
                j = min(bisect.bisect_right(cum[lang][word], rng.random()), self.branching - 1)
                word = succ[lang][word][j]
            rows.append(out[:seq_len])
        return torch.tensor(rows, dtype=torch.long), languages

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)

    def encode(self, text: str) -> torch.Tensor:
        bad = set(text) - set(self.alphabet)
        if bad:
            raise ValueError(f"text has characters outside ' a-z': {sorted(bad)}")
        return torch.tensor([self.alphabet.index(c) for c in text], dtype=torch.long)

    def word_entropy_bits(self) -> float:
        """Mean entropy (bits) of the next-word choice, averaged over languages and words (uniformly)."""
        p = self.successor_probs
        return float(-(p * p.log2()).sum(-1).mean())


def toy_language_batches(langs: ToyLanguages, batch_size: int, seq_len: int, seed: int = 0,
                         with_language: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless fresh batches ``{"input_ids", "labels"}`` (labels = inputs; models shift inside) for ``train``.

    ``with_language=True`` adds ``"language"`` ``(B,)`` (pop it before calling a model).
    """
    g = torch.Generator().manual_seed(seed)
    while True:
        ids, lang = langs.sample(batch_size, seq_len, g)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if with_language:
            batch["language"] = lang
        yield batch
