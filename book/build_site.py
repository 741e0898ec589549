"""Build the website into ``<source>/_build/html`` (what ``make book`` runs).

With npm on the PATH, MathJax is installed from the npm registry at build time (not committed) and served from
the site itself, so pages typeset their math offline; without npm the pages load MathJax from its CDN as Jupyter
Book does by default. Nothing is executed: pages render the outputs stored in the notebooks.

    python book/build_site.py [--source .] [--offline-assets auto|yes|no]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

MATHJAX = "mathjax@3.2.2"


def vendor_mathjax(build_dir: Path) -> Path:
    """Install MathJax with npm into ``build_dir/vendor`` and return the folder to serve as ``html_extra_path``."""
    vendor = build_dir / "vendor"
    es5 = vendor / "node_modules" / "mathjax" / "es5"
    if not (es5 / "tex-chtml.js").exists():
        vendor.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(vendor), MATHJAX],
            check=True,
        )
    extra = build_dir / "offline_assets"
    target = extra / "mathjax"
    if not target.exists():
        shutil.copytree(es5, target)
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=".", help="book source folder (holds _config.yml and _toc.yml)")
    parser.add_argument("--offline-assets", choices=["auto", "yes", "no"], default="auto")
    args = parser.parse_args(argv)

    source = Path(args.source).resolve()
    build_dir = source / "_build"
    config = yaml.safe_load((source / "_config.yml").read_text())
    want_offline = args.offline_assets == "yes" or (args.offline_assets == "auto" and shutil.which("npm"))
    if want_offline:
        extra = vendor_mathjax(build_dir)
        sphinx_config = config.setdefault("sphinx", {}).setdefault("config", {})
        sphinx_config["html_extra_path"] = [str(extra.relative_to(source))]
        # relative to _static/ of the built site; html_extra_path puts mathjax/ at the site root
        sphinx_config["mathjax_path"] = "../mathjax/tex-chtml.js"
        config_path = build_dir / "_config_offline.yml"
        build_dir.mkdir(exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        config_path = source / "_config.yml"
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jupyter_book), "build", str(source), "--config", str(config_path), "--keep-going"]
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd)
    if result.returncode == 0:
        print(f"Open {build_dir / 'html' / 'index.html'} in a browser.")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
