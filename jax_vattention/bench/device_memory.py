"""What each device holds after a benchmark run: the cache's pages and the device's memory in use."""

from __future__ import annotations

import jax

GiB = 1 << 30


def device_lines(manager, devices: list[jax.Device]) -> list[str]:
    """One line per device: the cache's mapped memory and peak, and the device memory in use (XLA's
    allocator, from ``memory_stats`` where the backend has it; and the driver's whole-card view on a GPU,
    which counts the cache's pages too: they are mapped outside XLA)."""
    lines = []
    for device, device_stats in zip(devices, (shard.stats() for shard in manager.shards)):
        line = (f"device {device.id} ({device.device_kind}): cache mapped "
                f"{device_stats['mapped_bytes'] / 2**20:,.1f} MiB in {device_stats['mapped_pages']} pages")
        memory = device.memory_stats() if hasattr(device, "memory_stats") else None
        if memory and "bytes_in_use" in memory:
            line += (f"; XLA in use {memory['bytes_in_use'] / GiB:.2f} GiB, peak "
                     f"{memory.get('peak_bytes_in_use', 0) / GiB:.2f} GiB")
        if device.platform == "gpu":
            from jax_vattention.cache.manager import default_driver
            free, total = default_driver(device).memory_info()
            line += f"; card in use {(total - free) / GiB:.2f} of {total / GiB:.2f} GiB"
        lines.append(line)
    return lines
