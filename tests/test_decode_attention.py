"""Tests of the split-K decode attention kernel against the float32 reference.

On CPU the kernel runs in the Pallas interpreter with small shapes. Tests marked ``gpu`` compile it
with Triton; the partly mapped cache test runs in a child process of its own, because a read of an
unmapped page would kill the CUDA context of the process that made it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vattention.attention.kernels import decode_attention
from jax_vattention.attention.kernels.reference import decode_attention_reference

ON_GPU = jax.devices()[0].platform == "gpu"
gpu = pytest.mark.gpu
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")

TOLERANCE = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 2e-2}


def random_inputs(seed, *, batch, q_heads, kv_heads, head_dim, max_len, dtype, max_batch=None, layers=None):
    """Fresh random q [batch, q_heads, head_dim] and caches [max_batch, max_len, (layers,) kv_heads,
    head_dim]."""
    rng = np.random.default_rng(seed)
    cache_shape = (max_batch or batch, max_len, *((layers,) if layers else ()), kv_heads, head_dim)
    q = jnp.asarray(rng.standard_normal((batch, q_heads, head_dim)), dtype)
    k_cache = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    return q, k_cache, v_cache


def assert_matches_reference(out, q, k_cache, v_cache, lengths, **kwargs):
    expected = decode_attention_reference(q, k_cache, v_cache, lengths, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(expected),
        atol=TOLERANCE[q.dtype.type],
        rtol=TOLERANCE[q.dtype.type],
    )


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_groups_and_head_dims(group, head_dim):
    q, k_cache, v_cache = random_inputs(
        group * head_dim,
        batch=2,
        q_heads=2 * group,
        kv_heads=2,
        head_dim=head_dim,
        max_len=48,
        dtype=jnp.bfloat16,
    )
    lengths = jnp.array([48, 19], jnp.int32)
    out = decode_attention(q, k_cache, v_cache, lengths, block_k=16, num_splits=2)
    assert_matches_reference(out, q, k_cache, v_cache, lengths)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_ragged_lengths_and_inactive_slots(dtype, num_splits):
    """Lengths that are not multiples of block_k, the full cache, one token, and 0 (zeros out)."""
    q, k_cache, v_cache = random_inputs(
        7, batch=5, q_heads=4, kv_heads=2, head_dim=64, max_len=72, dtype=dtype, max_batch=6
    )
    lengths = jnp.array([72, 37, 0, 1, 16], jnp.int32)
    out = decode_attention(q, k_cache, v_cache, lengths, block_k=16, num_splits=num_splits)
    assert_matches_reference(out, q, k_cache, v_cache, lengths)
    np.testing.assert_array_equal(np.asarray(out[2], np.float32), 0.0)


def test_default_tiling_and_scale():
    q, k_cache, v_cache = random_inputs(
        3, batch=2, q_heads=8, kv_heads=2, head_dim=64, max_len=200, dtype=jnp.float32
    )
    lengths = jnp.array([200, 129], jnp.int32)
    out = decode_attention(q, k_cache, v_cache, lengths, scale=0.3)
    assert_matches_reference(out, q, k_cache, v_cache, lengths, scale=0.3)


@pytest.mark.parametrize("layer", [0, 2])
def test_one_layer_of_interleaved_cache(layer):
    q, k_cache, v_cache = random_inputs(
        11, batch=2, q_heads=4, kv_heads=2, head_dim=64, max_len=40, dtype=jnp.float32, layers=3
    )
    lengths = jnp.array([40, 23], jnp.int32)
    out = decode_attention(q, k_cache, v_cache, lengths, layer=layer, block_k=16, num_splits=2)
    assert_matches_reference(out, q, k_cache, v_cache, lengths, layer=layer)


def test_reads_the_cache_in_place():
    """The caches go straight into the kernel: no transpose, copy or slice of them comes first."""
    q, k_cache, v_cache = random_inputs(
        0, batch=2, q_heads=8, kv_heads=2, head_dim=64, max_len=64, dtype=jnp.float32
    )
    lengths = jnp.array([64, 5], jnp.int32)
    (call,) = jax.make_jaxpr(decode_attention)(q, k_cache, v_cache, lengths).eqns
    body = call.params["jaxpr"].jaxpr
    (kernel,) = [eqn for eqn in body.eqns if eqn.primitive.name == "pallas_call"]
    assert body.invars[1] in kernel.invars and body.invars[2] in kernel.invars
    cache_users = [eqn for eqn in body.eqns if {*body.invars[1:3]} & {*eqn.invars}]
    assert cache_users == [kernel]


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda q, k, v, n: (q[0], k, v, n), "q must be"),
        (lambda q, k, v, n: (q, k[0], v[0], n), "k_cache must be"),
        (lambda q, k, v, n: (q, k, v[:, :32], n), "shapes differ"),
        (lambda q, k, v, n: (q[:, :3], k, v, n), "multiple of kv_heads"),
        (lambda q, k, v, n: (q, k.astype(jnp.float16), v, n), "dtypes differ"),
        (lambda q, k, v, n: (q[..., :48], k[..., :48], v[..., :48], n), "power of two"),
        (lambda q, k, v, n: (q, k, v, n.astype(jnp.int16)), "lengths must be int32"),
        (lambda q, k, v, n: (q, k, v, n[:1]), "lengths must be int32"),
        (lambda q, k, v, n: (q, k[:1], v[:1], n), "exceeds the cache's max_batch"),
    ],
)
def test_bad_input_raises_value_error(make_args, message):
    q, k_cache, v_cache = random_inputs(
        0, batch=2, q_heads=4, kv_heads=2, head_dim=64, max_len=64, dtype=jnp.float32
    )
    lengths = jnp.array([3, 4], jnp.int32)
    with pytest.raises(ValueError, match=message):
        decode_attention(*make_args(q, k_cache, v_cache, lengths))


def test_bad_layer_and_block_k_raise_value_error():
    q, k_cache, v_cache = random_inputs(
        0, batch=1, q_heads=2, kv_heads=2, head_dim=64, max_len=32, dtype=jnp.float32, layers=2
    )
    lengths = jnp.array([3], jnp.int32)
    with pytest.raises(ValueError, match="needs `layer`"):
        decode_attention(q, k_cache, v_cache, lengths)
    with pytest.raises(ValueError, match="out of range"):
        decode_attention(q, k_cache, v_cache, lengths, layer=2)
    with pytest.raises(ValueError, match="block_k"):
        decode_attention(q, k_cache, v_cache, lengths, layer=0, block_k=24)


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gpu_matches_reference(group, head_dim, dtype):
    q, k_cache, v_cache = random_inputs(
        group + head_dim, batch=4, q_heads=4 * group, kv_heads=4, head_dim=head_dim, max_len=1500, dtype=dtype
    )
    lengths = jnp.array([1500, 777, 0, 129], jnp.int32)
    out = decode_attention(q, k_cache, v_cache, lengths)
    assert_matches_reference(out, q, k_cache, v_cache, lengths)


@gpu
@requires_gpu
def test_gpu_one_layer_of_interleaved_cache():
    q, k_cache, v_cache = random_inputs(
        5, batch=3, q_heads=32, kv_heads=8, head_dim=128, max_len=600, dtype=jnp.bfloat16, layers=4
    )
    lengths = jnp.array([600, 333, 0], jnp.int32)
    out = decode_attention(q, k_cache, v_cache, lengths, layer=3)
    assert_matches_reference(out, q, k_cache, v_cache, lengths, layer=3)


@gpu
@requires_gpu
def test_gpu_partly_mapped_cache_reads_only_mapped_pages():
    """The kernel over a reserved range with pages mapped only up to each slot's length."""
    pytest.importorskip("cupy")
    pytest.importorskip("cuda.bindings.driver")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "PARTLY MAPPED OK" in child.stdout, child.stdout + child.stderr


def _partly_mapped_child():
    """Reserves K and V ranges, maps pages only up to each length, runs the kernel on DLPack views.

    Slot lengths [1024, 2500, 0] over 1024-token (2 MiB) pages: slot 0 ends exactly on a page
    boundary, slot 2 has no page at all. Tokens past a length inside a mapped page hold NaN, so a
    kernel that used them would be caught too.
    """
    import cupy
    from cuda.bindings import driver as cu

    def check(result):
        error, *values = result
        if error != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {error}")
        return values[0] if len(values) == 1 else values

    batch, max_len, kv_heads, head_dim, group = 3, 4096, 8, 128, 4
    lengths = np.array([1024, 2500, 0], np.int32)
    jax.devices()
    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(0))
    check(cu.cuCtxSetCurrent(check(cu.cuDevicePrimaryCtxRetain(device))))
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    page_bytes = check(
        cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        )
    )
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

    token_bytes = kv_heads * head_dim * 2
    slot_bytes = max_len * token_bytes
    tokens_per_page = page_bytes // token_bytes
    rng = np.random.default_rng(0)
    host_caches, device_caches = [], []
    for _ in range(2):
        host = np.full((batch, max_len, kv_heads, head_dim), np.nan, np.float16)
        base = int(check(cu.cuMemAddressReserve(batch * slot_bytes, 0, 0, 0)))
        for slot, length in enumerate(lengths):
            host[slot, :length] = rng.standard_normal((length, kv_heads, head_dim))
            for page in range(-(-int(length) // tokens_per_page)):
                address = base + slot * slot_bytes + page * page_bytes
                handle = check(cu.cuMemCreate(page_bytes, prop, 0))
                check(cu.cuMemMap(address, page_bytes, 0, handle, 0))
                check(cu.cuMemSetAccess(address, page_bytes, [access], 1))
                page_data = host[slot].reshape(-1)[page * page_bytes // 2 : (page + 1) * page_bytes // 2]
                check(cu.cuMemcpyHtoD(address, page_data.ctypes.data, page_bytes))
        memory = cupy.cuda.UnownedMemory(base, batch * slot_bytes, owner=None, device_id=0)
        view = cupy.ndarray(host.shape, cupy.float16, cupy.cuda.MemoryPointer(memory, 0))
        device_cache = jax.dlpack.from_dlpack(view)
        assert device_cache.unsafe_buffer_pointer() == base, "the DLPack view is a copy"
        host_caches.append(np.nan_to_num(host, nan=0.0))
        device_caches.append(device_cache)

    q = jnp.asarray(rng.standard_normal((batch, group * kv_heads, head_dim)), jnp.float16)
    lengths = jnp.asarray(lengths)
    out = decode_attention(q, *device_caches, lengths).block_until_ready()
    expected = decode_attention_reference(q, *map(jnp.asarray, host_caches), lengths)
    error = float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected)))
    assert error < TOLERANCE[jnp.float16], error
    print(f"PARTLY MAPPED OK max_abs_error={error:.2e}")


if __name__ == "__main__":
    _partly_mapped_child()
