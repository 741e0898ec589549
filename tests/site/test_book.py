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


def test_every_chapter_ends_with_exercises_and_solutions():
    # basic / applied / advanced exercises, each with a worked solution behind a toggle; coding solutions are code
    # cells, so nbval executes them with the rest of the chapter.
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        markdown = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
        start = next((i for i, text in enumerate(markdown) if re.search(r"^\s*#+ .*Exercises", text, re.M)), None)
        assert start is not None, f"{notebook.name} has no Exercises section"
        tail = "\n".join(markdown[start:])
        for level in ("Basic", "Applied", "Advanced"):
            # "**Basic.**", "**1 (basic).**" or a "### Basic" heading
            pattern = rf"\*\*[^*\n]*\b{level}\b[^*\n]*\*\*|^#+ .*\b{level}\b"
            assert re.search(pattern, tail, re.I | re.M), f"{notebook.name}: no {level.lower()} exercise"
        assert tail.count("<details>") >= 3, f"{notebook.name}: every exercise needs a <details> solution"


def test_every_chapter_installs_the_package_only_in_colab():
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        first_code = next(c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
        source = "".join(first_code["source"])
        assert '"google.colab" in sys.modules' in source and "dldna[colab]" in source, notebook.name


def test_landing_page_chapter_map_is_current_with_one_picture_per_chapter():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chapter_map", ROOT / "book" / "chapter_map.py")
    chapter_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chapter_map)
    intro = (ROOT / "book" / "intro.md").read_text()
    assert intro == chapter_map.updated_intro(write_thumbnails=False), "run `python book/chapter_map.py` and commit book/intro.md"
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        assert f"../chapters/{notebook.stem}" in intro, notebook.name
        assert f"figures/map/{notebook.stem[:2]}.png" in intro, f"{notebook.name} stores no figure for the chapter map"
        assert (ROOT / "book" / "figures" / "map" / f"{notebook.stem[:2]}.png").exists(), notebook.name
