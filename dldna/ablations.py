"""Small, seeded experiments behind chapters 7 (positions, norms, activations) and 15 (training recipes).

Every experiment trains ``dldna.models.tiny_lm.TinyLM`` on a byte-level language-modelling task (the AG News
text, 256-symbol vocabulary, no tokenizer) with ``dldna.training.train`` and returns plain, JSON-serialisable
dicts, so the same functions run tiny in a notebook's fast mode and full size from the command line, where they
are stored in ``results/`` with their provenance::

    python -m dldna.ablations --chapter 7     # writes results/ch07_*.json
    python -m dldna.ablations --chapter 15    # writes results/ch15_*.json

Used in chapters 7 and 15.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from dldna.config import seed_everything
from dldna.models.layers import RMSNorm
from dldna.models.tiny_lm import TinyLM, TinyLMConfig
from dldna.training import (adamw_param_groups, cosine_with_warmup, cross_entropy, linear_warmup, make_adamw,
                            train)

# ----------------------------------------------------------------------------------------------------------------
# Data: bytes of the AG News text
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ByteCorpus:
    """A byte-level corpus: ``train`` and ``val`` are int64 tensors of byte values (vocabulary 256)."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    vocab_size: int = 256


def byte_corpus(val_fraction: float = 0.1, limit: int | None = None) -> ByteCorpus:
    """AG News (test split: titles + descriptions, one article per line) as UTF-8 bytes, split by position:
    the last ``val_fraction`` of the stream is validation. ``limit`` keeps the first ``limit`` articles."""
    from dldna.data.agnews import load_ag_news

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = load_ag_news("test", limit=limit)
    raw = "\n".join(data.texts).encode("utf-8")
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(len(ids) * (1 - val_fraction))
    return ByteCorpus(ids[:cut], ids[cut:], f"AG News {data.source}, {len(raw):,} bytes")


class RandomWindows:
    """Endless seeded stream of ``(x, y)`` batches of random windows: ``x = ids[s:s+n]``, ``y = ids[s+1:s+n+1]``.

    Iterating again restarts the same sequence (the generator is re-seeded), so runs are reproducible.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        if ids.dim() != 1 or len(ids) <= seq_len + 1:
            raise ValueError(f"ids must be 1-D and longer than seq_len + 1 = {seq_len + 1}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        self.ids, self.seq_len, self.batch_size, self.seed = ids, seq_len, batch_size, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        offsets = torch.arange(self.seq_len + 1)
        while True:
            starts = torch.randint(0, len(self.ids) - self.seq_len - 1, (self.batch_size,), generator=gen)
            window = self.ids[starts[:, None] + offsets]
            yield window[:, :-1], window[:, 1:]


def eval_windows(ids: torch.Tensor, seq_len: int, n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_windows`` evenly spaced windows of ``ids`` as ``(x, y)`` of shape ``(n_windows, seq_len)``."""
    if len(ids) <= seq_len + 1:
        raise ValueError(f"ids ({len(ids)}) too short for seq_len {seq_len}")
    starts = torch.linspace(0, len(ids) - seq_len - 2, n_windows).long()
    window = ids[starts[:, None] + torch.arange(seq_len + 1)]
    return window[:, :-1], window[:, 1:]


@torch.no_grad()
def loss_by_position(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean next-byte loss at each position ``(seq_len,)`` over the windows ``x``/``y`` ``(n, seq_len)``.

    For a causal model the mean of the first ``L`` entries equals the loss of windows of length ``L``.
    """
    was = model.training
    model.eval()
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size]).float()
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), y[i:i + batch_size], reduction="none")
        total += loss.double().sum(0)
    model.train(was)
    return (total / len(x)).float()


# ----------------------------------------------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Optimisation settings of one run (model settings live in ``TinyLMConfig``)."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant" (after warmup)
    min_lr_ratio: float = 0.1
    optimizer: str = "adamw"  # "adamw" (decoupled decay) or "adam_l2" (decay added to the gradient)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    eval_every: int = 100
    eval_windows: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.optimizer not in ("adamw", "adam_l2"):
            raise ValueError(f"optimizer must be 'adamw' or 'adam_l2', got {self.optimizer!r}")


def make_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    """AdamW, or Adam with the same parameter groups and the decay as an L2 term in the gradient."""
    if run.optimizer == "adamw":
        return make_adamw(model, lr=run.lr, weight_decay=run.weight_decay, betas=run.betas)
    return torch.optim.Adam(adamw_param_groups(model, run.weight_decay), lr=run.lr, betas=run.betas)


def train_lm(model_cfg: TinyLMConfig, corpus: ByteCorpus, run: RunConfig, progress: bool = False,
             extra_batches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[TinyLM, dict]:
    """Train a fresh ``TinyLM(model_cfg)`` on ``corpus`` with ``run``; returns the model and the history
    (``dldna.training.train``'s, with ``eval_loss`` on ``run.eval_windows`` validation windows of ``seq_len``).

    ``extra_batches`` replaces the batch of the given (0-based) micro-step, to inject unusual data.
    """
    seed_everything(run.seed)
    model = TinyLM(model_cfg)
    opt = make_optimizer(model, run)
    if run.schedule == "cosine":
        sched = cosine_with_warmup(opt, run.warmup_steps, run.steps, min_lr_ratio=run.min_lr_ratio)
    else:
        sched = linear_warmup(opt, run.warmup_steps)
    val = eval_windows(corpus.val, run.seq_len, run.eval_windows)
    stream: Any = RandomWindows(corpus.train, run.seq_len, run.batch_size, seed=run.seed)
    if extra_batches:
        stream = _Injected(stream, extra_batches)
    hist = train(model, stream, opt, scheduler=sched, max_steps=run.steps, loss_fn=cross_entropy,
                 grad_clip=run.grad_clip, eval_fn=lambda m: {"loss": float(loss_by_position(m, *val).mean())},
                 eval_every=run.eval_every, progress=progress, desc=f"{model_cfg.position}/{model_cfg.ffn}")
    return model, _jsonable(hist)


class _Injected:
    def __init__(self, stream, extra):
        self.stream, self.extra = stream, extra

    def __iter__(self):
        for i, batch in enumerate(self.stream):
            yield self.extra.get(i, batch)


def _jsonable(hist: dict) -> dict:
    out = {}
    for key, value in hist.items():
        if isinstance(value, list):
            out[key] = [float(v) if isinstance(v, float) else v for v in value]
        else:
            out[key] = value
    return out


def model_config(**overrides) -> TinyLMConfig:
    """The chapters' default small model (2 layers, width 64, 4 heads, RMSNorm, pre-norm, SwiGLU, RoPE)."""
    base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, norm="rms",
                norm_position="pre", ffn="swiglu", position="rope", max_position_embeddings=64)
    base.update(overrides)
    return TinyLMConfig(**base)


# ----------------------------------------------------------------------------------------------------------------
# Chapter 7 experiments
# ----------------------------------------------------------------------------------------------------------------


def length_extrapolation(corpus: ByteCorpus, positions: Sequence[str] = ("sinusoidal", "learned", "rope", "alibi", "none"),
                         train_len: int = 64, test_len: int = 256, run: RunConfig | None = None,
                         test_windows: int = 64, progress: bool = False, **model_overrides) -> dict:
    """Train one model per position scheme on windows of ``train_len`` and measure the loss at every position
    of ``test_len`` windows (Press et al. 2022's train-short, test-long protocol).

    Returns ``{"train_len", "test_len", "runs": {position: {"loss_by_position": [...], "loss_at": {L: mean loss
    of the first L positions}, "history": ...}}}``. Learned positions have no embedding past ``train_len``,
    so they are measured up to ``train_len`` only (``loss_at`` holds ``None`` beyond).
    """
    run = replace(run or RunConfig(), seq_len=train_len)
    x, y = eval_windows(corpus.val, test_len, test_windows)
    lengths = sorted({train_len // 2, train_len, 2 * train_len, test_len})
    out: dict[str, Any] = {"train_len": train_len, "test_len": test_len, "run": asdict(run), "runs": {}}
    for pos in positions:
        cfg = model_config(position=pos, max_position_embeddings=train_len, **model_overrides)
        model, hist = train_lm(cfg, corpus, run, progress=progress)
        n = train_len if pos == "learned" else test_len
        curve = loss_by_position(model, x[:, :n], y[:, :n])
        out["runs"][pos] = {
            "loss_by_position": curve.tolist(),
            "loss_at": {str(L): (float(curve[:L].mean()) if L <= n else None) for L in lengths},
            "history": hist,
        }
    out["model"] = asdict(model_config(**model_overrides))
    return out


def ffn_comparison(corpus: ByteCorpus, ffns: Sequence[str] = ("gelu", "swiglu", "geglu"), seeds: Sequence[int] = (0, 1),
                   run: RunConfig | None = None, progress: bool = False, **model_overrides) -> dict:
    """Train the same model with each feed-forward at matched parameter count (``8 d^2`` FFN weights: width
    ``4d`` for GELU, ``8d/3`` for the gated ones, Shazeer 2020), for every seed; returns histories and counts."""
    run = run or RunConfig()
    out: dict[str, Any] = {"run": asdict(run), "runs": {}}
    for ffn in ffns:
        cfg = model_config(ffn=ffn, **model_overrides)
        runs = []
        for seed in seeds:
            model, hist = train_lm(cfg, corpus, replace(run, seed=seed), progress=progress)
            runs.append(hist)
        out["runs"][ffn] = {"histories": runs, "intermediate_size": cfg.intermediate_size,
                            "params_non_embedding": model.num_parameters(exclude_embeddings=True),
                            "ffn_params": sum(p.numel() for p in model.layers[0].mlp.parameters())}
    out["model"] = asdict(model_config(**model_overrides))
    return out


def layer_grad_norms(corpus: ByteCorpus, num_layers: int = 12, seeds: Sequence[int] = (0, 1, 2),
                     batch_size: int = 16, seq_len: int = 64, **model_overrides) -> dict:
    """Gradient norm of each block's parameters at initialisation, pre-norm vs post-norm (Xiong et al. 2020).

    Averaged over ``seeds`` (each a fresh model and batch). Returns ``{"pre": [...], "post": [...]}`` (one value
    per layer, input side first) plus ``{"pre_final_norm": ..., ...}`` helpers for the text.
    """
    out: dict[str, Any] = {"num_layers": num_layers, "seeds": list(seeds)}
    for placement in ("pre", "post"):
        per_seed = []
        for seed in seeds:
            seed_everything(seed)
            model = TinyLM(model_config(num_hidden_layers=num_layers, norm_position=placement, **model_overrides))
            x, y = next(iter(RandomWindows(corpus.train, seq_len, batch_size, seed=seed)))
            cross_entropy(model(x), y).backward()
            per_seed.append([float(torch.cat([p.grad.ravel() for p in layer.parameters()]).norm())
                             for layer in model.layers])
        out[placement] = torch.tensor(per_seed).mean(0).tolist()
    return out


def norm_placement_stability(corpus: ByteCorpus, lrs: Sequence[float] = (1e-3, 1e-2), num_layers: int = 4,
                             run: RunConfig | None = None, progress: bool = False, **model_overrides) -> dict:
    """Pre-norm vs post-norm trained without warmup at each learning rate; returns their histories.

    A post-norm stack amplifies the updates of its last layers (its gradients there are largest), so at a high
    learning rate without warmup it tends to diverge or stall where pre-norm trains (Xiong et al. 2020)."""
    run = run or RunConfig(steps=400, warmup_steps=0, schedule="constant", grad_clip=None)
    out: dict[str, Any] = {"run": asdict(run), "num_layers": num_layers, "runs": {}}
    for placement in ("pre", "post"):
        for lr in lrs:
            cfg = model_config(num_hidden_layers=num_layers, norm_position=placement, **model_overrides)
            _, hist = train_lm(cfg, corpus, replace(run, lr=lr), progress=progress)
            out["runs"][f"{placement}-norm, lr={lr:g}"] = hist
    return out


def norm_timing(shapes: Sequence[tuple[int, int, int]] = ((8, 512, 256), (8, 512, 1024)), repeats: int = 10,
                device: str | torch.device = "cpu") -> list[dict]:
    """Median forward+backward time of ``nn.LayerNorm``, ``dldna`` ``RMSNorm`` and ``torch.nn.RMSNorm`` on
    ``(B, N, d)`` float32 inputs. Fewer reductions is RMSNorm's theoretical edge; what a library gives you
    depends on which of these has a fused kernel on the device."""
    from dldna.bench import time_fn

    rows = []
    for b, n, d in shapes:
        x = torch.randn(b, n, d, device=device, requires_grad=True)
        g = torch.randn(b, n, d, device=device)
        for name, layer in (("LayerNorm (torch)", nn.LayerNorm(d)), ("RMSNorm (torch)", nn.RMSNorm(d, eps=1e-6)),
                            ("RMSNorm (dldna, unfused)", RMSNorm(d))):
            layer = layer.to(device)

            def step():
                x.grad = None
                layer(x).backward(g)

            rows.append({"shape": [b, n, d], "layer": name, "seconds": time_fn(step, warmup=2, repeats=repeats,
                                                                               device=device)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Chapter 15 experiments
# ----------------------------------------------------------------------------------------------------------------


def warmup_comparison(corpus: ByteCorpus, lrs: Sequence[float] = (1e-2, 1e-1), warmups: Sequence[int] = (0, 100),
                      num_layers: int = 4, run: RunConfig | None = None, progress: bool = False,
                      **model_overrides) -> dict:
    """The same pre-norm model trained at each peak learning rate with each number of warmup steps (cosine decay
    after, no clipping, so that only the schedule protects the first steps); returns the histories."""
    run = run or RunConfig(grad_clip=None)
    out: dict[str, Any] = {"run": asdict(run), "num_layers": num_layers, "runs": {}}
    for lr in lrs:
        for warmup in warmups:
            cfg = model_config(num_hidden_layers=num_layers, **model_overrides)
            _, hist = train_lm(cfg, corpus, replace(run, lr=lr, warmup_steps=warmup), progress=progress)
            out["runs"][f"lr {lr:g}, warmup {warmup}"] = hist
    return out


def adam_update_ratio(corpus: ByteCorpus, steps: int = 200, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                      batch_size: int = 16, seq_len: int = 64, seed: int = 0, **model_overrides) -> dict:
    """Per-step RMS of Adam's normalised update ``m_hat / (sqrt(v_hat) + eps)`` over all weights (the step is
    ``lr`` times it). Step 1 is exactly ``sign(g)`` (RMS 1); as ``v`` averages more gradients the ratio falls:
    the early steps are the largest, and each is based on very few gradients (Liu et al. 2020)."""
    seed_everything(seed)
    model = TinyLM(model_config(**model_overrides))
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=1e-8)
    ratios = []
    for i, (x, y) in enumerate(RandomWindows(corpus.train, seq_len, batch_size, seed=seed)):
        if i == steps:
            break
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
        delta = torch.cat([(p.detach() - b).ravel() for p, b in zip(model.parameters(), before)])
        ratios.append(float(delta.pow(2).mean().sqrt()) / lr)
    return {"lr": lr, "betas": list(betas), "update_rms_over_lr": ratios}


def decoupled_decay_toy(steps: int = 1500, lr: float = 1e-2, weight_decay: float = 0.5, n_features: int = 32,
                        n_samples: int = 512, seed: int = 0) -> dict:
    """AdamW vs Adam + L2 on a linear regression whose features fire with very different frequencies.

    Feature ``j`` is non-zero in a fraction ``freq_j`` (from 1 down to 1/256) of the samples, every true weight
    is 1. AdamW shrinks every weight by ``lr * weight_decay * w`` per step, whatever its gradient history. Adam
    + L2 adds ``weight_decay * w`` to the gradient, which Adam then divides by ``sqrt(v)``: weights with
    small loss gradients (rare features) are decayed far more, weights with large gradients hardly at all.
    Also tracks a weight that gets no loss gradient at all. Returns the final weights per feature frequency.
    """
    gen = seed_everything(seed)
    freqs = torch.logspace(0, -8, n_features, base=2.0)
    active = torch.rand(n_samples, n_features, generator=gen) < freqs
    x = torch.randn(n_samples, n_features, generator=gen) * active
    y = x.sum(1)  # true weights all 1
    out: dict[str, Any] = {"freqs": freqs.tolist(), "lr": lr, "weight_decay": weight_decay, "steps": steps}
    for name in ("none", "adamw", "adam_l2"):
        w = torch.zeros(n_features, requires_grad=True)
        idle = torch.ones(1, requires_grad=True)  # never used by the loss
        params = [w, idle]
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay if name == "adam_l2" else 0.0)
        idle_path, stride = [], max(1, steps // 200)
        for t in range(steps):
            opt.zero_grad()
            loss = (x @ w - y).pow(2).mean() + 0.0 * idle.sum()
            loss.backward()
            opt.step()
            if (t + 1) % stride == 0:  # recorded after steps stride, 2 * stride, ...
                idle_path.append(float(idle.detach()))
        out[name] = {"weights": w.detach().tolist(), "idle_weight": idle_path,
                     "final_loss": float((x @ w - y).pow(2).mean().detach())}
    return out


def clipping_experiment(corpus: ByteCorpus, clips: Sequence[float | None] = (None, 1.0, 0.25), lr: float = 3e-2,
                        bad_every: int = 100, run: RunConfig | None = None, progress: bool = False,
                        **model_overrides) -> dict:
    """Train with and without gradient clipping while every ``bad_every``-th batch is corrupted (one byte
    repeated with some noise: a degenerate document, as web data has), except in the last ``bad_every / 2``
    steps so the final evaluation is not taken right after one. Returns histories and the corrupted steps."""
    run = run or RunConfig(schedule="constant", warmup_steps=20)
    run = replace(run, lr=lr)
    gen = torch.Generator().manual_seed(1234)
    bad = {}
    for i in range(bad_every - 1, run.steps - bad_every // 2, bad_every):  # none right before the end
        byte = int(torch.randint(0, 256, (1,), generator=gen))
        window = torch.full((run.batch_size, run.seq_len + 1), byte, dtype=torch.long)
        window[:, ::7] = torch.randint(0, 256, (run.batch_size, (run.seq_len + 7) // 7), generator=gen)
        bad[i] = (window[:, :-1], window[:, 1:])
    out: dict[str, Any] = {"run": asdict(run), "bad_steps": [i + 1 for i in bad], "runs": {}}
    for clip in clips:
        _, hist = train_lm(model_config(**model_overrides), corpus, replace(run, grad_clip=clip), progress=progress,
                           extra_batches=bad)
        out["runs"]["no clipping" if clip is None else f"clip {clip:g}"] = hist
    return out


def rope_interpolation(corpus: ByteCorpus, run: RunConfig | None = None, factor: int = 4, test_windows: int = 32,
                       **model_overrides) -> dict:
    """Train a RoPE model on ``run.seq_len`` and evaluate it on ``factor`` times longer windows with plain positions
    and with linear position interpolation (``rope_scaling=factor``, Chen et al. 2023), without fine-tuning.
    Returns the mean loss on the trained and on the new positions for each."""
    run = run or RunConfig(steps=300, seq_len=32)
    model, _ = train_lm(model_config(position="rope", **model_overrides), corpus, run)
    x, y = eval_windows(corpus.val, factor * run.seq_len, test_windows)
    out: dict[str, Any] = {"run": asdict(run), "factor": factor}
    for scale in (1.0, float(factor)):
        model.config.rope_scaling = scale
        curve = loss_by_position(model, x, y)
        out[f"rope_scaling={scale:g}"] = {"trained positions": float(curve[:run.seq_len].mean()),
                                          "new positions": float(curve[run.seq_len:].mean())}
    model.config.rope_scaling = 1.0
    return out


def radam_without_warmup(corpus: ByteCorpus, lr: float = 1e-1, num_layers: int = 4, run: RunConfig | None = None,
                         **model_overrides) -> dict:
    """RAdam (Liu et al. 2020, decoupled weight decay) at a high peak ``lr`` with no warmup, otherwise the setting
    of ``warmup_comparison``; returns its history."""
    run = run or RunConfig(grad_clip=None, warmup_steps=0)
    seed_everything(run.seed)
    model = TinyLM(model_config(num_hidden_layers=num_layers, **model_overrides))
    opt = torch.optim.RAdam(adamw_param_groups(model, run.weight_decay), lr=lr, betas=run.betas,
                            decoupled_weight_decay=True)
    sched = cosine_with_warmup(opt, 0, run.steps, min_lr_ratio=run.min_lr_ratio)
    val = eval_windows(corpus.val, run.seq_len, run.eval_windows)
    hist = train(model, RandomWindows(corpus.train, run.seq_len, run.batch_size, seed=run.seed), opt, scheduler=sched,
                 loss_fn=cross_entropy, max_steps=run.steps, progress=False, eval_every=run.eval_every,
                 eval_fn=lambda m: {"loss": float(loss_by_position(m, *val).mean())})
    return {"run": asdict(replace(run, lr=lr)), "num_layers": num_layers, "history": _jsonable(hist)}


def spike_summary(result: dict, window: int = 5) -> dict[str, dict[str, float]]:
    """Per run of ``clipping_experiment``: loss on the corrupted batches, the mean rise of the training loss in the
    ``window`` steps after each corrupted batch over the ``window`` steps before it, the fraction of steps whose
    gradient norm exceeded the clipping threshold, and the final validation loss."""
    out = {}
    bad = result["bad_steps"]
    for name, hist in result["runs"].items():
        loss = hist["loss"]
        rises = [sum(loss[b:b + window]) / window - sum(loss[b - 1 - window:b - 1]) / window
                 for b in bad if b - 1 - window >= 0 and b + window <= len(loss)]
        clip = None if name == "no clipping" else float(name.split()[-1])
        out[name] = {
            "loss on corrupted batches": sum(loss[b - 1] for b in bad) / len(bad),
            f"rise after them ({window} steps)": sum(rises) / max(1, len(rises)),
            "fraction of steps clipped": (sum(g > clip for g in hist["grad_norm"]) / len(hist["grad_norm"])
                                          if clip else 0.0),
            "median grad norm": sorted(hist["grad_norm"])[len(hist["grad_norm"]) // 2],
            "final val loss": hist["eval_loss"][-1],
        }
    return out


# ----------------------------------------------------------------------------------------------------------------
# Figures (each returns the matplotlib figure)
# ----------------------------------------------------------------------------------------------------------------


def plot_loss_by_position(result: dict, smooth: int = 8, ax=None):
    """Validation loss at each position of the long test windows, one line per position scheme; the training
    length is marked. Lines that stay flat past it extrapolate."""
    import matplotlib.pyplot as plt

    from dldna.plots import _smooth

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4))
    for i, (pos, run) in enumerate(result["runs"].items()):
        curve = _smooth(run["loss_by_position"], smooth)
        ax.plot(range(len(curve)), curve, label=pos, color=f"C{i}")
    ax.axvline(result["train_len"] - 1, color="k", ls="--", lw=1)
    ax.annotate("training length", (result["train_len"], ax.get_ylim()[1]), fontsize=8, va="top")
    ax.set_xlabel("position in the test window")
    ax.set_ylabel(f"validation loss (nats/byte, {smooth}-position average)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_layer_grad_norms(result: dict, ax=None, title: str | None = None):
    """Gradient norm of each block at initialisation, pre-norm vs post-norm (log scale)."""
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.6))
    for placement in ("pre", "post"):
        values = result[placement]
        ax.plot(range(1, len(values) + 1), values, "o-", label=f"{placement}-norm")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("layer (1 = next to the embeddings)")
    ax.set_ylabel("gradient norm of the block's weights")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_lr_schedules(total_steps: int = 1000, warmup_steps: int = 100, min_lr_ratio: float = 0.1,
                      num_cycles: int = 3, ax=None):
    """The book's schedules as multipliers of the peak learning rate, read from real ``LambdaLR`` objects."""
    import matplotlib.pyplot as plt

    from dldna.training import cosine_with_restarts

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.6))
    makers = {
        "linear warmup, constant": lambda o: linear_warmup(o, warmup_steps),
        "linear warmup, linear decay": lambda o: linear_warmup(o, warmup_steps, total_steps),
        f"cosine (floor {min_lr_ratio:g})": lambda o: cosine_with_warmup(o, warmup_steps, total_steps, min_lr_ratio),
        f"cosine, {num_cycles} hard restarts": lambda o: cosine_with_restarts(o, warmup_steps, total_steps, num_cycles),
    }
    for label, make in makers.items():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        lrs = []
        for _ in range(total_steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ax.plot(lrs, label=label)
    ax.axvline(warmup_steps, color="k", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lr / peak lr")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_decoupled_decay(result: dict):
    """Left: final weight of each feature against how often it fires (true weight 1), for no decay, AdamW and
    Adam + L2. Right: the weight that gets no loss gradient, over training."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    freqs = result["freqs"]
    styles = {"none": ("no weight decay", "k"), "adamw": ("AdamW (decoupled)", "C0"), "adam_l2": ("Adam + L2", "C3")}
    for key, (label, color) in styles.items():
        left.semilogx(freqs, result[key]["weights"], "o-", ms=3, color=color, label=label)
        idle = result[key]["idle_weight"]
        stride = max(1, result["steps"] // 200)
        right.plot([stride * (i + 1) for i in range(len(idle))], idle, color=color, label=label)
    left.set_xlabel("fraction of samples where the feature is non-zero")
    left.set_ylabel("learned weight (true value 1)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("weight with zero loss gradient")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Command line: full-size runs stored in results/
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    from dldna.results import save_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapter", type=int, choices=(7, 15), required=True)
    parser.add_argument("--only", nargs="*", default=None, help="experiment names to run (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = byte_corpus()
    command = "python -m dldna.ablations --chapter {}".format(args.chapter)
    experiments = {
        7: {
            "ch07_length_extrapolation": lambda: length_extrapolation(corpus),
            "ch07_ffn_comparison": lambda: ffn_comparison(corpus),
            "ch07_layer_grad_norms": lambda: {
                # the original Transformer's block (LayerNorm, ReLU FFN, Xavier-size init) and the book's default
                "layernorm_relu_init_d^-0.5": layer_grad_norms(corpus, norm="layer", ffn="relu", initializer_range=64 ** -0.5),
                "rmsnorm_swiglu_init_0.02": layer_grad_norms(corpus)},
            "ch07_norm_placement": lambda: norm_placement_stability(corpus),
            "ch07_norm_timing": lambda: norm_timing(),
            "ch07_rope_interpolation": lambda: rope_interpolation(corpus),
            "ch07_norm_placement_warmup": lambda: norm_placement_stability(
                corpus, lrs=(1e-2,), run=RunConfig(steps=400, warmup_steps=100, schedule="constant", grad_clip=None)),
        },
        15: {
            "ch15_warmup": lambda: warmup_comparison(corpus),
            "ch15_adam_update_ratio": lambda: adam_update_ratio(corpus),
            "ch15_decoupled_decay": lambda: decoupled_decay_toy(),
            "ch15_clipping": lambda: clipping_experiment(corpus),
            "ch15_radam": lambda: radam_without_warmup(corpus),
        },
    }[args.chapter]
    for name, fn in experiments.items():
        if args.only and name not in args.only:
            continue
        data = fn()
        if isinstance(data, dict):
            data["corpus"] = corpus.source
        print("saved", save_result(name, data, command + (f" --only {name}" if args.only else "")))


if __name__ == "__main__":
    main()
