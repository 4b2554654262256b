// Full pages kept for reuse by content: the prefix cache's index.
//
// An entry is one page index of a slot in every buffer (the K and V of every
// layer), registered under a 64-bit key that Python derives from all the
// tokens up to the end of that page (a hash chain), so equal keys mean equal
// contents at the same position. The entry holds the physical pages: they
// outlive every mapping of them, and go back to the pool only when evicted.
// Not thread-safe: the PageManager's lock guards it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <unordered_map>
#include <vector>

#include "driver.h"

namespace vattention {

using PrefixKey = std::uint64_t;

class PrefixCache {
 public:
  struct Entry {
    std::size_t page = 0;                  // the page index it holds, in every slot that maps it
    std::vector<PhysicalHandle> handles;   // one per buffer
    std::uint64_t last_used = 0;           // a tick of the cache's clock
  };

  const Entry* find(PrefixKey key) const;
  // The key whose entry holds `handle`, if any.
  std::optional<PrefixKey> key_of(PhysicalHandle handle) const;
  bool holds(PhysicalHandle handle) const { return owners_.count(handle) != 0; }
  // Registers `handles` (not held by any entry) as page `page` under a new key.
  void insert(PrefixKey key, std::size_t page, const std::vector<PhysicalHandle>& handles);
  // Puts back an entry taken by erase(), as it was.
  void restore(PrefixKey key, const Entry& entry);
  Entry erase(PrefixKey key);
  // Marks the entries as used now: they are evicted last.
  void touch(const std::vector<PrefixKey>& keys);
  // Every key, in eviction order: least recently used first, and among entries used together (one
  // prefix) the deepest page first, so that what stays is still a prefix that alloc can match.
  std::vector<PrefixKey> eviction_order() const;
  const std::unordered_map<PrefixKey, Entry>& entries() const { return entries_; }
  std::size_t size() const { return entries_.size(); }
  // One more than the deepest page index an entry holds (0 if none): no slot maps a cached page above.
  std::size_t depth() const { return depths_.empty() ? 0 : depths_.rbegin()->first + 1; }
  void clear();

 private:
  std::unordered_map<PrefixKey, Entry> entries_;
  std::unordered_map<PhysicalHandle, PrefixKey> owners_;
  std::map<std::size_t, std::size_t> depths_;  // entries by page index
  std::uint64_t clock_ = 0;
};

}  // namespace vattention
