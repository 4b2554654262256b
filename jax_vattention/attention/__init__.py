"""Unpaged attention over a virtual KV cache, with the kernel chosen by one argument.

``reference`` holds the plain-XLA kernels, ``adapters`` the cuDNN / Pallas / Mosaic ones,
``kernels/`` our Pallas kernels, ``backends`` the one rule for which kernel may read which cache,
``kernel_implementation`` which implementation of our kernels runs,
and ``attend`` the entry points the models call.
"""

from jax_vattention.attention.adapters import (CUDNN_DTYPES, MOSAIC_BLOCK_Q, check_mosaic_shapes, chunk_attention,
                                               cudnn_attention, dot_product_attention, mosaic_attention,
                                               mosaic_prompt_attention, pallas_attention)
from jax_vattention.attention.attend import attend, attend_prompt
from jax_vattention.attention.backends import (BACKENDS, PROMPT_KERNELS,
                                               READS_WHOLE_CAPACITY, backend_for, check_backend, check_cache_dtype,
                                               check_backend_on, default_backend, default_dtype, default_layout,
                                               prefill_attends_prompt, resolve_backend)
from jax_vattention.attention.kernel_implementation import PALLAS_BACKENDS, PALLAS_ON_HOPPER, pallas_implementation
from jax_vattention.attention.reference import BLOCK_TOKENS, blocked_attention, xla_attention

__all__ = [
    "BACKENDS", "BLOCK_TOKENS", "CUDNN_DTYPES", "MOSAIC_BLOCK_Q", "PALLAS_BACKENDS", "PALLAS_ON_HOPPER",
    "PROMPT_KERNELS", "READS_WHOLE_CAPACITY",
    "attend", "attend_prompt", "backend_for", "blocked_attention", "check_backend", "check_backend_on", "check_cache_dtype", "check_mosaic_shapes",
    "chunk_attention", "cudnn_attention", "default_backend", "default_dtype", "default_layout",
    "dot_product_attention", "mosaic_attention", "mosaic_prompt_attention", "pallas_attention",
    "pallas_implementation",
    "prefill_attends_prompt", "resolve_backend", "xla_attention",
]
