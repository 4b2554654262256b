"""A Hugging Face ``config.json`` as a :class:`~.configs.LlamaConfig`: every family the model serves.

The families differ in fields, not in code (see :class:`~.configs.LlamaConfig`): Llama, Mistral
(a sliding window in every layer), Qwen 2 (q/k/v biases; an optional window in the top layers),
Qwen 3 (per-head q/k norms), Gemma 2 (every other layer sliding, soft-capped logits, GeGLU,
``1 + weight`` norms around both sublayers, scaled embeddings) and Gemma 3 (five sliding layers
of six with their own rotary base, q/k norms, no soft-capping). A field a checkpoint leaves out
means what transformers 5 makes of it: :data:`HF_DEFAULTS` holds its defaults per
``model_type``, and the rules by which it derives ``layer_types`` are repeated here. Anything the
model cannot reproduce exactly is a ``ValueError`` naming the field.
"""

from __future__ import annotations

from typing import Any

from .configs import LlamaConfig, RopeScaling

# model_type -> the architectures its checkpoints name.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
    "gemma2": ("Gemma2ForCausalLM",),
    "gemma3_text": ("Gemma3ForCausalLM",),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
SUPPORTED_ARCHITECTURES = tuple(name for names in ARCHITECTURES.values() for name in names)

_COMMON = {"num_key_value_heads": None, "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "sliding_window": None,
           "layer_types": None, "partial_rotary_factor": None}
_GEMMA = {"num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
          "tie_word_embeddings": True, "eos_token_id": 1, "query_pre_attn_scalar": 256, "sliding_window": 4096,
          "use_bidirectional_attention": False}

# transformers 5's defaults for every config.json field we read, per model_type: a field a
# checkpoint leaves out means what it means there.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048, "eos_token_id": 2},
    "mistral": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "eos_token_id": 2, "sliding_window": 4096},
    "qwen2": {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768,
              "eos_token_id": None, "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28},
    "qwen3": {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768,
              "eos_token_id": None, "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28},
    "gemma2": {**_COMMON, **_GEMMA, "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
               "num_hidden_layers": 26, "num_attention_heads": 8, "max_position_embeddings": 8192,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {**_COMMON, **_GEMMA, "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "max_position_embeddings": 131072,
                    "attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window_pattern": 6},
}
# Where each family's rotary base defaults to when a checkpoint names none: (full layers, sliding).
_DEFAULT_THETA = {"gemma3_text": (1_000_000.0, 10_000.0)}


def rope_scaling(parameters: dict[str, Any], where: str, max_positions: int,
                 original: int | None = None) -> RopeScaling | None:
    """The :class:`RopeScaling` of one rope parameter dict (transformers 4's ``rope_scaling`` or
    5's ``rope_parameters``), None for ``default``. ``where`` names the field in errors;
    ``original`` is a top-level ``original_max_position_embeddings`` (Phi-3 style), which wins."""
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json: {where} rotates a part of each head (partial_rotary_factor="
                         f"{parameters['partial_rotary_factor']}), which is not supported")
    original = original or parameters.get("original_max_position_embeddings") or max_positions

    def number(key, default=None):
        value = parameters.get(key, default)
        return None if value is None else float(value)

    try:
        if kind == "default":
            return None
        if kind in ("linear", "dynamic"):
            return RopeScaling(kind=kind, factor=number("factor"))
        if kind == "llama3":
            return RopeScaling(kind="llama3", factor=number("factor"), low_freq_factor=number("low_freq_factor"),
                               high_freq_factor=number("high_freq_factor"),
                               original_max_position_embeddings=int(original))
        if kind == "yarn":
            return RopeScaling(kind="yarn", factor=number("factor"), original_max_position_embeddings=int(original),
                               beta_fast=number("beta_fast") or 32.0, beta_slow=number("beta_slow") or 1.0,
                               mscale=number("mscale"), mscale_all_dim=number("mscale_all_dim"),
                               attention_factor=number("attention_factor"),
                               truncate=bool(parameters.get("truncate", True)))
        if kind == "longrope":
            return RopeScaling(kind="longrope", factor=number("factor"), original_max_position_embeddings=int(original),
                               attention_factor=number("attention_factor"),
                               short_factor=tuple(float(x) for x in parameters["short_factor"]),
                               long_factor=tuple(float(x) for x in parameters["long_factor"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"config.json: {where} of rope type {kind!r} lacks or mangles {error}") from None
    raise ValueError(f"config.json: rope type {kind!r} ({where}) is not supported; supported: default, "
                     f"linear, dynamic, llama3, yarn, longrope")


def _rope(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The rotary fields of :class:`LlamaConfig`: ``rope_theta``, ``rope_scaling`` and, where the
    sliding layers rotate differently (Gemma 3), ``sliding_rope_theta`` and ``sliding_rope_scaling``."""
    parameters = dict(hf.get("rope_parameters") or {})
    full_theta, sliding_theta = _DEFAULT_THETA.get(model_type, (10000.0, None))
    max_positions = int(hf["max_position_embeddings"])
    original = hf.get("original_max_position_embeddings")
    nested = {"full_attention", "sliding_attention"} & set(parameters)
    if nested or sliding_theta is not None:
        full = dict(parameters.get("full_attention") or {})
        sliding = dict(parameters.get("sliding_attention") or {})
        if hf.get("rope_scaling"):
            full.update(hf["rope_scaling"])
        full.setdefault("rope_theta", hf.get("rope_theta", full_theta))
        sliding.setdefault("rope_theta", hf.get("rope_local_base_freq", sliding_theta or full["rope_theta"]))
        return dict(rope_theta=float(full["rope_theta"]),
                    rope_scaling=rope_scaling(full, "rope_parameters['full_attention']", max_positions, original),
                    sliding_rope_theta=float(sliding["rope_theta"]),
                    sliding_rope_scaling=rope_scaling(sliding, "rope_parameters['sliding_attention']",
                                                      max_positions, original))
    scaling = hf.get("rope_scaling") or parameters
    theta = float(parameters.get("rope_theta", hf.get("rope_theta", full_theta)))
    return dict(rope_theta=theta, rope_scaling=rope_scaling(
        {"partial_rotary_factor": hf["partial_rotary_factor"] or 1.0, **scaling}, "rope_scaling / rope_parameters",
        max_positions, original))


def _sliding_layers(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """``(sliding_window, sliding_layers)`` as transformers derives them: ``layer_types`` where the
    checkpoint lists them, else each family's rule."""
    window = hf["sliding_window"]
    if model_type == "llama" or (model_type in ("qwen2", "qwen3") and not hf["use_sliding_window"]):
        window = None  # transformers' Llama has no window, whatever the field says
    if window is None:
        return None, None
    types = hf.get("layer_types")
    if types is None:
        if model_type == "mistral":
            return int(window), None
        if model_type in ("qwen2", "qwen3"):
            types = ["sliding_attention" if i >= hf["max_window_layers"] else "full_attention"
                     for i in range(num_layers)]
        elif model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        elif model_type == "gemma3_text":
            pattern = int(hf["sliding_window_pattern"])
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        else:
            return int(window), None
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types must name 'sliding_attention' or 'full_attention' for each of "
                         f"the {num_layers} layers; got {types}")
    layers = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    if model_type == "mistral":
        return int(window), None  # transformers' Mistral slides in every layer, whatever layer_types say
    return (int(window), layers) if layers else (None, None)


def token_ids(value) -> tuple[int, ...]:
    """An ``eos_token_id`` field, one id or a list of them, as a tuple of ids."""
    return tuple(int(t) for t in (value if isinstance(value, list) else [value]))


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> LlamaConfig:
    """A :class:`LlamaConfig` from the fields of a Hugging Face ``config.json``.

    A missing field takes transformers' default for the ``model_type`` (:data:`HF_DEFAULTS`):
    a Mistral checkpoint without ``sliding_window`` has a window of 4096 there, and so here.
    ``dtype`` overrides the checkpoint's ``torch_dtype`` / ``dtype`` (default float32 if absent).
    Raises ``ValueError`` naming the field for any architecture or feature we do not support.
    """
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise ValueError("config.json: model_type 'gemma3' is Gemma 3's image-and-text model; its text decoder "
                         "is served from a text-only checkpoint (model_type 'gemma3_text', Gemma3ForCausalLM)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for architecture in hf.get("architectures") or ():
        if architecture not in ARCHITECTURES[model_type]:
            raise ValueError(f"config.json: architectures has {architecture!r}; a {model_type!r} checkpoint is "
                             f"{', '.join(ARCHITECTURES[model_type])}")
    hf = {**HF_DEFAULTS[model_type], **hf}
    gemma = model_type.startswith("gemma")
    activation = hf.get("hidden_activation") if gemma else hf["hidden_act"]
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    refusals = {
        "hidden_activation" if gemma else "hidden_act": activation not in activations,
        "mlp_bias": bool(hf["mlp_bias"]),
        "quantization_config": hf.get("quantization_config") is not None,
        "use_bidirectional_attention": bool(hf.get("use_bidirectional_attention")),
    }
    for field, refused in refusals.items():
        if refused:
            raise ValueError(f"config.json: {field}={hf[field]!r} is not supported")
    num_heads = int(hf["num_attention_heads"])
    num_layers = int(hf["num_hidden_layers"])
    window, sliding_layers = _sliding_layers(hf, model_type, num_layers)
    eos = hf["eos_token_id"]
    dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    attention_bias = bool(hf["attention_bias"])
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=int(hf["num_key_value_heads"] or num_heads),
        head_dim=int(hf["head_dim"] or int(hf["hidden_size"]) // num_heads),
        rms_norm_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf["tie_word_embeddings"]),
        max_position_embeddings=int(hf["max_position_embeddings"]), dtype=str(dtype),
        eos_token_ids=() if eos is None else token_ids(eos), sliding_window=window, sliding_layers=sliding_layers,
        qkv_bias=model_type == "qwen2" or attention_bias, o_bias=model_type != "qwen2" and attention_bias,
        qk_norm=model_type in ("qwen3", "gemma3_text"), norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma, activation=activations[activation], scale_embeddings=gemma,
        query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if gemma else None,
        attn_softcap=_cap(hf["attn_logit_softcapping"]) if model_type == "gemma2" else None,
        final_softcap=_cap(hf["final_logit_softcapping"]) if gemma else None,
        **_rope(hf, model_type))


def _cap(value) -> float | None:
    return None if value is None else float(value)
