"""Printed-book names of the chapter 9 encoder (``efficient_encoder``, ``efficient_encoder_rope``,
``train_ag_news``), mapped onto ``dldna.models.encoder`` and ``dldna.models.encoder_experiments``."""
