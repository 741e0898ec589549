"""Printed-book compatibility facade.

The printed chapter 9 imports names such as ``dldna.chapter_09.complexity_benchmark.measure_attention_complexity``
or ``dldna.chapter_09.mistral.simple_mistral.MistralConfig``. The modules below this package map those names onto
the real implementations elsewhere in ``dldna``, with the printed signatures, so the printed cells run unchanged.
New code should import from ``dldna.attention``, ``dldna.models``, ``dldna.data`` and ``dldna.bench`` directly.
"""
