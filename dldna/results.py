"""Stored full-size results: the numbers behind a chapter's GPU figures, with their provenance.

Benchmarks and long runs call ``save_result(name, data, command)``; it writes ``results/<name>.json`` with the
device, date, torch/triton versions and the command that produced it. Chapters call ``load_result(name)`` and
print ``provenance(result)`` beside the figure, so every full-size number on the site says where it came from.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any, Sequence

import torch

from dldna.config import repo_root


def results_dir() -> Path:
    """``results/`` at the repository root (created on demand)."""
    path = repo_root() / "results"
    path.mkdir(exist_ok=True)
    return path


def device_name() -> str:
    """Human-readable name of the device results are measured on (GPU name, else the CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line(program: str, args: Sequence[str] | None = None) -> str:
    """The command that made a result, for ``save_result``: ``program`` and its arguments (default: this
    process's ``sys.argv[1:]``), separated by single spaces (no trailing space when there are none)."""
    return " ".join([program, *(sys.argv[1:] if args is None else args)])


def save_result(name: str, data: Any, command: str, out_dir: Path | str | None = None) -> Path:
    """Write ``data`` (JSON-serialisable) with provenance to ``<out_dir or results/>/<name>.json``."""
    if not name or "/" in name:
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:  # triton is optional (not installed on macOS/Windows or CPU-only setups)
        triton_version = None
    record = {
        "name": name,
        "device": device_name(),
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "command": command,
        "data": data,
    }
    path = Path(out_dir) if out_dir is not None else results_dir()
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{name}.json"
    target.write_text(json.dumps(record, indent=1) + "\n")
    return target


def _search_dirs() -> list[Path]:
    """Where stored results are looked for: ``DLDNA_RESULTS_DIR``, the checkout's ``results/``, then the copy a
    ``pip install`` puts under ``<prefix>/share/dldna/results`` (so chapters opened in Colab find them too)."""
    dirs = [Path(os.environ["DLDNA_RESULTS_DIR"])] if os.environ.get("DLDNA_RESULTS_DIR") else []
    dirs.append(repo_root() / "results")
    for prefix in (sysconfig.get_path("data"), sys.prefix, sysconfig.get_config_var("userbase") or ""):
        if prefix:
            dirs.append(Path(prefix) / "share" / "dldna" / "results")
    return dirs


def result_file(filename: str) -> Path:
    """Path of a stored artifact (e.g. trained weights ``phi3_arithmetic_model_v4.pt``) in the first results
    folder that holds it (checkout, ``DLDNA_RESULTS_DIR`` or the pip-installed copy)."""
    for folder in _search_dirs():
        if (folder / filename).exists():
            return folder / filename
    raise FileNotFoundError(f"no stored file {filename!r} in {[str(d) for d in _search_dirs()]}")


def load_result(name: str) -> dict:
    """Read ``<name>.json`` as written by ``save_result``; raises ``FileNotFoundError`` if no copy exists."""
    for folder in _search_dirs():
        path = folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"no stored result {name!r} in {[str(d) for d in _search_dirs()]}; run the command that produces it")


def provenance(record: dict) -> str:
    """One line saying where a stored result came from: device, date, versions and command."""
    versions = f"torch {record['torch']}" + (f", triton {record['triton']}" if record.get("triton") else "")
    return f"Measured on {record['device']} on {record['date']} ({versions}) with `{record['command']}`"


def stored_results() -> list[dict]:
    """Name, device, date and command of every stored result (first copy found per name), sorted by name."""
    found: dict[str, dict] = {}
    for folder in _search_dirs():
        for path in sorted(folder.glob("*.json")):
            if path.stem not in found:
                record = json.loads(path.read_text())
                found[path.stem] = {key: record.get(key) for key in ("device", "date", "command")}
    return [{"name": name, **found[name]} for name in sorted(found)]


def main() -> None:
    """``python -m dldna.results``: which stored result came from which command on which device."""
    for row in stored_results():
        print(f"{row['name']:40s} {row['date']}  {row['device']}\n{'':40s} {row['command']}")


if __name__ == "__main__":
    main()
