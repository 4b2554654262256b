"""Every place the project reads something JAX does not promise: one module, tested on each JAX.

Two readings cannot go through a public API (jax 0.10.2 through 0.12):

* which parameter of a lowered program aliases which output (:func:`aliased_outputs`): JAX says
  which arguments it donates (``Lowered.args_info``) but not what XLA aliases them to; the donation
  check (:mod:`~jax_vattention.cache.donation`) reads it from the lowered StableHLO text and, for a
  sharded program that leaves aliasing to XLA, from the compiled HLO;
* what a runtime failure was (:func:`failed_in`, :func:`out_of_memory`): an error raised inside a
  compiled program (our mapping op's, or XLA's allocator's) reaches Python as a
  ``jax.errors.JaxRuntimeError`` whose only structure is its message.

tests/test_jax_internals.py checks each reading against the installed JAX, so a JAX release that
changes them fails there first, by name.
"""

from __future__ import annotations

import re

import jax


def aliased_outputs(lowered: jax.stages.Lowered, arguments: int) -> list[int | None]:
    """For each of the ``arguments`` flat arguments of ``lowered``: the flat output it aliases, or None.

    The lowered program's parameters are the constants JAX hoisted out of the function (jax 0.12
    passes closed-over arrays as leading parameters marked ``jax.const``), then the arguments XLA did
    not prune; both are counted in ``kept_var_idx``, the constants first.
    """
    signature = re.search(r"func\.func public @main\((.*?)\)\s*->", lowered.as_text(), re.S)
    if signature is None:
        raise RuntimeError("cannot find the lowered program's main function")
    constants = len(getattr(lowered._lowering, "const_args", None) or ())
    kept = lowered._lowering.compile_args.get("kept_var_idx")  # constants and arguments XLA did not prune
    kept = sorted(kept) if kept is not None else list(range(constants + arguments))

    def argument_of(parameter: int) -> int | None:
        """The flat argument behind the lowered program's ``parameter``; None for a constant."""
        if parameter >= len(kept) or kept[parameter] < constants:
            return None
        return kept[parameter] - constants

    aliased: list[int | None] = [None] * arguments
    donors = False
    for text in signature.group(1).split("%arg")[1:]:  # "<n>: tensor<...> {attributes}, "
        parameter = int(re.match(r"\d+", text).group(0))
        output = re.search(r"tf\.aliasing_output = (\d+) : i32", text)
        donors = donors or "jax.buffer_donor = true" in text
        if output is not None and argument_of(parameter) is not None:
            aliased[argument_of(parameter)] = int(output.group(1))
    if donors:
        # A sharded program (e.g. shard_map over a mesh) marks donated parameters as buffer donors
        # and leaves the aliasing to XLA: read what the compiled program aliases.
        compiled = lowered.compile().as_text()
        for output, parameter in re.findall(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)", compiled):
            if argument_of(int(parameter)) is not None:
                aliased[argument_of(int(parameter))] = int(output)
    return aliased


def failed_in(error: BaseException, target: str) -> bool:
    """Whether ``error``, raised by a compiled program, came from the FFI custom call ``target``."""
    return isinstance(error, jax.errors.JaxRuntimeError) and target in str(error)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out (XLA's allocator, or our mapping op's budget)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message: what failed, without XLA's stack of frames."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
