#include "fake_driver.h"

#include <algorithm>
#include <cstring>
#include <sstream>

namespace vattention {
namespace {

std::string hex(DevicePtr address) {
  std::ostringstream out;
  out << "0x" << std::hex << address;
  return out.str();
}

}  // namespace

FakeDriver::FakeDriver(std::size_t granularity, std::size_t memory_bytes, bool host_pages, bool poison_unmapped)
    : granularity_(granularity), memory_bytes_(memory_bytes), host_pages_(host_pages),
      poison_unmapped_(host_pages && poison_unmapped) {
  if (granularity == 0) throw std::invalid_argument("FakeDriver: granularity must be positive");
}

bool FakeDriver::can_alias() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return host_pages_ || !reservations_.empty();
}

MemoryInfo FakeDriver::memory_info() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t used = 0;
  for (const auto& [handle, bytes] : handles_) used += bytes;
  return MemoryInfo{memory_bytes_ > used ? memory_bytes_ - used : 0, memory_bytes_};
}

void FakeDriver::record(const std::string& operation) {
  ++calls_[operation];
  for (auto failure = failures_.begin(); failure != failures_.end(); ++failure) {
    if (failure->operation != operation || failures_thrown_ <= failure->after_thrown) continue;
    if (--failure->countdown > 0) continue;
    failures_.erase(failure);
    ++failures_thrown_;
    throw DriverError("fake " + operation + " failed: injected failure");
  }
}

DevicePtr FakeDriver::reserve(std::size_t bytes, std::size_t alignment) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("reserve");
  const std::size_t align = alignment ? alignment : granularity_;
  const DevicePtr base = (next_address_ + align - 1) / align * align;
  next_address_ = base + bytes + granularity_;  // a gap, as between real reservations
  reservations_[base] = bytes;
  return base;
}

void FakeDriver::free_reservation(DevicePtr base, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("free_reservation");
  auto it = reservations_.find(base);
  if (it == reservations_.end() || it->second != bytes) {
    throw DriverError("fake free_reservation failed: " + hex(base) + " is not a reservation");
  }
  for (const auto& [address, mapping] : mappings_) {
    if (address >= base && address < base + bytes) {
      throw DriverError("fake free_reservation failed: " + hex(address) + " is still mapped");
    }
  }
  reservations_.erase(it);
}

PhysicalHandle FakeDriver::create(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("create");
  if (bytes % granularity_ != 0) throw DriverError("fake create failed: size not a multiple of the granularity");
  std::size_t used = 0;
  for (const auto& [handle, size] : handles_) used += size;
  if (used + bytes > memory_bytes_) throw DriverError("fake create failed: out of memory");
  const PhysicalHandle handle = next_handle_++;
  handles_[handle] = bytes;
  return handle;
}

void FakeDriver::release(PhysicalHandle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("release");
  // The real driver would free the memory only at the last unmap; for the manager it is a bug.
  for (const auto& [address, mapping] : mappings_) {
    if (mapping.handle == handle) throw DriverError("fake release failed: the handle is still mapped at " + hex(address));
  }
  if (handles_.erase(handle) == 0) throw DriverError("fake release failed: unknown handle");
  contents_.erase(handle);
  page_bytes_.erase(handle);
}

const std::pair<const DevicePtr, FakeDriver::Mapping>* FakeDriver::mapping_at(DevicePtr address) const {
  auto it = mappings_.upper_bound(address);
  if (it == mappings_.begin()) return nullptr;
  --it;
  if (address < it->first + it->second.bytes) return &*it;
  return nullptr;
}

void FakeDriver::map(DevicePtr address, std::size_t bytes, PhysicalHandle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("map");
  auto owner = handles_.find(handle);
  if (owner == handles_.end() || owner->second != bytes) {
    throw DriverError("fake map failed: handle does not exist or has another size");
  }
  // Buffers adopted from elsewhere (the CPU backend) are not reservations of
  // this driver; only its own reservations are checked for bounds and alignment.
  if (!reservations_.empty()) {
    bool inside = false;
    for (const auto& [base, size] : reservations_) {
      inside = inside || (address >= base && address + bytes <= base + size);
    }
    if (!inside) throw DriverError("fake map failed: " + hex(address) + " is outside every reservation");
    if (address % granularity_ != 0) throw DriverError("fake map failed: unaligned address " + hex(address));
  }
  for (DevicePtr a = address; a < address + bytes; a += granularity_) {
    if (mapping_at(a) != nullptr) throw DriverError("fake map failed: " + hex(a) + " is already mapped");
  }
  if (host_pages_ && reservations_.empty()) {
    // The handle's bytes: those of another address it is mapped at, or those it kept when unmapped.
    const unsigned char* source = nullptr;
    for (const auto& [other, mapping] : mappings_) {
      if (mapping.handle == handle) source = reinterpret_cast<const unsigned char*>(other);
    }
    auto kept = contents_.find(handle);
    if (source == nullptr && kept != contents_.end()) source = kept->second.data();
    if (source != nullptr) std::memcpy(reinterpret_cast<void*>(address), source, bytes);
  }
  mappings_[address] = Mapping{bytes, handle, false};
}

void FakeDriver::set_access(DevicePtr address, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("set_access");
  for (DevicePtr a = address; a < address + bytes;) {
    auto* mapping = mapping_at(a);
    if (mapping == nullptr) throw DriverError("fake set_access failed: " + hex(a) + " is not mapped");
    mappings_[mapping->first].accessible = true;
    a = mapping->first + mapping->second.bytes;
  }
}

void FakeDriver::unmap(DevicePtr address, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("unmap");
  auto it = mappings_.find(address);
  if (it == mappings_.end() || it->second.bytes != bytes) {
    throw DriverError("fake unmap failed: no mapping of that size at " + hex(address));
  }
  const PhysicalHandle handle = it->second.handle;
  mappings_.erase(it);
  if (host_pages_ && reservations_.empty()) {
    bool elsewhere = false;
    for (const auto& [other, mapping] : mappings_) elsewhere = elsewhere || mapping.handle == handle;
    if (!elsewhere) {
      auto& kept = contents_[handle];
      kept.resize(bytes);
      std::memcpy(kept.data(), reinterpret_cast<const void*>(address), bytes);
    }
    if (poison_unmapped_) std::memset(reinterpret_cast<void*>(address), 0xff, bytes);
  }
}

std::vector<FakeDriver::Piece> FakeDriver::pieces(const std::string& call, DevicePtr address,
                                                  std::size_t bytes) const {
  std::vector<Piece> out;
  for (DevicePtr a = address; a < address + bytes;) {
    auto* mapping = mapping_at(a);
    if (mapping == nullptr || !mapping->second.accessible) {
      throw DriverError("fake " + call + " failed: " + hex(a) + " is not mapped and accessible (a fault)");
    }
    const std::size_t end = std::min<DevicePtr>(address + bytes, mapping->first + mapping->second.bytes);
    out.push_back(Piece{mapping->second.handle, a - mapping->first, end - a});
    a = end;
  }
  return out;
}

std::vector<unsigned char> FakeDriver::load(const std::vector<Piece>& from) const {
  std::vector<unsigned char> data;
  for (const Piece& piece : from) {
    auto kept = page_bytes_.find(piece.handle);
    if (kept == page_bytes_.end()) {
      data.insert(data.end(), piece.bytes, 0);
    } else {
      data.insert(data.end(), kept->second.begin() + piece.offset, kept->second.begin() + piece.offset + piece.bytes);
    }
  }
  return data;
}

void FakeDriver::store(const std::vector<Piece>& to, const std::vector<unsigned char>& data) {
  std::size_t done = 0;
  for (const Piece& piece : to) {
    auto& kept = page_bytes_[piece.handle];
    kept.resize(handles_.at(piece.handle));
    std::copy(data.begin() + done, data.begin() + done + piece.bytes, kept.begin() + piece.offset);
    done += piece.bytes;
  }
}

void FakeDriver::copy(DevicePtr destination, DevicePtr source, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("copy");
  const std::vector<Piece> from = pieces("copy", source, bytes);
  const std::vector<Piece> to = pieces("copy", destination, bytes);
  auto kept = [this](const Piece& piece) { return page_bytes_.count(piece.handle) != 0; };
  if (in_host_memory()) {
    std::memmove(reinterpret_cast<void*>(destination), reinterpret_cast<const void*>(source), bytes);
  } else if (std::any_of(from.begin(), from.end(), kept) || std::any_of(to.begin(), to.end(), kept)) {
    store(to, load(from));  // else zeros onto zeros: nothing to keep
  }
}

void FakeDriver::write(DevicePtr address, const std::vector<unsigned char>& data) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::vector<Piece> to = pieces("write", address, data.size());
  if (in_host_memory()) {
    std::memcpy(reinterpret_cast<void*>(address), data.data(), data.size());
  } else {
    store(to, data);
  }
}

std::vector<unsigned char> FakeDriver::read(DevicePtr address, std::size_t bytes) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::vector<Piece> from = pieces("read", address, bytes);
  if (!in_host_memory()) return load(from);
  const auto* begin = reinterpret_cast<const unsigned char*>(address);
  return std::vector<unsigned char>(begin, begin + bytes);
}

void FakeDriver::synchronize(void*) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("synchronize");
}

void FakeDriver::discard(DevicePtr address, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  record("discard");
  discarded_.emplace_back(address, bytes);
}

std::vector<FakeDriver::MappingEntry> FakeDriver::mappings() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<MappingEntry> table;
  for (const auto& [address, mapping] : mappings_) {
    table.push_back(MappingEntry{address, mapping.bytes, mapping.handle, mapping.accessible});
  }
  return table;
}

std::vector<PhysicalHandle> FakeDriver::handles() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<PhysicalHandle> handles;
  for (const auto& [handle, bytes] : handles_) handles.push_back(handle);
  return handles;
}

std::vector<DevicePtr> FakeDriver::reservations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<DevicePtr> bases;
  for (const auto& [base, bytes] : reservations_) bases.push_back(base);
  return bases;
}

std::vector<std::pair<DevicePtr, std::size_t>> FakeDriver::discarded() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return discarded_;
}

void FakeDriver::fail_on(const std::string& operation, int nth, bool after_a_failure) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (nth < 1) throw std::invalid_argument("fail_on: nth must be at least 1");
  failures_.push_back(Failure{operation, nth, after_a_failure ? failures_thrown_ : -1});
}

int FakeDriver::calls(const std::string& operation) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = calls_.find(operation);
  return it == calls_.end() ? 0 : it->second;
}

int FakeDriver::failures_thrown() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failures_thrown_;
}

std::size_t FakeDriver::mapped_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t total = 0;
  for (const auto& [address, mapping] : mappings_) total += mapping.bytes;
  return total;
}

std::size_t FakeDriver::live_handles() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return handles_.size();
}

std::size_t FakeDriver::live_reservations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reservations_.size();
}

bool FakeDriver::is_accessible(DevicePtr address, std::size_t bytes) const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (DevicePtr a = address; a < address + bytes;) {
    auto* mapping = mapping_at(a);
    if (mapping == nullptr || !mapping->second.accessible) return false;
    a = mapping->first + mapping->second.bytes;
  }
  return true;
}

}  // namespace vattention
