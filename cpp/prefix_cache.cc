#include "prefix_cache.h"

#include <algorithm>
#include <stdexcept>
#include <tuple>

namespace vattention {

const PrefixCache::Entry* PrefixCache::find(PrefixKey key) const {
  auto it = entries_.find(key);
  return it == entries_.end() ? nullptr : &it->second;
}

std::optional<PrefixKey> PrefixCache::key_of(PhysicalHandle handle) const {
  auto it = owners_.find(handle);
  if (it == owners_.end()) return std::nullopt;
  return it->second;
}

void PrefixCache::insert(PrefixKey key, std::size_t page, const std::vector<PhysicalHandle>& handles) {
  restore(key, Entry{page, handles, ++clock_});
}

void PrefixCache::restore(PrefixKey key, const Entry& entry) {
  if (entries_.count(key) != 0) throw std::logic_error("prefix cache: key registered twice");
  for (PhysicalHandle handle : entry.handles) {
    if (owners_.count(handle) != 0) throw std::logic_error("prefix cache: a page registered twice");
  }
  for (PhysicalHandle handle : entry.handles) owners_[handle] = key;
  entries_[key] = entry;
  ++depths_[entry.page];
}

PrefixCache::Entry PrefixCache::erase(PrefixKey key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) throw std::logic_error("prefix cache: erasing an unknown key");
  Entry entry = std::move(it->second);
  entries_.erase(it);
  for (PhysicalHandle handle : entry.handles) owners_.erase(handle);
  if (--depths_[entry.page] == 0) depths_.erase(entry.page);
  return entry;
}

void PrefixCache::touch(const std::vector<PrefixKey>& keys) {
  ++clock_;
  for (PrefixKey key : keys) {
    auto it = entries_.find(key);
    if (it != entries_.end()) it->second.last_used = clock_;
  }
}

std::vector<PrefixKey> PrefixCache::eviction_order() const {
  std::vector<std::tuple<std::uint64_t, std::size_t, PrefixKey>> order;
  for (const auto& [key, entry] : entries_) order.emplace_back(entry.last_used, SIZE_MAX - entry.page, key);
  std::sort(order.begin(), order.end());
  std::vector<PrefixKey> keys;
  for (const auto& item : order) keys.push_back(std::get<2>(item));
  return keys;
}

void PrefixCache::clear() {
  entries_.clear();
  owners_.clear();
  depths_.clear();
}

}  // namespace vattention
