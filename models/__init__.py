"""Decoders of the Llama family (Llama, Mistral, Qwen 2 and 3, Gemma 2 and 3: one architecture whose
differences are config fields) that read and write a :class:`~jax_vattention.cache.KVCache`.

This folder is the backend's first user: it imports ``jax_vattention`` the way any model code
would, and nothing in the backend imports it. The wheel installs it as ``jax_vattention.models``
(``[tool.scikit-build] wheel.packages`` in pyproject.toml), so no bare ``models`` package lands in
site-packages; for work in the source tree, ``scripts/build_inplace.sh`` links it there.
"""

from .configs import CONFIGS, LlamaConfig, RopeScaling, config_for_device, get_config
from .hf_loader import load_model, load_tokenizer
from .llama import Llama

__all__ = [
    "CONFIGS",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "config_for_device",
    "get_config",
    "load_model",
    "load_tokenizer",
]
