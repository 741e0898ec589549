"""Tools for testing and debugging Transformers: equivalence checks, NaN/Inf hooks, overfitting one batch, profiling.

Each check turns a class of real bug into a number that must be zero (or tiny): the cache-position, mask and
dtype bugs of the printed chapter all fail one of them. Used in chapter 16.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def causal_leak(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, position: int,
                generator: torch.Generator | None = None) -> float:
    """How much outputs at positions ``<= position`` change when every input *after* ``position`` changes.

    ``forward`` maps ``inputs`` ``(B, N, ...)`` (token ids or features along axis 1) to outputs ``(B, N, ...)``.
    A causal model returns exactly 0.0; anything else means the future leaks into the past.
    """
    if not 0 <= position < inputs.shape[1] - 1:
        raise ValueError(f"position must be in [0, {inputs.shape[1] - 2}], got {position}")
    perturbed = inputs.clone()
    tail = perturbed[:, position + 1:]
    if inputs.is_floating_point():
        perturbed[:, position + 1:] = torch.randn(tail.shape, generator=generator, dtype=tail.dtype).to(tail.device)
    else:
        high = int(inputs.max()) + 1
        perturbed[:, position + 1:] = (tail + 1 + torch.randint(0, max(high - 1, 1), tail.shape, generator=generator)) % high
    with torch.no_grad():
        before, after = forward(inputs), forward(perturbed)
    return (before[:, : position + 1] - after[:, : position + 1]).abs().max().item()


@torch.no_grad()
def cached_vs_full(model: nn.Module, input_ids: torch.Tensor, prefix: int,
                   position_ids_fn: Callable[[int, int], torch.Tensor] | None = None) -> float:
    """Max |logits| difference between one full forward and prefill(``prefix``) + one-token cached decode steps.

    ``model(input_ids, past_key_values=..., use_cache=True)`` must return ``.logits`` and ``.past_key_values``
    (the book's Mistral/Phi-3 interface). ``position_ids_fn(step, batch)`` overrides the positions passed for the
    decode step at stream index ``step`` (used to reproduce the printed chapter's bug); by default the model counts.
    """
    if not 0 < prefix < input_ids.shape[1]:
        raise ValueError(f"prefix must be in [1, {input_ids.shape[1] - 1}], got {prefix}")
    model.eval()
    full = model(input_ids, use_cache=False).logits
    out = model(input_ids[:, :prefix], use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    for step in range(prefix, input_ids.shape[1]):
        kwargs = {}
        if position_ids_fn is not None:
            kwargs["position_ids"] = position_ids_fn(step, input_ids.shape[0])
        out = model(input_ids[:, step:step + 1], past_key_values=cache, use_cache=True, **kwargs)
        pieces.append(out.logits)
        cache = out.past_key_values
    return (torch.cat(pieces, dim=1) - full).abs().max().item()


class NonFiniteError(RuntimeError):
    """Raised by ``detect_non_finite`` with the name of the first module whose output is NaN or Inf."""


@contextlib.contextmanager
def detect_non_finite(model: nn.Module) -> Iterator[None]:
    """Inside this context a forward hook on every submodule raises ``NonFiniteError`` naming the *first* module
    (in execution order) whose output holds a NaN or Inf; the hooks are removed on exit."""

    def check(name):
        def hook(module, args, output):
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                    kind = "NaN" if torch.isnan(t).any() else "Inf"
                    raise NonFiniteError(f"{kind} in the output of {name or 'the model'} ({type(module).__name__}), "
                                         f"dtype {t.dtype}, max |finite| {t[torch.isfinite(t)].abs().max().item() if torch.isfinite(t).any() else float('nan'):.3g}")
        return hook

    handles = [module.register_forward_hook(check(name)) for name, module in model.named_modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def overfit_one_batch(model: nn.Module, batch: dict, steps: int = 100, lr: float = 3e-3, progress: bool = False) -> list[float]:
    """Train on a single batch with the book's training loop; returns the loss per step.

    A model and loss that are wired correctly drive this to near zero; a loss stuck high points at labels that are
    shifted twice, a detached graph, a frozen parameter or a mask hiding the targets.
    """
    from dldna.training import make_adamw, train

    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    optimizer = make_adamw(model, lr=lr, weight_decay=0.0)
    history = train(model, [batch], optimizer, max_steps=steps, progress=progress, desc="overfit one batch")
    return history["loss"]


def profile_table(fn: Callable[[], object], row_limit: int = 12, sort_by: str = "self_cpu_time_total") -> str:
    """Run ``fn`` once under ``torch.profiler`` (CPU, plus CUDA when available) and return the top-ops table."""
    import os

    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        fn()
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
