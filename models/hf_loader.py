"""Loading a Hugging Face checkpoint directory of the Llama family (Llama, Mistral, Qwen 2 and 3,
Gemma 2 and 3; :mod:`.hf_config`) into :class:`Llama`.

A directory holds ``config.json``, the weights as ``model.safetensors`` or as
shards listed in ``model.safetensors.index.json`` (bfloat16, float16 or
float32), and optionally ``tokenizer.json``. Hugging Face stores each linear
layer as ``[out_features, in_features]``; the model keeps einsum layouts, so
each weight is transposed and split into heads on the way in, and ``q_proj``,
``k_proj``, ``v_proj`` go into the one ``w_qkv``, ``gate_proj`` and ``up_proj``
into the one ``w_gate_up`` (see :mod:`.placement`); the q/k/v biases go into
``b_qkv`` the same way. Every tensor is checked against the shape the config
implies, and anything the model cannot reproduce exactly (MLP biases, other
activations, other rope types) is refused with a ``ValueError`` naming the field
or tensor. A tied checkpoint that
stores its own ``lm_head.weight``, different from the embedding, gets that head,
as in transformers 5.

Given a mesh (tensor parallelism), each weight is read straight into its shards:
every device's block is read from the file on its own (``safe_open(...).get_slice``
of the rows or columns that hold it: a device's block of ``w_qkv`` from the
``q_proj``, ``k_proj`` and ``v_proj`` rows of its KV heads), so neither the host
nor any device ever holds a whole split weight (a Llama-3-70B ``q_proj`` is
128 MiB; its MLP weights 448 MiB).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from .configs import LlamaConfig
from .hf_config import (HF_DEFAULTS, SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES,  # noqa: F401 (re-exported)
                        config_from_hf, token_ids)
from .llama import Llama
from .placement import Flat, OutIn, Part, Same, check_parts, weight_block

# Buffers some older checkpoints store that the model recomputes.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _tensor_files(directory: str) -> dict[str, str]:
    """Each tensor name -> the safetensors file that holds it."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open
    with safe_open(single, framework="flax") as f:
        return {name: single for name in f.keys()}


def _placements(config: LlamaConfig) -> dict[tuple, tuple[Part, ...]]:
    """Each model weight's attribute path -> the Hugging Face tensors it is made of, in the order
    their shapes are checked.

    ``w_qkv [D, K, G + 2, H]`` is ``q_proj`` (rows ``[K * G * H]``: query head ``n = k * G + g``
    at ``w_qkv[:, k, g]``), ``k_proj`` at ``[:, :, G]`` and ``v_proj`` at ``[:, :, G + 1]``, and
    ``b_qkv [K, G + 2, H]`` their biases alike; ``w_gate_up [D, 2, F]`` is ``gate_proj`` at
    ``[:, 0]`` and ``up_proj`` at ``[:, 1]``. Llama's ``post_attention_layernorm`` is the norm
    before the MLP; with sandwich norms (Gemma) it norms the attention's output, and
    ``pre_feedforward_layernorm`` is the one before the MLP.
    """
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    f, groups = config.intermediate_size, config.num_heads // config.num_kv_heads
    placements = {
        ("embed",): (Part("model.embed_tokens.weight", Same((config.vocab_size, d))),),
        ("norm", "weight"): (Part("model.norm.weight", Same((d,))),),
    }
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        layer = ("layers", i)
        attention = prefix + "self_attn."
        mlp_norm = "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
        placements.update({
            layer + ("attention_norm", "weight"): (Part(prefix + "input_layernorm.weight", Same((d,))),),
            layer + ("mlp_norm", "weight"): (Part(prefix + mlp_norm + ".weight", Same((d,))),),
            layer + ("attention", "w_qkv"): (
                Part(attention + "q_proj.weight", OutIn((d,), (k, groups, h)), axis=2, at=slice(0, groups)),
                Part(attention + "k_proj.weight", OutIn((d,), (k, h)), axis=2, at=groups),
                Part(attention + "v_proj.weight", OutIn((d,), (k, h)), axis=2, at=groups + 1)),
            layer + ("attention", "wo"): (Part(attention + "o_proj.weight", OutIn((n, h), (d,))),),
            layer + ("mlp", "w_gate_up"): (
                Part(prefix + "mlp.gate_proj.weight", OutIn((d,), (f,)), axis=1, at=0),
                Part(prefix + "mlp.up_proj.weight", OutIn((d,), (f,)), axis=1, at=1)),
            layer + ("mlp", "w_down"): (Part(prefix + "mlp.down_proj.weight", OutIn((f,), (d,))),),
        })
        if config.qkv_bias:
            placements[layer + ("attention", "b_qkv")] = (
                Part(attention + "q_proj.bias", Flat((k, groups, h)), axis=1, at=slice(0, groups)),
                Part(attention + "k_proj.bias", Flat((k, h)), axis=1, at=groups),
                Part(attention + "v_proj.bias", Flat((k, h)), axis=1, at=groups + 1))
        if config.o_bias:
            placements[layer + ("b_o",)] = (Part(attention + "o_proj.bias", Same((d,))),)
        if config.qk_norm:
            placements[layer + ("attention", "q_norm", "weight")] = (Part(attention + "q_norm.weight", Same((h,))),)
            placements[layer + ("attention", "k_norm", "weight")] = (Part(attention + "k_norm.weight", Same((h,))),)
        if config.sandwich_norms:
            placements[layer + ("post_attention_norm", "weight")] = (
                Part(prefix + "post_attention_layernorm.weight", Same((d,))),)
            placements[layer + ("post_mlp_norm", "weight")] = (
                Part(prefix + "post_feedforward_layernorm.weight", Same((d,))),)
    if not config.tie_embeddings:
        placements[("lm_head",)] = (Part("lm_head.weight", OutIn((d,), (config.vocab_size,))),)
    return placements


def _param(model: Llama, path: tuple) -> nnx.Param:
    node = model
    for step in path:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    return node


def read_config(directory: str, dtype: str | None = None) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face model directory's ``config.json`` (no weights read)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{directory} has no config.json")
    with open(config_path) as f:
        return config_from_hf(json.load(f), dtype)


def load_model(directory: str, *, dtype: str | None = None, mesh=None) -> Llama:
    """Build a :class:`Llama` holding the checkpoint's weights.

    Parameters
    ----------
    directory : a Hugging Face model directory (``config.json`` + safetensors)
    dtype : ``float32``, ``bfloat16`` or ``float16``; default: the checkpoint's dtype
    mesh : a one-dimensional ``jax.sharding.Mesh`` or None; given, the model is split over it
        Megatron-style as :func:`jax_vattention.decode.mesh.shard_model` splits it, each
        device's shard read from the file on its own

    Raises
    ------
    ValueError
        For an unsupported architecture or feature (naming the config field), or a missing,
        unexpected or mis-shaped tensor (naming the tensor).

    Example::

        model = load_model("/models/Llama-3.1-8B-Instruct", dtype="bfloat16")
        model = load_model("/models/Llama-3.1-8B-Instruct", dtype="bfloat16", mesh=tp_mesh(2))
    """
    config = read_config(directory, dtype)
    axis = None
    if mesh is not None:
        from jax_vattention.cache.sharded_manager import mesh_axis

        from .sharding import check_divisible
        axis = mesh_axis(mesh, None)
        check_divisible(config, mesh.size)
    files = _tensor_files(directory)
    if config.tie_embeddings and "lm_head.weight" in files and not _same_tensor(
            files, "lm_head.weight", "model.embed_tokens.weight"):
        # transformers 5 does not tie a head stored with other values than the embedding: it uses it
        config = config.replace(tie_embeddings=False)
    ignored = {name for name in files if name.endswith(IGNORED_SUFFIXES)
               or (config.tie_embeddings and name == "lm_head.weight")}
    model, placements = _empty_model(config, set(files) - ignored, f"checkpoint {directory}")
    from safetensors import safe_open
    with contextlib.ExitStack() as open_files:
        handles: dict[str, Any] = {}

        def stored(name: str):
            """The safetensors slice of the tensor ``name``, its file opened once."""
            if files[name] not in handles:
                handles[files[name]] = open_files.enter_context(safe_open(files[name], framework="flax"))
            return handles[files[name]].get_slice(name)

        _check_shapes(placements, lambda name: tuple(stored(name).get_shape()), "config.json")
        read = lambda name, index: stored(name)[index]
        for path, parts in placements.items():
            if mesh is None:
                _place(model, path, parts, read)
            else:
                _place_sharded(model, path, parts, read, mesh, axis)
    if mesh is not None:
        model.tp_axis = axis
    return model


def load_tensors(config: LlamaConfig, tensors: dict[str, Any], *, source: str) -> Llama:
    """Build a :class:`Llama` from tensors under their Hugging Face names and layouts (``[out, in]``).

    The loaders of other formats (:mod:`.gguf_loader`) end here, so every format is checked
    the same way: a missing, unexpected or mis-shaped tensor is a ``ValueError`` naming it.
    """
    model, placements = _empty_model(config, set(tensors), source)
    _check_shapes(placements, lambda name: tuple(tensors[name].shape), f"the metadata of {source}")
    for path, parts in placements.items():
        _place(model, path, parts, lambda name, index: np.asarray(tensors[name])[index])
    return model


def _empty_model(config: LlamaConfig, names: set[str], source: str):
    """An abstract :class:`Llama` and its placements, once ``names`` are exactly the tensors it needs."""
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    placements = _placements(config)
    needed = {part.name for parts in placements.values() for part in parts}
    missing = sorted(needed - names)
    if missing:
        raise ValueError(f"{source} lacks the tensor {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(names - needed)
    if unexpected:
        raise ValueError(f"{source} has the tensor {unexpected[0]}, which a "
                         f"{config.num_layers}-layer model of this config does not use")
    for path, parts in placements.items():
        check_parts(parts, _param(model, path).shape, ".".join(str(step) for step in path))
    return model, placements


def _check_shapes(placements: dict[tuple, tuple[Part, ...]], shape_of, implied_by: str) -> None:
    """``ValueError`` naming the first stored tensor whose shape (``shape_of(name)``) is not the one
    the config implies."""
    for parts in placements.values():
        for part in parts:
            shape = shape_of(part.name)
            if shape != part.layout.source_shape:
                raise ValueError(f"tensor {part.name} has shape {shape}; {implied_by} implies "
                                 f"{part.layout.source_shape}")


def _place(model: Llama, path: tuple, parts: tuple[Part, ...], read) -> None:
    """Build the weight at ``path`` whole from its stored ``parts`` (``read(name, index)`` reads a
    block of one), cast it to the weight's dtype and set it."""
    param = _param(model, path)
    whole = tuple(slice(0, size) for size in param.shape)
    _set(param, jax.device_put(weight_block(param.shape, param.dtype, parts, whole, read)))


def _place_sharded(model: Llama, path: tuple, parts: tuple[Part, ...], read, mesh, axis: str) -> None:
    """:func:`_place` over ``mesh``: each device's block of the weight built on its own from the
    rows or columns of its stored parts that it holds (a ``w_qkv`` shard from the ``q_proj``,
    ``k_proj`` and ``v_proj`` rows of its KV heads only), through the host, into a global array
    split as :func:`~jax_vattention.decode.mesh.shard_model` splits it."""
    from jax.sharding import NamedSharding, PartitionSpec

    from .sharding import split_axis

    param = _param(model, path)
    split = split_axis(path[-1])
    spec = [None] * len(param.shape)
    if split is not None:
        spec[split] = axis
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    _set(param, jax.make_array_from_callback(
        param.shape, sharding, lambda index: weight_block(param.shape, param.dtype, parts, index, read)))


def _same_tensor(files: dict[str, str], first: str, second: str) -> bool:
    """Whether two stored tensors hold the same shape and values."""
    import numpy as np
    from safetensors import safe_open
    values = []
    for name in (first, second):
        if name not in files:
            return False
        with safe_open(files[name], framework="flax") as f:
            values.append(np.asarray(f.get_tensor(name)))
    return values[0].shape == values[1].shape and bool(np.array_equal(values[0], values[1]))


def _set(param: nnx.Param, value: jax.Array) -> None:
    """Replace an abstract parameter's value (``set_value`` is newer than flax 0.12.0)."""
    if hasattr(param, "set_value"):
        param.set_value(value)
    else:
        param.value = value


def load_tokenizer(directory: str):
    """The tokenizer of ``directory/tokenizer.json``, or None if there is none.

    A ``tokenizers.Tokenizer``; a :class:`~.chat_template.TemplatedTokenizer` around it where the
    directory has a chat template (``chat_template.jinja``, or ``chat_template`` in
    ``tokenizer_config.json``), with ``tokenizer_config.json``'s ``bos_token`` / ``eos_token``.
    """
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    from .chat_template import TemplatedTokenizer
    tokenizer = Tokenizer.from_file(path)
    settings = {}
    settings_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            settings = json.load(f)
    template = settings.get("chat_template")
    template_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(template_path):
        with open(template_path) as f:
            template = f.read()
    if not isinstance(template, str):
        return tokenizer  # none, or a list of named templates, which we do not pick from
    token = lambda value: value.get("content") if isinstance(value, dict) else value
    return TemplatedTokenizer(tokenizer=tokenizer, bos_token=token(settings.get("bos_token")),
                              eos_token=token(settings.get("eos_token")), chat_template=template)


def eos_token_ids(directory: str, config: LlamaConfig) -> tuple[int, ...]:
    """End-of-sequence ids: ``generation_config.json``'s if present, else ``config.json``'s."""
    path = os.path.join(directory, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return token_ids(eos)
    return config.eos_token_ids


