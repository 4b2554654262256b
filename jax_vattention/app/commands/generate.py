"""``vattention generate``: text through the virtual KV cache, with its speed and memory.

With no arguments it runs the embedded default (the ``tiny`` config with random
weights) on whatever device JAX has. It reports tokens per second over the
timed rounds (the first, compiling round is not counted) and the physical
memory the cache mapped against what a static contiguous cache of the same
slots and ``max_len`` would hold; where whole pages rather than tokens decide
what is mapped (a small model on a GPU's 2 MiB pages), it says so and why.

The cache is interleaved by default (one K and one V buffer for all layers):
a request holds at least a page in every buffer, so this layout holds the
fewest pages; decode reads it with the Pallas kernel on a GPU and the XLA
reference on a CPU. ``--backend cudnn`` takes the per-layer layout.
Every option is checked before anything is compiled; a bad one exits with
status 2 and a one-line message.

Over several processes (``--coordinator``, ``--num-processes``, ``--process-id``, and ``--tp`` over
all their devices: :mod:`~jax_vattention.app.processes`), every process runs the same generation
on its own devices' shards, and each prints the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import jax
import numpy as np

from jax_vattention.app.assembly import add_speculation_arguments, assemble, open_draft, speculation_options
from jax_vattention.app.commands.model_source import ByteTokenizer, add_model_arguments, check_model_arguments
from jax_vattention.app.processes import add_process_arguments, initialize
from jax_vattention.attention import BACKENDS
from jax_vattention.cache.config import LAYOUTS

# The default slot length: a server's, long enough that a static cache sized for it is larger than
# what short requests map even in whole 2 MiB GPU pages (the reservation is free; only pages cost).
DEFAULT_MAX_LEN = 65536


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="attention kernel; auto: pallas on GPU (cudnn for a per-layer cache), xla on CPU")
    parser.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto",
                        help="cache layout; auto: interleaved (all layers in one buffer, the least memory a "
                             "request can hold in whole pages), per_layer for --backend cudnn")
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
    parser.add_argument("--max-len", type=int,
                        help=f"tokens a cache slot may hold (default {DEFAULT_MAX_LEN}, at most the model's "
                             f"max_position_embeddings for --model); the virtual range is reserved for it, "
                             f"and only the pages requests fill are mapped")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the compiling one (default 3)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree: the model and the cache split over the first TP devices "
                             "(default 1)")
    add_speculation_arguments(parser)
    add_process_arguments(parser)


def _check_arguments(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` for options that cannot run here (the model's and the kernel's are
    checked by :func:`~jax_vattention.app.assembly.assemble`)."""
    for name in ("batch", "max_new_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.max_len is not None and args.max_len < 1:
        raise ValueError(f"--max-len must be at least 1; got {args.max_len}")
    if args.chat is not None and args.prompt:
        raise ValueError("give either --chat or --prompt")
    if not args.prompt and args.prompt_len < 1:
        raise ValueError(f"--prompt-len must be at least 1; got {args.prompt_len}")
    if args.tp > 1 and args.chat is not None:
        raise ValueError("--chat runs on one device: leave out --tp")
    speculation_options(args)
    if args.speculate and args.chat is not None:
        raise ValueError("--chat decodes one token a step: leave out --speculate")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature and --top-k must be at least 0 and --top-p in (0, 1]")
    check_model_arguments(args)


def _max_len(args: argparse.Namespace) -> int:
    """``--max-len``, else :data:`DEFAULT_MAX_LEN` (a named config's, at most the checkpoint's
    max_position_embeddings for ``--model``)."""
    if args.max_len is not None:
        return args.max_len
    if args.model:
        from jax_vattention.app.commands.model_source import model_config_of
        return min(DEFAULT_MAX_LEN, model_config_of(args).max_position_embeddings)
    return DEFAULT_MAX_LEN


def _check_budget(manager, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raises ``ValueError`` when the page budget cannot hold every request at its full length."""
    config, stats = manager.config, manager.stats()
    needed = pages_needed(manager, [len(p) + max_new_tokens - 1 for p in prompts])
    if needed > stats["budget_pages"]:
        raise ValueError(f"{len(prompts)} requests of up to {max(map(len, prompts)) + max_new_tokens - 1} tokens "
                         f"need {needed} pages of {manager.page_bytes >> 10} KiB ({config.num_buffers} buffers "
                         f"each), more than the budget of {stats['budget_pages']}: lower --batch or --max-len")


def pages_needed(manager, lengths: list[int]) -> int:
    """Whole pages that requests of ``lengths`` tokens hold, over every buffer of the cache."""
    return sum(manager.pages_for(n) for n in lengths)



def _prompts(args, tokenizer, vocab_size: int) -> list[list[int]]:
    if args.prompt:
        if tokenizer is None:
            raise ValueError("--prompt needs a tokenizer: use --model DIR with a tokenizer.json")
        texts = [args.prompt[i % len(args.prompt)] for i in range(max(args.batch, len(args.prompt)))]
        return [tokenizer.encode(text) if isinstance(tokenizer, ByteTokenizer) else tokenizer.encode(text).ids
                for text in texts]
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, size=args.batch)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _page(n: int) -> str:
    return f"{n >> 20} MiB" if n % 2**20 == 0 else f"{n >> 10} KiB"


def memory_report(manager, prompts: list[list[int]], outputs: list[list[int]]) -> list[str]:
    """Lines comparing the memory the cache mapped with a static cache of the same slots and max_len.

    When whole pages, not tokens, set what was mapped (a small model's tokens are a few hundred bytes,
    a GPU page 2 MiB), the last line says so and why.
    """
    config, stats = manager.config, manager.stats()
    mapped, static, page = stats["mapped_bytes"], stats["static_bytes"], manager.page_bytes
    lengths = [len(p) + len(t) - 1 for p, t in zip(prompts, outputs)]
    live = sum(lengths) * config.kv_bytes_per_token
    least = pages_needed(manager, lengths)
    lines = [f"KV cache ({config.layout}, {config.num_buffers} buffers): mapped {_mib(mapped)} of physical "
             f"memory in {stats['mapped_pages']} pages of {_page(page)}; a static cache of "
             f"{config.max_batch} x {config.max_len} tokens holds {_mib(static)} "
             f"({mapped / static:.1%} of it mapped); the live tokens need {_mib(live)}"]
    if least * page > live * 2:
        per_page = page // manager.shard_config.token_bytes
        line = (f"pages are {_page(page)}: these {len(prompts)} requests (up to {max(lengths)} tokens) need at "
                f"least {least} pages ({_mib(least * page)}), one in each of the {config.num_buffers} buffers "
                f"per request, and a page holds {per_page:,} tokens of a buffer")
        if mapped >= static:
            line += (f"; a static cache is smaller here, until max_len passes about "
                     f"{-(-least // (len(prompts) * config.num_buffers)) * per_page:,} tokens a slot (larger "
                     f"models fill pages sooner: an interleaved Llama-3-8B page holds 32 tokens)")
        lines.append(line)
    if stats.get("window_pages_unmapped_total"):
        unmapped = stats["window_pages_unmapped_total"]
        lines.append(f"sliding window of {config.window} tokens: {unmapped} pages ({_mib(unmapped * page)}) "
                     f"unmapped behind it as the requests advanced")
    return lines


def _chat(args: argparse.Namespace, loaded, backend: str, layout: str, max_len: int) -> int:
    """``--chat``: the answer streams to standard output, the rest goes to standard error."""
    from jax_vattention.app.commands.chat import stream_chat

    if loaded.tokenizer is None or isinstance(loaded.tokenizer, ByteTokenizer):
        raise ValueError("--chat needs a real model with a tokenizer: use --model PATH")
    config = loaded.model.config
    print(f"model: {loaded.source}; {config.num_layers} layers, {config.dtype}; device: {jax.devices()[0]}; "
          f"{layout} cache, backend: {backend}", file=sys.stderr)
    stream_chat(loaded.model, loaded.tokenizer, args.chat, stop_tokens=loaded.stop_tokens,
                max_new_tokens=args.max_new_tokens, max_len=max_len, layout=layout, backend=backend,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                kv_dtype=args.kv_dtype)
    return 0


class EngineGeneration:
    """``generate_in_manager``'s call over the engine, for ``--speculate`` (speculative decoding is
    the engine's): each call submits the prompts as requests to one engine over ``manager`` and
    runs them; the result's ``tokens`` are theirs, in order."""

    def __init__(self, model, manager, *, backend: str, stop_tokens, speculation: dict, draft=None,
                 overlap: bool = True):
        from jax_vattention.engine import Engine, EngineConfig

        self.engine = Engine(model, manager, EngineConfig(backend=backend, max_stop_tokens=max(8, len(stop_tokens)),
                                                          overlap=overlap, **speculation), draft=draft)

    def __call__(self, model, manager, prompts, *, seed: int, max_new_tokens: int, stop_tokens, temperature: float,
                 top_k: int, top_p: float, backend: str):
        from types import SimpleNamespace

        from jax_vattention.engine import Request

        ids = [self.engine.submit(Request(prompt=list(prompt), max_new_tokens=max_new_tokens,
                                          stop_tokens=tuple(stop_tokens), temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed + i if temperature > 0 else None))
               for i, prompt in enumerate(prompts)]
        outputs = self.engine.run()
        return SimpleNamespace(tokens=[outputs[request_id] for request_id in ids])

    def report(self) -> str:
        stats = self.engine.stats
        return (f"speculation ({self.engine.config.speculate}): {stats.verifications} verifications, acceptance "
                f"rate {stats.acceptance_rate:.1%}, mean accepted length {stats.mean_accepted_length:.2f} tokens")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import jax_vattention as jv
    from jax_vattention.decode.generate import generate_in_manager

    try:
        _check_arguments(args)
        processes = initialize(args)
        if processes.count > 1 and args.chat is not None:
            raise ValueError("--chat reads the terminal of one process: run it without --coordinator")
        max_len = _max_len(args)
        batch = 1 if args.chat is not None else max(args.batch, len(args.prompt or ()))
        built = assemble(args, max_batch=batch, max_len=max_len)
        loaded, backend, layout, mesh = built.loaded, built.backend, built.layout, built.mesh
        config = loaded.model.config
        if args.chat is not None:
            return _chat(args, loaded, backend, layout, max_len)
        prompts = _prompts(args, loaded.tokenizer, config.vocab_size)
        options = dict(max_new_tokens=args.max_new_tokens, stop_tokens=loaded.stop_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, backend=backend)
        print(f"model: {loaded.source}; {config.num_layers} layers, {config.dtype}; device: {jax.devices()[0]}; "
              f"{layout} cache of {np.dtype(built.cache_config.dtype).name}, backend: {backend}")
        model, generate = loaded.model, generate_in_manager
        if mesh is not None:
            print(f"tensor parallel over {args.tp} devices: {', '.join(map(str, mesh.devices.flat))}")
        with built.open() as manager, contextlib.ExitStack() as closing:
            _check_budget(manager, prompts, args.max_new_tokens)
            draft, draft_host = open_draft(args, built)   # after the model's cache: it takes what is left
            if draft_host is not None:
                closing.enter_context(draft_host)
            if args.speculate:
                generate = EngineGeneration(model, manager, backend=backend, stop_tokens=loaded.stop_tokens,
                                            speculation=speculation_options(args), draft=draft,
                                            overlap=processes.count == 1)   # map-ahead depends on timing
            started = time.perf_counter()
            first = generate(model, manager, prompts, seed=args.seed, **options)
            compile_seconds = time.perf_counter() - started
            memory = memory_report(manager, prompts, first.tokens)
            tokens = 0
            seconds = 0.0
            with tqdm(range(args.rounds), desc="generate", unit="round") as bar:
                for round_index in bar:
                    started = time.perf_counter()
                    result = generate(model, manager, prompts, seed=args.seed + 1 + round_index, **options)
                    seconds += time.perf_counter() - started
                    tokens += sum(len(t) for t in result.tokens)
                    bar.set_postfix(tokens_per_s=f"{tokens / seconds:,.0f}")
        for i, (prompt, new) in enumerate(zip(prompts, first.tokens)):
            if loaded.tokenizer is not None and (args.prompt or args.model):
                shown = repr(loaded.decode(new))
            else:
                shown = "ids " + " ".join(map(str, new[:16])) + (" ..." if len(new) > 16 else "")
            print(f"[{i}] {len(prompt)} prompt tokens -> {len(new)} new: {shown}")
        print(f"first round (compiling): {compile_seconds:.2f} s")
        print(f"throughput: {tokens / seconds:,.1f} tokens/s ({tokens} tokens in {seconds:.3f} s, "
              f"batch {len(prompts)}, prefill included)")
        print("\n".join(memory))
        if args.speculate:
            print(generate.report())
        return 0
    except (ValueError, jv.OutOfPagesError, jv.NoFreeSlotError) as error:
        print(f"vattention generate: error: {error}", file=sys.stderr)
        return 2
