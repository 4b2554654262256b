// Pages that several slots map read-only at the same page index: the prefix cache's index.
//
// An entry is one page index of a slot in every buffer (the K and V of every layer). There are two
// kinds:
// * a cached page, registered under a 64-bit key that Python derives from all the tokens up to
//   the end of that page (a hash chain), so equal keys mean equal contents at the same position.
//   The cache holds its physical pages: they outlive every mapping of them, and go back to the pool
//   only when evicted.
// * a forked page: a full page of a slot that fork() mapped in a second slot. It has no key (no
//   request can ask for it by content), and goes back to the pool once no slot maps it; publish()
//   may give it a key, which makes it a cached page.
// Entries are named by an id of their own, so that a forked page needs no key.
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
using EntryId = std::uint64_t;

class PrefixCache {
 public:
  struct Entry {
    std::optional<PrefixKey> key;          // none for a forked page
    std::size_t page = 0;                  // the page index it holds, in every slot that maps it
    std::vector<PhysicalHandle> handles;   // one per buffer
    std::uint64_t last_used = 0;           // a tick of the cache's clock
  };

  // The cached page registered under `key`, if any.
  const Entry* find(PrefixKey key) const;
  const Entry& at(EntryId id) const { return entries_.at(id); }
  // The entry that holds `handle`, if any.
  std::optional<EntryId> entry_of(PhysicalHandle handle) const;
  bool holds(PhysicalHandle handle) const { return owners_.count(handle) != 0; }
  // Registers `handles` (not held by any entry) as page `page`, under `key` (a cached page) or
  // without one (a forked page); returns the new entry's id.
  EntryId insert(std::optional<PrefixKey> key, std::size_t page, const std::vector<PhysicalHandle>& handles);
  // Puts back an entry taken by erase(), as it was.
  void restore(EntryId id, const Entry& entry);
  Entry erase(EntryId id);
  // Gives the forked page `id` the key `key` (which no entry holds): it becomes a cached page.
  void name(EntryId id, PrefixKey key);
  // Marks the cached pages of `keys` as used now: they are evicted last.
  void touch(const std::vector<PrefixKey>& keys);
  // Every entry, in eviction order: least recently used first, and among entries used together (one
  // prefix) the deepest page first, so that what stays is still a prefix that alloc can match.
  std::vector<EntryId> eviction_order() const;
  const std::unordered_map<EntryId, Entry>& entries() const { return entries_; }
  std::size_t size() const { return entries_.size(); }
  // Entries without a key.
  std::size_t forked() const { return entries_.size() - keys_.size(); }
  // One more than the deepest page index an entry holds (0 if none): no slot maps an entry above.
  std::size_t depth() const { return depths_.empty() ? 0 : depths_.rbegin()->first + 1; }
  void clear();

 private:
  std::unordered_map<EntryId, Entry> entries_;
  std::unordered_map<PrefixKey, EntryId> keys_;
  std::unordered_map<PhysicalHandle, EntryId> owners_;
  std::map<std::size_t, std::size_t> depths_;  // entries by page index
  std::uint64_t clock_ = 0;
  EntryId next_id_ = 1;
};

}  // namespace vattention
