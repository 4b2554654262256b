"""Loading a llama.cpp GGUF file into :class:`Llama`, with numpy and ``gguf`` only: the
architectures llama, qwen2 (q/k/v biases), qwen3 (q/k norms), gemma2 and gemma3 (sandwich norms,
sliding windows, soft-caps; llama.cpp's own rules for what their files leave out: the logit
scale, the sliding layers, Gemma 3's local rotary base).

A GGUF file holds the architecture as metadata (``llama.block_count``, ...), the
tokenizer (see :mod:`.gguf_tokenizer`) and the tensors, possibly quantized in
blocks. Each tensor is dequantized to float32 by the ``gguf`` library
(:func:`dequantize`), then cast to the model's dtype.

Three conventions differ from a Hugging Face checkpoint. Tensor names are
llama.cpp's (``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight``).
For the llama architecture, llama.cpp's converter permutes the rows of ``attn_q`` and
``attn_k`` so that rotary pairs are adjacent (GPT-J style); our rotation pairs dimension
``i`` with ``i + head_dim / 2`` (Hugging Face's layout), so :func:`unpermute_rows` undoes
it, as transformers' GGUF loading does (the other architectures rotate in Hugging Face's
layout already). And Gemma's norms are stored as ``1 + weight``. After both, the tensors go through the same
placement as a safetensors checkpoint (:mod:`.hf_loader`).

Anything the model cannot reproduce is a ``ValueError`` naming it: another
architecture, a tensor type outside :data:`SUPPORTED_TYPES`, missing metadata,
per-layer head counts, rope scaling other than linear. So is a damaged file: every
metadata field and tensor is checked before any model is built
(:mod:`.gguf_validation`), and each error names the file (and, for a copy in the
download cache, says to delete it).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator

import numpy as np

from .configs import LlamaConfig, RopeScaling
from .gguf_validation import check_blocks, check_metadata, check_tensors

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
# llama.cpp stores Gemma's norms as 1 + weight (its converter adds the 1); the model keeps the weight.
NORM_SHIFTED = ("gemma2", "gemma3")
# GGML tensor types we dequantize (and test against the block layout): name -> GGMLQuantizationType value
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# Gemma's chat turns end with this control token; its files name only <eos> as the end of text.
_END_OF_TURN = "<end_of_turn>"

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's norms around both sublayers: llama.cpp's ffn_norm is the one before the MLP.
_SANDWICH_TENSORS = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError('reading a .gguf file needs the gguf package: pip install ".[demo]" '
                         '(or pip install gguf)') from None
    return gguf


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` of ``path`` (memory-mapped: tensors are read when touched); ``ValueError``
    for a file that is not a whole GGUF file."""
    gguf = _require_gguf()
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, OSError) as error:
        raise ValueError(f"{path} is not a readable GGUF file: it is truncated or corrupted "
                         f"({type(error).__name__}: {error}){_cached_hint(path)}") from None


def _cached_hint(path: str) -> str:
    """What to do about a bad file in the download cache (fetching it again)."""
    from .bundled import cache_folder

    folder = os.path.realpath(cache_folder())
    if os.path.realpath(path).startswith(folder + os.sep):
        return f"; it is a cached download: delete {path} and run again to fetch it anew"
    return ""


@contextlib.contextmanager
def _about(path: str) -> Iterator[None]:
    """Names ``path`` in the ``ValueError`` raised inside (with the cache hint)."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        if message.startswith(path):
            raise
        raise ValueError(f"{path}: {message}{_cached_hint(path)}") from None


def _checked(path: str, dtype: str | None):
    """``(reader, metadata, config)`` of the file, its metadata and tensors checked."""
    reader = open_gguf(path)
    with _about(path):
        meta = metadata(reader)
        config = config_from_gguf(meta, {t.name for t in reader.tensors}, dtype or "float32")
        check_blocks(config.num_layers, [t.name for t in reader.tensors], f"{meta['general.architecture']}.block_count")
        check_tensors(reader.tensors, config, os.path.getsize(path))
    return reader, meta, config


def metadata(reader) -> dict[str, Any]:
    """Every metadata field of the file as a Python value (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def hf_tensor_name(gguf_name: str, sandwich_norms: bool = False) -> str:
    """The Hugging Face name of a llama.cpp tensor name (``sandwich_norms``: of a Gemma file, whose
    ``ffn_norm`` is the norm before the MLP); ``ValueError`` for one the model has no place for
    (``rope_freqs.weight``, ...)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    names = {**_LAYER_TENSORS, **_SANDWICH_TENSORS} if sandwich_norms else _LAYER_TENSORS
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"
    if gguf_name == "rope_freqs.weight":
        raise ValueError("the GGUF file has rope_freqs.weight (per-frequency rope scaling factors, as "
                         "llama.cpp stores Llama 3.1's scaling): not supported; use the safetensors "
                         "checkpoint, whose config.json names the scaling")
    raise ValueError(f"the GGUF file has the tensor {gguf_name}, which a Llama-family model does not use")


def _field(meta: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise ValueError(f"the GGUF file lacks the metadata field {key!r}")
    return default


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], dtype: str = "float32") -> LlamaConfig:
    """A :class:`LlamaConfig` from a GGUF file's metadata (``{arch}.block_count``, ...).

    Parameters
    ----------
    meta : the file's metadata, from :func:`metadata`
    tensor_names : the file's tensor names (a file without ``output.weight`` ties the head)
    dtype : the model's dtype; the file's own is a quantization, not a compute dtype
    """
    architecture = _field(meta, "general.architecture")
    if architecture in SUPPORTED_ARCHITECTURES:
        check_metadata(meta)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"the GGUF file's architecture is {architecture!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    a = architecture + "."
    gemma = architecture in NORM_SHIFTED
    num_heads = _field(meta, a + "attention.head_count")
    num_kv_heads = _field(meta, a + "attention.head_count_kv", num_heads)
    for key, value in (("attention.head_count", num_heads), ("attention.head_count_kv", num_kv_heads)):
        if not isinstance(value, int):
            raise ValueError(f"the GGUF field {a + key} is {value!r}: per-layer head counts are not supported")
    hidden = _field(meta, a + "embedding_length")
    head_dim = _field(meta, a + "attention.key_length", hidden // num_heads)
    rope_dims = _field(meta, a + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"the GGUF file rotates {rope_dims} of {head_dim} head dimensions "
                         f"({a}rope.dimension_count): partial rotary embeddings are not supported")
    scaling_kind = _field(meta, a + "rope.scaling.type", "none")
    scaling = None
    if scaling_kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(_field(meta, a + "rope.scaling.factor")))
    elif scaling_kind != "none":
        raise ValueError(f"the GGUF file's rope scaling {scaling_kind!r} ({a}rope.scaling.type) is not "
                         f"supported; supported: none, linear")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = _field(meta, a + "vocab_size", len(tokens) if tokens is not None else ...)
    eos = [meta[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in meta]
    if architecture in NORM_SHIFTED and tokens is not None and _END_OF_TURN in tokens:
        eos.append(tokens.index(_END_OF_TURN))     # llama.cpp ends generation there too (an end-of-turn token)
    layers = int(_field(meta, a + "block_count"))
    family = {}
    if architecture == "qwen2":
        family = dict(qkv_bias=True)
    elif architecture == "qwen3":
        family = dict(qk_norm=True)
    elif gemma:
        # llama.cpp's rules where the file holds no field: the logit scale is 1 / sqrt(head_dim), but
        # 1 / sqrt(hidden / heads) for the 27B models (46 blocks of Gemma 2, 62 of Gemma 3); Gemma 2
        # slides in every other layer, Gemma 3 in five of six, with a rotary base of 10,000 there.
        big = layers == (46 if architecture == "gemma2" else 62)
        pattern = 2 if architecture == "gemma2" else 6
        family = dict(norm_offset=1.0, sandwich_norms=True, activation="gelu_tanh", scale_embeddings=True,
                      query_scale=(hidden // num_heads if big else head_dim) ** -0.5,
                      sliding_window=int(_field(meta, a + "attention.sliding_window")),
                      sliding_layers=tuple(i for i in range(layers) if (i + 1) % pattern))
        if architecture == "gemma2":
            family.update(attn_softcap=_optional_real(meta, a + "attn_logit_softcapping"),
                          final_softcap=_optional_real(meta, a + "final_logit_softcapping"))
        else:
            family.update(qk_norm=True, sliding_rope_theta=10000.0,
                          final_softcap=_optional_real(meta, a + "final_logit_softcapping"))
    return LlamaConfig(**family,
        vocab_size=int(vocab_size), hidden_size=int(hidden),
        intermediate_size=int(_field(meta, a + "feed_forward_length")),
        num_layers=layers, num_heads=int(num_heads),
        num_kv_heads=int(num_kv_heads), head_dim=int(head_dim),
        rope_theta=float(_field(meta, a + "rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(_field(meta, a + "attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(_field(meta, a + "context_length")),
        dtype=dtype, eos_token_ids=tuple(dict.fromkeys(int(t) for t in eos)))


def _optional_real(meta: dict[str, Any], key: str) -> float | None:
    value = meta.get(key)
    return None if value is None else float(value)


def dequantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """A tensor's stored bytes as float32 ``[..., in_features]``.

    ``data`` is what ``gguf.GGUFReader`` gives: for a block type, uint8 ``[..., bytes]`` holding
    whole blocks along the last axis. ``type_name`` is one of :data:`SUPPORTED_TYPES`.
    """
    gguf = _require_gguf()
    if type_name not in SUPPORTED_TYPES:
        raise ValueError(f"the GGUF tensor type {type_name} is not supported; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    qtype = gguf.GGMLQuantizationType[type_name]
    return np.asarray(gguf.quants.dequantize(np.asarray(data), qtype), np.float32)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of ``attn_q`` / ``attn_k``: ``[heads * head_dim, in]``.

    The converter stores, within each head, the rows ``0, H/2, 1, H/2 + 1, ...`` (rotary pairs
    adjacent); this puts them back as ``0, 1, ..., H - 1`` (pairs ``i``, ``i + H/2``).
    """
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(reader, config: LlamaConfig, architecture: str = "llama") -> dict[str, np.ndarray]:
    """Every tensor of the file under its Hugging Face name, float32 ``[out, in]`` (norms ``[D]``),
    with ``attn_q`` / ``attn_k`` rows in Hugging Face order (only the llama architecture's converter
    permutes them) and Gemma's norms without llama.cpp's added 1."""
    tensors = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, config.sandwich_norms)
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(f"the GGUF tensor {tensor.name} has the type {tensor.tensor_type.name}, which "
                             f"we do not dequantize; supported: {', '.join(SUPPORTED_TYPES)}")
        value = dequantize(tensor.data, tensor.tensor_type.name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest axis first
        value = value.reshape(shape)
        if architecture == "llama" and name.endswith("q_proj.weight"):
            value = unpermute_rows(value, config.num_heads)
        elif architecture == "llama" and name.endswith("k_proj.weight"):
            value = unpermute_rows(value, config.num_kv_heads)
        elif architecture in NORM_SHIFTED and name.endswith("norm.weight"):
            value = value - np.float32(1.0)
        tensors[name] = value
    return tensors


def read_config(path: str, dtype: str | None = None) -> LlamaConfig:
    """The :class:`LlamaConfig` of a GGUF file (no tensors read, their shapes checked); ``dtype``
    default float32."""
    return _checked(path, dtype)[2]


def load(path: str, *, dtype: str | None = None):
    """``(model, tokenizer)`` of a GGUF file: a :class:`Llama` holding its weights dequantized to
    ``dtype`` and its :class:`~.chat_template.TemplatedTokenizer` (the file is parsed once).

    Parameters
    ----------
    path : a ``.gguf`` file of the llama architecture
    dtype : ``float32`` (default), ``bfloat16`` or ``float16``

    Raises
    ------
    ValueError
        Naming the file, for another architecture, a tensor type outside :data:`SUPPORTED_TYPES`,
        missing or out-of-range metadata (naming the field), or a missing, unexpected, mis-shaped or
        truncated tensor (naming it); before any model is built.

    Example::

        model, tokenizer = load("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    from .gguf_tokenizer import tokenizer_from_gguf
    from .hf_loader import load_tensors

    reader, meta, config = _checked(path, dtype)
    with _about(path):
        tokenizer = tokenizer_from_gguf(meta)
        tensors = read_tensors(reader, config, meta["general.architecture"])
    return load_tensors(config, tensors, source=path), tokenizer


def load_model(path: str, *, dtype: str | None = None):
    """The :class:`Llama` of a GGUF file, without its tokenizer (see :func:`load`)."""
    from .hf_loader import load_tensors

    reader, meta, config = _checked(path, dtype)
    with _about(path):
        tensors = read_tensors(reader, config, meta["general.architecture"])
    return load_tensors(config, tensors, source=path)
