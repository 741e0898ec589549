"""The website builds from the stored notebook outputs (README's `make book`), with chapter 1's plots on its page."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_index_and_chapter_one_with_plots(built_site):
    assert (built_site / "index.html").exists()
    page = built_site / "chapters" / "01_attention_cost.html"
    text = page.read_text()
    images = re.findall(r'<img[^>]+src="([^"]+\.png)"', text)
    assert len(images) >= 3, images
    for src in images:
        assert (page.parent / src).resolve().exists(), src
    assert "colab.research.google.com" in text


def test_every_chapter_is_in_the_site(built_site):
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        assert (built_site / "chapters" / f"{notebook.stem}.html").exists(), notebook.name


def test_notebooks_store_no_widget_state():
    # The site has no kernel: a widget's stored state would render as a dead control (and load widget JS from a
    # CDN). Chapters show a static figure beside each widget instead.
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        metadata = json.loads(notebook.read_text())["metadata"]
        assert "widgets" not in metadata, f"{notebook.name} stores widget state; clear it before committing"
