"""Triton kernels, each behind a ``torch.autograd.Function`` and a plain function (chapter 5).

``import dldna.kernels`` works without triton: the functions then run the tiled PyTorch version.
"""
from dldna.kernels.flash_attention import block_sparse_flash_attention, flash_attention, triton_available
from dldna.kernels.tiled import online_softmax, tiled_flash_attention

flash_attention_reference = tiled_flash_attention  # the pure-PyTorch FlashAttention (same arguments)
