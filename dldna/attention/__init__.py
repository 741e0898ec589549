"""Attention mechanisms, one module per family; ``reference.attention`` is the oracle.

Each module adds its public names here with one ``from .module import ...`` line.
"""
from dldna.attention.reference import attention, check_qkv, naive_attention, repeat_kv
from dldna.attention.masks import (and_masks, bigbird_block_layout, bigbird_mask, block_layout_from_mask, block_sparse_mask, causal_mask, dilated_mask, fixed_block_layout, fixed_mask, longformer_block_layout, longformer_mask, make_block_sparse, make_causal, make_dilated, make_fixed, make_longformer, make_segment_dilated, make_sliding_window, make_strided, mask_density, materialize, or_masks, receptive_field, segment_dilated_mask, sliding_window_block_layout, sliding_window_mask, strided_block_layout, strided_mask)
from dldna.attention.grouped import LayerCache, MultiHeadAttention, MultiHeadLatentAttention, KVDecoderConfig, TinyDecoder, cache_nbytes, kv_cache_bytes, kv_cache_table, mla_kv_cache_bytes
from dldna.attention.paged import BlockAllocator, PagedKVCache, paged_attention, simulate_serving, synthetic_trace
from dldna.attention.local import block_sparse_attention, sliding_window_attention
from dldna.attention.lowrank import linformer_attention, linformer_projection, pooling_projection
from dldna.attention.linear import elu_features, favor_features, linear_attention, orthogonal_random_matrix, performer_attention, random_projection
from dldna.attention.lsh import collision_probability, lsh_attention, lsh_hash, lsh_mask, random_rotations
from dldna.attention.ring import gather_sequence, merge_partials, ring_attention, ring_schedule, shard_sequence
from dldna.attention.dilated import dilated_attention, longnet_mask
from dldna.attention.hierarchical import hierarchical_attention
from dldna.attention.recurrent_memory import RecallTask, RecurrentMemoryTransformer, RMTConfig
