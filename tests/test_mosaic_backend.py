"""The ``mosaic`` backend (JAX's Mosaic GPU flash attention) on the CPU: who refuses it and why, the
wrapper's padding, scaling and casts around the kernel (run through JAX's own reference of it), and
the model's prefill going to it. Its GPU runs are cases of ``tests/gpu_cases.py``."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_vattention as jv
import jax_vattention.attention as attention
from jax_vattention.attention import (check_backend_on, check_mosaic_shapes, mosaic_attention,
                                      mosaic_prompt_attention, prefill_attends_prompt, resolve_backend,
                                      xla_attention)
from jax_vattention.models import llama
from jax_vattention.models.configs import get_config


@pytest.mark.parametrize("platform, capability, message", [
    ("cpu", None, "needs an NVIDIA Hopper GPU; JAX runs on cpu here: use 'blocked'"),
    ("gpu", "8.0", "compute capability 9.x.*this GPU's is 8.0: use 'cudnn' or 'pallas'"),
    ("gpu", "10.0", "this GPU's is 10.0"),
])
def test_mosaic_is_refused_off_a_hopper_gpu_with_what_to_use_instead(platform, capability, message):
    with pytest.raises(ValueError, match=message):
        check_backend_on("mosaic", "per_layer", platform, compute_capability=capability)


def test_mosaic_is_accepted_on_hopper_for_both_layouts():
    for layout in ("per_layer", "interleaved"):
        check_backend_on("mosaic", layout, "gpu", virtual=True, compute_capability="9.0")


def test_mosaic_refuses_caches_its_kernel_cannot_take():
    with pytest.raises(ValueError, match="bfloat16 or float16 caches, not float32"):
        check_mosaic_shapes(jnp.float32, 128)
    with pytest.raises(ValueError, match="head_dim a multiple of 64.*has 16"):
        check_mosaic_shapes(jnp.bfloat16, 16)
    check_mosaic_shapes(jnp.float16, 64)
    cache = jv.KVCache.dense(num_layers=1, max_batch=1, capacity=8, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
                             device=jax.devices("cpu")[0])
    with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU"):
        resolve_backend("mosaic", cache)
    with pytest.raises(ValueError, match="prefills through attend_prompt"):
        mosaic_attention(jnp.zeros((1, 2, 1, 64)), cache.k[0], cache.v[0], jnp.zeros((1, 2), jnp.int32),
                         jnp.ones(1, jnp.int32))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the command runs on the GPU there")
def test_the_command_line_refuses_mosaic_off_a_gpu_in_one_line(capsys):
    from jax_vattention.app.cli import main
    assert main(["generate", "--backend", "mosaic", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "backend 'mosaic'" in err and "Hopper" in err and "\n" not in err


@pytest.mark.parametrize("tokens", [5, 128, 200])
def test_the_wrapper_pads_scales_and_casts_around_the_kernel(tokens):
    """Through ``attention_mgpu.attention_reference`` (JAX's plain version of the kernel, causal,
    unscaled, no lengths), the wrapper gives the float32 reference's attention on every real token."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    calls = []

    def kernel(q, k, v):
        calls.append((q.shape, q.dtype))
        return attention_mgpu.attention_reference(q, k, v, causal=True)

    rng = np.random.default_rng(tokens)
    q = jnp.asarray(rng.standard_normal((2, tokens, 4, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, tokens, 2, 64)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, tokens, 2, 64)), jnp.bfloat16)
    lengths = jnp.array([tokens, max(1, tokens // 3)], jnp.int32)
    got = mosaic_prompt_attention(q, k, v, kernel=kernel)
    padded = -(-tokens // 128) * 128
    assert calls == [((2, padded, 4, 64), jnp.float16)] and got.shape == q.shape and got.dtype == jnp.bfloat16
    want = xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                         jnp.broadcast_to(jnp.arange(tokens), (2, tokens)), lengths)
    real = np.arange(tokens)[None] < np.asarray(lengths)[:, None]  # [B, T]
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want)[real], atol=2e-2, rtol=2e-2)


def test_prefill_goes_to_attend_prompt_for_mosaic_on_either_layout():
    assert prefill_attends_prompt("mosaic", interleaved=False) and prefill_attends_prompt("mosaic", interleaved=True)
    assert prefill_attends_prompt("cudnn", interleaved=True) and not prefill_attends_prompt("cudnn", interleaved=False)
    assert not prefill_attends_prompt("xla", interleaved=True) and not prefill_attends_prompt("blocked", False)
    # The model's prefill on a per-layer cache with backend 'mosaic' calls attend_prompt (stood in for
    # here by the reference, since the kernel needs a Hopper GPU), and reads nothing from the cache.
    config = get_config("tiny")
    model = llama.Llama(config, rngs=nnx.Rngs(0))
    seen = []

    def stand_in(q, k, v, lengths, *, backend, scale=None, window=None):
        seen.append(backend)
        return attention.attend_prompt(q, k, v, lengths, backend="blocked", scale=scale, window=window)

    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=2, capacity=16, kv_heads=config.num_kv_heads,
                             head_dim=config.head_dim, dtype=jnp.float32)
    tokens = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0]], jnp.int32)
    arguments = dict(start=jnp.zeros(2, jnp.int32), count=jnp.array([4, 2], jnp.int32))
    with mock.patch.object(llama, "attend_prompt", stand_in):
        logits, _ = jax.jit(lambda cache: model(tokens, jnp.broadcast_to(jnp.arange(4), (2, 4)), cache,
                                                backend="mosaic", **arguments))(cache)
    assert seen == ["mosaic"] * config.num_layers and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim", [(5, 32, 8, 128), (300, 4, 2, 64), (1024, 8, 8, 128), (256, 8, 4, 256)])
def test_the_installed_kernel_traces_with_the_shapes_and_config_the_wrapper_gives_it(monkeypatch, tokens, q_heads,
                                                                                    kv_heads, head_dim):
    """JAX's kernel itself (not a stand-in) accepts what the wrapper passes: its shape and config checks
    run at trace time, so ``eval_shape`` runs them here without a GPU (its CUDA version query, which needs
    the CUDA plugin, is stubbed)."""
    import types

    from jax.experimental.pallas.ops.gpu import attention_mgpu

    if hasattr(attention_mgpu, "cuda_versions"):
        monkeypatch.setattr(attention_mgpu, "cuda_versions",
                            types.SimpleNamespace(cuda_runtime_get_version=lambda: 13000))
    q = jax.ShapeDtypeStruct((2, tokens, q_heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, tokens, kv_heads, head_dim), jnp.bfloat16)
    out = jax.eval_shape(mosaic_prompt_attention, q, kv, kv)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
