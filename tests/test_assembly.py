"""The composition root: kernels and layouts chosen by the one rule, the memory checked from the
config before any weight is built, the host opened for one device or a mesh."""

import argparse

import jax
import pytest

from jax_vattention.app import assembly, memory_fit
from jax_vattention.app.commands import model_source

GiB = 1 << 30


def options(**changes) -> argparse.Namespace:
    args = dict(model=None, config="tiny", dtype=None, seed=0, backend="auto", layout="auto", tp=1)
    args.update(changes)
    return argparse.Namespace(**args)


def test_choose_kernel_defaults_and_refusals():
    cpu = jax.devices()[0]
    assert assembly.choose_kernel("auto", "auto", cpu) == ("blocked", "interleaved")
    assert assembly.choose_kernel(None, "per_layer", cpu) == ("blocked", "per_layer")

    class Gpu:
        platform = "gpu"

    assert assembly.choose_kernel(None, "auto", Gpu(), "bfloat16") == ("pallas", "interleaved")
    assert assembly.choose_kernel("cudnn", "auto", Gpu(), "bfloat16") == ("cudnn", "per_layer")
    # float32 on a GPU: cuDNN cannot take it, so the default is the blocked kernel (one rule for both).
    assert assembly.choose_kernel(None, "per_layer", Gpu(), "float32") == ("blocked", "per_layer")
    with pytest.raises(ValueError, match="cannot read one layer of an interleaved cache"):
        assembly.choose_kernel("cudnn", "interleaved", Gpu())
    with pytest.raises(ValueError, match="--tp must be between 1 and"):
        assembly.mesh_for(len(jax.devices()) + 1)


def test_weights_that_cannot_fit_are_refused_before_any_is_built(monkeypatch):
    """float32 Llama-3-8B weights (29.9 GiB) on a host with 8 GiB free: refused in one line naming the
    sizes and what to do, and the model loader is never called."""
    monkeypatch.setattr(memory_fit, "free_bytes", lambda device: 8 * GiB)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the memory check")

    monkeypatch.setattr(model_source, "load_model", no_model)
    with pytest.raises(ValueError, match=r"llama-3-8b \(float32\) needs 29.9 GiB of weights .* but 8.0 GiB is free: "
                                         r"use a smaller model or dtype"):
        assembly.assemble(options(config="llama-3-8b", dtype="float32"), max_batch=4, max_len=2048)


def test_a_cache_budget_that_cannot_fit_names_the_one_that_would(monkeypatch):
    monkeypatch.setattr(memory_fit, "free_bytes", lambda device: 8 * GiB)
    with pytest.raises(ValueError, match=r"a cache budget of 6.0 GiB would fit \(--budget-mib 61"):
        assembly.assemble(options(), max_batch=4, max_len=1 << 24, budget_bytes=32 * GiB)


def test_assemble_builds_the_model_and_opens_its_cache():
    built = assembly.assemble(options(), max_batch=2, max_len=256)
    assert (built.backend, built.layout, built.mesh) == ("blocked", "interleaved", None)
    assert built.cache_config.num_layers == built.loaded.model.config.num_layers
    with built.open() as host:
        assert host.mesh is None and host.shards == [host]
        assert host.pages_for(1) == host.config.num_buffers
