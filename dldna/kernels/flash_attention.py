"""FlashAttention as a PyTorch function: Triton kernels on GPU (or in Triton's CPU interpreter), tiled PyTorch else.

``flash_attention`` and ``block_sparse_flash_attention`` validate their arguments, pick a backend and wrap the
kernels of ``dldna.kernels.flash_triton`` in ``torch.autograd.Function``s (forward saves only ``O`` and the
log-sum-exp; the backward recomputes the attention weights). On a Hopper GPU, causal and sliding-window calls of
the shapes that ``dldna.kernels.flash_gluon.plan_for`` lists run its warp-specialised Gluon kernels instead.
Without a GPU and without ``TRITON_INTERPRET=1`` the same algorithm runs in plain PyTorch (``dldna.kernels.tiled``),
so the package and chapter 5 work everywhere.

Precision: fp16/bf16 inputs use the tensor cores with fp32 accumulation (relative error ~1e-3 to 1e-2, as the
input rounding dictates); fp32 inputs use TF32 tensor cores on the GPU (~1e-3) and exact fp32 in the interpreter.

Used in chapter 5 (and by Ring attention, which needs ``return_lse=True``).
"""
from __future__ import annotations

import math
import weakref

import torch

from dldna.attention.reference import check_qkv
from dldna.kernels import availability
from dldna.kernels.tiled import band_limits, tiled_flash_attention

try:  # triton is optional: absent on macOS/Windows and on CPU-only installs
    from dldna.kernels import flash_triton as _kernels
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _kernels = None
from dldna.kernels import flash_gluon as _gluon  # imports Gluon only when a Hopper GPU runs its kernels

HEAD_DIMS = (16, 32, 64, 128)
BACKENDS = ("auto", "triton", "torch")


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether these Triton kernels can run on ``device``: CUDA with triton, or CPU under ``TRITON_INTERPRET=1``
    (and the kernel module imported: a triton too old for it counts as none)."""
    return _kernels is not None and availability.triton_available(device)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            f"backend='triton' needs triton and a CUDA tensor, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got a {device.type} tensor"
        )
    return backend


def _check_common(q, k, v, scale):
    check_qkv(q, k, v)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v must have the head_dim of q ({q.shape[-1]}), got {v.shape[-1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _kernel_inputs(*tensors):
    """Contiguous last dimension (any other strides are passed to the kernels as they are)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _interpreter_upcast(q, k, v):
    """The interpreter's bf16 ``tl.dot`` is wrong (TOOLCHAIN.md): run bf16 there in fp32 and cast back."""
    if _kernels is not None and _kernels.interpreting() and q.dtype == torch.bfloat16:
        return q.float(), k.float(), v.float(), torch.bfloat16
    return q, k, v, None


class _FlashAttention(torch.autograd.Function):
    """``plan``: the Gluon kernels' ``flash_gluon.Plan`` for this call, or None (the Triton kernels throughout)."""

    @staticmethod
    def forward(ctx, q, k, v, band_lo, band_hi, scale, plan):
        q, k, v = _kernel_inputs(q, k, v)
        if plan is not None and plan.forward is not None:
            out, lse = _gluon.attention_forward(q, k, v, plan, scale)
        else:
            out, lse = _kernels.attention_forward(q, k, v, band_lo, band_hi, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.band = (band_lo, band_hi)
        ctx.scale, ctx.plan = scale, plan
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused lse (a kernel per call)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        (grad_out,) = _kernel_inputs(grad_out)
        if ctx.plan is not None:
            dq, dk, dv = _gluon.attention_backward(q, k, v, out, lse, grad_out, ctx.plan, *ctx.band, ctx.scale)
        else:
            dq, dk, dv = _kernels.attention_backward(q, k, v, out, lse, grad_out, *ctx.band, ctx.scale)
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact softmax attention in O(N) memory (Dao et al. 2022; FlashAttention-2, Dao 2023), fwd + bwd.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (GQA/MQA; K/V are never repeated).
            ``D`` in {16, 32, 64, 128}; any ``Nq``, ``Nk``; fp16, bf16 or fp32 (see the module doc on precision).
        causal: query ``i`` sees keys ``j <= i + Nk - Nq`` (bottom-right aligned, as ``dldna.attention.attention``).
        window: with ``causal``, each query sees its last ``window`` keys (itself included); without, keys with
            ``|i + Nk - Nq - j| <= window // 2``. Key blocks outside the window are skipped, so time is O(N * window).
        scale: defaults to ``1 / sqrt(D)``.
        return_lse: also return the natural log-sum-exp of the scaled scores, ``(B, H, Nq)`` float32 (``-inf`` for
            rows with no key); it carries no gradient.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; on a Hopper GPU the Gluon kernels where
            ``flash_gluon.plan_for`` has them), ``"torch"`` (tiled PyTorch, any device) or ``"auto"`` (Triton where
            it can run, else PyTorch).

    Returns ``out`` ``(B, H, Nq, D)`` in the input dtype (and ``lse``). Rows with no allowed key give zeros.
    Used in chapter 5.
    """
    scale = _check_common(q, k, v, scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    band = band_limits(q.shape[2], k.shape[2], causal, window)  # validates window
    if _resolve_backend(backend, q.device) == "torch":
        out, lse = tiled_flash_attention(q, k, v, causal, window, scale, return_lse=True)
    else:
        if q.shape[-1] not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS} for the Triton kernel, got {q.shape[-1]}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32 tensors, got {q.dtype}")
        plan = _gluon.plan_for(q, k, v, band.lo, band.hi)
        qi, ki, vi, cast_back = (q, k, v, None) if plan is not None else _interpreter_upcast(q, k, v)
        out, lse = _FlashAttention.apply(qi, ki, vi, band.lo, band.hi, scale, plan)
        if cast_back is not None:
            out = out.to(cast_back)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------ block-sparse
def layout_spans(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept columns of each row of a 2-D bool block layout ``(R, C)``, as the kernels read them.

    Returns ``(spans, cols)``, both int32: ``cols`` is ``(R * C,)``, row ``r``'s kept columns in increasing order at
    the start of its slice ``[r * C, (r + 1) * C)``; ``spans`` is ``(2 * R,)``, with ``spans[2r:2r + 2]`` the begin
    and end of those columns in ``cols``. Unlike a compressed (CSR) layout, whose size depends on the number of
    kept blocks, this needs no GPU-to-host synchronisation (``nonzero`` waits for the GPU on every call).
    """
    n_rows, n_cols = layout.shape
    cols = torch.sort((~layout).to(torch.int8), dim=1, stable=True).indices  # kept (0) first, in column order
    begin = torch.arange(n_rows, device=layout.device, dtype=torch.int32) * n_cols
    spans = torch.stack((begin, begin + layout.sum(1, dtype=torch.int32)), 1)
    return spans.flatten(), cols.to(torch.int32).flatten()


# (id of a layout, device) -> (weak reference to it, its version counter, spans of the layout, spans of its transpose)
_SPANS: dict[tuple[int, torch.device], tuple] = {}


def cached_layout_spans(layout: torch.Tensor, device: torch.device) -> tuple[tuple, tuple]:
    """``layout_spans`` of ``layout`` and of its transpose, on ``device``, computed once per layout tensor.

    A model passes the same layout every step; building the spans took 0.1 ms on an H200, a sixth of the BigBird
    row's forward. The entry is rebuilt when the tensor is changed in place (its version counter moves) and dropped
    when the tensor is freed.
    """
    key = (id(layout), torch.device(device))
    hit = _SPANS.get(key)
    if hit is not None and hit[0]() is layout and hit[1] == layout._version:
        return hit[2], hit[3]
    on_device = layout.to(device)
    spans, spans_t = layout_spans(on_device), layout_spans(on_device.t())
    _SPANS[key] = (weakref.ref(layout, lambda _, key=key: _SPANS.pop(key, None)), layout._version, spans, spans_t)
    return spans, spans_t


def _check_layout(layout, block_size, n_q, n_k):
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        raise TypeError("layout must be a bool tensor (True = block pair computed)")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    want = (-(-n_q // block_size), -(-n_k // block_size))
    if layout.dim() != 2 or tuple(layout.shape) != want:
        raise ValueError(f"layout must have shape (ceil(Nq/block_size), ceil(Nk/block_size)) = {want}, "
                         f"got {tuple(layout.shape)}")


def block_mask_from_layout(layout: torch.Tensor, block_size: int, n_q: int, n_k: int) -> torch.Tensor:
    """Expand a block layout to the ``(n_q, n_k)`` token mask it stands for (for the dense reference)."""
    full = layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return full[:n_q, :n_k]


class _BlockSparseFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, block_size, scale):
        q, k, v = _kernel_inputs(q, k, v)
        spans, spans_t = cached_layout_spans(layout, q.device)
        out, lse = _kernels.attention_forward(q, k, v, None, None, scale, layout=spans, block=block_size)
        ctx.save_for_backward(q, k, v, out, lse, *spans, *spans_t)
        ctx.block_size, ctx.scale = block_size, scale
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused lse (a kernel per call)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, *spans = ctx.saved_tensors
        (grad_out,) = _kernel_inputs(grad_out)
        dq, dk, dv = _kernels.attention_backward(q, k, v, out, lse, grad_out, None, None, ctx.scale,
                                                 layout=spans[:2], layout_t=spans[2:],
                                                 block=ctx.block_size)
        return dq, dk, dv, None, None, None


def block_sparse_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """FlashAttention that visits only the kept blocks of a block layout (one softmax over all kept blocks).

    Args:
        q, k, v: as in ``flash_attention`` (GQA allowed).
        layout: bool ``(ceil(Nq / block_size), ceil(Nk / block_size))``; ``layout[r, c]`` keeps the pair of query
            block ``r`` and key block ``c`` (Longformer / BigBird / Sparse Transformer block layouts). Token mask:
            ``block_mask_from_layout``. Work is proportional to the number of kept blocks.
        block_size: 16, 32, 64 or 128 for the Triton kernel (the tile of both queries and keys).

    Rows whose block row keeps nothing return zeros. The ``"torch"`` backend runs the dense reference with the
    expanded token mask (O(N^2) memory; a check, not a fast path). Used in chapter 5.
    """
    scale = _check_common(q, k, v, scale)
    _check_layout(layout, block_size, q.shape[2], k.shape[2])
    if _resolve_backend(backend, q.device) == "torch":
        from dldna.attention.reference import attention

        mask = block_mask_from_layout(layout.to(q.device), block_size, q.shape[2], k.shape[2])
        out, lse = attention(q, k, v, mask=mask, scale=scale, return_lse=True)
        return (out, lse) if return_lse else out
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be 16, 32, 64 or 128 for the Triton kernel, got {block_size}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS} for the Triton kernel, got {q.shape[-1]}")
    qi, ki, vi, cast_back = _interpreter_upcast(q, k, v)
    out, lse = _BlockSparseFlashAttention.apply(qi, ki, vi, layout, block_size, scale)
    if cast_back is not None:
        out = out.to(cast_back)
    return (out, lse) if return_lse else out
