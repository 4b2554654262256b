#include "host_driver.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

namespace vattention {
namespace {

// Pages of the CPU backend default to 64 KiB: big enough to keep the
// bookkeeping small, small enough that the waste of a tiny slot stays small.
constexpr std::size_t kHostGranularity = 64 * 1024;

std::string errno_message(const char* call) {
  return std::string(call) + " failed: " + std::strerror(errno);
}

class HostDriver final : public Driver {
 public:
  std::string name() const override { return "host"; }
  std::size_t granularity() const override { return kHostGranularity; }

  MemoryInfo memory_info() override {
    const long page = sysconf(_SC_PAGESIZE);
    const long available = sysconf(_SC_AVPHYS_PAGES);
    const long total = sysconf(_SC_PHYS_PAGES);
    if (page <= 0 || available < 0 || total <= 0) throw DriverError(errno_message("sysconf"));
    return MemoryInfo{static_cast<std::size_t>(available) * page,
                      static_cast<std::size_t>(total) * page};
  }

  DevicePtr reserve(std::size_t, std::size_t) override {
    throw DriverError(
        "reserve: on the CPU backend cache buffers are allocated by XLA, not reserved");
  }
  void free_reservation(DevicePtr, std::size_t) override {}

  PhysicalHandle create(std::size_t) override { return ++last_handle_; }
  void release(PhysicalHandle) override {}
  void map(DevicePtr, std::size_t, PhysicalHandle) override {}
  void set_access(DevicePtr, std::size_t) override {}

  void unmap(DevicePtr, std::size_t) override {}
  void copy(DevicePtr destination, DevicePtr source, std::size_t bytes) override {
    std::memcpy(reinterpret_cast<void*>(destination), reinterpret_cast<const void*>(source), bytes);
  }
  bool can_alias() const override { return false; }
  void discard(DevicePtr address, std::size_t bytes) override { discard_pages(address, bytes); }

  // XLA's CPU client runs a handler inline, in program order, so there is
  // nothing in flight to wait for there.
  void synchronize(void*) override {}

 private:
  PhysicalHandle last_handle_ = 0;
};

}  // namespace

std::unique_ptr<Driver> make_host_driver() { return std::make_unique<HostDriver>(); }

void discard_pages(DevicePtr address, std::size_t bytes) {
  const std::size_t page = os_page_bytes();
  const DevicePtr begin = (address + page - 1) / page * page;
  const DevicePtr end = (address + bytes) / page * page;
  if (end <= begin) return;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED) != 0) {
    throw DriverError(errno_message("madvise(MADV_DONTNEED)"));
  }
}

void clear_pages(DevicePtr address, std::size_t bytes) {
  const std::size_t page = os_page_bytes();
  const DevicePtr begin = std::min((address + page - 1) / page * page, address + bytes);
  const DevicePtr end = std::max((address + bytes) / page * page, begin);
  std::memset(reinterpret_cast<void*>(address), 0, begin - address);
  std::memset(reinterpret_cast<void*>(end), 0, address + bytes - end);
  discard_pages(address, bytes);
}

std::size_t os_page_bytes() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }

std::vector<bool> resident_pages(DevicePtr address, std::size_t bytes) {
  const std::size_t page = os_page_bytes();
  const DevicePtr begin = address / page * page;
  const DevicePtr end = (address + bytes + page - 1) / page * page;
  std::vector<unsigned char> flags((end - begin) / page);
  if (!flags.empty() &&
      mincore(reinterpret_cast<void*>(begin), end - begin, flags.data()) != 0) {
    throw DriverError(errno_message("mincore"));
  }
  std::vector<bool> resident(flags.size());
  for (std::size_t i = 0; i < flags.size(); ++i) resident[i] = (flags[i] & 1) != 0;
  return resident;
}

}  // namespace vattention
