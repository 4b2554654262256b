"""Checks of a GGUF file's metadata and tensors before anything is built from it.

A GGUF file is input: a truncated download, a corrupted copy or a wrong converter gives
values that would otherwise fail deep inside (``head_count = 0``: a division by zero; a
``bos_token_id`` past the vocabulary: an ``IndexError``; ``block_count = 2**32 - 1`` in a
250 KB file: a model of four billion layers, built until memory runs out; a tensor shorter
than its shape: numpy's reshape error). Here every field the loader reads is checked for its
type and range, the tensors against what the metadata implies (each one present, of its
shape, inside the file), and each refusal is a ``ValueError`` naming the field or tensor;
the loader adds the file's name (and, for a cached download, that deleting it fetches it
anew).
"""

from __future__ import annotations

import math
import re
from typing import Any

# More transformer blocks than any released model has (Llama-3.1-405B: 126).
MAX_BLOCKS = 1024

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def _integer(meta: dict[str, Any], key: str, low: int, required: bool = True, high: int | None = None):
    if key not in meta:
        if required:
            raise ValueError(f"the GGUF file lacks the metadata field {key!r}")
        return None
    value = meta[key]
    if isinstance(value, list):
        return value            # per-layer values: the loader says what it supports
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"the GGUF field {key} is {value!r}: an integer is expected")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"the GGUF field {key} is {value}: it must be {bounds}")
    return value


def _real(meta: dict[str, Any], key: str, low: float, high: float = math.inf, low_open: bool = True):
    if key not in meta:
        return None
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the GGUF field {key} is {value!r}: a finite number is expected")
    if not (low < value if low_open else low <= value) or not value < high:
        raise ValueError(f"the GGUF field {key} is {value}: it must be in {'(' if low_open else '['}{low}, {high})")
    return value


def check_metadata(meta: dict[str, Any]) -> None:
    """Raises ``ValueError`` naming the first metadata field of a llama-family file that is missing,
    of the wrong type or out of range (the model's shape, its norms and rotary settings, and the
    tokenizer's vocabulary and special token ids)."""
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str):
        raise ValueError(f"the GGUF field general.architecture is {architecture!r}: a name is expected")
    a = architecture + "."
    _integer(meta, a + "block_count", 1, high=MAX_BLOCKS)
    hidden = _integer(meta, a + "embedding_length", 1)
    _integer(meta, a + "feed_forward_length", 1)
    _integer(meta, a + "context_length", 1)
    heads = _integer(meta, a + "attention.head_count", 1)
    kv_heads = _integer(meta, a + "attention.head_count_kv", 1, required=False)
    head_dim = _integer(meta, a + "attention.key_length", 1, required=False)
    _integer(meta, a + "rope.dimension_count", 1, required=False)
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ValueError(f"the GGUF field {a}attention.head_count_kv is {kv_heads}: it must divide "
                         f"{a}attention.head_count ({heads})")
    if isinstance(heads, int) and head_dim is None and hidden % heads:
        raise ValueError(f"the GGUF field {a}attention.head_count is {heads}: without "
                         f"{a}attention.key_length it must divide {a}embedding_length ({hidden})")
    _real(meta, a + "attention.layer_norm_rms_epsilon", 0.0, 1.0)
    _integer(meta, a + "attention.sliding_window", 1, required=architecture in ("gemma2", "gemma3"))
    _real(meta, a + "attn_logit_softcapping", 0.0)
    _real(meta, a + "final_logit_softcapping", 0.0)
    _real(meta, a + "rope.freq_base", 0.0)
    _real(meta, a + "rope.scaling.factor", 0.0)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)):
        raise ValueError("the GGUF field tokenizer.ggml.tokens is not a list of strings")
    vocab = _integer(meta, a + "vocab_size", 1, required=False)
    if vocab is None and tokens is not None:
        vocab = len(tokens)
    if tokens is not None and vocab != len(tokens):
        raise ValueError(f"the GGUF field {a}vocab_size is {vocab} but tokenizer.ggml.tokens holds {len(tokens)} "
                         f"tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and tokens is not None and len(types) != len(tokens):
        raise ValueError(f"the GGUF field tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                         f"tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and not all(isinstance(m, str) and " " in m for m in merges):
        raise ValueError("the GGUF field tokenizer.ggml.merges holds an entry that is not two tokens "
                         "separated by a space")
    for key in sorted(k for k in meta if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")):
        if vocab is None:
            raise ValueError(f"the GGUF file has {key} but no vocabulary ({a}vocab_size or tokenizer.ggml.tokens)")
        _integer(meta, key, 0, high=vocab - 1)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a llama-family GGUF file of ``config`` holds, by GGUF name, as
    numpy reads it (``[out, in]``; norms ``[D]``)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (v, d)
    h = config.head_dim
    for i in range(config.num_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (q, d), f"blk.{i}.attn_k.weight": (kv, d),
                       f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, q),
                       f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                       f"blk.{i}.ffn_down.weight": (d, f)})
        if config.qkv_bias:  # Qwen 2
            shapes.update({f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (kv,), f"blk.{i}.attn_v.bias": (kv,)})
        if config.qk_norm:  # Qwen 3, Gemma 3
            shapes.update({f"blk.{i}.attn_q_norm.weight": (h,), f"blk.{i}.attn_k_norm.weight": (h,)})
        if config.sandwich_norms:  # Gemma
            shapes.update({f"blk.{i}.post_attention_norm.weight": (d,), f"blk.{i}.post_ffw_norm.weight": (d,)})
    return shapes


def check_blocks(block_count: int, tensor_names, key: str) -> None:
    """Raises ``ValueError`` unless the file's ``blk.N`` tensors are those of exactly ``block_count``
    blocks (a count that disagrees with the tensors is corrupted metadata)."""
    blocks = {int(match.group(1)) for name in tensor_names if (match := _BLOCK_TENSOR.match(name))}
    if blocks != set(range(block_count)):
        held = f"blocks 0-{max(blocks)}" if blocks else "no block"
        raise ValueError(f"the GGUF field {key} is {block_count} but the file's tensors are those of "
                         f"{len(blocks)} blocks ({held})")


def check_tensors(tensors, config, file_bytes: int) -> None:
    """Raises ``ValueError`` naming the first tensor that is missing, unexpected, of another shape
    than the metadata implies, or reaching past the file's end (``file_bytes``).

    ``tensors``: ``gguf.ReaderTensor`` objects (``name``, ``shape`` fastest axis first,
    ``data_offset``, ``n_bytes``)."""
    expected = expected_shapes(config)
    present = set()
    for tensor in tensors:
        name = tensor.name
        present.add(name)
        if name not in expected:
            continue                # the loader names a tensor the model has no place for
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if len(expected[name]) == 1 and len(shape) == 2 and shape[0] == 1:
            shape = shape[1:]
        if shape != expected[name]:
            raise ValueError(f"the GGUF tensor {name} has shape {shape}; the metadata implies {expected[name]}")
        if int(tensor.data_offset) + int(tensor.n_bytes) > file_bytes:
            raise ValueError(f"the GGUF tensor {name} ends at byte {int(tensor.data_offset) + int(tensor.n_bytes)}, "
                             f"past the file's end ({file_bytes} bytes): the file is truncated")
    missing = [name for name in expected if name not in present]
    if missing:
        raise ValueError(f"the GGUF file lacks the tensor {missing[0]} (and {len(missing) - 1} more)"
                         if len(missing) > 1 else f"the GGUF file lacks the tensor {missing[0]}")
