"""Attention kernels that read the virtually contiguous KV cache in place."""

from jax_vattention.kernels.decode_attention import decode_attention

__all__ = ["decode_attention"]
