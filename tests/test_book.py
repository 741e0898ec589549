"""The website builds from the stored notebook outputs (README's `make book`), with chapter 1's plots on its page."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    jb = Path(sys.executable).parent / "jupyter-book"
    if not jb.exists():
        pytest.skip("jupyter-book is not installed (pip install dldna[book])")
    out = tmp_path_factory.mktemp("site")
    # Build from a copy so a local _build/ is neither read nor overwritten.
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "_build", ".git", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([str(jb), "build", str(src), "--keep-going"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return src / "_build" / "html", proc.stdout + proc.stderr


def test_index_and_chapter_one_with_plots(built_site):
    html, _ = built_site
    assert (html / "index.html").exists()
    page = html / "chapters" / "01_attention_cost.html"
    assert page.exists()
    text = page.read_text()
    images = re.findall(r'<img[^>]+src="([^"]+\.png)"', text)
    assert len(images) >= 3, images
    for src in images:
        assert (page.parent / src).resolve().exists(), src
    assert "colab.research.google.com" in text


def test_every_chapter_is_in_the_site(built_site):
    html, _ = built_site
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        assert (html / "chapters" / f"{notebook.stem}.html").exists(), notebook.name
