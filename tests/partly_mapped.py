"""KV caches over reserved virtual memory whose pages are mapped only up to each slot's length.

For GPU tests of kernels that read a vAttention cache in place: a read of an unmapped page kills the
CUDA context, so such a test runs in a child process of its own. Tokens past a length that share a
mapped page hold NaN, so a kernel that used them is caught too. Needs ``cupy`` and ``cuda.bindings``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass
class MappedCache:
    """One cache buffer: the device view (a ``jax.Array`` over the reservation, no copy), what was
    written (NaN past the lengths, zeros past the mapped pages) and the driver handles kept alive."""

    device: jax.Array
    host: np.ndarray
    handles: list


def _check(result):
    from cuda.bindings import driver as cu

    error, *values = result
    if error != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {error}")
    return values[0] if len(values) == 1 else values


def partly_mapped_cache(shape: tuple[int, ...], lengths, dtype, seed: int) -> MappedCache:
    """A cache ``shape`` = ``[max_batch, max_len, ...]`` of ``dtype`` whose slot ``b`` has pages mapped
    for its first ``lengths[b]`` tokens only (whole pages: a slot must be whole pages).

    Random values below each length, NaN from the length to the end of its last mapped page.
    """
    import cupy
    from cuda.bindings import driver as cu

    jax.devices()
    _check(cu.cuInit(0))
    device = _check(cu.cuDeviceGet(0))
    _check(cu.cuCtxSetCurrent(_check(cu.cuDevicePrimaryCtxRetain(device))))
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    page_bytes = _check(cu.cuMemGetAllocationGranularity(
        prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

    dtype = np.dtype(dtype)
    batch, max_len = shape[:2]
    token_bytes = int(np.prod(shape[2:])) * dtype.itemsize
    slot_bytes = max_len * token_bytes
    if slot_bytes % page_bytes:
        raise ValueError(f"a slot of {slot_bytes} bytes is not whole {page_bytes}-byte pages")
    rng = np.random.default_rng(seed)
    host = np.zeros(shape, dtype)
    base = int(_check(cu.cuMemAddressReserve(batch * slot_bytes, 0, 0, 0)))
    handles = []
    for slot, length in enumerate(int(n) for n in lengths):
        pages = -(-length * token_bytes // page_bytes)
        row = host[slot].reshape(-1)
        row[: pages * page_bytes // dtype.itemsize] = np.nan
        host[slot, :length] = rng.standard_normal((length, *shape[2:]))
        for page in range(pages):
            address = base + slot * slot_bytes + page * page_bytes
            handle = _check(cu.cuMemCreate(page_bytes, prop, 0))
            handles.append(handle)
            _check(cu.cuMemMap(address, page_bytes, 0, handle, 0))
            _check(cu.cuMemSetAccess(address, page_bytes, [access], 1))
            chunk = np.ascontiguousarray(row[page * page_bytes // dtype.itemsize:(page + 1) * page_bytes // dtype.itemsize])
            _check(cu.cuMemcpyHtoD(address, chunk.ctypes.data, page_bytes))
    memory = cupy.cuda.UnownedMemory(base, batch * slot_bytes, owner=None, device_id=0)
    view = cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))
    device_cache = jax.dlpack.from_dlpack(view)
    assert device_cache.unsafe_buffer_pointer() == base, "the DLPack view is a copy"
    return MappedCache(device_cache, host, handles)
