"""dldna: the package behind the executable book on efficient Transformers.

Subpackages are imported on demand (``import dldna.attention``), so ``import dldna`` stays cheap.
"""
from dldna.config import device, fast, is_fast, seed_everything

__version__ = "0.1.0"
__all__ = ["device", "fast", "is_fast", "seed_everything", "__version__"]
