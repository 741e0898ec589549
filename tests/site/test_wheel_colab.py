"""`pip install dldna[colab]` from a freshly built wheel into a fresh venv, then chapter 1's code runs there.

This is what a Colab reader gets: the package and its `colab` extra, no repository checkout (the stored GPU results
must come with the wheel), fast mode on a CPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

CHAPTER = ROOT / "chapters" / "01_attention_cost.ipynb"


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_with_colab_extra_runs_chapter_one(tmp_path):
    nbconvert = pytest.importorskip("nbconvert")
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)])
    (wheel,) = wheels.glob("dldna-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # torch pinned first so pip takes the CPU build where one is provided (an unpinned torch may be a CUDA build)
    run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], timeout=1800)
    run([str(python), "-m", "pip", "install", "-q", f"{wheel}[colab]"], timeout=1800)

    script, _ = nbconvert.PythonExporter().from_filename(str(CHAPTER))
    (tmp_path / "chapter.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DLDNA_RESULTS"))}
    env.update(DLDNA_FAST="1", MPLBACKEND="Agg")
    workdir = tmp_path / "elsewhere"  # not the checkout: nothing may be read from the repository
    workdir.mkdir()
    proc = run([str(python), str(tmp_path / "chapter.py")], cwd=workdir, env=env, timeout=900)
    assert "Measured on NVIDIA" in proc.stdout  # the stored H100 results came with the wheel
    located = run([str(python), "-c", "import dldna, sys; print(dldna.__file__)"], cwd=workdir, env=env).stdout
    assert str(venv) in located and str(ROOT) not in located
