#include "prefix_cache.h"

#include <algorithm>
#include <stdexcept>
#include <tuple>

namespace vattention {

const PrefixCache::Entry* PrefixCache::find(PrefixKey key) const {
  auto it = keys_.find(key);
  return it == keys_.end() ? nullptr : &entries_.at(it->second);
}

std::optional<EntryId> PrefixCache::entry_of(PhysicalHandle handle) const {
  auto it = owners_.find(handle);
  if (it == owners_.end()) return std::nullopt;
  return it->second;
}

EntryId PrefixCache::insert(std::optional<PrefixKey> key, std::size_t page,
                            const std::vector<PhysicalHandle>& handles) {
  const EntryId id = next_id_;
  restore(id, Entry{key, page, handles, ++clock_});
  return id;
}

void PrefixCache::restore(EntryId id, const Entry& entry) {
  if (entries_.count(id) != 0) throw std::logic_error("prefix cache: entry registered twice");
  if (entry.key && keys_.count(*entry.key) != 0) throw std::logic_error("prefix cache: key registered twice");
  for (PhysicalHandle handle : entry.handles) {
    if (owners_.count(handle) != 0) throw std::logic_error("prefix cache: a page registered twice");
  }
  for (PhysicalHandle handle : entry.handles) owners_[handle] = id;
  if (entry.key) keys_[*entry.key] = id;
  entries_[id] = entry;
  ++depths_[entry.page];
  next_id_ = std::max(next_id_, id + 1);
}

PrefixCache::Entry PrefixCache::erase(EntryId id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) throw std::logic_error("prefix cache: erasing an unknown entry");
  Entry entry = std::move(it->second);
  entries_.erase(it);
  for (PhysicalHandle handle : entry.handles) owners_.erase(handle);
  if (entry.key) keys_.erase(*entry.key);
  if (--depths_[entry.page] == 0) depths_.erase(entry.page);
  return entry;
}

void PrefixCache::name(EntryId id, PrefixKey key) {
  Entry& entry = entries_.at(id);
  if (entry.key || keys_.count(key) != 0) throw std::logic_error("prefix cache: naming a named entry, or a key twice");
  entry.key = key;
  keys_[key] = id;
}

void PrefixCache::touch(const std::vector<PrefixKey>& keys) {
  ++clock_;
  for (PrefixKey key : keys) {
    auto it = keys_.find(key);
    if (it != keys_.end()) entries_.at(it->second).last_used = clock_;
  }
}

std::vector<EntryId> PrefixCache::eviction_order() const {
  std::vector<std::tuple<std::uint64_t, std::size_t, EntryId>> order;
  for (const auto& [id, entry] : entries_) order.emplace_back(entry.last_used, SIZE_MAX - entry.page, id);
  std::sort(order.begin(), order.end());
  std::vector<EntryId> ids;
  for (const auto& item : order) ids.push_back(std::get<2>(item));
  return ids;
}

void PrefixCache::clear() {
  entries_.clear();
  keys_.clear();
  owners_.clear();
  depths_.clear();
}

}  // namespace vattention
