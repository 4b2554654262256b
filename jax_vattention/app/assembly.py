"""The one composition root: from a command's options to a model, a cache host and a kernel.

Every entry point (``vattention generate``, ``chat``, ``serve``, ``serve-bench``, ``bench decode``,
``bench profile``) builds the same four things in the same order, here:

1. the kernel and the cache layout (:func:`choose_kernel`: the one backend rule of
   :mod:`jax_vattention.attention.backends`), and the mesh for ``--tp`` (:func:`mesh_for`);
2. a memory check from the model's config alone, before any weight is built
   (:func:`~jax_vattention.app.memory_fit.check_fits`);
3. the model (``--model`` / ``--config``: :mod:`~jax_vattention.app.commands.model_source`);
4. the cache's configuration and its host (:func:`open_host`: a ``CacheManager``, or a
   ``ShardedCacheManager`` over the mesh);
5. for the commands that run the engine, its speculative decoding (:func:`add_speculation_arguments`,
   :func:`speculation_options`).

:func:`assemble` does all four for the commands that take the model options; the benchmarks,
whose models are named shapes, call the steps themselves.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from jax_vattention.attention.backends import backend_for, default_layout
from jax_vattention.cache.config import CacheConfig
from jax_vattention.cache.host import CacheHost
from jax_vattention.cache.jax_internals import first_line, out_of_memory


def choose_kernel(backend: str | None, layout: str | None, device: jax.Device, dtype=None) -> tuple[str, str]:
    """``(backend, layout)`` for a cache on ``device``: ``None`` or ``"auto"`` picks the default of
    each (:func:`~jax_vattention.attention.backends.default_layout`, ``default_backend``); a named
    one is checked. ``ValueError`` for a kernel that cannot read such a cache there."""
    backend = None if backend in (None, "auto") else backend
    layout = default_layout(backend) if layout in (None, "auto") else layout
    return backend_for(backend, layout, device, dtype), layout


def mesh_for(tp: int) -> jax.sharding.Mesh | None:
    """The mesh of ``--tp`` devices (None for 1); ``ValueError`` outside ``[1, devices]``."""
    count = len(jax.devices())
    if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= count:
        raise ValueError(f"--tp must be between 1 and the {count} devices JAX sees; got {tp}")
    if jax.process_count() > 1 and tp != count:
        raise ValueError(f"over {jax.process_count()} processes, the model splits over every process's devices: "
                         f"--tp must be {count}; got {tp}")
    if tp == 1:
        return None
    from jax_vattention.decode.mesh import tp_mesh
    return tp_mesh(tp)


def replica_devices(dp: int, tp: int) -> list[list[jax.Device]]:
    """The device groups of ``--dp`` data-parallel replicas of ``--tp`` devices each, in JAX's order
    (replica ``r``: devices ``r * tp`` to ``(r + 1) * tp - 1``; the first group is :func:`mesh_for`'s).
    ``ValueError`` naming both numbers when JAX sees fewer than ``dp * tp`` devices."""
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ValueError(f"--dp must be at least 1; got {dp}")
    if dp > 1 and jax.process_count() > 1:
        raise ValueError(f"--dp runs replicas on one process's devices; over {jax.process_count()} processes the "
                         f"job is one replica: leave out --dp and start one job per replica")
    devices = jax.devices()
    if dp * tp > len(devices):
        raise ValueError(f"--dp {dp} replicas of --tp {tp} devices each need {dp * tp} devices; JAX sees "
                         f"{len(devices)} ({devices[0].platform})")
    return [list(devices[r * tp:(r + 1) * tp]) for r in range(dp)]


def model_on(model, devices: list[jax.Device]):
    """A copy of ``model`` (as loaded onto the first replica's devices) on another replica's
    ``devices``: split over their mesh for more than one, else on the one device."""
    if len(devices) > 1:
        from jax_vattention.decode.mesh import shard_model, tp_mesh
        return shard_model(model, tp_mesh(len(devices), devices), model.tp_axis)
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, devices[0]))


def cache_config_for(model_config, *, max_batch: int, max_len: int, layout: str, budget_bytes: int | None = None,
                     page_bytes: int | None = None, kv_dtype: str | None = None) -> CacheConfig:
    """The cache a model of ``model_config`` writes: its layers, KV heads, head_dim and dtype (or
    ``kv_dtype``: ``--kv-dtype``, e.g. ``float8_e4m3fn`` for an FP8 cache with vLLM's default scales
    of 1.0), and its sliding windows, behind which the cache unmaps pages."""
    return CacheConfig(num_layers=model_config.num_layers, max_batch=max_batch, max_len=max_len,
                       kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim,
                       dtype=cache_dtype(model_config, kv_dtype), layout=layout, budget_bytes=budget_bytes,
                       page_bytes=page_bytes, **model_config.cache_windows())


def cache_dtype(model_config, kv_dtype: str | None = None):
    """What the cache holds: ``kv_dtype`` (``--kv-dtype``), or the model's dtype for None."""
    return jnp.dtype(kv_dtype) if kv_dtype else model_config.jnp_dtype


def check_memory(model_config, name: str, cache_config: CacheConfig, mesh=None) -> None:
    """``ValueError`` (one line, with what would fit) unless the weights in their dtype and the cache
    fit the free memory of the run's devices.

    The cache counts at its budget where one is set (at most what a static cache of its slots would
    hold), else not at all: without a budget the manager takes a share of what is free once the
    weights are in, and maps pages only as requests grow; the reservation itself is free."""
    from jax_vattention.app.memory_fit import check_fits

    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    cache = 0
    if cache_config.budget_bytes is not None:
        cache = min(cache_config.static_bytes() // len(devices), cache_config.budget_bytes)
    check_fits(model_config, name, devices, cache)


def open_host(cache_config: CacheConfig, mesh=None, device: jax.Device | None = None, *,
              driver_factory=None) -> CacheHost:
    """A :class:`~jax_vattention.CacheManager` on ``device`` (default: JAX's first), or a
    :class:`~jax_vattention.ShardedCacheManager` over ``mesh``; ``ValueError`` when the device cannot
    hold its buffers. ``driver_factory`` (``device -> driver``): fake drivers, for tests."""
    import jax_vattention as jv

    try:
        if mesh is not None:
            return jv.ShardedCacheManager(cache_config, mesh, driver_factory=driver_factory)
        device = device if device is not None else jax.devices()[0]
        return jv.CacheManager(cache_config, device,
                               driver=driver_factory(device) if driver_factory is not None else None)
    except (jax.errors.JaxRuntimeError, jv.DriverError) as error:
        if isinstance(error, jax.errors.JaxRuntimeError) and not out_of_memory(error):
            raise
        raise ValueError(f"the device cannot hold a cache of {cache_config.max_batch} slots x "
                         f"{cache_config.max_len} tokens ({cache_config.static_bytes() / 2**30:,.1f} GiB): "
                         f"lower the slots (--batch, --max-batch) or --max-len ({first_line(error)})") from None


def add_speculation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--speculate`` and ``--num-speculative-tokens``, for the commands that run the engine."""
    parser.add_argument("--speculate", default=None, metavar="ngram|draft:PATH",
                        help="speculative decoding: ngram proposes tokens by prompt lookup (no extra model), "
                             "draft:PATH by a draft model that shares the model's tokenizer (PATH as --model "
                             "takes it); each step verifies them and greedy output is unchanged (default: off)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                        help="the most tokens a request proposes a step, adapted per request below it "
                             "(default 4; with --speculate)")


def speculation_options(args: argparse.Namespace) -> dict:
    """The :class:`~jax_vattention.engine.EngineConfig` fields of ``--speculate`` and
    ``--num-speculative-tokens``; ``ValueError`` for an unknown method or a K outside [1, 16]."""
    tokens = args.num_speculative_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 16:
        raise ValueError(f"--num-speculative-tokens must be between 1 and 16; got {tokens}")
    method = args.speculate
    if method is not None and method != "ngram" and not (method.startswith("draft:") and len(method) > 6):
        raise ValueError(f"--speculate takes ngram or draft:PATH; got {method!r}")
    return dict(speculate=None if method is None else method.split(":", 1)[0], num_speculative_tokens=tokens)


def open_draft(args: argparse.Namespace, built: "Assembly"):
    """With ``--speculate draft:PATH``: the draft model (loaded as ``--model PATH`` would be, in the
    run's dtype) and its own cache host of the target's slots and length, as a
    :class:`~jax_vattention.engine.draft.DraftProposer`, and the host (the caller closes it); else
    ``(None, None)``. ``ValueError`` for a draft that cannot run beside the model."""
    if not (args.speculate or "").startswith("draft:"):
        return None, None
    if built.mesh is not None:
        raise ValueError("a draft model runs on one device: leave out --tp, or use --speculate ngram")
    from jax_vattention.app.commands.model_source import check_model_arguments, load_model
    from jax_vattention.engine.draft import DraftProposer

    draft_args = argparse.Namespace(**{**vars(args), "model": args.speculate.split(":", 1)[1]})
    check_model_arguments(draft_args)
    draft = load_model(draft_args).model
    config = built.cache_config
    # Per-layer: the draft's prefill from a slot's length (generate's starts) took a copy of an
    # interleaved cache where measured (CPU), which the mapping op refuses.
    backend, layout = choose_kernel(None, "per_layer", jax.devices()[0], draft.config.jnp_dtype)
    host = open_host(cache_config_for(draft.config, max_batch=config.max_batch, max_len=config.max_len,
                                      layout=layout, budget_bytes=config.budget_bytes))
    proposer = DraftProposer(draft, host, backend=backend)
    try:
        proposer.check_target(built.loaded.model, config)
    except ValueError:
        host.close()
        raise
    return proposer, host


@dataclasses.dataclass
class Assembly:
    """What :func:`assemble` built: the model with its tokenizer (``loaded``), the cache's
    configuration, the kernel, the layout and the mesh (None on one device). The host is opened
    by the caller (:meth:`open`), which closes it."""

    loaded: object
    cache_config: CacheConfig
    backend: str
    layout: str
    mesh: jax.sharding.Mesh | None

    def open(self, devices: list[jax.Device] | None = None) -> CacheHost:
        """The cache host on the first ``--tp`` devices, or on ``devices`` (a replica's group,
        :func:`replica_devices`)."""
        first = list(self.mesh.devices.flat) if self.mesh is not None else [jax.devices()[0]]
        if devices is None or list(devices) == first:
            return open_host(self.cache_config, self.mesh)
        if len(devices) > 1:
            from jax_vattention.decode.mesh import tp_mesh
            return open_host(self.cache_config, tp_mesh(len(devices), devices))
        return open_host(self.cache_config, device=devices[0])


def assemble(args: argparse.Namespace, *, max_batch: int, max_len: int, budget_bytes: int | None = None) -> Assembly:
    """The model, cache configuration, kernel and mesh of a command's options (``--model`` /
    ``--config``, ``--dtype``, ``--kv-dtype``, ``--seed``, ``--backend``, ``--layout``, ``--tp``), checked in that
    order and the memory checked before the model is built. ``ValueError`` for any option that
    cannot run, with nothing built."""
    from jax_vattention.app.commands.model_source import check_model_arguments, load_model, model_config_of

    mesh = mesh_for(args.tp)
    check_model_arguments(args)
    model_config = model_config_of(args)
    device = jax.devices()[0]
    kv_dtype = getattr(args, "kv_dtype", None)
    backend, layout = choose_kernel(args.backend, args.layout, device, cache_dtype(model_config, kv_dtype))
    cache_config = cache_config_for(model_config, max_batch=max_batch, max_len=max_len, layout=layout,
                                    budget_bytes=budget_bytes, kv_dtype=kv_dtype)
    check_memory(model_config, args.model or args.config, cache_config, mesh)
    loaded = load_model(args, mesh)  # over a mesh: every weight made or read in its shards
    return Assembly(loaded, cache_config_for(loaded.model.config, max_batch=max_batch, max_len=max_len,
                                             layout=layout, budget_bytes=budget_bytes, kv_dtype=kv_dtype),
                    backend, layout, mesh)
