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


ROPE_KINDS = ("linear", "dynamic", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are stretched for long contexts (transformers' ``rope_type``).

    ``kind``:

    * ``"linear"`` divides every frequency by ``factor``;
    * ``"dynamic"`` (NTK) raises the base with the sequence length once it passes the model's
      ``max_position_embeddings``: each forward pass takes the frequencies of its rows' lengths;
    * ``"llama3"`` is Llama 3.1's piecewise scaling: wavelengths shorter than
      ``original_max_position_embeddings / high_freq_factor`` are kept, those longer than
      ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, and the
      band between is interpolated;
    * ``"yarn"`` blends interpolated and original frequencies along a ramp between the dimensions
      ``beta_fast`` and ``beta_slow`` rotate, and scales cos and sin by ``attention_factor``
      (default ``0.1 ln(factor) + 1``);
    * ``"longrope"`` divides the frequencies by ``short_factor`` while a sequence is at most
      ``original_max_position_embeddings`` long and by ``long_factor`` beyond (Phi-3), and scales
      cos and sin by ``attention_factor`` (default ``sqrt(1 + ln(factor) / ln(original))``).

    ``factor`` None (longrope only): ``max_position_embeddings / original_max_position_embeddings``.
    """

    kind: str = "llama3"
    factor: float | None = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"rope scaling kind {self.kind!r} is not supported; use one of {', '.join(ROPE_KINDS)}")
        if self.factor is None and self.kind != "longrope":
            raise ValueError(f"rope scaling {self.kind!r} needs a factor")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive; got {self.factor}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope scaling needs high_freq_factor > low_freq_factor; got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.kind in ("llama3", "yarn", "longrope") and self.original_max_position_embeddings <= 0:
            raise ValueError(f"rope scaling {self.kind!r} needs a positive original_max_position_embeddings")
        if self.kind == "longrope" and (not self.short_factor or len(self.short_factor) != len(self.long_factor)):
            raise ValueError("rope scaling 'longrope' needs short_factor and long_factor of one length each "
                             "(head_dim / 2)")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ValueError(f"rope attention_factor must be positive; got {self.attention_factor}")


ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a decoder of the Llama family (Llama, Mistral, Yi, Qwen 2 and 3,
    Gemma 2 and 3): one architecture, where each family's differences are fields.

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads (grouped-query
    attention), so ``num_heads`` must be a multiple of ``num_kv_heads``. ``dtype``
    names the dtype of the weights and activations; norms, softmax and the final
    logits are computed in float32.

    What the families add, each off by default (Llama):

    * ``qkv_bias`` (Qwen 2): the query, key and value projections have biases; ``o_bias`` the
      output projection too (Llama's ``attention_bias`` sets both);
    * ``qk_norm`` (Qwen 3, Gemma 3): an RMSNorm over ``head_dim`` of every query and key head,
      before the rotation;
    * ``norm_offset`` (Gemma: 1.0): every RMSNorm scales by ``norm_offset + weight``, computed in
      float32 before the cast back (Gemma's order);
    * ``sandwich_norms`` (Gemma 2 and 3): the attention's and the MLP's outputs are normed too,
      before each joins the residual stream;
    * ``activation``: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU with the tanh approximation);
    * ``scale_embeddings`` (Gemma): embeddings are multiplied by ``sqrt(hidden_size)``, rounded to
      the model's dtype;
    * ``query_scale``: the logit scale, ``head_dim ** -0.5`` when None (Gemma: the inverse square
      root of ``query_pre_attn_scalar``);
    * ``attn_softcap``, ``final_softcap`` (Gemma 2): attention logits and output logits are
      soft-capped, ``cap * tanh(logit / cap)``;
    * ``sliding_window``: the layers in ``sliding_layers`` (every layer when None) attend only to
      the last ``sliding_window`` positions, their own included (Mistral: every layer; Gemma 2:
      every other layer; Gemma 3: five of six);
    * ``sliding_rope_theta``, ``sliding_rope_scaling`` (Gemma 3): the sliding layers' rotary base
      and scaling, where they differ from the others' (``rope_theta``, ``rope_scaling``).
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
    sliding_layers: tuple[int, ...] | None = None
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    activation: str = "silu"
    scale_embeddings: bool = False
    query_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None

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
        if self.sliding_layers is not None:
            if self.sliding_window is None:
                raise ValueError("sliding_layers needs a sliding_window")
            if any(not 0 <= layer < self.num_layers for layer in self.sliding_layers):
                raise ValueError(f"sliding_layers {self.sliding_layers} must be layers 0..{self.num_layers - 1}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} is not supported; use float32, bfloat16 or float16")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
        for name in ("query_scale", "attn_softcap", "final_softcap", "sliding_rope_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None; got {value}")
        for scaling in (self.rope_scaling, self.sliding_rope_scaling):
            if scaling is not None and scaling.kind == "longrope" and len(scaling.short_factor) != self.head_dim // 2:
                raise ValueError(f"longrope short_factor and long_factor need head_dim / 2 = {self.head_dim // 2} "
                                 f"values each; got {len(scaling.short_factor)}")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.jnp_dtype.itemsize

    def layer_window(self, layer: int) -> int | None:
        """The attention window of ``layer``: ``sliding_window`` if the layer slides, else None (full)."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    @property
    def window_layers(self) -> tuple[int, ...]:
        """The layers that attend within ``sliding_window`` (empty without one)."""
        return tuple(layer for layer in range(self.num_layers) if self.layer_window(layer) is not None)

    def cache_windows(self) -> dict:
        """The ``CacheConfig`` fields that let a virtual cache unmap the pages behind this model's
        windows: ``window`` and ``window_layers`` (empty without a window).

        Example::

            CacheConfig(num_layers=..., ..., **model.config.cache_windows())
        """
        if self.sliding_window is None:
            return {}
        return dict(window=self.sliding_window, window_layers=self.window_layers)

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
