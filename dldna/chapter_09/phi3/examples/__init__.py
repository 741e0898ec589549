"""Printed-book example scripts of the Phi-3 section, mapped onto ``dldna.models.phi3`` and ``dldna.data.arithmetic``."""
