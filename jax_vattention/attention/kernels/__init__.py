"""Attention kernels that read the virtually contiguous KV cache in place.

Each kernel has two implementations of one algorithm: Pallas on Triton (``decode_attention``,
``chunk_attention``; JAX 0.11 deprecated that backend) and Pallas on Mosaic GPU for Hopper
(``mosaic_decode_attention``, ``mosaic_chunk_attention``, sharing the bounded key loop of
``mosaic_keys``). :func:`jax_vattention.attention.kernel_implementation.pallas_implementation` picks one.
"""

from jax_vattention.attention.kernels.chunk_attention import chunk_attention
from jax_vattention.attention.kernels.decode_attention import decode_attention
from jax_vattention.attention.kernels.mosaic_chunk_attention import mosaic_chunk_attention
from jax_vattention.attention.kernels.mosaic_decode_attention import mosaic_decode_attention

__all__ = ["chunk_attention", "decode_attention", "mosaic_chunk_attention", "mosaic_decode_attention"]
