"""One training loop for every chapter, learning-rate schedules and AdamW parameter groups.

``train`` runs optimizer steps over a data loader with mixed precision (bf16, or fp16 with a ``GradScaler``),
gradient accumulation, gradient clipping, optional gradient checkpointing and ``torch.compile``, an evaluation
hook, periodic checkpoints and a ``tqdm.auto`` progress bar, and returns a history dict for plotting.

Example (a causal LM whose ``forward(input_ids, labels=...)`` returns an object with ``.loss``)::

    from dldna.training import make_adamw, cosine_with_warmup, train
    opt = make_adamw(model, lr=3e-4, weight_decay=0.1)
    sched = cosine_with_warmup(opt, warmup_steps=100, total_steps=2000)
    hist = train(model, loader, opt, scheduler=sched, max_steps=2000, grad_clip=1.0, amp_dtype="bf16")
    plt.plot(hist["step"], hist["loss"])

With ``(inputs, targets)`` batches pass a ``loss_fn(outputs, targets)``, e.g. ``dldna.training.cross_entropy``.
Used in chapters 7, 10-12 and 15.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "adamw_param_groups",
    "batch_loss",
    "cosine_with_restarts",
    "cosine_with_restarts_factor",
    "cosine_with_warmup",
    "cosine_with_warmup_factor",
    "cross_entropy",
    "enable_gradient_checkpointing",
    "evaluate",
    "linear_warmup",
    "linear_warmup_factor",
    "load_checkpoint",
    "make_adamw",
    "move_to_device",
    "save_checkpoint",
    "train",
]

# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedules. Each ``*_factor(step, ...)`` is a pure function of the optimizer step (0-based) giving
# the multiplier of the base learning rate; each factory wraps it in a ``LambdaLR``. The formulas equal the
# Hugging Face ``transformers.optimization`` schedules (plus an optional floor ``min_lr_ratio``).
# ----------------------------------------------------------------------------------------------------------------


def _check_steps(warmup_steps: int, total_steps: int | None) -> None:
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps < max(warmup_steps, 1)):
        raise ValueError(f"total_steps must be an int >= max(warmup_steps, 1), got {total_steps!r}")


def _check_ratio(min_lr_ratio: float) -> None:
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def linear_warmup_factor(step: int, warmup_steps: int, total_steps: int | None = None, min_lr_ratio: float = 0.0) -> float:
    """``step / warmup_steps`` during warmup; then 1 (``total_steps=None``) or a linear decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if total_steps is None:
        return 1.0
    remaining = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * remaining


def cosine_with_warmup_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                              num_cycles: float = 0.5) -> float:
    """Linear warmup, then ``0.5 * (1 + cos(pi * 2 * num_cycles * progress))`` rescaled to ``[min_lr_ratio, 1]``.

    ``num_cycles=0.5`` (default) is one half cosine from the peak to the floor (Loshchilov & Hutter 2017).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # stay at the floor after
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def cosine_with_restarts_factor(step: int, warmup_steps: int, total_steps: int, num_cycles: int = 1,
                                min_lr_ratio: float = 0.0) -> float:
    """Linear warmup, then ``num_cycles`` half cosines, each restarting at the peak (SGDR, hard restarts)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if progress >= 1.0:
        return min_lr_ratio
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None = None,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """``LambdaLR`` with linear warmup over ``warmup_steps`` optimizer steps, then constant (or linear decay).

    Example: ``sched = linear_warmup(opt, warmup_steps=100)``; call ``sched.step()`` after each ``opt.step()``.
    """
    _check_steps(warmup_steps, total_steps)
    _check_ratio(min_lr_ratio)
    return LambdaLR(optimizer, partial(linear_warmup_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                       min_lr_ratio=min_lr_ratio))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0, num_cycles: float = 0.5) -> LambdaLR:
    """``LambdaLR``: linear warmup then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``.

    Example: ``sched = cosine_with_warmup(opt, warmup_steps=100, total_steps=2000, min_lr_ratio=0.1)``.
    """
    _check_steps(warmup_steps, total_steps)
    _check_ratio(min_lr_ratio)
    if total_steps is None:
        raise ValueError("total_steps is required for a cosine schedule")
    return LambdaLR(optimizer, partial(cosine_with_warmup_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                       min_lr_ratio=min_lr_ratio, num_cycles=num_cycles))


def cosine_with_restarts(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, num_cycles: int = 2,
                         min_lr_ratio: float = 0.0) -> LambdaLR:
    """``LambdaLR``: linear warmup then ``num_cycles`` cosine cycles with hard restarts (Loshchilov & Hutter 2017).

    Example: ``sched = cosine_with_restarts(opt, warmup_steps=50, total_steps=3000, num_cycles=3)``.
    """
    _check_steps(warmup_steps, total_steps)
    _check_ratio(min_lr_ratio)
    if total_steps is None:
        raise ValueError("total_steps is required for a cosine schedule")
    if not isinstance(num_cycles, int) or num_cycles < 1:
        raise ValueError(f"num_cycles must be a positive int, got {num_cycles!r}")
    return LambdaLR(optimizer, partial(cosine_with_restarts_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                       num_cycles=num_cycles, min_lr_ratio=min_lr_ratio))


# ----------------------------------------------------------------------------------------------------------------
# AdamW with parameter groups
# ----------------------------------------------------------------------------------------------------------------

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm,
                                            nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    # Also catch custom norms (dldna.models.layers.RMSNorm, HF *RMSNorm / *LayerNorm) by class name.
    name = type(module).__name__.lower()
    return isinstance(module, _NORM_TYPES) or name.endswith("norm") or "layernorm" in name or "rmsnorm" in name


def adamw_param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False,
                       no_decay: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed and a non-decayed group for AdamW.

    No weight decay for: biases and every other parameter with fewer than 2 dimensions, all parameters of
    normalisation layers (LayerNorm, RMSNorm, BatchNorm, ... and any module whose class name ends in "Norm"),
    embedding tables unless ``decay_embeddings=True`` (as in minGPT), and names containing any substring in
    ``no_decay``. Matrices of linear/conv layers are decayed. Tied parameters appear once.

    Returns ``[{"params": [...], "weight_decay": weight_decay, "name": "decay"},
    {"params": [...], "weight_decay": 0.0, "name": "no_decay"}]`` (empty groups dropped), ready for
    ``torch.optim.AdamW(groups, lr=...)``. Used in chapters 10-12 and 15.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay = tuple(no_decay)
    excluded: set[int] = set()
    for module in model.modules():
        if _is_norm(module) or (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and not decay_embeddings):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    decay, skip, seen = [], [], set()
    for name, param in model.named_parameters():  # named_parameters() already yields tied parameters once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or id(param) in excluded or any(s in name for s in no_decay):
            skip.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
              {"params": skip, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def make_adamw(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8, *, decay_embeddings: bool = False, fused: bool | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` (decoupled weight decay, Loshchilov & Hutter 2019) over ``adamw_param_groups``.

    Example: ``opt = make_adamw(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))``.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    groups = adamw_param_groups(model, weight_decay, decay_embeddings=decay_embeddings)
    if not groups:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# Batches, losses and evaluation
# ----------------------------------------------------------------------------------------------------------------


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor inside ``batch`` (nested tuples, lists, dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy for ``logits`` ``(..., V)`` and integer ``targets`` ``(...)``, in float32."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index)


def _logits(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def _extract_loss(outputs: Any) -> torch.Tensor:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        loss = outputs[0]
    if loss is None and isinstance(outputs, torch.Tensor):
        loss = outputs
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("the model must return a scalar loss (a tensor, .loss, ['loss'] or a tuple starting with it) "
                        "when no loss_fn is given")
    return loss.reshape(())


def batch_loss(model: nn.Module | Callable, batch: Any, loss_fn: Callable | None = None) -> torch.Tensor:
    """The scalar loss of one batch, with the conventions ``train`` and ``evaluate`` use:

    - dict batch: ``model(**batch)`` returns the loss; with ``loss_fn``, ``loss_fn(model(**inputs), batch["labels"])``
      where ``inputs`` is the batch without ``"labels"``;
    - tuple/list batch: with ``loss_fn``, ``loss_fn(model(*batch[:-1]), batch[-1])`` (outputs' ``.logits`` or first
      element is used if the model returns a structure); without, ``model(*batch)`` returns the loss;
    - tensor batch: ``model(batch)`` returns the loss, or ``loss_fn(model(batch), batch)``.
    """
    if isinstance(batch, Mapping):
        if loss_fn is None:
            return _extract_loss(model(**batch))
        if "labels" not in batch:
            raise ValueError("a dict batch used with loss_fn needs a 'labels' entry")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return loss_fn(_logits(model(**inputs)), batch["labels"])
    if isinstance(batch, (tuple, list)):
        if loss_fn is None:
            return _extract_loss(model(*batch))
        if len(batch) < 2:
            raise ValueError("a tuple batch used with loss_fn must be (inputs..., targets)")
        return loss_fn(_logits(model(*batch[:-1])), batch[-1])
    if isinstance(batch, torch.Tensor):
        return _extract_loss(model(batch)) if loss_fn is None else loss_fn(_logits(model(batch)), batch)
    raise TypeError(f"unsupported batch type {type(batch).__name__}")


def _count_tokens(batch: Any) -> int:
    """Tokens in a batch: ``input_ids`` (dict) or the first tensor; integer tensors count all elements (B*T),
    float tensors count samples (first dimension)."""
    if isinstance(batch, Mapping):
        first = batch.get("input_ids", next((v for v in batch.values() if isinstance(v, torch.Tensor)), None))
    elif isinstance(batch, (tuple, list)):
        first = next((v for v in batch if isinstance(v, torch.Tensor)), None)
    else:
        first = batch
    if not isinstance(first, torch.Tensor) or first.ndim == 0:
        return 0
    return first.numel() if not first.is_floating_point() else first.shape[0]


def _autocast(device: torch.device, amp_dtype: torch.dtype | None, autocast_cpu: bool):
    enabled = amp_dtype is not None and (device.type == "cuda" or (device.type == "cpu" and autocast_cpu))
    return torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=enabled), enabled


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, loss_fn: Callable | None = None, device: torch.device | str | None = None,
             max_batches: int | None = None, amp_dtype: str | torch.dtype | None = None) -> dict[str, float]:
    """Mean loss over (at most ``max_batches`` of) ``loader`` in eval mode; returns ``{"loss": ..., "ppl": ...}``.

    The mean is over batches (equal to the token mean when batches have the same number of targets).
    Example: ``train(..., eval_fn=lambda m: evaluate(m, val_loader, loss_fn=cross_entropy), eval_every=100)``.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = _amp_dtype(amp_dtype)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            ctx, _ = _autocast(dev, dtype, False)
            with ctx:
                total += float(batch_loss(model, move_to_device(batch, dev), loss_fn))
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("loader yielded no batches")
    loss = total / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, scaler: Any = None, step: int = 0, **extra: Any) -> Path:
    """Save model/optimizer/scheduler/scaler states, the step, RNG states and ``extra`` (plain Python values) to
    ``path``; everything is loadable with ``torch.load(path, weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": _unwrap(model).state_dict(),
        "step": int(step),
        "torch_rng": torch.get_rng_state(),
        "extra": extra,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, scaler: Any = None, map_location: str | torch.device = "cpu",
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a ``save_checkpoint`` file (``weights_only=True``) into the given objects; returns
    ``{"step": ..., "extra": {...}}``."""
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    _unwrap(model).load_state_dict(state["model"])
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if obj is not None:
            if key not in state:
                raise ValueError(f"checkpoint {path} has no {key} state")
            obj.load_state_dict(state[key])
    if restore_rng:
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return {"step": state["step"], "extra": state.get("extra", {})}


class _Checkpointed(nn.Module):
    """Wraps a block so its activations are recomputed in the backward pass (``torch.utils.checkpoint``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False, **kwargs)
        return self.block(*args, **kwargs)


def enable_gradient_checkpointing(model: nn.Module, attr: str | None = None) -> int:
    """Recompute activations of each repeated block during backward, trading compute for memory.

    Uses the model's own ``gradient_checkpointing_enable()`` when it has one (HF models); otherwise wraps each
    element of the first ``nn.ModuleList`` named ``attr`` (default: ``layers``, ``blocks``, ``h``) — the parameter
    names change (``layers.0.block.*``), so enable it after loading weights. Returns the number of blocks wrapped
    (-1 when the model's own method was used).
    """
    if hasattr(model, "gradient_checkpointing_enable") and attr is None:
        model.gradient_checkpointing_enable()
        return -1
    for name in ([attr] if attr else []) + ["layers", "blocks", "h"]:
        blocks = getattr(model, name, None)
        if blocks is None and hasattr(model, "model"):
            blocks = getattr(model.model, name, None)
        if isinstance(blocks, nn.ModuleList):
            for i, block in enumerate(blocks):
                if not isinstance(block, _Checkpointed):
                    blocks[i] = _Checkpointed(block)
            return len(blocks)
    raise ValueError(f"found no nn.ModuleList named {attr or 'layers/blocks/h'} on {type(model).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------

_AMP = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
        "fp32": None, "float32": None, None: None}


def _amp_dtype(amp_dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"amp_dtype must be bf16, fp16 or None, got {amp_dtype}")
        return None if amp_dtype == torch.float32 else amp_dtype
    if amp_dtype not in _AMP:
        raise ValueError(f"amp_dtype must be one of {[k for k in _AMP if k]} or None, got {amp_dtype!r}")
    return _AMP[amp_dtype]


def _batches(loader: Iterable, epochs: int | None):
    """Yield ``(epoch, batch)`` for ``epochs`` passes (forever when ``epochs`` is None)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        empty = True
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        for batch in loader:
            empty = False
            yield epoch, batch
        if empty:
            raise ValueError("train_loader yielded no batches")
        epoch += 1


def train(model: nn.Module, train_loader: Iterable, optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
          epochs: int | None = None, max_steps: int | None = None, loss_fn: Callable | None = None,
          device: torch.device | str | None = None, amp_dtype: str | torch.dtype | None = None,
          autocast_cpu: bool = False, grad_clip: float | None = None, grad_accum_steps: int = 1,
          eval_fn: Callable[[nn.Module], Any] | None = None, eval_every: int | None = None,
          checkpoint_path: str | Path | None = None, checkpoint_every: int | None = None,
          resume_from: str | Path | None = None, gradient_checkpointing: bool = False, compile: bool = False,
          stop_on_nonfinite: bool = True, log_every: int = 1, progress: bool = True, desc: str = "train",
          count_tokens: Callable[[Any], int] | None = None) -> dict[str, Any]:
    """Train ``model`` and return its history.

    Steps are *optimizer* steps: each consumes ``grad_accum_steps`` micro-batches whose losses are divided by
    ``grad_accum_steps``, so with mean losses and equal micro-batches one step equals one step on the concatenated
    batch. Training stops after ``max_steps`` optimizer steps or ``epochs`` passes over ``train_loader``
    (default 1 epoch when neither is given; with ``max_steps`` alone the loader is cycled). A trailing incomplete
    accumulation at the very end is dropped. ``scheduler.step()`` follows every optimizer step that was taken.

    Batches: see ``batch_loss`` (dict -> ``model(**batch)`` returns the loss; ``(inputs, targets)`` with
    ``loss_fn(outputs, targets)``).

    Precision: ``amp_dtype`` ``"bf16"``/``"fp16"`` autocasts the forward pass on CUDA (on CPU only when
    ``autocast_cpu=True``); fp16 adds a ``GradScaler``, whose skipped steps (inf/NaN gradients) are counted in
    ``history["skipped_steps"]`` and do not advance the scheduler. The gradient norm (before clipping) is
    always measured; ``grad_clip`` clips it to that value.

    ``eval_fn(model)`` (called in eval mode under ``no_grad`` every ``eval_every`` steps and at the end) returns a
    float or a dict of floats, logged as ``history["eval_<name>"]`` with ``history["eval_step"]``.
    ``checkpoint_path`` + ``checkpoint_every`` save with ``save_checkpoint`` (also at the end);
    ``resume_from`` restores model, optimizer, scheduler, scaler and step count (the data order restarts).
    A non-finite loss stops training when ``stop_on_nonfinite`` (``history["diverged"] = True``).

    Returns a dict of lists, one entry per logged step: ``step`` (1-based count of optimizer steps taken),
    ``loss`` (mean micro-batch loss), ``lr`` (of the first param group, used for that step), ``grad_norm``,
    ``tokens_per_s``; plus ``eval_step``/``eval_*``, and scalars ``tokens``, ``time_s``, ``diverged``,
    ``skipped_steps``.

    Example::

        hist = train(model, loader, opt, loss_fn=cross_entropy, max_steps=500, grad_clip=1.0,
                     scheduler=cosine_with_warmup(opt, 50, 500), eval_fn=my_eval, eval_every=100)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be a positive int, got {grad_accum_steps!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be positive, got {grad_clip}")
    for name, every in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"{name} must be a positive int, got {every!r}")
    if eval_every is not None and eval_fn is None:
        raise ValueError("eval_every needs an eval_fn")
    if checkpoint_every is not None and checkpoint_path is None:
        raise ValueError("checkpoint_every needs a checkpoint_path")
    if max_steps is None and epochs is None:
        epochs = 1

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    dtype = _amp_dtype(amp_dtype)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    run_model = torch.compile(model) if compile else model
    _, autocast_on = _autocast(dev, dtype, autocast_cpu)
    scaler = torch.amp.GradScaler(dev.type, enabled=autocast_on and dtype == torch.float16)
    count_tokens = count_tokens or _count_tokens
    params = [p for g in optimizer.param_groups for p in g["params"]]

    step = 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, scheduler, scaler if scaler.is_enabled() else None,
                               map_location=dev)["step"]
    hist: dict[str, Any] = {"step": [], "loss": [], "lr": [], "grad_norm": [], "tokens_per_s": [], "eval_step": [],
                            "tokens": 0, "time_s": 0.0, "diverged": False, "skipped_steps": 0}

    def run_eval():
        model.eval()
        with torch.no_grad():
            metrics = eval_fn(model)
        model.train()
        if not isinstance(metrics, Mapping):
            metrics = {"metric": float(metrics)}
        hist["eval_step"].append(step)
        for key, value in metrics.items():
            hist.setdefault(f"eval_{key}", []).append(float(value))
        return metrics

    total = max_steps
    if total is None:
        try:
            total = epochs * (len(train_loader) // grad_accum_steps)  # type: ignore[arg-type]
        except TypeError:
            total = None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=min(step, total or step), desc=desc, disable=not progress, leave=False)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    t_step, micro, acc_loss, acc_tokens = time.perf_counter(), 0, 0.0, 0
    try:
        if max_steps is not None and step >= max_steps:
            return hist
        for _, batch in _batches(train_loader, epochs):
            batch = move_to_device(batch, dev)
            ctx, _ = _autocast(dev, dtype, autocast_cpu)
            with ctx:
                loss = batch_loss(run_model, batch, loss_fn)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value) and stop_on_nonfinite:
                hist["diverged"] = True
                hist["step"].append(step + 1)
                hist["loss"].append(loss_value)
                hist["lr"].append(optimizer.param_groups[0]["lr"])
                hist["grad_norm"].append(float("nan"))
                hist["tokens_per_s"].append(float("nan"))
                break
            scaler.scale(loss / grad_accum_steps).backward()
            acc_loss += loss_value / grad_accum_steps
            acc_tokens += count_tokens(batch)
            micro += 1
            if micro < grad_accum_steps:
                continue
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf")))
            lr = optimizer.param_groups[0]["lr"]
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
            optimizer.zero_grad(set_to_none=True)
            if skipped:
                hist["skipped_steps"] += 1
            elif scheduler is not None:
                scheduler.step()
            step += 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            hist["tokens"] += acc_tokens
            if step % log_every == 0 or step == max_steps:
                hist["step"].append(step)
                hist["loss"].append(acc_loss)
                hist["lr"].append(lr)
                hist["grad_norm"].append(grad_norm)
                hist["tokens_per_s"].append(acc_tokens / max(now - t_step, 1e-9))
            bar.update(1)
            bar.set_postfix(loss=f"{acc_loss:.4f}", lr=f"{lr:.2e}")
            micro, acc_loss, acc_tokens = 0, 0.0, 0
            if eval_every is not None and step % eval_every == 0:
                run_eval()
            if checkpoint_every is not None and step % checkpoint_every == 0:
                save_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler if scaler.is_enabled() else None, step)
            t_step = time.perf_counter()
            if max_steps is not None and step >= max_steps:
                break
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    hist["time_s"] = time.perf_counter() - start
    if eval_fn is not None and not hist["diverged"] and (not hist["eval_step"] or hist["eval_step"][-1] != step):
        run_eval()
    if checkpoint_path is not None and not hist["diverged"]:
        save_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler if scaler.is_enabled() else None, step)
    return hist
