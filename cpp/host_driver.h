// The Driver of the CPU backend. Cache buffers there are ordinary XLA-owned
// host buffers that the operating system commits page by page when they are
// first written, so "mapping" needs no call: creating a page only counts it
// against the budget, and a discarded range goes back to the OS with
// madvise(MADV_DONTNEED).
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "driver.h"

namespace vattention {

std::unique_ptr<Driver> make_host_driver();

// For each OS page of [address, address + bytes): whether it is resident in
// memory (mincore). Throws DriverError if the range is not mapped.
std::vector<bool> resident_pages(DevicePtr address, std::size_t bytes);

// Returns the whole OS pages inside [address, address + bytes) to the OS
// (madvise(MADV_DONTNEED)); partial pages at the ends are left alone.
void discard_pages(DevicePtr address, std::size_t bytes);

// Zeros the host range: its whole OS pages are discarded (they read as zeros
// and hold no memory until touched), the partial OS pages at its edges, which
// other memory shares, are written with zeros.
void clear_pages(DevicePtr address, std::size_t bytes);

// The operating system's page size.
std::size_t os_page_bytes();

}  // namespace vattention
