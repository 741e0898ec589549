"""Regenerate the landing page's chapter map from the chapters themselves.

For every ``chapters/NN_*.ipynb``: the title (first ``#`` heading), the first sentence after it, and a thumbnail of
its first stored figure (``book/figures/map/NN.png``). The map is written into ``book/intro.md`` between the
``chapter-map`` markers; a test fails when the page is out of date. Run after adding or re-executing a chapter:

    python book/chapter_map.py
"""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
INTRO = ROOT / "book" / "intro.md"
THUMBS = ROOT / "book" / "figures" / "map"
START, END = "<!-- chapter-map:start -->", "<!-- chapter-map:end -->"


def chapter_summary(path: Path) -> tuple[str, str, bytes | None]:
    """(title, first sentence, first PNG output or None) of one chapter notebook."""
    nb = nbformat.read(path, as_version=4)
    title, sentence, image = path.stem, "", None
    for cell in nb.cells:
        if cell.cell_type == "markdown" and title == path.stem:
            match = re.search(r"^# +(.+)$", cell.source, re.M)
            if match:
                title = match.group(1).strip()
                body = cell.source[match.end():].strip()
                first = re.split(r"(?<=[.!?])\s", " ".join(body.split()), maxsplit=1)[0] if body else ""
                sentence = first
        if cell.cell_type == "code" and image is None:
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    image = base64.b64decode(output["data"]["image/png"])
                    break
    return title, sentence, image


def thumbnail(png: bytes, target: Path, width: int = 420) -> None:
    """Downscale a PNG to ``width`` pixels wide (matplotlib's bundled Pillow), keeping the aspect ratio."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.thumbnail((width, width * 4))
    target.parent.mkdir(parents=True, exist_ok=True)
    img.save(target, optimize=True)


def render_map(write_thumbnails: bool = True) -> str:
    """The MyST grid of chapter cards (``write_thumbnails=False``: only render, as the test does)."""
    lines = [START, "", "::::{grid} 1 2 3 3", ":gutter: 2", ""]
    for path in sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")):
        title, sentence, png = chapter_summary(path)
        number = path.stem[:2]
        lines += [f":::{{grid-item-card}} {title}", f":link: ../chapters/{path.stem}", ":link-type: doc"]
        if png is not None:
            if write_thumbnails:
                thumbnail(png, THUMBS / f"{number}.png")
            lines.append(f":img-top: figures/map/{number}.png")
        lines += ["", sentence or "", ":::", ""]
    lines += ["::::", "", END]
    return "\n".join(lines)


def updated_intro(write_thumbnails: bool = True) -> str:
    text = INTRO.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{INTRO} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + render_map(write_thumbnails) + tail


if __name__ == "__main__":
    INTRO.write_text(updated_intro())
    print("chapter map written to", INTRO)
