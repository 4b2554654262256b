"""Catching an undonated cache before it runs.

A virtual cache must be donated to every jitted function that takes it and
returned from it, so that XLA updates it in place. Without donation XLA
copies the input first; on a GPU that copy reads the unmapped parts of the
reserved range and kills the CUDA context, before any op of ours could look.
A donated foreign buffer that no output aliases aborts the process. Both
show in the lowered program, so :func:`check_cache_donation` reads them
there, and :func:`cache_jit` does it for every new signature.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax

from jax_vattention.cache.jax_internals import aliased_outputs
from jax_vattention.cache.kv_cache import KVCache


def _cache_leaves(tree: Any) -> list[tuple[int, int] | None]:
    """For each leaf of ``tree``: ``(manager_id, position in its KVCache)`` for a virtual cache's
    array, None for anything else."""
    tags: list[tuple[int, int] | None] = []
    for node in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, KVCache)):
        if isinstance(node, KVCache):
            count = len(jax.tree_util.tree_leaves(node))
            tags.extend([None] * count if node.is_dense else [(node.manager_id, i) for i in range(count)])
        else:
            tags.append(None)
    return tags


def check_cache_donation(lowered: jax.stages.Lowered, args: Sequence[Any], kwargs: dict) -> None:
    """Raises ``ValueError`` unless every virtual cache array in ``args``/``kwargs`` is donated and
    updated in place: its parameter must alias the output that is the same array of the same
    cache (same ``manager_id``, same position in the :class:`KVCache`).

    ``lowered`` is ``jitted.lower(*args, **kwargs)``. Counting aliases over the whole signature
    is not enough: another donated argument could fill the count while a cache array aliases
    nothing (the process aborts), and a cache array aliased to some other output would have XLA
    write a dense array across the reserved range.
    """
    info_args, info_kwargs = lowered.args_info
    if len(info_args) != len(args):
        raise ValueError("pass static arguments of a function that takes a cache by name (static_argnames)")
    traced_kwargs = {name: value for name, value in kwargs.items() if name in info_kwargs}  # static ones are not
    inputs = _cache_leaves((tuple(args), traced_kwargs))
    if not any(inputs):
        return
    infos = jax.tree_util.tree_leaves((info_args, info_kwargs))
    if len(infos) != len(inputs):
        raise RuntimeError("the lowered arguments do not match the call's arguments")
    undonated = sum(1 for tag, info in zip(inputs, infos) if tag and not info.donated)
    if undonated:
        raise ValueError(
            f"{undonated} cache array(s) are passed without donation: XLA would copy the virtual cache "
            "(on a GPU that copy reads unmapped memory and kills the CUDA context). Donate it: "
            "jax.jit(fn, donate_argnames='cache'), or use jax_vattention.cache_jit.")
    outputs = _cache_leaves(lowered.out_info)
    aliased = aliased_outputs(lowered, len(inputs))
    wrong = [tag for tag, output in zip(inputs, aliased)
             if tag and (output is None or output >= len(outputs) or outputs[output] != tag)]
    if wrong:
        raise ValueError(
            f"{len(wrong)} donated cache array(s) (manager, position) {wrong} are not returned in place: each "
            "must come back as the same array of the same cache, with the same shape and dtype. Return "
            "the cache from every jitted function that takes it (cache = step(cache, ...)), in its own "
            "place, so that XLA updates it in place.")


def cache_jit(fun: Callable | None = None, *, cache_argnames: str | Sequence[str] = ("cache",),
              **jit_kwargs) -> Callable:
    """``jax.jit`` that donates the cache arguments and checks, once per signature, that they alias outputs.

    Example::

        @cache_jit
        def step(cache, tokens):
            cache = jax_vattention.grow(cache, 1)
            ...
            return cache, logits
    """
    if fun is None:
        return functools.partial(cache_jit, cache_argnames=cache_argnames, **jit_kwargs)
    names = (cache_argnames,) if isinstance(cache_argnames, str) else tuple(cache_argnames)
    donate = jit_kwargs.pop("donate_argnames", ())
    donate = (donate,) if isinstance(donate, str) else tuple(donate)
    jitted = jax.jit(fun, donate_argnames=tuple(dict.fromkeys(donate + names)), **jit_kwargs)
    checked: set = set()

    def check(*args, **kwargs) -> None:
        """Checks the donation of the call's signature, once per signature (shapes, dtypes, pytree)."""
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        key = (treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x))) for x in leaves))
        if key not in checked:
            check_cache_donation(jitted.lower(*args, **kwargs), args, kwargs)
            checked.add(key)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        check(*args, **kwargs)
        return jitted(*args, **kwargs)

    # A caller that dispatches a few fixed signatures many times (the engine's step) checks each
    # once and then calls ``jitted`` itself: the check's key costs host time on every call.
    call.check = check
    call.lower = jitted.lower
    call.jitted = jitted
    return call
