// The few virtual-memory operations the page manager needs from a device
// driver, behind an interface so that the manager can run on the CUDA driver,
// on host memory (the CPU backend) or on a fake that counts calls and injects
// failures in tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace vattention {

using DevicePtr = std::uint64_t;
using PhysicalHandle = std::uint64_t;

// A driver call failed. The message names the call and carries the driver's
// own description of the error.
class DriverError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct MemoryInfo {
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
};

class Driver {
 public:
  virtual ~Driver() = default;

  // "cuda", "host" or "fake".
  virtual std::string name() const = 0;
  // The smallest page the driver maps; page sizes are multiples of it.
  virtual std::size_t granularity() const = 0;
  virtual MemoryInfo memory_info() = 0;

  // Reserves `bytes` of virtual address space aligned to `alignment`.
  virtual DevicePtr reserve(std::size_t bytes, std::size_t alignment) = 0;
  virtual void free_reservation(DevicePtr base, std::size_t bytes) = 0;

  // Creates / releases one physical page of `bytes`.
  virtual PhysicalHandle create(std::size_t bytes) = 0;
  virtual void release(PhysicalHandle handle) = 0;

  // Maps one physical page at `address`; the range is usable only after
  // set_access, which may cover many adjacent pages at once (it dominates the
  // cost, so the manager batches it).
  virtual void map(DevicePtr address, std::size_t bytes, PhysicalHandle handle) = 0;
  virtual void set_access(DevicePtr address, std::size_t bytes) = 0;
  virtual void unmap(DevicePtr address, std::size_t bytes) = 0;
  // Copies `bytes` from `source` to `destination`, both mapped and accessible, and returns once the
  // copy is complete. A fork copies the partly filled last page of a sequence this way.
  virtual void copy(DevicePtr destination, DevicePtr source, std::size_t bytes) = 0;
  // Called once for a contiguous range whose pages were all just unmapped:
  // the host driver returns the memory to the OS here, in one piece, so that
  // OS pages straddling two of our pages go back too. Nothing to do elsewhere.
  virtual void discard(DevicePtr, std::size_t) {}

  // Whether one physical page can be mapped at several addresses at once, so that a page of the
  // prefix cache appears in several slots. The host driver cannot: its "pages" are XLA's memory,
  // which starts 64 bytes past an OS page (AlignedMalloc's header), so no page of a cache starts on
  // an OS page, the unit in which the OS maps memory.
  virtual bool can_alias() const { return true; }

  // Waits until device work that may read or write pages about to be unmapped
  // has completed: `stream` when the caller runs inside a compiled program,
  // the whole device when it is null. Unmapping does not wait by itself.
  virtual void synchronize(void* stream) = 0;
};

}  // namespace vattention
