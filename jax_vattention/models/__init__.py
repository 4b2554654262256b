"""Llama-family decoders that read and write a :class:`~jax_vattention.cache.KVCache`."""

from jax_vattention.models.configs import CONFIGS, LlamaConfig, RopeScaling, get_config
from jax_vattention.models.hf_loader import load_model, load_tokenizer
from jax_vattention.models.llama import Llama

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "RopeScaling", "get_config", "load_model", "load_tokenizer"]
