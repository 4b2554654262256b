// A Driver for tests: it keeps an exact table of what is mapped where, rejects
// misuse (mapping twice, unmapping what is not mapped, leaking handles) as the
// real driver would, counts every call, and fails chosen calls on demand.
// On its own reservations it also keeps the bytes of every page that tests
// write (write/read) or that copy() fills, so that tests can check contents.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "driver.h"

namespace vattention {

class FakeDriver final : public Driver {
 public:
  // `granularity` is the page size it reports; `memory_bytes` the free memory. With `host_pages`,
  // mappings into buffers it did not reserve (the CPU backend's, adopted by the manager: real host
  // memory) behave like physical pages: mapping a handle copies into the address the bytes of its
  // other mapping, or what it held when last unmapped, so every address of a shared page shows the
  // same tokens (the manager never writes a shared page). Off, memory is never touched. With
  // `poison_unmapped` too, an unmapped address is filled with 0xff bytes (NaN in every float
  // dtype): a kernel that reads an unmapped page shows it, as a GPU would fault.
  FakeDriver(std::size_t granularity, std::size_t memory_bytes, bool host_pages = false, bool poison_unmapped = false);

  std::string name() const override { return "fake"; }
  // Pages may be shared where that is honest: on its own reservations (addresses with nothing
  // behind them: bookkeeping only) or with host_pages. On buffers adopted from the CPU backend
  // without host_pages, a page mapped at a second address would not show the first one's bytes.
  bool can_alias() const override;
  std::size_t granularity() const override { return granularity_; }
  MemoryInfo memory_info() override;

  DevicePtr reserve(std::size_t bytes, std::size_t alignment) override;
  void free_reservation(DevicePtr base, std::size_t bytes) override;
  PhysicalHandle create(std::size_t bytes) override;
  void release(PhysicalHandle handle) override;
  void map(DevicePtr address, std::size_t bytes, PhysicalHandle handle) override;
  void set_access(DevicePtr address, std::size_t bytes) override;
  void unmap(DevicePtr address, std::size_t bytes) override;
  // Copies between mapped, accessible ranges (a fault otherwise: DriverError): the bytes of host
  // memory with host_pages, else the bytes the driver keeps for each page.
  void copy(DevicePtr destination, DevicePtr source, std::size_t bytes) override;
  void synchronize(void* stream) override;
  // What a kernel would write or read at `address` (mapped and accessible, else DriverError): on
  // the driver's own reservations, bytes it keeps for each physical page (zeros until written), so
  // that every address a page is mapped at shows the same bytes. No call is counted.
  void write(DevicePtr address, const std::vector<unsigned char>& data);
  std::vector<unsigned char> read(DevicePtr address, std::size_t bytes) const;

  // Makes the `nth` next call of `operation` ("reserve", "free_reservation",
  // "create", "map", "set_access", "unmap", "release", "copy", "synchronize",
  // "discard") throw DriverError. With `after_a_failure`, calls count only
  // once another injected failure was thrown: the nth call of the undo, say.
  void fail_on(const std::string& operation, int nth, bool after_a_failure = false);
  int calls(const std::string& operation) const;
  // How many injected failures were thrown so far.
  int failures_thrown() const;
  std::size_t mapped_bytes() const;
  std::size_t live_handles() const;
  std::size_t live_reservations() const;
  struct MappingEntry {
    DevicePtr address;
    std::size_t bytes;
    PhysicalHandle handle;
    bool accessible;
  };
  // The whole table, in address order: what tests compare with the manager's view.
  std::vector<MappingEntry> mappings() const;
  std::vector<PhysicalHandle> handles() const;
  std::vector<DevicePtr> reservations() const;
  // Ranges passed to discard(), in call order.
  std::vector<std::pair<DevicePtr, std::size_t>> discarded() const;
  void discard(DevicePtr address, std::size_t bytes) override;
  // True if every byte of [address, address + bytes) is mapped and accessible.
  bool is_accessible(DevicePtr address, std::size_t bytes) const;

 private:
  struct Mapping {
    std::size_t bytes;
    PhysicalHandle handle;
    bool accessible;
  };

  // Counts the call and throws if a failure was injected for it.
  void record(const std::string& operation);
  // The pieces of [address, address + bytes) in the mappings that cover it: (handle, offset in the
  // page, bytes). Throws DriverError naming `call` if a byte is not mapped and accessible.
  struct Piece {
    PhysicalHandle handle;
    std::size_t offset;
    std::size_t bytes;
  };
  std::vector<Piece> pieces(const std::string& call, DevicePtr address, std::size_t bytes) const;
  bool in_host_memory() const { return host_pages_ && reservations_.empty(); }
  // The bytes kept for the pieces, in order (zeros where nothing was written); and the other way.
  std::vector<unsigned char> load(const std::vector<Piece>& from) const;
  void store(const std::vector<Piece>& to, const std::vector<unsigned char>& data);
  const std::pair<const DevicePtr, Mapping>* mapping_at(DevicePtr address) const;

  mutable std::mutex mutex_;
  std::size_t granularity_;
  std::size_t memory_bytes_;
  DevicePtr next_address_ = 1ull << 40;
  PhysicalHandle next_handle_ = 1;
  std::map<std::string, int> calls_;
  struct Failure {
    std::string operation;
    int countdown;
    int after_thrown;  // counts down once more than this many failures were thrown; -1: at once
  };
  std::vector<Failure> failures_;
  int failures_thrown_ = 0;
  std::map<DevicePtr, std::size_t> reservations_;
  std::map<PhysicalHandle, std::size_t> handles_;
  std::map<DevicePtr, Mapping> mappings_;
  std::vector<std::pair<DevicePtr, std::size_t>> discarded_;
  bool host_pages_ = false;
  bool poison_unmapped_ = false;
  std::map<PhysicalHandle, std::vector<unsigned char>> contents_;  // host_pages: bytes of unmapped handles
  std::map<PhysicalHandle, std::vector<unsigned char>> page_bytes_;  // own reservations: bytes written
};

}  // namespace vattention
