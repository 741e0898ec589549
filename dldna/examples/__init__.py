"""Runnable examples built on the dldna package (``python -m dldna.examples.<name>``)."""
