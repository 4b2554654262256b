// Prefix sharing in the PageManager: one physical page mapped at the same page
// index of several slots, registered in a prefix cache by content.
//
//   buffer k[0]:  | slot 0: AB#_______ | slot 1: AB##______ | slot 2: ____________ |
//                   A, B: pages of the prefix cache, one physical page each, mapped in slots 0 and 1
//                   #: private pages
//
// Reference counts: a cached page is held by the cache and by every slot that
// maps it; unmapping it drops one mapping, and only an eviction (of a page no
// slot maps) returns it to the pool. A private page is mapped once or pooled.
// Cached pages are read-only: a slot's cached pages lie below its length when
// it is active, and check_write() refuses a write range that starts in one.
#include <algorithm>
#include <string>

#include "page_manager.h"

namespace vattention {

std::size_t PageManager::tokens_per_page() const {
  if (!driver_->can_alias() || geometry_.page_bytes % geometry_.token_bytes != 0) return 0;
  return geometry_.page_bytes / geometry_.token_bytes;
}

std::size_t PageManager::cached_run(const std::vector<PrefixKey>& keys) const {
  std::size_t run = 0;
  while (run < keys.size()) {
    const PrefixCache::Entry* entry = prefix_.find(keys[run]);
    if (entry == nullptr || entry->page != run) break;
    ++run;
  }
  return run;
}

std::size_t PageManager::reusable_pages(std::size_t slot, const std::vector<PrefixKey>& keys,
                                        std::size_t shared) const {
  const auto& pages = slots_[slot].pages;
  if (!pages.empty() && mapped_in(pages.front()) < geometry_.num_buffers) {
    return 0;  // unmapped behind a window (holes are leading pages): the next request starts at page 0
  }
  std::size_t p = 0;
  for (; p < pages.size(); ++p) {
    const std::optional<EntryId> id = prefix_.entry_of(pages[p].front());
    if (p < shared ? (!id || prefix_.at(*id).key != keys[p]) : id.has_value()) break;
  }
  return p;
}

std::unordered_map<EntryId, std::size_t> PageManager::cache_mappings() const {
  std::unordered_map<EntryId, std::size_t> counts;
  if (prefix_.size() == 0) return counts;
  // Cached pages lie below the cache's depth in every slot: the statistics of every step stay cheap.
  const std::size_t depth = prefix_.depth();
  for (const Slot& slot : slots_) {
    for (std::size_t p = 0; p < std::min(depth, slot.pages.size()); ++p) {
      if (auto id = prefix_.entry_of(page_handle(slot.pages[p]))) ++counts[*id];
    }
  }
  return counts;
}

void PageManager::evict_unmapped(std::size_t needed, const std::vector<PrefixKey>& kept) {
  if (pool_.headroom() >= needed || prefix_.size() == 0) return;
  const auto mappings = cache_mappings();
  for (EntryId id : prefix_.eviction_order()) {
    const std::optional<PrefixKey> key = prefix_.at(id).key;
    if (mappings.count(id) != 0 || (key && std::find(kept.begin(), kept.end(), *key) != kept.end())) continue;
    PrefixCache::Entry entry = prefix_.erase(id);
    pool_.put(entry.handles);
    pages_evicted_total_ += entry.handles.size();
    evicted_log_.emplace_back(id, std::move(entry));
    if (pool_.headroom() >= needed) return;
  }
}

void PageManager::map_cached(std::size_t slot, const std::vector<PrefixKey>& keys, std::size_t last) {
  std::vector<std::vector<PhysicalHandle>> pages;
  for (std::size_t p = slots_[slot].pages.size(); p < last; ++p) pages.push_back(prefix_.find(keys[p])->handles);
  map_pages(slot, pages);  // if it fails, the pages stay with the cache
}

std::size_t PageManager::publish(int slot, const std::vector<PrefixKey>& keys) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  check_slot(slot);
  const Slot& state = slots_[slot];
  if (!state.active) throw std::invalid_argument("slot " + std::to_string(slot) + " holds no request to publish");
  const std::size_t tokens = tokens_per_page();
  if (tokens == 0 || keys.empty()) return 0;
  if (keys.size() > state.length / tokens) {
    throw std::invalid_argument("publishing " + std::to_string(keys.size()) + " pages of slot " + std::to_string(slot) +
                                " needs " + std::to_string(keys.size() * tokens) + " written tokens but it holds " +
                                std::to_string(state.length) + ": publish only full pages");
  }
  // Pages unmapped behind a window cannot be shared (a request maps a prefix from page 0).
  if (state.pages.empty() || mapped_in(state.pages.front()) < geometry_.num_buffers) return 0;
  // Checked first, so that a refusal changes nothing.
  for (std::size_t p = 0; p < keys.size(); ++p) {
    const std::optional<EntryId> id = prefix_.entry_of(state.pages[p].front());
    const std::optional<PrefixKey> key = id ? prefix_.at(*id).key : std::nullopt;
    if (key && *key != keys[p]) {
      throw std::invalid_argument("page " + std::to_string(p) + " of slot " + std::to_string(slot) +
                                  " is cached under another key: pass the hash chain of the slot's own tokens");
    }
  }
  std::size_t registered = 0;
  for (std::size_t p = 0; p < keys.size(); ++p) {
    if (prefix_.find(keys[p]) != nullptr) continue;  // this page, or the same tokens computed elsewhere
    const std::optional<EntryId> id = prefix_.entry_of(state.pages[p].front());
    if (id) {
      prefix_.name(*id, keys[p]);  // a forked page: the cache keeps it from now on
    } else {
      prefix_.insert(keys[p], p, state.pages[p]);
    }
    ++registered;
  }
  prefix_.touch(keys);  // one tick for the whole prefix: its deepest pages go first
  return registered;
}

std::size_t PageManager::writable_from(int slot) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  check_slot(slot);
  return writable_from_locked(static_cast<std::size_t>(slot));
}

std::size_t PageManager::writable_from_locked(std::size_t slot) const {
  const auto& pages = slots_[slot].pages;
  for (std::size_t p = pages.size(); p-- > 0;) {
    // The first token that lies wholly after the page (a page may end inside a token).
    if (is_cached(pages[p])) return ((p + 1) * geometry_.page_bytes + geometry_.token_bytes - 1) / geometry_.token_bytes;
  }
  return 0;
}

void PageManager::check_write(int slot, std::size_t start) const {
  const std::size_t first = writable_from(slot);
  if (start < first) {
    throw std::invalid_argument("writing slot " + std::to_string(slot) + " from token " + std::to_string(start) +
                                " would overwrite its shared prefix (tokens 0.." + std::to_string(first - 1) +
                                " are cached pages, read-only): start at token " + std::to_string(first) +
                                " or later");
  }
}

std::size_t PageManager::cached_pages(const std::vector<PrefixKey>& keys) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  return tokens_per_page() == 0 ? 0 : cached_run(keys);
}

std::size_t PageManager::evict() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const std::uint64_t before = pages_evicted_total_;
  evict_unmapped(SIZE_MAX);  // no driver call: nothing to undo
  evicted_log_.clear();
  return static_cast<std::size_t>(pages_evicted_total_ - before);
}

}  // namespace vattention
