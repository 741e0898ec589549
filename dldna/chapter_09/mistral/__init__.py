"""Printed names ``dldna.chapter_09.mistral.*``: ``simple_mistral`` and the three ``examples`` (chapters 9-10).

They re-export ``dldna.models.mistral`` and ``dldna.examples.mistral_tasks`` with the printed signatures.
"""
