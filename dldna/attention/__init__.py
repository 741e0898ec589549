"""Attention mechanisms, one module per family; ``reference.attention`` is the oracle.

Each module adds its public names here with one ``from .module import ...`` line.
"""
from dldna.attention.reference import attention, check_qkv, naive_attention, repeat_kv
from dldna.attention.grouped import LayerCache, MultiHeadAttention, MultiHeadLatentAttention, KVDecoderConfig, TinyDecoder, cache_nbytes, kv_cache_bytes, kv_cache_table, mla_kv_cache_bytes
