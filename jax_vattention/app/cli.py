"""The ``vattention`` command: ``generate``, ``serve``,
``bench {alloc,attention,crossing,decode,profile,pages,load,router,sampling,samples,speculate}`` and ``serve-bench``."""

from __future__ import annotations

import argparse
import importlib
import sys

# (command words, module with add_arguments(parser) and run(args), help)
COMMANDS = [
    (("generate",), "jax_vattention.app.commands.generate", "generate text through the virtual cache"),
    (("serve",), "jax_vattention.app.commands.serve", "an OpenAI-compatible HTTP server over the engine"),
    (("bench", "alloc"), "jax_vattention.bench.alloc", "page map/unmap latency and bandwidth"),
    (("bench", "attention"), "jax_vattention.bench.attention", "decode attention against paged kernels"),
    (("bench", "decode"), "jax_vattention.bench.decode", "the model's decode step: static vs virtual cache, roofline"),
    (("bench", "crossing"), "jax_vattention.bench.crossing", "the cost of a decode step that crosses a page"),
    (("bench", "profile"), "jax_vattention.bench.profile", "where a decode step's time goes, by kernel kind (profiler)"),
    (("bench", "pages"), "jax_vattention.bench.page_table", "tokens per page and worst-case waste by model, TP, page size"),
    (("bench", "sampling"), "jax_vattention.bench.sampling", "what penalties, logit_bias and logprobs cost the step"),
    (("bench", "samples"), "jax_vattention.bench.samples", "n samples of one prompt: forked vs n=1 and n independent"),
    (("bench", "speculate"), "jax_vattention.bench.speculation",
     "speculative decoding (prompt lookup) against none: tokens/s, acceptance, same greedy tokens"),
    (("serve-bench",), "jax_vattention.bench.serve", "the engine under a synthetic serving workload"),
    (("bench", "load"), "jax_vattention.bench.serve_load",
     "concurrent openai clients against a running server: first-token and per-token latency"),
    (("bench", "router"), "jax_vattention.bench.router_sim",
     "a simulation of routing a trace over data-parallel replicas: prefix hit rate and load balance by policy"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vattention", description="vAttention for JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module, help_text in COMMANDS:
        if len(words) == 1:
            sub = commands.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                group = commands.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        sub.set_defaults(module=module)
        _add_arguments(sub, module)
    return parser


def _add_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    # Subcommands whose module is missing still parse; running them says why.
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise


def standalone(doc: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """Runs one command module on its own (``python -m jax_vattention.bench.alloc``)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return importlib.import_module(args.module).run(args)
    except (ValueError, MemoryError) as error:   # bad arguments, or a budget too small for them
        parser.exit(2, f"vattention: error: {error}\n")


if __name__ == "__main__":
    raise SystemExit(main())
