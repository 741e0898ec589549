"""Where the Triton kernels can run: a CUDA GPU, or the CPU under Triton's interpreter (chapters 5 and 6).

``triton`` is optional (absent on macOS/Windows and on CPU-only installs); every kernel module asks here.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAVE_TRITON = False
else:
    HAVE_TRITON = True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether Triton kernels can run on ``device``: CUDA with triton, or CPU under ``TRITON_INTERPRET=1``."""
    if not HAVE_TRITON:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return dev.type == "cpu" and interpreting()
