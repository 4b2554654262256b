"""The CUDA driver's virtual-memory calls made directly, as the baseline of the allocation benchmark."""

from __future__ import annotations

import time

try:
    from cuda.bindings import driver as cuda
except ImportError as error:
    raise ImportError("the raw-driver baseline needs cuda-python: pip install 'jax_vattention[gpu]' "
                      "(or pip install cuda-python)") from error


def _check(result):
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cuda.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {error}")
    return values[0] if len(values) == 1 else values


def map_unmap_seconds(ordinal: int, pages: int, page_bytes: int) -> tuple[float, float]:
    """Creates and maps ``pages`` pages into one reservation with one set-access, then undoes it.

    Returns (seconds to create + map + set access, seconds to unmap + release).
    """
    _check(cuda.cuInit(0))
    device = _check(cuda.cuDeviceGet(ordinal))
    context = _check(cuda.cuDevicePrimaryCtxRetain(device))
    _check(cuda.cuCtxPushCurrent(context))
    try:
        prop = cuda.CUmemAllocationProp()
        prop.type = cuda.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cuda.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        access = cuda.CUmemAccessDesc()
        access.location.type = cuda.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = ordinal
        access.flags = cuda.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        base = _check(cuda.cuMemAddressReserve(pages * page_bytes, page_bytes, 0, 0))
        start = time.perf_counter()
        handles = [_check(cuda.cuMemCreate(page_bytes, prop, 0)) for _ in range(pages)]
        for index, handle in enumerate(handles):
            _check(cuda.cuMemMap(int(base) + index * page_bytes, page_bytes, 0, handle, 0))
        _check(cuda.cuMemSetAccess(base, pages * page_bytes, [access], 1))
        mapped = time.perf_counter() - start
        start = time.perf_counter()
        for index, handle in enumerate(handles):
            _check(cuda.cuMemUnmap(int(base) + index * page_bytes, page_bytes))
            _check(cuda.cuMemRelease(handle))
        unmapped = time.perf_counter() - start
        _check(cuda.cuMemAddressFree(base, pages * page_bytes))
        return mapped, unmapped
    finally:
        _check(cuda.cuCtxPopCurrent())
        _check(cuda.cuDevicePrimaryCtxRelease(device))
