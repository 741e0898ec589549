"""Remove stored ipywidgets state from notebooks before committing them.

Executing a chapter stores the state of its widgets (tqdm progress bars, sliders) in the notebook. The website has
no kernel, so that state would only render dead controls and load widget JavaScript from a CDN; each widget output
keeps its plain-text form, and chapters show a static figure beside every interactive one.

    python book/clean_notebooks.py chapters/*.ipynb
"""
from __future__ import annotations

import sys

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def clean(path: str) -> bool:
    """Strip widget state and widget-view outputs from one notebook; returns True if it changed."""
    nb = nbformat.read(path, as_version=4)
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if WIDGET_VIEW in output.get("data", {}):
                del output["data"][WIDGET_VIEW]
                changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    for notebook in sys.argv[1:]:
        if clean(notebook):
            print("cleaned", notebook)
