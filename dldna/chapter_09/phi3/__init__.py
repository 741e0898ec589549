"""Printed-book names of the Phi-3 section (``simple_phi3``, ``examples.train_complex_math``); see ``dldna.models.phi3``."""
