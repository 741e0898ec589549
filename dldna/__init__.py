"""dldna: the package behind the executable book on efficient Transformers.

Subpackages are imported on demand (``import dldna.attention``), so ``import dldna`` stays cheap.
"""
import torch as _torch

from dldna.config import device, fast, is_fast, seed_everything

# Workaround for torch 2.13's CPU build: the first float64 ``torch.exp`` of a process sometimes returns values off
# by up to ~1e-9 relative (about 1 in 60 fresh processes when four start at once on this 2-core machine; every later
# call is exact to ~1e-16), and the book's float64 checks against the reference (1e-12) then failed at random. After
# one call here, at import, none of 240 processes showed it.
_torch.exp(_torch.zeros(1, dtype=_torch.float64))

__version__ = "0.1.0"
__all__ = ["device", "fast", "is_fast", "seed_everything", "__version__"]
