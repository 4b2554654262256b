"""``vattention serve``: an OpenAI-compatible HTTP server over the engine and the virtual cache.

The model options are ``generate``'s: ``--model DIR`` serves a checkpoint (its tokenizer turns
text into tokens and back, its chat template formats chat), ``--config NAME`` a named shape with
random weights (UTF-8 bytes as tokens). Endpoints: ``/v1/completions``, ``/v1/chat/completions``
(both streaming and not), ``/v1/models`` (and ``/v1/models/{id}``), ``/health``, ``/metrics``
(Prometheus). The server listens on 127.0.0.1 unless ``--host`` says otherwise; the port is taken
before the model is built. It answers to the model's own name and to the name given to
``--model`` (or to ``--served-model-name``). Ctrl-C stops it gracefully (requests in flight get
``--shutdown-timeout`` seconds to finish), a second Ctrl-C at once. Each request leaves one JSON
line in the log. ``--dp N`` serves N replicas of the engine, each on its own ``--tp`` devices, behind
the one front (:mod:`~jax_vattention.app.server.replicas`). Needs the ``serve`` extra:
``pip install ".[serve]"``.

Over several processes (``--coordinator``, ``--num-processes``, ``--process-id``: see
:mod:`~jax_vattention.app.processes`), every process builds the same model and engine over a
``--tp`` mesh of all their devices; process 0 serves HTTP, the others replay its engine's calls
(:mod:`~jax_vattention.engine.lockstep`) until it stops, and exit with it. Such a job is one
replica (``--dp`` is refused there).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jax

from jax_vattention.attention import BACKENDS
from jax_vattention.app.assembly import (add_speculation_arguments, assemble, model_on, open_draft, replica_devices,
                                         speculation_options)
from jax_vattention.app.commands.model_source import add_model_arguments
from jax_vattention.app.processes import Processes, add_process_arguments, initialize
from jax_vattention.cache.config import LAYOUTS
from jax_vattention.engine import EngineConfig
from jax_vattention.app.server.limits import ServerLimits


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
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel replicas: engines on disjoint groups of --tp devices each, behind one "
                             "HTTP front; a request goes to the replica with the longest cached prefix of its "
                             "prompt, else the most free pages (default 1). --budget-mib and --max-waiting "
                             "are per replica")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the names clients use for the model, the first one reported (default: the "
                             "name given to --model, and the model's own)")
    parser.add_argument("--max-waiting", type=int, default=ServerLimits.max_waiting,
                        help="requests that may wait for a slot; beyond, 429 with Retry-After (default "
                             f"{ServerLimits.max_waiting})")
    parser.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes,
                        help=f"the largest request body (default {ServerLimits.max_body_bytes})")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="the longest prompt in tokens (default: --max-len)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds requests in flight get to finish after Ctrl-C (default 30)")
    add_speculation_arguments(parser)
    add_process_arguments(parser)


def check_serve_extra() -> None:
    """``ValueError`` in one line when the ``serve`` extra is not installed."""
    for module in ("fastapi", "uvicorn", "pydantic"):
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"the server needs FastAPI and uvicorn ({module} is missing): "
                             f"pip install 'jax_vattention[serve]'") from None


def check_arguments(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` for options that cannot run (the model and kernel options: in
    :func:`~jax_vattention.app.assembly.assemble`)."""
    check_serve_extra()
    for name in ("max_batch", "max_len", "token_budget", "chunk_tokens", "max_waiting", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.max_len < 2:
        raise ValueError(f"--max-len must be at least 2 (a prompt token and an answer); got {args.max_len}")
    if args.budget_mib is not None and args.budget_mib < 1:
        raise ValueError(f"--budget-mib must be at least 1; got {args.budget_mib}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65536); got {args.port}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be at least 1; got {args.max_prompt_tokens}")
    if isinstance(args.dp, bool) or not isinstance(args.dp, int) or args.dp < 1:
        raise ValueError(f"--dp must be at least 1; got {args.dp}")
    if args.dp > 1 and (args.speculate or "").startswith("draft:"):
        raise ValueError("a draft model runs on one device beside one engine: with --dp, use --speculate ngram")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be at least 0; got {args.shutdown_timeout}")
    speculation_options(args)


def build_engines(args: argparse.Namespace, processes: Processes = Processes()):
    """``(loaded, engines)``: the model with its tokenizer and one engine per ``--dp`` replica, each
    over its own cache on its own ``--tp`` devices, compiled and warmed up (so the first client does
    not wait for it). Every process of a job builds the same (one replica over several processes)."""
    check_arguments(args)
    groups = replica_devices(args.dp, args.tp)
    built = assemble(args, max_batch=args.max_batch, max_len=args.max_len,
                     budget_bytes=args.budget_mib << 20 if args.budget_mib is not None else None)
    loaded = built.loaded
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source} has no tokenizer (a vocabulary under 256 has no byte tokens): "
                         f"serve a checkpoint with a tokenizer.json")
    return loaded, [_replica_engine(args, built, devices, processes, first=index == 0)
                    for index, devices in enumerate(groups)]


def _replica_engine(args: argparse.Namespace, built, devices, processes: Processes, *, first: bool):
    """One replica's engine on ``devices`` (its model, its own cache host), compiled and warmed up."""
    from jax_vattention.engine import Engine, Request

    loaded = built.loaded
    model = loaded.model if first else model_on(loaded.model, devices)
    manager = built.open(devices)
    draft, _ = open_draft(args, built)   # after the model's cache: it takes what is left; it lives with the server
    engine = Engine(model, manager, EngineConfig(
        token_budget=args.token_budget, chunk_tokens=args.chunk_tokens, backend=built.backend, seed=args.seed,
        max_stop_tokens=max(4, len(loaded.stop_tokens)), **speculation_options(args),
        overlap=processes.count == 1), draft=draft)   # map-ahead depends on timing: one plan needs none
    engine.compile()
    engine.submit(Request(prompt=[0] * min(args.chunk_tokens + 1, args.max_len - 1), max_new_tokens=2))
    engine.run()
    return engine


def build_service(args: argparse.Namespace, processes: Processes = Processes()):
    """The model, caches, engines and their running threads (``--dp`` replicas, one by default), as a
    :class:`~jax_vattention.app.server.app.Service` (on process 0 of several, with the lockstep that
    the others follow)."""
    from jax_vattention.app.server.engine_loop import EngineLoop
    from jax_vattention.app.server.replicas import Replicas
    from jax_vattention.app.server.service import Service
    from jax_vattention.engine.lockstep import KeyValueChannel, LockstepLeader

    loaded, engines = build_engines(args, processes)
    lockstep = None
    if processes.count > 1:
        lockstep = LockstepLeader(KeyValueChannel(), processes.followers, processes.timeout, on_stall=_abandon)
    replicas = Replicas([EngineLoop(engine, lockstep=lockstep) for engine in engines])
    replicas.start()
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                          max_waiting=args.max_waiting)
    return Service(replicas, loaded, _chat_format(loaded, args.model), names=served_names(args, loaded),
                   limits=limits)


def served_names(args: argparse.Namespace, loaded) -> list[str]:
    """``--served-model-name``, else the name given to ``--model`` (a bundled model's short name)
    followed by the model's own name."""
    if args.served_model_name:
        return list(dict.fromkeys(args.served_model_name))
    typed = [args.model] if args.model and "/" not in args.model and not args.model.endswith(".gguf") else []
    return list(dict.fromkeys([*typed, loaded.name]))


def _chat_format(loaded, model: str | None):
    """The chat template the tokenizer carries (a GGUF file's), else the checkpoint directory's."""
    from jax_vattention.app.server.chat import ChatFormat

    template = getattr(loaded.tokenizer, "chat_template", None)
    if template:
        tokenizer = loaded.tokenizer
        return ChatFormat(template, {"bos_token": tokenizer.bos_token or "",
                                     "eos_token": tokenizer.eos_token or ""})
    return ChatFormat.from_checkpoint(model)


def _abandon(error: Exception) -> None:
    """Process 0's end when another process stalled inside a step: the engine thread waits in that
    step's collectives for good, so nothing but the process's exit can stop it (and free its pages)."""
    print(f"vattention serve: error: {error}", file=sys.stderr, flush=True)
    os._exit(1)


def run(args: argparse.Namespace) -> int:
    """Serves until Ctrl-C; 0 after a shutdown, 130 after an interrupt, 2 when it cannot start, 1
    when another process of the job stalled or diverged."""
    try:
        check_serve_extra()
        processes = initialize(args)
        if not processes.leader:
            return _follow(args, processes)
        from jax_vattention.app.server.lifecycle import bind
        listening = bind(args.host, args.port)       # before the model: a port in use is found at once
    except ValueError as error:
        print(f"vattention serve: error: {error}", file=sys.stderr)
        return 2
    try:
        try:
            service = build_service(args, processes)
        except ValueError as error:
            print(f"vattention serve: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("vattention serve: interrupted while starting", file=sys.stderr)
            return 130
        return _serve(service, listening, args)
    finally:
        listening.close()


def _follow(args: argparse.Namespace, processes: Processes) -> int:
    """A process other than 0: builds the same engine and replays process 0's calls on it until
    process 0 stops (0) or stalls or diverges (1)."""
    from jax_vattention.engine.lockstep import KeyValueChannel, ProcessGroupError, follow

    _, (engine,) = build_engines(args, processes)
    print(f"process {processes.process_id} of {processes.count}: following process 0's engine", flush=True)
    try:
        steps = follow(engine, KeyValueChannel(), processes.process_id, processes.timeout)
    except ProcessGroupError as error:
        print(f"vattention serve: error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        engine.manager.close()
    print(f"process {processes.process_id}: process 0 stopped after {steps} steps", flush=True)
    return 0


def _serve(service, listening, args: argparse.Namespace) -> int:
    import uvicorn

    from jax_vattention.app.server.app import create_app
    from jax_vattention.app.server.lifecycle import GracefulServer, close_engine

    host, port = listening.getsockname()[:2]
    engine = service.replicas.engine
    cache = engine.manager.config
    where = str(jax.devices()[0]) if args.dp == 1 else f"{args.dp} replicas of {args.tp} devices"
    print(f"serving {service.loaded.source} as model {' / '.join(map(repr, service.names))} on "
          f"http://{host}:{port}/v1 ({where}, {cache.layout} cache, {cache.max_batch} slots x "
          f"{cache.max_len} tokens{' each' if args.dp > 1 else ''}, backend {engine.config.backend}); chat prompts: "
          f"{service.chat_format.description}", flush=True)
    _log_requests()
    # No lifespan events: the app has none, and a forced exit would cancel uvicorn's wait for them.
    config = uvicorn.Config(create_app(service), log_level="info", lifespan="off")
    server = GracefulServer(config, service, args.shutdown_timeout)
    try:
        server.run(sockets=[listening])
    except KeyboardInterrupt:   # a Ctrl-C outside uvicorn's handlers (before it started listening)
        server.signals.append(2)
    try:
        close_engine(service)
    except KeyboardInterrupt:
        return 130
    return 130 if 2 in server.signals else 0


def _log_requests() -> None:
    """Each request's JSON line on stderr, as it is (the request log's only handler)."""
    from jax_vattention.app.server.metrics import REQUEST_LOG

    if not REQUEST_LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        REQUEST_LOG.addHandler(handler)
        REQUEST_LOG.setLevel(logging.INFO)
        REQUEST_LOG.propagate = False
