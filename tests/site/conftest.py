"""Fixtures for the website tests: the book built once per session from a copy of the repository."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "_build" / "test-artifacts"


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    """Build the book the way ``make book`` does, in a copy (a local ``_build/`` is neither read nor clobbered)."""
    if not (Path(sys.executable).parent / "jupyter-book").exists():
        pytest.skip("jupyter-book is not installed (pip install dldna[book])")
    src = tmp_path_factory.mktemp("site") / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "_build", ".git", "__pycache__", ".pytest_cache", ".hypothesis"))
    proc = subprocess.run([sys.executable, "book/build_site.py", "--source", str(src)], cwd=src, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return src / "_build" / "html"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}
