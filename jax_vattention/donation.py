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
import re
from typing import Any, Callable, Sequence

import jax

from jax_vattention.cache import KVCache


def _virtual_cache_mask(tree: Any) -> list[bool]:
    """For each leaf of ``tree``: does it belong to a virtual (manager-served) cache?"""
    mask = []
    for node in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, KVCache)):
        if isinstance(node, KVCache):
            mask.extend([not node.is_dense] * len(jax.tree_util.tree_leaves(node)))
        else:
            mask.append(False)
    return mask


def check_cache_donation(lowered: jax.stages.Lowered, args: Sequence[Any], kwargs: dict) -> None:
    """Raises ``ValueError`` unless every virtual cache in ``args``/``kwargs`` is donated and returned.

    ``lowered`` is ``jitted.lower(*args, **kwargs)``.
    """
    info_args, info_kwargs = lowered.args_info
    if len(info_args) != len(args):
        raise ValueError("pass static arguments of a function that takes a cache by name (static_argnames)")
    traced_kwargs = {name: value for name, value in kwargs.items() if name in info_kwargs}  # static ones are not
    mask = _virtual_cache_mask((tuple(args), traced_kwargs))
    if not any(mask):
        return
    infos = jax.tree_util.tree_leaves((info_args, info_kwargs))
    if len(infos) != len(mask):
        raise RuntimeError("the lowered arguments do not match the call's arguments")
    undonated = sum(1 for is_cache, info in zip(mask, infos) if is_cache and not info.donated)
    if undonated:
        raise ValueError(
            f"{undonated} cache array(s) are passed without donation: XLA would copy the virtual cache "
            "(on a GPU that copy reads unmapped memory and kills the CUDA context). Donate it: "
            "jax.jit(fn, donate_argnames='cache'), or use jax_vattention.cache_jit.")
    signature = re.search(r"func\.func public @main\((.*?)\)\s*->", lowered.as_text(), re.S)
    aliased = signature.group(1).count("tf.aliasing_output") if signature else 0
    if aliased < sum(mask):
        raise ValueError(
            f"{sum(mask) - aliased} donated cache array(s) are not returned with the same shape and dtype: "
            "return the cache from every jitted function that takes it, so XLA updates it in place.")


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

    @functools.wraps(fun)
    def call(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        key = (treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x))) for x in leaves))
        if key not in checked:
            check_cache_donation(jitted.lower(*args, **kwargs), args, kwargs)
            checked.add(key)
        return jitted(*args, **kwargs)

    call.lower = jitted.lower
    call.jitted = jitted
    return call
