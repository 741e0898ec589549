"""Attention mechanisms, one module per family; ``reference.attention`` is the oracle.

Each module adds its public names here with one ``from .module import ...`` line.
"""
from dldna.attention.reference import attention, check_qkv, naive_attention, repeat_kv
