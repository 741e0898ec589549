"""Printed example ``train_sql``: a 4-layer Mistral maps WikiSQL questions to SQL logical forms (chapter 10).

Printed names and signatures: ``WikiSQLDataset(split, tokenizer, max_length=128)`` yielding
``(input_ids, labels)``, ``train(model, dataloader, optimizer, scheduler, epochs, device)`` and
``generate_sql(model, tokenizer, question, max_length, device, temperature=0.7)``. The tokenizer may be a
transformers T5 tokenizer (as printed) or ``dldna.data.tokenizers.t5_tokenizer()`` (offline). The target is the
logical form with column indices (``dldna.data.wikisql.logical_form``: the local data has no table headers),
separated from the question by the T5 sentinel ``<extra_id_0>``; the loss covers only the logical form.
The printed split ``"train"`` exists only online (Hugging Face hub); locally ``"validation"``/``"dev"`` and
``"test"`` are available, and chapter 10 trains on ``test`` and evaluates on ``dev``.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dldna.data.wikisql import load_wikisql
from dldna.examples.mistral_tasks import SQL_SEPARATOR, SQLExamples, _decode, _encode, train_epochs
from dldna.models.mistral import MistralConfig, MistralForCausalLM

__all__ = ["MistralConfig", "MistralForCausalLM", "WikiSQLDataset", "train", "generate_sql"]


class WikiSQLDataset(Dataset):
    """``(input_ids, labels)`` of length ``max_length``: ``question <sep> logical form </s>`` right-padded.

    ``labels`` are ``-100`` on the question and the padding (the printed version also trained on both).
    """

    def __init__(self, split, tokenizer, max_length=128):
        self.examples = SQLExamples(load_wikisql(split), tokenizer, max_length)
        self.max_length = max_length

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, idx):
        item = self.examples[idx]
        pad = self.max_length - len(item["input_ids"])
        input_ids = torch.cat([item["input_ids"], torch.full((pad,), self.examples.pad_id)])
        labels = torch.cat([item["labels"], torch.full((pad,), -100)])
        return input_ids, labels


def train(model, dataloader, optimizer, scheduler, epochs, device):
    """Printed loop; the printed ``get_cosine_schedule_with_warmup`` is stepped after every optimizer step."""
    return train_epochs(model, dataloader, optimizer, scheduler, epochs, device)


@torch.no_grad()
def generate_sql(model, tokenizer, question, max_length, device, temperature=0.7):
    """The logical form generated for ``question`` (text after the separator, up to ``</s>``).

    Samples at ``temperature`` as printed; ``temperature=0`` is greedy (what chapter 10 evaluates).
    """
    ids = _encode(tokenizer, question)[: max_length // 2] + _encode(tokenizer, SQL_SEPARATOR)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    eos = model.config.eos_token_id
    out = model.generate(input_ids, max_new_tokens=max(1, max_length - len(ids)), temperature=temperature,
                         eos_token_id=eos)[0, len(ids):].tolist()
    if eos in out:
        out = out[: out.index(eos)]
    return _decode(tokenizer, out)


if __name__ == "__main__":
    from dldna.examples.mistral_tasks import main

    main(["sql"])
