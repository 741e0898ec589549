"""Printed example modules ``train_seq_num``, ``train_math`` and ``train_sql`` (chapter 10)."""
