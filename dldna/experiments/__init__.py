"""Experiments behind the chapters' stored results (python -m dldna.experiments.<name>)."""
