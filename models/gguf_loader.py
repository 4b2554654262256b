"""Loading a llama.cpp GGUF file (llama family) into :class:`Llama`, with numpy and ``gguf`` only.

A GGUF file holds the architecture as metadata (``llama.block_count``, ...), the
tokenizer (see :mod:`.gguf_tokenizer`) and the tensors, possibly quantized in
blocks. Each tensor is dequantized to float32 by the ``gguf`` library
(:func:`dequantize`), then cast to the model's dtype.

Two conventions differ from a Hugging Face checkpoint. Tensor names are
llama.cpp's (``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight``).
And llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` so that
rotary pairs are adjacent (GPT-J style); our rotation pairs dimension ``i`` with
``i + head_dim / 2`` (Hugging Face's layout), so :func:`unpermute_rows` undoes it,
as transformers' GGUF loading does. After both, the tensors go through the same
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

SUPPORTED_ARCHITECTURES = ("llama",)
# GGML tensor types we dequantize (and test against the block layout): name -> GGMLQuantizationType value
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


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


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name; ``ValueError`` for one the model has no
    place for (``rope_freqs.weight``, biases, ...)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"
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
    return LlamaConfig(
        vocab_size=int(vocab_size), hidden_size=int(hidden),
        intermediate_size=int(_field(meta, a + "feed_forward_length")),
        num_layers=int(_field(meta, a + "block_count")), num_heads=int(num_heads),
        num_kv_heads=int(num_kv_heads), head_dim=int(head_dim),
        rope_theta=float(_field(meta, a + "rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(_field(meta, a + "attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(_field(meta, a + "context_length")),
        dtype=dtype, eos_token_ids=tuple(dict.fromkeys(int(t) for t in eos)))


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


def read_tensors(reader, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Every tensor of the file under its Hugging Face name, float32 ``[out, in]`` (norms ``[D]``),
    with ``attn_q`` / ``attn_k`` rows in Hugging Face order."""
    tensors = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(f"the GGUF tensor {tensor.name} has the type {tensor.tensor_type.name}, which "
                             f"we do not dequantize; supported: {', '.join(SUPPORTED_TYPES)}")
        value = dequantize(tensor.data, tensor.tensor_type.name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest axis first
        value = value.reshape(shape)
        if name.endswith("q_proj.weight"):
            value = unpermute_rows(value, config.num_heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_rows(value, config.num_kv_heads)
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
        tensors = read_tensors(reader, config)
    return load_tensors(config, tensors, source=path), tokenizer


def load_model(path: str, *, dtype: str | None = None):
    """The :class:`Llama` of a GGUF file, without its tokenizer (see :func:`load`)."""
    from .hf_loader import load_tensors

    reader, _, config = _checked(path, dtype)
    with _about(path):
        tensors = read_tensors(reader, config)
    return load_tensors(config, tensors, source=path)
