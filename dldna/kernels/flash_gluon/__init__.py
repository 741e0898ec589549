"""FlashAttention-3-style Gluon kernels for causal and sliding-window attention on Hopper (H100, H200).

``dldna.kernels.flash_attention`` runs these instead of the Triton kernels of ``flash_triton`` where they apply
(``plan_for``): a CUDA device of compute capability 9.0, bf16, as many K/V heads as query heads, ``Nq == Nk`` a
multiple of 128, head_dim 64 or 128, a causal mask with or without a sliding window. Elsewhere (other GPUs, fp16 or
fp32, GQA, ragged lengths, other masks, block-sparse layouts) the Triton kernels run, which remain the reference
that these are checked against.

The three kernels (``forward``, ``dq``, ``dkdv``) are warp-specialised: a loader warpgroup feeds a ring of shared
memory by TMA while two (or three) consumer warpgroups run asynchronous ``wgmma`` products, which Triton's own
language cannot express. They share the Triton kernels' contracts: the forward returns ``(out, lse)`` with the
natural log-sum-exp, the dQ kernel writes the base-2 LSE and ``delta = rowsum(dO * O)`` that the dK/dV kernel reads,
so each pass can use either implementation (``Plan``). On CPU tensors they run in ``dldna.kernels.gluon_emulator``,
which is how the CPU-only CI tests them.

Which kernel runs which pass (``plan_for``) comes from the H200 runs in ``benchmarks/experiments/README.md``
(sections on the Gluon forward, dQ and dK/dV kernels), and the stored benchmark of chapter 5 times the result.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

HEAD_DIMS = (64, 128)
BLOCK = 128  # the sequence length must be a multiple of this (the forward's and dQ kernel's query blocks)
_enabled = True


@dataclass(frozen=True)
class Plan:
    """The kernels of one call: ``forward``, ``dq`` and ``dkdv`` are the keyword arguments of ``fa3_forward``,
    ``fa3_dq`` and ``fa3_dkdv`` (None: the Triton kernel of ``flash_triton`` for that pass); ``window`` as in
    ``flash_attention`` (None: causal)."""

    window: int | None
    forward: dict | None
    dq: dict | None
    dkdv: dict


@contextlib.contextmanager
def triton_only():
    """Inside the ``with``, ``plan_for`` gives None, so that ``flash_attention`` runs the Triton kernels for every pass
    of the calls made there (their backward too, whenever it runs): the benchmark's comparison of the two."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and _hopper_index(device.index if device.index is not None else
                                                   torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_index(index: int) -> bool:
    """Compute capability 9.0, and a Triton with Gluon's Hopper language (3.6 and later)."""
    try:
        import triton.experimental.gluon.language.nvidia.hopper  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index) == (9, 0)


def plan_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band_lo: int | None, band_hi: int | None):
    """The ``Plan`` for these inputs and band (``dldna.kernels.tiled.band_limits``), or None where the Gluon
    kernels do not apply (the Triton kernels then run every pass)."""
    b, h, n, d = q.shape
    if not (_enabled and q.dtype == torch.bfloat16 and k.shape == q.shape and v.shape == q.shape and n % BLOCK == 0
            and d in HEAD_DIMS and band_hi == 0 and _hopper(q.device)):
        return None
    return _plan(d, n, None if band_lo is None else 1 - band_lo)


@functools.lru_cache(maxsize=None)
def _plan(d: int, n: int, window: int | None) -> Plan:
    if window is None:
        # causal: persistent programs on a queue (3 stages at D = 64, or 3 consumer warpgroups on 192-row blocks from
        # 16k on); at D = 128 from 16k on a program per tile, which ran faster there in two runs of three
        forward = dict(persistent="queue") if n < 16384 else dict()
        if d == 64:
            forward = dict(persistent="queue", consumers=3) if n >= 16384 else dict(persistent="queue", stages=3)
        return Plan(window, forward, dict(keys=128 if d == 128 else 64), dict(stages=2, consumers=2))
    if d == 128:
        return Plan(window, dict(persistent="queue"), dict(keys=64), dict(stages=2, consumers=2))
    # window at D = 64: the Triton forward and dQ kernels are as fast or faster; the dK/dV kernel on one consumer
    return Plan(window, None, None, dict(stages=2, consumers=1))


def attention_forward(q, k, v, plan: Plan, scale: float):
    """``(out, lse)`` of ``plan``'s forward kernel (``plan.forward`` must not be None)."""
    from dldna.kernels.flash_gluon.forward import fa3_forward

    return fa3_forward(q, k, v, window=plan.window, scale=scale, **plan.forward)


def attention_backward(q, k, v, out, lse, grad_out, plan: Plan, band_lo, band_hi, scale: float):
    """``(dq, dk, dv)`` of ``plan``'s dQ kernel (Gluon or Triton) and Gluon dK/dV kernel."""
    from dldna.kernels.flash_gluon.dkdv import fa3_dkdv

    if plan.dq is None:
        from dldna.kernels.flash_triton import backward_dq

        dq, lse2, delta = backward_dq(q, k, v, out, lse, grad_out, band_lo, band_hi, scale)
    else:
        from dldna.kernels.flash_gluon.dq import fa3_dq

        dq, lse2, delta = fa3_dq(q, k, v, out, lse, grad_out, window=plan.window, scale=scale, **plan.dq)
    dk, dv = fa3_dkdv(q, k, v, grad_out, lse2, delta, window=plan.window, scale=scale, **plan.dkdv)
    return dq, dk, dv
