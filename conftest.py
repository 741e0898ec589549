"""Test configuration shared by unit tests and notebooks: fast mode on, headless plots, local data."""
import os
from pathlib import Path

os.environ.setdefault("DLDNA_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
_shared = Path(__file__).resolve().parent.parent / "shared" / "data"
if "DLDNA_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["DLDNA_DATA_DIR"] = str(_shared)
