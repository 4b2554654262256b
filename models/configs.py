"""Model configurations: one frozen dataclass and the named shapes we serve.

A :class:`LlamaConfig` is hashable, so it can be a static argument of a jitted
function. The named configs are the real shapes of public checkpoints (their
weights are random here: nothing is downloaded) and a ``tiny`` one that runs on
two CPU cores in seconds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_vattention.attention.backends import default_dtype


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are stretched for long contexts.

    ``kind="llama3"`` is Llama 3.1's piecewise scaling: wavelengths shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept, those longer
    than ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor``, and the band between is interpolated. ``kind="linear"`` divides
    every frequency by ``factor``.
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise ValueError(f"rope scaling kind {self.kind!r} is not supported; use 'llama3' or 'linear'")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive; got {self.factor}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope scaling needs high_freq_factor > low_freq_factor; got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama-family decoder (Llama, Mistral, Yi).

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads (grouped-query
    attention), so ``num_heads`` must be a multiple of ``num_kv_heads``. ``dtype``
    names the dtype of the weights and activations; norms, softmax and the final
    logits are computed in float32. ``sliding_window`` is the attention window the
    checkpoint was trained with (Mistral): attention here is always full, so the model
    refuses a cache longer than the window, where the two would differ.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings; got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None; got {self.sliding_window}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} is not supported; use float32, bfloat16 or float16")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.jnp_dtype.itemsize

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64),
        max_position_embeddings=512, dtype="float32", eos_token_ids=(1,)),
    "yi-6b": LlamaConfig(
        vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=4, head_dim=128, rope_theta=5_000_000.0, max_position_embeddings=4096,
        eos_token_ids=(2,)),
    "llama-3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500_000.0, max_position_embeddings=8192,
        eos_token_ids=(128001, 128009)),
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, eos_token_ids=(128001, 128008, 128009)),
    "yi-34b": LlamaConfig(
        vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_layers=60, num_heads=56,
        num_kv_heads=8, head_dim=128, rope_theta=5_000_000.0, max_position_embeddings=4096,
        eos_token_ids=(2,)),
    "llama-3-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=500_000.0, max_position_embeddings=8192,
        eos_token_ids=(128001, 128009)),
}


def get_config(name: str) -> LlamaConfig:
    """The named config (``tiny``, ``yi-6b``, ``llama-3-8b``, ``llama-3.1-8b``, ``yi-34b``, ``llama-3-70b``)."""
    key = name.lower()
    if key not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[key]


def config_for_device(name: str, device: jax.Device) -> LlamaConfig:
    """The named shape in the dtype :func:`~jax_vattention.attention.backends.default_dtype` picks for
    ``device`` (bfloat16 on a GPU where the config says float32)."""
    config = get_config(name)
    return config.replace(dtype=default_dtype(config.dtype, device.platform))
