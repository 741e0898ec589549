"""Recurrent Memory Transformer (Bulatov, Kuratov and Burtsev 2022, "Recurrent Memory Transformer"; 2023,
"Scaling Transformer to 1M tokens and beyond with RMT") as a toy: a long input is cut into segments, a small
Transformer reads one segment at a time together with ``M`` memory tokens, and the hidden states at the memory
positions become the memory of the next segment. Attention cost per segment is O((L + M)^2), so the cost of the
whole input grows linearly with its length; gradients flow through the memory across segments (backpropagation
through time), truncated to at most ``bptt_segments`` segment hops.

The recall task: the first segment holds ``num_pairs`` key-value pairs, the following segments hold noise, and
the last segment ends with ``QUERY key``; the model must output that key's value. The answer lies more than one
segment away from the question, so the same model without memory (``num_memory_tokens=0``) is at chance. With
``shuffle_keys=False`` the keys are ``0, 1, ...`` in order (recall by position); with random keys the memory must
bind keys to values (associative recall), which this tiny model learns only partly on a CPU budget.

Used in chapter 14. Full-size run: ``python -m dldna.attention.recurrent_memory`` (CPU, a few minutes).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------- task
@dataclass
class RecallTask:
    """Key-value recall across segments. Vocabulary: keys ``[0, num_keys)``, values ``[num_keys, num_keys +
    num_values)``, noise tokens after them, then one ``QUERY`` token (``vocab_size - 1``)."""

    num_segments: int = 3
    segment_len: int = 8
    num_pairs: int = 2
    num_keys: int = 8
    num_values: int = 8
    num_noise: int = 16
    shuffle_keys: bool = True  # False: the pairs' keys are 0, 1, ... in order (recall by position, easier)

    def __post_init__(self):
        for name in ("num_segments", "segment_len", "num_pairs", "num_keys", "num_values", "num_noise"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_segments < 2:
            raise ValueError(f"num_segments must be >= 2 (facts and question in different segments), got {self.num_segments}")
        if 2 * self.num_pairs > self.segment_len:
            raise ValueError(f"segment_len ({self.segment_len}) must hold 2 * num_pairs ({2 * self.num_pairs}) tokens")
        if self.segment_len < 2:
            raise ValueError("segment_len must be >= 2 to hold 'QUERY key'")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs ({self.num_pairs}) must be <= num_keys ({self.num_keys})")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_noise + 1

    @property
    def query_token(self) -> int:
        return self.vocab_size - 1

    @property
    def seq_len(self) -> int:
        return self.num_segments * self.segment_len

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (batch, seq_len) long, answer (batch,) long in [0, num_values))``."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        g = generator
        noise_lo = self.num_keys + self.num_values
        tokens = torch.randint(noise_lo, noise_lo + self.num_noise, (batch, self.seq_len), generator=g)
        if self.shuffle_keys:
            keys = torch.rand(batch, self.num_keys, generator=g).argsort(dim=1)[:, : self.num_pairs]  # distinct keys
        else:
            keys = torch.arange(self.num_pairs).expand(batch, -1)
        values = torch.randint(0, self.num_values, (batch, self.num_pairs), generator=g)
        tokens[:, 0 : 2 * self.num_pairs : 2] = keys
        tokens[:, 1 : 2 * self.num_pairs : 2] = self.num_keys + values
        which = torch.randint(0, self.num_pairs, (batch,), generator=g)
        rows = torch.arange(batch)
        tokens[:, -2] = self.query_token
        tokens[:, -1] = keys[rows, which]
        return tokens, values[rows, which]


class RecallBatches:
    """Endless iterable of fresh ``(tokens, answer)`` batches from a seeded generator (for ``dldna.training.train``)."""

    def __init__(self, task: RecallTask, batch: int, seed: int = 0):
        self.task, self.batch, self.generator = task, batch, torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            yield self.task.sample(self.batch, self.generator)


# ----------------------------------------------------------------------------------------------- model
@dataclass
class RMTConfig:
    """Tiny segment-recurrent encoder. ``num_memory_tokens=0`` is the same model without memory."""

    vocab_size: int
    num_classes: int
    segment_len: int
    num_memory_tokens: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    bptt_segments: int | None = None  # None: backpropagate through every segment

    def __post_init__(self):
        for name in ("vocab_size", "num_classes", "segment_len", "hidden_size", "num_attention_heads",
                     "num_hidden_layers", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_memory_tokens, int) or self.num_memory_tokens < 0:
            raise ValueError(f"num_memory_tokens must be a non-negative int, got {self.num_memory_tokens!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.bptt_segments is not None and (not isinstance(self.bptt_segments, int) or self.bptt_segments < 1):
            raise ValueError(f"bptt_segments must be None or a positive int, got {self.bptt_segments!r}")


class RecurrentMemoryTransformer(nn.Module):
    """Reads ``(B, S * L)`` tokens segment by segment with ``M`` memory tokens prepended to each segment.

    Per segment: ``h = Encoder([memory; embed(segment) ])``; the next memory is ``h[:, :M]`` (after the final
    norm). The memory gradient is cut (``detach``) every ``bptt_segments`` segments, so backpropagation through
    time spans a bounded number of segments. The answer is read from the last position of the last segment.
    Used in chapter 14.
    """

    def __init__(self, config: RMTConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_positions = nn.Embedding(c.num_memory_tokens + c.segment_len, c.hidden_size)
        self.memory = nn.Parameter(torch.randn(c.num_memory_tokens, c.hidden_size) * 0.02)
        layer = nn.TransformerEncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_hidden_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.hidden_size)
        self.head = nn.Linear(c.hidden_size, c.num_classes)

    def forward(self, tokens: torch.Tensor, return_memories: bool = False):
        """``tokens`` ``(B, S * L)`` long -> answer logits ``(B, num_classes)`` (and the memory after each segment)."""
        c = self.config
        if tokens.dim() != 2 or tokens.shape[1] % c.segment_len:
            raise ValueError(f"tokens must be (batch, k * segment_len={c.segment_len}), got {tuple(tokens.shape)}")
        batch, m = tokens.shape[0], c.num_memory_tokens
        memory = self.memory.expand(batch, -1, -1)
        positions = self.embed_positions.weight
        memories = []
        for i, segment in enumerate(tokens.split(c.segment_len, dim=1)):
            if c.bptt_segments is not None and i > 0 and i % c.bptt_segments == 0:
                memory = memory.detach()  # truncated BPTT: gradients span at most bptt_segments segments
            x = torch.cat([memory, self.embed_tokens(segment)], dim=1) + positions
            h = self.norm(self.encoder(x))
            memory = h[:, :m]
            memories.append(memory)
        logits = self.head(h[:, -1])
        return (logits, memories) if return_memories else logits


# ----------------------------------------------------------------------------------------------- training
@torch.no_grad()
def recall_accuracy(model: nn.Module, task: RecallTask, num_samples: int = 2048, seed: int = 12345) -> float:
    """Accuracy on ``num_samples`` fresh held-out samples (a separate seed from training)."""
    was_training = model.training
    model.eval()
    tokens, answer = task.sample(num_samples, torch.Generator().manual_seed(seed))
    correct = (model(tokens).argmax(-1) == answer).float().mean().item()
    model.train(was_training)
    return correct


def train_recall(task: RecallTask, num_memory_tokens: int, steps: int, batch: int = 64, lr: float = 2e-3,
                 seed: int = 0, bptt_segments: int | None = None, progress: bool = True, num_threads: int | None = 1,
                 **model_kwargs) -> dict:
    """Train one model on the recall task with ``dldna.training.train``; returns its config, test accuracy and
    loss history. ``num_threads`` (default 1; None keeps PyTorch's setting) limits CPU threads while training:
    for a model this small extra threads only wait on each other (10x slower on a busy 2-core machine).
    Used in chapter 14."""
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_recall(task, num_memory_tokens, steps, batch, lr, seed, bptt_segments, progress, **model_kwargs)
    finally:
        torch.set_num_threads(threads)


def _train_recall(task, num_memory_tokens, steps, batch, lr, seed, bptt_segments, progress, **model_kwargs):
    from dldna.config import seed_everything
    from dldna.training import cosine_with_warmup, cross_entropy, make_adamw, train

    seed_everything(seed)
    config = RMTConfig(vocab_size=task.vocab_size, num_classes=task.num_values, segment_len=task.segment_len,
                       num_memory_tokens=num_memory_tokens, bptt_segments=bptt_segments, **model_kwargs)
    model = RecurrentMemoryTransformer(config)
    opt = make_adamw(model, lr=lr, weight_decay=0.01)
    sched = cosine_with_warmup(opt, warmup_steps=max(1, steps // 20), total_steps=steps)
    hist = train(model, RecallBatches(task, batch, seed), opt, scheduler=sched, max_steps=steps, loss_fn=cross_entropy,
                 grad_clip=1.0, progress=progress, desc=f"RMT M={num_memory_tokens}", device="cpu")
    return {"config": asdict(config), "accuracy": recall_accuracy(model, task), "steps": steps,
            "loss": hist["loss"], "time_s": hist["time_s"], "model": model}


TASKS = {
    # the value at slot i of the first segment; the question comes two segments later
    "recall by position": RecallTask(num_segments=3, segment_len=8, num_pairs=4, shuffle_keys=False),
    # the value bound to a random key (associative recall): needs content-based binding in memory
    "associative recall": RecallTask(num_segments=3, segment_len=8, num_pairs=2, shuffle_keys=True),
}


def recall_experiment(steps: int = 400, seeds=(0, 1), associative_steps: int = 600, progress: bool = True,
                      lr: float = 2e-3, memory_tokens: int = 8) -> list[dict]:
    """The chapter-14 table: on ``TASKS["recall by position"]``, RMT (``memory_tokens`` memory tokens) vs the
    same model without memory for each seed, and RMT with backpropagation truncated to 1 and 2 segments (first
    seed); on ``TASKS["associative recall"]`` (``associative_steps`` steps, skipped when 0), RMT vs no memory.
    One row per run with the held-out accuracy, chance level, final loss and wall time."""
    runs = [("recall by position", m, None, seed, steps) for seed in seeds for m in (memory_tokens, 0)]
    runs += [("recall by position", memory_tokens, bptt, seeds[0], steps) for bptt in (1, 2)]
    if associative_steps:
        runs += [("associative recall", m, None, seeds[0], associative_steps) for m in (memory_tokens, 0)]
    rows = []
    for name, m, bptt, seed, n_steps in runs:
        task = TASKS[name]
        run = train_recall(task, m, n_steps, seed=seed, lr=lr, bptt_segments=bptt, progress=progress)
        tail = run["loss"][-20:]
        rows.append({"task": name, "num_segments": task.num_segments, "segment_len": task.segment_len,
                     "num_memory_tokens": m, "bptt_segments": bptt, "seed": seed, "steps": n_steps,
                     "accuracy": run["accuracy"], "chance": 1.0 / task.num_values,
                     "final_loss": sum(tail) / len(tail), "time_s": run["time_s"]})
    return rows


def main(argv=None) -> None:
    """Full-size RMT recall experiment on CPU; stores ``results/rmt_recall.json``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--associative-steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    from dldna.results import save_result

    rows = recall_experiment(args.steps, tuple(args.seeds), args.associative_steps)
    for r in rows:
        print(r)
    command = (f"python -m dldna.attention.recurrent_memory --steps {args.steps} --associative-steps "
               f"{args.associative_steps} --seeds {' '.join(map(str, args.seeds))}")
    path = save_result("rmt_recall", {"tasks": {k: asdict(t) for k, t in TASKS.items()}, "rows": rows}, command=command)
    print("saved", path)


if __name__ == "__main__":
    main()
