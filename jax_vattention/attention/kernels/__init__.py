"""Attention kernels that read the virtually contiguous KV cache in place."""

from jax_vattention.attention.kernels.chunk_attention import chunk_attention
from jax_vattention.attention.kernels.decode_attention import decode_attention

__all__ = ["chunk_attention", "decode_attention"]
