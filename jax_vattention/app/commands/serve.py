"""``vattention serve``: an OpenAI-compatible HTTP server over the engine and the virtual cache.

The model options are ``generate``'s: ``--model DIR`` serves a checkpoint (its tokenizer turns
text into tokens and back, its chat template formats chat), ``--config NAME`` a named shape with
random weights (UTF-8 bytes as tokens). Endpoints: ``/v1/completions``, ``/v1/chat/completions``
(both streaming and not), ``/v1/models``, ``/health``. The server listens on 127.0.0.1 unless
``--host`` says otherwise. Needs the ``serve`` extra: ``pip install ".[serve]"``.
"""

from __future__ import annotations

import argparse
import sys

import jax

from jax_vattention.attention import BACKENDS
from jax_vattention.app.assembly import assemble
from jax_vattention.app.commands.model_source import add_model_arguments
from jax_vattention.cache.config import LAYOUTS
from jax_vattention.engine import EngineConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-len", type=int, default=2048,
                        help="tokens a request may hold, prompt and answer (default 2048)")
    parser.add_argument("--token-budget", type=int, default=EngineConfig.token_budget,
                        help="tokens per engine step: decodes plus prompt chunks (default 256)")
    parser.add_argument("--chunk-tokens", type=int, default=64, help="the width of a prompt chunk row (default 64)")
    parser.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto",
                        help="cache layout; auto: interleaved, per_layer for --backend cudnn")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="attention kernel; auto: pallas on GPU (cudnn for a per-layer cache), xla on CPU")
    parser.add_argument("--budget-mib", type=int, default=None,
                        help="physical memory the cache may map (default: 90%% of free)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree: the model and the cache split over the first TP devices "
                             "(default 1)")


def check_arguments(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` for options that cannot run (the model and kernel options: in
    :func:`~jax_vattention.app.assembly.assemble`)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ValueError(f"vattention serve needs FastAPI and uvicorn ({error.name} is missing): "
                         f"pip install 'jax_vattention[serve]'") from None
    for name in ("max_batch", "max_len", "token_budget", "chunk_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.max_len < 2:
        raise ValueError(f"--max-len must be at least 2 (a prompt token and an answer); got {args.max_len}")
    if args.budget_mib is not None and args.budget_mib < 1:
        raise ValueError(f"--budget-mib must be at least 1; got {args.budget_mib}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65536); got {args.port}")


def build_service(args: argparse.Namespace):
    """The model, cache, engine and its running thread, as a :class:`~jax_vattention.app.server.app.Service`.

    Compiles the engine's step programs first, so the first client does not wait for it.
    """
    from jax_vattention.engine import Engine, Request
    from jax_vattention.app.server.app import Service
    from jax_vattention.app.server.engine_loop import EngineLoop

    check_arguments(args)
    built = assemble(args, max_batch=args.max_batch, max_len=args.max_len,
                     budget_bytes=args.budget_mib << 20 if args.budget_mib is not None else None)
    loaded = built.loaded
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source} has no tokenizer (a vocabulary under 256 has no byte tokens): "
                         f"serve a checkpoint with a tokenizer.json")
    manager = built.open()
    engine = Engine(loaded.model, manager, EngineConfig(
        token_budget=args.token_budget, chunk_tokens=args.chunk_tokens, backend=built.backend, seed=args.seed,
        max_stop_tokens=max(4, len(loaded.stop_tokens))))
    engine.compile()
    engine.submit(Request(prompt=[0] * min(args.chunk_tokens + 1, args.max_len - 1), max_new_tokens=2))
    engine.run()
    loop = EngineLoop(engine)
    loop.start()
    return Service(loop, loaded, _chat_format(loaded, args.model))


def _chat_format(loaded, model: str | None):
    """The chat template the tokenizer carries (a GGUF file's), else the checkpoint directory's."""
    from jax_vattention.app.server.chat import ChatFormat

    template = getattr(loaded.tokenizer, "chat_template", None)
    if template:
        tokenizer = loaded.tokenizer
        return ChatFormat(template, {"bos_token": tokenizer.bos_token or "",
                                     "eos_token": tokenizer.eos_token or ""})
    return ChatFormat.from_checkpoint(model)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from jax_vattention.app.server.app import create_app

    try:
        service = build_service(args)
    except ValueError as error:
        print(f"vattention serve: error: {error}", file=sys.stderr)
        return 2
    cache = service.engine_loop.engine.manager.config
    print(f"serving {service.loaded.source} as model {service.loaded.name!r} on http://{args.host}:{args.port}/v1 "
          f"({jax.devices()[0]}, {cache.layout} cache, {cache.max_batch} slots x {cache.max_len} tokens, "
          f"backend {service.engine_loop.engine.config.backend}); chat prompts: {service.chat_format.description}",
          flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    finally:
        service.engine_loop.stop()
        service.engine_loop.engine.manager.close()
    return 0
