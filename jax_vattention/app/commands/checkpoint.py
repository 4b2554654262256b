"""A checkpoint directory checked file by file before the loader reads it.

The loader (``jax_vattention.models.hf_loader``) raises ``ValueError`` for what
the model cannot represent, but a damaged directory reaches it as whatever the
JSON parser, the file system or safetensors raise. :func:`check_checkpoint`
reads only the small parts (``config.json``, the shard index, each safetensors
header and the file sizes) and raises :class:`CheckpointError` naming the file
and what is wrong with it; :func:`load_checkpoint` runs it, then the loader,
and turns anything else the loader raises into the same error.
"""

from __future__ import annotations

import json
import os
from typing import Any

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory the model cannot be loaded from; the message names the file."""


def _json(path: str) -> Any:
    try:
        with open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error})") from None


def _check_safetensors(path: str) -> None:
    """Checks a safetensors file's header and that the file holds every byte the header promises."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header")
            header_len = int.from_bytes(head, "little")
            if 8 + header_len > size:
                raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims "
                                      f"{header_len} bytes, the file has {size}")
            header = json.loads(file.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise CheckpointError(f"{path} is truncated: {size} bytes where its header needs {needed}")


def check_checkpoint(directory: str) -> None:
    """Raises :class:`CheckpointError` for a checkpoint directory whose files are missing or damaged.

    Example::

        check_checkpoint("/models/Llama-3.1-8B-Instruct")   # silent when the files are sound
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"--model {directory}: no such directory")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory} has no config.json")
    config = _json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object; it holds a {type(config).__name__}")
    index_path = os.path.join(directory, INDEX)
    if os.path.isfile(index_path):
        index = _json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no \"weight_map\" object (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE)):
        files = [SINGLE]
    else:
        raise CheckpointError(f"{directory} has neither {SINGLE} nor {INDEX}")
    for name in files:
        if not isinstance(name, str):
            raise CheckpointError(f"{index_path} maps a tensor to {name!r}, not a file name")
        _check_safetensors(os.path.join(directory, name))
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tokenizer_path) and not isinstance(_json(tokenizer_path), dict):
        raise CheckpointError(f"{tokenizer_path} must hold a JSON object")


def load_checkpoint(directory: str, dtype: str | None, device, mesh=None):
    """``(model, tokenizer or None, end-of-sequence ids)`` of a checked checkpoint directory.

    ``dtype`` None takes the checkpoint's (bfloat16 for a float32 one on a GPU ``device``).
    ``mesh``: the model split over it, each device's shards read from the files on their own.
    Raises :class:`CheckpointError` (a ``ValueError``) for any file the loader cannot use.
    """
    from jax_vattention.attention.backends import default_dtype
    from jax_vattention.models import hf_loader

    check_checkpoint(directory)
    try:
        dtype = dtype or default_dtype(hf_loader.read_config(directory).dtype, device.platform)
        model = hf_loader.load_model(directory, dtype=dtype, mesh=mesh)
        tokenizer = hf_loader.load_tokenizer(directory)
        return model, tokenizer, hf_loader.eos_token_ids(directory, model.config)
    except ValueError as error:
        message = str(error) if directory in str(error) else f"checkpoint {directory}: {error}"
        raise CheckpointError(message) from None
    except Exception as error:  # the loader's dependencies raise their own types for damaged files
        raise CheckpointError(f"checkpoint {directory} cannot be loaded: {type(error).__name__}: {error}") from None
