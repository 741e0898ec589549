"""Run-time configuration shared by every chapter: fast mode, device choice and seeding.

Fast mode (``DLDNA_FAST=1``) shrinks sizes and step counts so that every notebook runs top to bottom
on a 2-core CPU in CI; without it the chapters run at full size (on a GPU where one is present).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def is_fast() -> bool:
    """True when ``DLDNA_FAST`` is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    value = os.environ.get("DLDNA_FAST", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"DLDNA_FAST must be one of {sorted(_TRUE | _FALSE)}, got {value!r}")


def fast(full: T, small: T) -> T:
    """Pick ``small`` in fast mode and ``full`` otherwise, e.g. ``steps = fast(2000, 20)``."""
    return small if is_fast() else full


def device(prefer: str | None = None) -> torch.device:
    """The device chapters run on: ``prefer`` if given, else CUDA when available, else CPU.

    ``DLDNA_DEVICE`` in the environment overrides the automatic choice (e.g. ``DLDNA_DEVICE=cpu``).
    """
    name = prefer or os.environ.get("DLDNA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA); returns a CPU ``torch.Generator`` seeded the same."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def repo_root() -> Path:
    """The repository root when running from a checkout (the folder holding ``dldna/``)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path | None:
    """Local data folder: ``DLDNA_DATA_DIR`` if set, else ``../shared/data`` beside a checkout, else None."""
    env = os.environ.get("DLDNA_DATA_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"DLDNA_DATA_DIR={env!r} is not a directory")
        return path
    for candidate in (repo_root().parent / "shared" / "data", repo_root() / "data"):
        if candidate.is_dir():
            return candidate
    return None


def check_positive_ints(obj: object, names) -> None:
    """Raise ``ValueError`` naming the first attribute of ``obj`` in ``names`` that is not a positive int
    (used by the model configs' ``__post_init__``)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
